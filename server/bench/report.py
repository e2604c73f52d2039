"""What the bench shows and keeps: the figures of a run, its table, the JSON results (and
reading them back for `--from`), a progress display and the version of the code measured."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path
from typing import Any

from server.bench.errors import BenchError
from server.bench.machine import machine_record
from server.bench.manifest import Item
from server.bench.offline import OFFLINE_METHOD, OfflineResult
from server.bench.runner import ModelKey, RunResult, StreamRecord, model_key_of
from server.bench.scoring import (
    LATENCY_KINDS,
    analyse_session,
    lost_phrases,
    normalize,
    percentile,
    speech_seconds,
    word_errors,
)
from server.bench.variants import Variant, variant_settings


def rounded(x: float | None, digits: int = 3) -> float | None:
    """`x` rounded for the results; None for None and for what is not finite."""
    return None if x is None or not math.isfinite(x) else round(x, digits)


def run_figures(
    run: RunResult,
    offline: dict[str, OfflineResult],
    offline_errors: tuple[int, int],
    speed: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The figures of one run, and its per-file log."""
    files: list[dict[str, Any]] = []
    errors = ref_total = 0
    audio_s = speech_s = 0.0
    partials = revisions = retractions = segments = failed = server_errors = 0
    lost_total = 0
    pooled: dict[str, list[float]] = {k: [] for k in LATENCY_KINDS}
    unreached = {k: 0 for k in ("first_correct", "settled", "final")}
    for record in run.records:
        result = offline[record.item.id]
        ref_words = normalize(record.item.text)
        analysis = analyse_session(result.ref, record.messages, speed)
        hyp = normalize(analysis.transcript)
        file_errors = word_errors(ref_words, hyp)
        # The reference words are normalized as result.ref's, so its times index them.
        lost = [
            {
                "words": " ".join(ref_words[a:b]),
                "ref_index": a,
                "length": b - a,
                "start": round(result.ref[a].start, 3),
                "end": round(result.ref[b - 1].end, 3),
            }
            if len(result.ref) == len(ref_words)
            else {"words": " ".join(ref_words[a:b]), "ref_index": a, "length": b - a}
            for a, b in lost_phrases(ref_words, normalize(result.text), hyp)
        ]
        lost_total += len(lost)
        errors += file_errors
        ref_total += len(ref_words)
        audio_s += record.duration_s
        speech_s += speech_seconds(result.ref)
        partials += analysis.partials
        revisions += analysis.revisions
        retractions += analysis.retractions
        segments += analysis.segments
        server_errors += len(analysis.errors)
        failed += record.error is not None
        for kind in LATENCY_KINDS:
            pooled[kind] += analysis.latencies(kind)
        for kind in unreached:
            unreached[kind] += sum(v is None for v in getattr(analysis, kind))
        files.append(
            {
                "id": record.item.id,
                "wav": str(record.item.wav),
                # Unrounded: `--from` sums these again and must reach the same figures.
                "duration_s": record.duration_s,
                "reference": record.item.text,
                "transcript": analysis.transcript,
                "offline_transcript": result.text,
                "wer": rounded(file_errors / len(ref_words)) if ref_words else None,
                "lost_phrases": lost,
                "error": record.error,
                "close_code": record.close_code,
                "partials": analysis.partials,
                "revisions": analysis.revisions,
                "retractions": analysis.retractions,
                "words": [
                    {
                        "word": w.word,
                        "start": round(w.start, 3),
                        "end": round(w.end, 3),
                        **{k: rounded(getattr(analysis, k)[i]) for k in unreached},
                    }
                    for i, w in enumerate(result.ref)
                ],
                "segment_end_to_final": {
                    str(k): rounded(v) for k, v in analysis.segment_end_to_final.items()
                },
                "messages": [[t, m] for t, m in record.messages],
            }
        )
    speech_min = speech_s / 60
    cpu_s = run.server.get("cpu_s")
    baseline = [offline[i] for i in {r.item.id for r in run.records}]  # files streamed again: once
    baseline_audio_s = sum(r.audio_s for r in baseline)
    offline_cpu = sum(r.cpu_s for r in baseline) / baseline_audio_s if baseline_audio_s else None
    server_cpu = cpu_s / audio_s if cpu_s is not None and audio_s else None
    model = run.server.get("model") or {}
    figures: dict[str, Any] = {
        "variant": run.variant.name,
        "overrides": run.variant.env,
        "concurrency": run.concurrency,
        "model": run.model_name,
        "files": len(run.records),
        "audio_s": round(audio_s, 2),
        "speech_s": round(speech_s, 2),
        "reference_words": ref_total,
        "wer": rounded(errors / ref_total, 4) if ref_total else None,
        "offline_wer": rounded(offline_errors[0] / offline_errors[1], 4)
        if offline_errors[1]
        else None,
        "lost_phrases": lost_total,
        "failed_sessions": failed,
        "server_errors": server_errors,
        "segments": segments,
        "partials": partials,
        "revisions": revisions,
        "revisions_per_speech_min": rounded(revisions / speech_min, 2) if speech_min else None,
        "stable_retractions": retractions,
        "words_never": unreached,
        "latency_s": {
            kind: {
                "p50": rounded(percentile(values, 50)),
                "p90": rounded(percentile(values, 90)),
                "n": len(values),
            }
            for kind, values in pooled.items()
        },
        "server_cpu_s": rounded(cpu_s),
        "server_cpu_s_per_audio_s": rounded(server_cpu, 4),
        "offline_cpu_s_per_audio_s": rounded(offline_cpu, 4),
        "server_cpu_vs_offline": rounded(server_cpu / offline_cpu, 2)
        if server_cpu is not None and offline_cpu
        else None,
        "model_steps_per_audio_s": {
            kind: rounded(model[f"steps_{kind}"] / audio_s, 3) if audio_s else None
            for kind in ("partial", "final")
            if f"steps_{kind}" in model
        },
        "model_busy_s_per_audio_s": rounded(model["model_s"] / audio_s, 4)
        if "model_s" in model and audio_s
        else None,
        "server_peak_rss_mb": round(run.server["peak_rss_bytes"] / 2**20, 1)
        if run.server.get("peak_rss_bytes")
        else None,
        "server_rss_source": run.server.get("rss_source"),
        "wall_s": round(run.wall_s, 1),
    }
    return figures, files


def table_rows(figures: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f} %"

    def lat(f: dict[str, Any], kind: str) -> str:
        entry = f["latency_s"][kind]
        if entry["p50"] is None:
            return "n/a"
        return f"{entry['p50']:.2f} / {entry['p90']:.2f} s"

    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    def steps(f: dict[str, Any]) -> str:
        per = f.get("model_steps_per_audio_s") or {}
        if not per:
            return "n/a"
        return f"{per.get('partial') or 0:.2f} + {per.get('final') or 0:.2f}"

    def delta(f: dict[str, Any]) -> str:
        if f["wer"] is None or f["offline_wer"] is None:
            return "n/a"
        return f"{100 * (f['wer'] - f['offline_wer']):+.1f} points"

    return [
        (
            "files / audio / speech",
            [
                f"{f['files']} / {f['audio_s'] / 60:.1f} / {f['speech_s'] / 60:.1f} min"
                for f in figures
            ],
        ),
        ("WER, streamed finals", [pct(f["wer"]) for f in figures]),
        ("WER, offline (same model)", [pct(f["offline_wer"]) for f in figures]),
        ("streamed - offline", [delta(f) for f in figures]),
        # Reports from before lost phrases were counted have none: "n/a" (--from counts).
        (
            "lost phrases",
            [
                str(f["lost_phrases"]) if f.get("lost_phrases") is not None else "n/a"
                for f in figures
            ],
        ),
        ("word → first correct p50 / p90", [lat(f, "first_correct") for f in figures]),
        ("word → settled p50 / p90", [lat(f, "settled") for f in figures]),
        ("word → final p50 / p90", [lat(f, "final") for f in figures]),
        ("segment end → final p50 / p90", [lat(f, "segment_end_to_final") for f in figures]),
        (
            "partial revisions / min of speech",
            [num(f["revisions_per_speech_min"], ".1f") for f in figures],
        ),
        ("stable retractions", [str(f["stable_retractions"]) for f in figures]),
        ("server CPU s / audio s", [num(f["server_cpu_s_per_audio_s"], ".3f") for f in figures]),
        (
            "offline CPU s / audio s (same model)",
            [num(f.get("offline_cpu_s_per_audio_s"), ".3f") for f in figures],
        ),
        ("server CPU / offline CPU", [num(f.get("server_cpu_vs_offline"), ".2f") for f in figures]),
        ("model steps / audio s, partial + final", [steps(f) for f in figures]),
        (
            "model busy s / audio s",
            [num(f.get("model_busy_s_per_audio_s"), ".3f") for f in figures],
        ),
        (
            "server peak RSS",
            [
                num(f["server_peak_rss_mb"], ".0f") + " MB"
                if f["server_peak_rss_mb"] is not None
                else "n/a"
                for f in figures
            ],
        ),
        (
            "segments / failed sessions",
            [f"{f['segments']} / {f['failed_sessions']}" for f in figures],
        ),
    ]


def column_name(f: dict[str, Any]) -> str:
    return f"{f['variant']} ×{f['concurrency']}"


def markdown_table(figures: list[dict[str, Any]]) -> str:
    rows = table_rows(figures)
    lines = [
        "| | " + " | ".join(column_name(f) for f in figures) + " |",
        "|---|" + "---|" * len(figures),
    ]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]
    return "\n".join(lines)


def print_table(figures: list[dict[str, Any]], caption: str, markdown: bool) -> None:
    if markdown:
        print(markdown_table(figures))
        print(f"\n{caption}")
        return
    print_rows(
        "whisperstream bench", [column_name(f) for f in figures], table_rows(figures), caption
    )


def print_rows(
    title: str, columns: list[str], rows: list[tuple[str, list[str]]], caption: str
) -> None:
    """A table on stdout (rich): a label column, then one right-aligned column each."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("")
    for name in columns:
        table.add_column(name, justify="right")
    for label, values in rows:
        table.add_row(label, *values)
    Console().print(table)


def progress_display(console: Any) -> Any:
    """A rich progress display: one line a task, with its `audio` field."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[audio]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        refresh_per_second=2,
    )


def code_version() -> str | None:
    """The git commit of the code under test, with '+changes' when the tree differs."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if dirty.strip() else "")


def runs_from_report(path: Path, config: Path | None) -> tuple[list[RunResult], dict[str, Any]]:
    """The runs of an earlier --out, to analyse again, and that report."""
    try:
        report = json.loads(path.read_text())
        runs = []
        for run in report["runs"]:
            f = run["figures"]
            variant = Variant(f["variant"], dict(f.get("overrides") or {}))
            s = variant_settings(config, variant)
            server = run.get("server")
            if server is None:  # reports from before the raw figures were kept
                server = {
                    "cpu_s": f.get("server_cpu_s"),
                    "peak_rss_bytes": int((f.get("server_peak_rss_mb") or 0) * 2**20),
                    "rss_source": f.get("server_rss_source"),
                }
            records = [
                StreamRecord(
                    Item(file["id"], Path(file["wav"]), file["reference"]),
                    file["duration_s"],
                    [(t, m) for t, m in file["messages"]],
                    file.get("close_code"),
                    file.get("error"),
                )
                for file in run["files"]
            ]
            runs.append(
                RunResult(
                    variant,
                    int(f["concurrency"]),
                    records,
                    server,
                    model_key_of(s),
                    f.get("model", ""),
                    float(f.get("wall_s", 0.0)),
                )
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{path} is not a report of whisperstream bench --out ({exc})") from None
    if not runs:
        raise BenchError(f"{path} holds no runs")
    return runs, report


def bench_results(
    per_run: list[tuple[RunResult, dict[str, Any], list[dict[str, Any]]]],
    offline: dict[ModelKey, dict[str, OfflineResult]],
    *,
    command: Any,
    analysed_by: list[str] | None,
    manifest: str,
    speed: float,
    code: Any,
    definitions: str | None,
) -> dict[str, Any]:
    """The JSON results of `whisperstream bench --out`: figures, raw logs, offline texts."""
    return {
        "command": command,
        "analysed_by": analysed_by,
        "manifest": manifest,
        "speed": speed,
        "machine": machine_record(),
        "code": code,
        "offline_method": OFFLINE_METHOD,
        "definitions": definitions,
        "runs": [{"figures": f, "server": run.server, "files": files} for run, f, files in per_run],
        "offline": {
            "/".join(map(str, key)): {
                item_id: dataclasses.asdict(result) for item_id, result in results.items()
            }
            for key, results in offline.items()
        },
    }


def write_json(path: Path, data: dict[str, Any], ensure_ascii: bool = True) -> None:
    """`data` as indented JSON at `path`, its folder created if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=ensure_ascii) + "\n")
