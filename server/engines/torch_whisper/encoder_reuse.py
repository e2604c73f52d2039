"""The encoder states a session's growing window keeps from one step to the next.

Whisper's encoder attends over the whole window, so strictly every position's state
changes when audio is appended; a session's live window grows by a step (0.3 s) and is
encoded whole each time. But a position's state barely changes once it has a couple of
seconds of audio after it. Measured on the 75 utterances of ../shared/speech/manifest.jsonl
(each decoded once whole from an encoder output built up in 0.3 s steps, tiny.en int8):
keeping positions once they are 1.5 / 2 / 3 s before the end gave WER 9.12 / 9.03 / 8.86 %
against 9.03 % for the window encoded whole. So a step encodes only the positions less
than `reuse_s` before the window's end (and those new since the last step); they attend
to the kept keys and values of the older ones (AudioEncoder.extend), whose output and
decoder cross-attention keys and values are kept too.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from server.engines.torch_whisper.model import KV

CAPACITY = 32  # windows kept: about two per session of 16; a 15 s window keeps ~18 MB


@dataclass
class KeptEncoding:
    """A window's first `positions` encoder positions, as computed by earlier steps."""

    audio: np.ndarray  # the last window they were used with: the next must extend it
    self_kv: list[KV]  # per encoder layer, [1, head, positions, state/head]
    output: Tensor  # [positions, state]
    cross_kv: list[KV]  # per decoder layer, [1, head, positions, state/head]

    @property
    def positions(self) -> int:
        return len(self.output)


class EncoderStates:
    """Kept encodings by stream key, the least recently used dropped first.

    A key stands for one live window of one session; `take` hands its encoding out only
    when the new window starts with the audio it was last used with (so a reused key,
    or a window that slid, starts over), and removes it meanwhile: the calls of
    several model workers never share one."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._kept: OrderedDict[str, KeptEncoding] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def take(self, key: str, audio: np.ndarray) -> KeptEncoding | None:
        with self._lock:
            kept = self._kept.pop(key, None)
        if kept is None:
            return None
        n = len(kept.audio)
        if len(audio) < n or not np.array_equal(audio[:n], kept.audio):
            return None
        return kept

    def put(self, key: str, kept: KeptEncoding) -> None:
        with self._lock:
            self._kept[key] = kept
            while len(self._kept) > self._capacity:
                self._kept.popitem(last=False)
