"""One decoding step, timed on each engine: `python -m server.bench.step FILE.wav`.

A micro-benchmark of what the session asks the engine at every step: a window of audio
(`--window-s`, from the start of the file) with a forced prefix of promised tokens
(`--prefix-tokens`). The prefix is the start of the file's own transcript (of its first
MAX_WINDOW_S), so a long prefix may promise more than the window holds: the decoder then
goes on with a few invented tokens that the guards then drop ("new" counts the tokens
kept), and the figure is mostly what reading the prefix costs; a window long enough to
hold the prefix (`--window-s 11` on the test speech for 30 tokens) is the realistic
case. Each engine runs with one thread, one request a call, `--repeat` times; the table
gives the median CPU seconds of the process per step (and wall seconds): run it on a
quiet machine. The full streaming comparison is `whisperstream bench` with a
`--variant` per engine (see README.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from server.bench.machine import machine_line
from server.bench.manifest import read_audio_16k
from server.config import ModelSection
from server.engines import build_engine
from server.engines.decoding import MAX_WINDOW_S
from streaming.engine import DecodeRequest, Engine

RATE = 16_000


def time_step(engine: Engine, request: DecodeRequest, repeat: int) -> dict[str, Any]:
    """Median CPU and wall seconds of `repeat` calls (after one to warm up), and the new
    tokens of the hypothesis (after the engine's guards)."""
    engine.transcribe([request])  # warm-up: first-call allocations, lazy initialisation
    cpu, wall, new = [], [], 0
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        hypothesis = engine.transcribe([request])[0]
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        new = len(hypothesis.tokens) - len(request.prefix_tokens)
    return {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall), "new_tokens": new}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.bench.step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("wav", type=Path)
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--prefix-tokens", type=int, nargs="+", default=[0, 30])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--engines", nargs="+", default=["ctranslate2", "torch"])
    parser.add_argument(
        "--compute-type",
        nargs="+",
        default=["int8"],
        help="compute types to time (each on each engine)",
    )
    args = parser.parse_args(argv)
    audio = read_audio_16k(args.wav)
    window = audio[: int(args.window_s * RATE)]
    reference = build_engine(ModelSection(engine="ctranslate2", cpu_threads=1, workers=1))
    transcript = reference.transcribe([DecodeRequest(audio[: int(MAX_WINDOW_S * RATE)])])[0]
    tokens = transcript.tokens
    print(
        f"CPU: {machine_line()}; window {len(window) / RATE:.1f} s of {args.wav.name}; "
        f"median of {args.repeat}, one thread per engine"
    )
    print(f"{'engine':<12} {'compute':<9} {'prefix':>6} {'new':>4} {'CPU s':>7} {'wall s':>7}")
    for compute_type in args.compute_type:
        for name in args.engines:
            engine = build_engine(
                ModelSection(engine=name, compute_type=compute_type, cpu_threads=1, workers=1)
            )
            for count in args.prefix_tokens:
                request = DecodeRequest(window, prefix_tokens=tuple(tokens[:count]))
                r = time_step(engine, request, args.repeat)
                print(
                    f"{name:<12} {compute_type:<9} {len(request.prefix_tokens):>6} "
                    f"{r['new_tokens']:>4} {r['cpu_s']:>7.3f} {r['wall_s']:>7.3f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
