"""The offline baseline: each file transcribed whole (or window by window) with the same
model as the server, and the reference words force-aligned to the audio."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.bench.manifest import Item, read_audio_16k
from server.bench.scoring import RefWord, align, normalize
from streaming.longform import METHOD, quiet_cuts, window_request

__all__ = [
    "OFFLINE_METHOD",
    "OfflineResult",
    "offline_pass",
    "offline_transcribe",
    "quiet_cuts",
    "reference_times",
    "trim_to_sound",
]

if TYPE_CHECKING:
    import numpy as np

    from server.bench.runner import ModelKey
    from server.config import ModelSection
    from server.engines import WhisperEngine

TRIM_DROP_DB = 40.0  # see trim_to_sound
TRIM_FLOOR_DB = 10.0
OFFLINE_METHOD = METHOD  # the windows and prompts of streaming/longform.py, as uploads get


@dataclass
class OfflineResult:
    text: str
    windows: list[tuple[float, float]]
    ref: list[RefWord]
    # CPU seconds of the transcription (not of the reference alignment), and the audio's
    # length: the baseline the server's CPU per audio second is held against.
    cpu_s: float = 0.0
    audio_s: float = 0.0


def offline_transcribe(
    engine: WhisperEngine, audio: np.ndarray
) -> tuple[list[tuple[int, int]], list[str]]:
    """The windows and their texts."""
    windows = quiet_cuts(audio)
    texts: list[str] = []
    for window in windows:
        request = window_request(audio, window, texts[-1] if texts else "")
        texts.append(engine.transcribe([request])[0].text)
    return windows, texts


def reference_times(
    engine: WhisperEngine,
    audio: np.ndarray,
    ref_words: list[str],
    windows: list[tuple[int, int]],
    window_texts: list[str],
) -> list[RefWord]:
    """Forced alignment of the reference words, window by window."""
    if not ref_words:
        return []
    owner = [0] * len(ref_words)
    if len(windows) > 1:
        tagged = [(w, word) for w, text in enumerate(window_texts) for word in normalize(text)]
        alignment = align(ref_words, [word for _, word in tagged])
        known = [tagged[j][0] if j is not None else None for _, j in alignment]
        last = next((w for w in known if w is not None), 0)
        for i, w in enumerate(known):
            last = w if w is not None else last
            owner[i] = last
    out: list[RefWord] = []
    for w, (start, end) in enumerate(windows):
        group = [word for word, o in zip(ref_words, owner, strict=True) if o == w]
        if not group:
            continue
        offset = start / 16_000
        aligned = engine.align_words(audio[start:end], group)
        out.extend(
            RefWord(word, offset + a.start_s, offset + a.end_s)
            for word, a in zip(group, aligned, strict=True)
        )
    return trim_to_sound(out, audio)


def trim_to_sound(words: list[RefWord], audio: np.ndarray, rate: int = 16_000) -> list[RefWord]:
    """Pull aligned word edges in from silence.

    The alignment's word boundaries are where its path jumps from one token to the next,
    so a word next to a pause tends to take part of the pause. Each word keeps the 10 ms
    frames from its first to its last within TRIM_DROP_DB of its own loudest frame and
    TRIM_FLOOR_DB above the recording's noise floor (its 10th percentile), and then at
    most twice the median word length (capped at 0.7 s), as faster-whisper does.
    """
    import numpy as np

    hop = rate // 100
    frames = len(audio) // hop
    if not words or frames == 0:
        return words
    power = np.square(audio[: frames * hop].astype(np.float64)).reshape(frames, hop).mean(1)
    db = 10 * np.log10(power + 1e-10)
    floor = float(np.percentile(db, 10))
    spans: list[tuple[float, float]] = []
    for w in words:
        a = min(int(w.start * 100), frames - 1)
        b = min(max(math.ceil(w.end * 100), a + 1), frames)
        span = db[a:b]
        loud = np.nonzero(span >= max(float(span.max()) - TRIM_DROP_DB, floor + TRIM_FLOOR_DB))[0]
        if len(loud):
            spans.append((max(w.start, (a + loud[0]) / 100), min(w.end, (a + loud[-1] + 1) / 100)))
        else:
            spans.append((w.start, w.end))
    longest = 2 * min(float(np.median([e - s for s, e in spans])), 0.7)
    return [
        RefWord(w.word, s, max(s, min(e, s + longest)))
        for w, (s, e) in zip(words, spans, strict=True)
    ]


def offline_pass(
    models: dict[ModelKey, ModelSection],
    items: Sequence[Item],
    progress: Any,
) -> dict[ModelKey, dict[str, OfflineResult]]:
    """Offline transcripts per model (in the order given), and the reference times (from
    the first model)."""
    from server.engines import build_engine

    offline: dict[ModelKey, dict[str, OfflineResult]] = {}
    for key, model in models.items():
        engine = build_engine(model)
        task = progress.add_task(f"offline {engine.name}", total=len(items), audio="")
        first = next(iter(offline.values()), None)
        results: dict[str, OfflineResult] = {}
        for item in items:
            audio = read_audio_16k(item.wav)
            began = time.process_time()
            windows, texts = offline_transcribe(engine, audio)
            cpu_s = time.process_time() - began
            ref = (
                first[item.id].ref
                if first is not None
                else reference_times(engine, audio, normalize(item.text), windows, texts)
            )
            results[item.id] = OfflineResult(
                " ".join(t for t in texts if t),
                [(a / 16_000, b / 16_000) for a, b in windows],
                ref,
                cpu_s=cpu_s,
                audio_s=len(audio) / 16_000,
            )
            progress.advance(task)
        offline[key] = results
    return offline
