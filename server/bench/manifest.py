"""Manifests (JSON lines of recordings and their reference text) and their audio."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.bench.errors import BenchError

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Item:
    id: str
    wav: Path
    text: str


def load_manifest(path: Path, limit: int | None = None, need_text: bool = True) -> list[Item]:
    """JSON lines with `wav` (relative to the manifest's folder) and `text` (optional
    without `need_text`)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BenchError(f"cannot read the manifest {path}: {exc.strerror or exc}") from None
    items: list[Item] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            wav = Path(row["wav"])
            text = str(row["text"] if need_text else row.get("text", ""))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            wanted = "'wav' and 'text'" if need_text else "'wav'"
            raise BenchError(
                f"{path}:{number}: expected a JSON object with {wanted} ({exc})"
            ) from None
        wav = wav if wav.is_absolute() else path.parent / wav
        if not wav.is_file():
            raise BenchError(f"{path}:{number}: no such file {wav}")
        items.append(Item(str(row.get("id") or wav.stem), wav, text))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise BenchError(f"{path} lists no files")
    return items


def load_manifests(paths: Sequence[Path], limit: int | None = None) -> list[Item]:
    """The files of several manifests in order, each recording once (the first listing)."""
    items: list[Item] = []
    seen: set[Path] = set()
    for path in paths:
        for item in load_manifest(path):
            wav = item.wav.resolve()
            if wav not in seen:
                seen.add(wav)
                items.append(item)
    return items[:limit] if limit is not None else items


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """A recording's samples (float32 mono) and sample rate (streaming.audio.read_wav)."""
    from streaming.audio import AudioFormatError, read_wav

    try:
        return read_wav(Path(path).read_bytes(), str(path))
    except OSError as exc:
        raise BenchError(f"cannot read {path}: {exc.strerror or exc}") from None
    except AudioFormatError as exc:
        raise BenchError(str(exc)) from None


def read_pcm(path: Path) -> tuple[bytes, int]:
    """A recording as the 16-bit PCM it is streamed as, and its sample rate."""
    from streaming.audio import to_pcm_s16le

    samples, rate = read_audio(path)
    return to_pcm_s16le(samples), rate


def read_audio_16k(path: Path) -> np.ndarray:
    """A recording at the model's 16 kHz, for the offline baseline."""
    import numpy as np
    import soxr

    audio, rate = read_audio(path)
    if rate != 16_000:
        audio = soxr.resample(audio, rate, 16_000).astype(np.float32)
    return audio


def stream_duration(item: Item) -> float:
    """The seconds of audio a file streams."""
    samples, rate = read_audio(item.wav)
    return len(samples) / rate
