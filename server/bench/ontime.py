"""Streaming with every step on time: `python -m server.bench.ontime --manifest M --variant V`.

Each file goes through the sans-I/O session as the server drives it, except that the
engine answers each step before the next 20 ms of audio arrives: no step is skipped, and
nothing depends on how fast the machine is or what else runs on it. So two policies
compare on their words alone (WER of the finals), and a rerun on the same CPU gives the
same figures; a real-time run (`whisperstream bench`) differs by a few words from run to
run as steps are skipped. How soon words come and what they cost is that bench's to
measure, at real-time pace; this one says what a policy does to the words.
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
from server.bench.scoring import normalize, word_errors
from server.bench.variants import Variant, parse_variant, variant_settings
from server.host import configured_session, frame_classifier
from streaming.audio import to_pcm_s16le
from streaming.engine import Engine
from streaming.protocol import Final, Stop
from streaming.session import Session

FRAME_BYTES = 640  # 20 ms of 16 kHz pcm_s16le, a browser's frame


@dataclass
class Replayed:
    text: str
    steps: int  # engine calls, partial and final


def replay(session: Session, engine: Engine, pcm: bytes) -> Replayed:
    """Stream `pcm` (16 kHz pcm_s16le) through `session`, each job answered at once."""
    steps = 0

    def answer() -> None:
        nonlocal steps
        while (job := session.next_job()) is not None:
            session.complete_job(job, engine.transcribe([job.request])[0])
            steps += 1

    for offset in range(0, len(pcm), FRAME_BYTES):
        session.receive_audio(pcm[offset : offset + FRAME_BYTES])
        answer()
    session.receive_message(Stop())
    answer()
    if not session.done:
        raise BenchError("the session did not finish after its audio")
    finals = [m.text for m in session.take_messages() if isinstance(m, Final) and m.text]
    return Replayed(" ".join(finals), steps)


def run_variant(
    variant: Variant, config: Path | None, manifests: Sequence[tuple[Path, list[Item]]]
) -> dict[str, Any]:
    """Every file of every manifest through one variant's engine and session settings."""
    from server.engines import build_engine

    settings = variant_settings(config, variant)
    engine = build_engine(settings.model)
    session_config = configured_session(settings)  # 16 kHz pcm_s16le, as replay sends
    files: list[dict[str, Any]] = []
    cpu0 = time.process_time()
    for manifest, items in manifests:
        for item in items:
            audio = read_audio_16k(item.wav)
            session = Session(item.id, session_config, frame_classifier(session_config.vad))
            replayed = replay(session, engine, to_pcm_s16le(audio))
            ref = normalize(item.text)
            files.append(
                {
                    "manifest": str(manifest),
                    "id": item.id,
                    "words": len(ref),
                    "errors": word_errors(ref, normalize(replayed.text)),
                    "steps": replayed.steps,
                    "audio_s": round(len(audio) / 16_000, 3),
                    "text": replayed.text,
                }
            )
    return {
        "variant": variant.name,
        "overrides": variant.env,
        "cpu_s": round(time.process_time() - cpu0, 1),
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
    return "\n".join(lines)


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
        runs = [run_variant(v, args.config, manifests) for v in variants]
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
