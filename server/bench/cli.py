"""The `whisperstream bench` command: accuracy and latency of streaming on real recordings.

For each run (a server configuration, `--variant`, at a number of simultaneous streams,
`--concurrency`) the files of a manifest are streamed at real-time pace through a server
(one the bench starts as a subprocess, or `--url`), and every message is recorded with its
arrival time. Wall time is measured from the moment audio time 0 was sent: the frame that
ends at audio time t is sent at wall time t / speed, as a microphone delivers it. With
more streams than files, files are streamed again so that that many run at once.

After the streaming (so that it never competes with the server for the CPU), the bench
loads the same Whisper model itself and computes, per file:

- the offline transcript: the whole file with the same engine, in one window when it is
  at most 28 s long, else in consecutive windows of 15 to 25 s cut at the quietest
  0.3 s, each with the previous window's text as the prompt (streaming/longform.py,
  which uploads to the OpenAI files API go through too);
- reference word times: forced alignment of the normalized reference text against the
  audio (the engine's `align_words`, the cross-attention alignment that gives the server
  its word times), window by window for long files (reference words are given to the
  offline window their offline match fell in), with word edges then pulled in from
  silence by the audio's energy (`trim_to_sound`).

Then, with words normalized by Whisper's English text normalizer and hypotheses aligned to
the reference with a Levenshtein alignment (jiwer), and the reference restricted to the
words that had started by the time a message arrived (plus SPOKEN_SLACK_S for alignment
error), each reference word gets three latencies (arrival minus the word's aligned end):

- first correct: the first partial or final after which the transcript so far (finals,
  then the open segment's partial) has this word as a hit, and also the (up to)
  CONTEXT_WORDS reference words before it that the finished transcript gets right;
- settled: the first message after which the settled transcript (finals, then the open
  segment's `stable` prefix) reaches this word (a hit or a substitution of it or of a
  later word), or the final that covers it, whichever is first;
- final: the first final after which the finals so far reach this word;

and each final gets the time from the aligned end of the last reference word it covers to
its arrival. A partial revision is a partial whose words (lower case, punctuation dropped)
do not extend the previous partial of its segment; a `stable` retraction is a partial or
final whose text does not start with the segment's last `stable`.

A lost phrase is a run of LOST_PHRASE_WORDS (3) or more consecutive reference words that
the offline transcript of the same run gets (each aligned as a hit) and the streamed finals
do not (none of them a hit): words the model could hear that streaming lost. They are
listed per file (`lost_phrases`, with the first word's index and the aligned times) and
counted in the table; `--from` computes them from the stored messages and a new offline
pass, so reports from before they were counted get them too.

Cost: the server process's CPU seconds (all threads) and peak RSS; and, from the server's
/metrics, its model steps (partial and final) and the wall seconds its model calls took,
each per second of audio streamed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.bench.errors import BenchError
from server.bench.machine import machine_line
from server.bench.manifest import load_manifests
from server.bench.offline import OFFLINE_METHOD, offline_pass
from server.bench.report import (
    bench_results,
    code_version,
    print_table,
    progress_display,
    run_figures,
    runs_from_report,
    write_json,
)
from server.bench.runner import ModelKey, stream_runs
from server.bench.scoring import normalize, word_errors
from server.bench.variants import Variant, parse_variant, variant_settings

if TYPE_CHECKING:
    from server.config import ModelSection


def add_subcommand(sub: Any) -> None:
    """`whisperstream bench ...`, for server.cli's parser."""
    p = sub.add_parser(
        "bench",
        help="stream a manifest of recordings through a server and measure it",
        description="Streams each file of a manifest at real-time pace through a server and "
        "prints WER (streamed and offline, same model), word latencies, revisions, and the "
        "server's CPU and memory. Definitions: the docstring of server/bench/cli.py.",
    )
    p.add_argument(
        "--manifest",
        type=Path,
        action="append",
        default=None,
        help="JSON lines with 'wav' (relative to the manifest) and 'text'; "
        "repeatable (a file listed twice is streamed once)",
    )
    p.add_argument(
        "--concurrency",
        default="1",
        help="streams at once; a comma-separated list runs each (e.g. 1,4); "
        "with more streams than files, files are streamed again",
    )
    p.add_argument("--speed", type=float, default=1.0, help="pace relative to real time")
    p.add_argument("--out", type=Path, default=None, help="write figures and raw log as JSON")
    p.add_argument("--limit", type=int, default=None, help="only the first K files")
    p.add_argument(
        "--url",
        default=None,
        help="a running server (default: start one per variant on a free port)",
    )
    p.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="with --url: the server's process, for its CPU and memory",
    )
    p.add_argument("--api-key", default=None, help="with --url: the server's API key")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file for the started server and the offline model",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[:KEY=VAL,...]",
        help="a server configuration to run, one after another; KEY is a config "
        "key (streaming.step_s) or a WHISPERSTREAM_ variable; repeatable",
    )
    p.add_argument(
        "--from",
        dest="from_report",
        type=Path,
        default=None,
        metavar="R.json",
        help="no streaming: analyse again the message log of an earlier --out",
    )
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    w = p.add_argument_group(
        "Wyoming",
        "--wyoming: each file as one Home Assistant voice command over Wyoming, "
        "whisperstream and each --peer in turn; definitions: server/bench/wyoming.py",
    )
    w.add_argument(
        "--wyoming",
        action="store_true",
        help="measure Wyoming speech to text (with --url: tcp://HOST:PORT)",
    )
    w.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="another Wyoming server to measure, started from COMMAND with "
        "{port} in it; repeatable",
    )
    w.add_argument(
        "--stop-silence-s",
        type=float,
        default=0.7,
        help="audio-stop this long after the last speech, as a satellite's VAD "
        "sends it; 0: the whole file (default 0.7, Home Assistant's)",
    )
    p.add_argument(
        "--api",
        choices=("native", "openai-realtime"),
        default="native",
        help="stream through the native protocol (/v1/stream) or OpenAI's Realtime "
        "transcription API (compat listener; with --url, its ws:// base)",
    )
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        if args.wyoming:
            from server.bench.wyoming import cmd_wyoming_bench

            return cmd_wyoming_bench(args)
        if args.peer:
            raise BenchError("--peer goes with --wyoming")
        return _bench(args)
    except BenchError as exc:
        print(f"whisperstream bench: {exc}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    if (args.manifest is None) == (args.from_report is None):
        raise BenchError(
            "give --manifest M.jsonl (to stream) or --from R.json (to analyse an earlier run again)"
        )
    if args.speed <= 0:
        raise BenchError("--speed must be above 0: latency needs real-time pacing")
    try:
        levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    except ValueError:
        raise BenchError("--concurrency takes numbers, e.g. 1 or 1,4") from None
    if not levels or min(levels) < 1:
        raise BenchError("--concurrency must be at least 1")
    variants = [parse_variant(v) for v in args.variant] or [Variant("default")]
    if len({v.name for v in variants}) != len(variants):
        raise BenchError("--variant names must differ")
    if args.url and (len(variants) > 1 or variants[0].env):
        raise BenchError("--variant starts its own servers; leave out --url")
    if args.server_pid is not None and not args.url:
        raise BenchError("--server-pid goes with --url")

    console = Console(stderr=True)
    with (
        progress_display(console) as progress,
        tempfile.TemporaryDirectory(prefix="whisperstream-bench-") as tmp,
    ):
        if args.from_report is not None:
            runs, earlier = runs_from_report(args.from_report, args.config)
            manifest, speed = str(earlier.get("manifest")), float(earlier.get("speed", 1.0))
            items = [r.item for r in runs[0].records]
            code, command = earlier.get("code"), earlier.get("command")
            settings = {r.variant.name: variant_settings(args.config, r.variant) for r in runs}
        else:
            items = load_manifests(args.manifest, args.limit)
            manifest, speed = ", ".join(str(m) for m in args.manifest), args.speed
            code, command = code_version(), sys.argv
            settings = {v.name: variant_settings(args.config, v) for v in variants}
            runs = stream_runs(
                items,
                variants,
                levels,
                settings,
                args.speed,
                progress,
                Path(tmp),
                url=args.url,
                server_pid=args.server_pid,
                api_key=args.api_key,
                config=args.config,
                api=args.api,
            )
        # After the servers have stopped, so that it does not compete with them.
        offline_models: dict[ModelKey, ModelSection] = {}
        for run in runs:  # each model once, in the order of the runs
            offline_models.setdefault(run.model_key, settings[run.variant.name].model)
        offline = offline_pass(offline_models, items, progress)

    per_run = []
    for run in runs:
        results = offline[run.model_key]
        counted = [
            (word_errors(normalize(i.text), normalize(results[i.id].text)), len(normalize(i.text)))
            for i in items
        ]
        totals = (sum(e for e, _ in counted), sum(n for _, n in counted))
        figures, files = run_figures(run, results, totals, speed)
        per_run.append((run, figures, files))

    figures_list = [f for _, f, _ in per_run]
    models = sorted({f["model"] for f in figures_list if f["model"]})
    no_server = all(not r.server for r in runs)
    caption = (
        f"{len(items)} files from {manifest}, speed {speed:g}, "
        f"model {', '.join(models) or 'n/a'}, {machine_line()}"
        + ("; server CPU and RSS: n/a (pass --server-pid)" if no_server else "")
        + f".\nOffline: {OFFLINE_METHOD}. Latencies: wall seconds from the end of the word "
        "in the audio (forced alignment of the reference) to the message's arrival."
    )
    print_table(figures_list, caption, args.markdown)
    if args.out is not None:
        report = bench_results(
            per_run,
            offline,
            command=command,
            analysed_by=sys.argv if args.from_report is not None else None,
            manifest=manifest,
            speed=speed,
            code=code,
            definitions=__doc__,
        )
        write_json(args.out, report, ensure_ascii=False)
        console.print(f"wrote {args.out}")
    return 1 if any(f["failed_sessions"] for f in figures_list) else 0
