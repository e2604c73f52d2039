"""Long recordings in windows Whisper can take: the benchmark's offline baseline
(server/bench/offline.py) and uploaded files (server/compat/openai_files.py) are cut and
prompted the same way, here.

A recording up to `SINGLE_WINDOW_S` is one window. A longer one is cut into windows of
`MIN_WINDOW_S` to `MAX_WINDOW_S`, each cut at the quietest `QUIET_SPAN_S` of its last
stretch (so a cut rarely splits a word), and each window after the first is prompted
with the text of the one before it.
"""

from __future__ import annotations

import numpy as np

from streaming.engine import DecodeRequest

SINGLE_WINDOW_S = 28.0  # longer recordings are transcribed window by window
MIN_WINDOW_S = 15.0
MAX_WINDOW_S = 25.0
QUIET_SPAN_S = 0.3  # the span whose energy picks a cut between windows
METHOD = (
    f"whole file when <= {SINGLE_WINDOW_S:g} s, else {MIN_WINDOW_S:g}-"
    f"{MAX_WINDOW_S:g} s windows cut at the quietest {QUIET_SPAN_S:g} s, previous "
    "window's text as prompt"
)


def quiet_cuts(
    audio: np.ndarray,
    rate: int = 16_000,
    min_s: float = MIN_WINDOW_S,
    max_s: float = MAX_WINDOW_S,
    single_s: float = SINGLE_WINDOW_S,
) -> list[tuple[int, int]]:
    """Windows (start, end sample) covering the audio, each cut at the quietest span."""
    total = len(audio)
    if total <= single_s * rate:
        return [(0, total)]
    hop = rate // 100
    frames = len(audio) // hop
    energy = np.square(audio[: frames * hop].astype(np.float64)).reshape(frames, hop).mean(1)
    span = max(1, int(QUIET_SPAN_S * 100))
    smooth = np.convolve(energy, np.ones(span) / span, mode="same")
    windows, start = [], 0
    while total - start > single_s * rate:
        lo, hi = (start + int(min_s * rate)) // hop, (start + int(max_s * rate)) // hop
        cut = (lo + int(np.argmin(smooth[lo:hi]))) * hop
        windows.append((start, cut))
        start = cut
    windows.append((start, total))
    return windows


def window_request(
    audio: np.ndarray,
    window: tuple[int, int],
    previous_text: str,
    *,
    prompt: str = "",
    language: str = "en",
) -> DecodeRequest:
    """The decode of one window: the previous window's text as its prompt (the first
    window gets `prompt`, a caller's own context, if any)."""
    start, end = window
    return DecodeRequest(audio[start:end], prompt=previous_text or prompt, language=language)
