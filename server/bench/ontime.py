"""Streaming with every step on time: `python -m server.bench.ontime --manifest M --variant V`.

Each file goes through the sans-I/O session as the server drives it, except that the
engine answers each step before the next 20 ms of audio arrives: no step is skipped, and
nothing depends on how fast the machine is or what else runs on it. So two policies
compare on their words alone (WER of the finals), and a rerun on the same CPU gives the
same figures; a real-time run (`whisperstream bench`) differs by a few words from run to
run as steps are skipped. It also gives the policy's own latencies: each message counts as
sent when the audio that let it out had come (no model time, no queue), against the
reference words' times force-aligned as the bench does; a real-time run adds the steps'
compute and queueing to these. It also gives the CPU of that replay (every step taken,
none skipped: what a stream costs when the machine keeps up) against the same engine's
offline transcription of the files, the real-time bench's baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.bench.errors import BenchError
from server.bench.machine import machine_line
from server.bench.manifest import Item, load_manifest, read_audio_16k
from server.bench.offline import offline_transcribe, reference_times
from server.bench.scoring import (
    RefWord,
    analyse_session,
    normalize,
    percentile,
    speech_seconds,
    word_errors,
)
from server.bench.variants import Variant, parse_variant, variant_settings
from server.host import configured_session, frame_classifier
from streaming.audio import to_pcm_s16le
from streaming.engine import Engine
from streaming.protocol import Final, ServerMessage, Stop
from streaming.session import Session

FRAME_BYTES = 640  # 20 ms of 16 kHz pcm_s16le, a browser's frame
BYTES_PER_S = 32_000
LATENCIES = ("first_correct", "settled", "segment_end_to_final")
LATENCY_LABELS = ("word → first correct", "word → settled", "segment end → final")


@dataclass
class Replayed:
    text: str
    steps: int  # engine calls, partial and final
    # Every message the session sent, as on the wire, with the audio time (s) that had
    # come when it was sent.
    messages: list[tuple[float, dict[str, Any]]]


def replay(session: Session, engine: Engine, pcm: bytes) -> Replayed:
    """Stream `pcm` (16 kHz pcm_s16le) through `session`, each job answered at once."""
    steps = 0
    sent: list[tuple[float, ServerMessage]] = []

    def answer(now_s: float) -> None:
        nonlocal steps
        while (job := session.next_job()) is not None:
            session.complete_job(job, engine.transcribe([job.request])[0])
            steps += 1
        sent.extend((now_s, m) for m in session.take_messages())

    for offset in range(0, len(pcm), FRAME_BYTES):
        session.receive_audio(pcm[offset : offset + FRAME_BYTES])
        answer(min(offset + FRAME_BYTES, len(pcm)) / BYTES_PER_S)
    session.receive_message(Stop())
    answer(len(pcm) / BYTES_PER_S)
    if not session.done:
        raise BenchError("the session did not finish after its audio")
    finals = [m.text for _, m in sent if isinstance(m, Final) and m.text]
    return Replayed(" ".join(finals), steps, [(t, m.to_dict()) for t, m in sent])


def run_variant(
    variant: Variant,
    config: Path | None,
    manifests: Sequence[tuple[Path, list[Item]]],
    references: dict[str, list[RefWord]],
) -> dict[str, Any]:
    """Every file of every manifest through one variant's engine and session settings.

    `references`: the reference words' times by file id, filled in by the first variant
    (with its engine) for those that follow."""
    from server.engines import build_engine

    settings = variant_settings(config, variant)
    engine = build_engine(settings.model)
    session_config = configured_session(settings)  # 16 kHz pcm_s16le, as replay sends
    files: list[dict[str, Any]] = []
    for manifest, items in manifests:
        for item in items:
            audio = read_audio_16k(item.wav)
            session = Session(item.id, session_config, frame_classifier(session_config.vad))
            started = time.process_time()
            replayed = replay(session, engine, to_pcm_s16le(audio))
            streamed_cpu = time.process_time() - started
            # The baseline, as the real-time bench's: the same engine transcribes the
            # file offline (its CPU is what streaming's is held against).
            started = time.process_time()
            windows, texts = offline_transcribe(engine, audio)
            offline_cpu = time.process_time() - started
            ref = normalize(item.text)
            if item.id not in references:
                references[item.id] = reference_times(engine, audio, ref, windows, texts)
            timed = references[item.id]
            analysis = analyse_session(timed, replayed.messages)
            files.append(
                {
                    "manifest": str(manifest),
                    "id": item.id,
                    "words": len(ref),
                    "errors": word_errors(ref, normalize(replayed.text)),
                    "steps": replayed.steps,
                    "cpu_s": round(streamed_cpu, 3),
                    "offline_cpu_s": round(offline_cpu, 3),
                    "audio_s": round(len(audio) / 16_000, 3),
                    "speech_s": round(speech_seconds(timed), 3),
                    "revisions": analysis.revisions,
                    **{kind: analysis.latencies(kind) for kind in LATENCIES},
                    "text": replayed.text,
                }
            )
    return {
        "variant": variant.name,
        "overrides": variant.env,
        "cpu_s": round(sum(f["cpu_s"] for f in files), 1),
        "files": files,
    }


def _wer(files: Sequence[dict[str, Any]]) -> str:
    words = sum(f["words"] for f in files)
    errors = sum(f["errors"] for f in files)
    return f"{100 * errors / words:.2f} % ({errors} / {words})" if words else "-"


def table(runs: Sequence[dict[str, Any]], manifests: Sequence[Path]) -> str:
    """WER of each variant's finals per manifest and over all files, as markdown."""
    lines = [
        "| | " + " | ".join(r["variant"] for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for manifest in manifests:
        cells = [_wer([f for f in r["files"] if f["manifest"] == str(manifest)]) for r in runs]
        lines.append(f"| WER, {manifest.name} | " + " | ".join(cells) + " |")
    if len(manifests) > 1:
        lines.append("| WER, all files | " + " | ".join(_wer(r["files"]) for r in runs) + " |")
    steps = []
    for r in runs:
        audio_s = sum(f["audio_s"] for f in r["files"])
        steps.append(f"{sum(f['steps'] for f in r['files']) / audio_s:.2f}" if audio_s else "-")
    lines.append("| model steps / audio s | " + " | ".join(steps) + " |")
    lines += _cpu_rows(runs)
    for kind, label in zip(LATENCIES, LATENCY_LABELS, strict=True):
        cells = [_percentiles([v for f in r["files"] for v in f[kind]]) for r in runs]
        lines.append(f"| {label} p50 / p90 | " + " | ".join(cells) + " |")
    rates = []
    for r in runs:
        speech_min = sum(f["speech_s"] for f in r["files"]) / 60
        revisions = sum(f["revisions"] for f in r["files"])
        rates.append(f"{revisions / speech_min:.1f}" if speech_min else "-")
    lines.append("| partial revisions / min of speech | " + " | ".join(rates) + " |")
    return "\n".join(lines)


def _cpu_rows(runs: Sequence[dict[str, Any]]) -> list[str]:
    """CPU per audio second of the replay (the session and every step's model call) and
    of the same engine's offline transcription of the files, and their ratio."""
    streamed, offline, ratio = [], [], []
    for r in runs:
        audio_s = sum(f["audio_s"] for f in r["files"])
        cpu = sum(f["cpu_s"] for f in r["files"])
        base = sum(f["offline_cpu_s"] for f in r["files"])
        streamed.append(f"{cpu / audio_s:.3f}" if audio_s else "-")
        offline.append(f"{base / audio_s:.3f}" if audio_s else "-")
        ratio.append(f"{cpu / base:.2f}" if base else "-")
    return [
        "| CPU s / audio s, every step | " + " | ".join(streamed) + " |",
        "| offline CPU s / audio s (same engine) | " + " | ".join(offline) + " |",
        "| streamed / offline CPU | " + " | ".join(ratio) + " |",
    ]


def _percentiles(values: Sequence[float]) -> str:
    p50, p90 = percentile(values, 50), percentile(values, 90)
    return "-" if p50 is None or p90 is None else f"{p50:.2f} / {p90:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.bench.ontime",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--manifest", type=Path, action="append", required=True)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME or NAME:KEY=VALUE,... as for whisperstream bench (default: the config)",
    )
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None, help="files of each manifest")
    parser.add_argument("--out", type=Path, default=None, help="the per-file texts, as JSON")
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variant] or [Variant("default")]
        if len({v.name for v in variants}) != len(variants):
            raise BenchError("--variant names must differ")
        manifests = [(m, load_manifest(m, args.limit)) for m in args.manifest]
        references: dict[str, list[RefWord]] = {}
        runs = [run_variant(v, args.config, manifests, references) for v in variants]
    except BenchError as exc:
        parser.exit(2, f"error: {exc}\n")
    report = {"machine": machine_line(), "runs": runs}
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
    print(f"Every step on time; {machine_line()}\n")
    print(table(runs, [m for m, _ in manifests]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
