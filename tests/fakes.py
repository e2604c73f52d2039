"""Fakes shared by the tests: scripted engines and detectors, and a free port.

The middle test layer runs the real WebSocket server with `ScriptedWhisper`, so that a
test of the protocol, limits, auth, faults or shutdown does not depend on Whisper's
words (which change with a CPU's kernels) and runs in a fraction of the time.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Sequence

import numpy as np

from streaming.engine import DecodeRequest, EngineCapabilities, Hypothesis, Word

SR = 16_000
SLOT_S = 0.5  # ScriptedWhisper hears one word per half second of loud audio
LOUD_RMS = 0.01


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EnergyClassifier:
    """A VAD frame classifier that calls loud frames speech: exact in the core's tests."""

    def __init__(self, threshold: float = 1e-4) -> None:
        self.threshold = threshold

    def is_speech(self, frame: np.ndarray) -> bool:
        return float(np.mean(np.square(frame))) > self.threshold


def scripted_word(index: int) -> str:
    return f"w{index}"


def scripted_words(text: str, at_least: int = 3) -> bool:
    """Whether a transcript is what ScriptedWhisper says of speech: w1 w2 ... (at least
    `at_least` words; the first half second is often the VAD's padding, not speech)."""
    words = text.split()
    return len(words) >= at_least and all(re.fullmatch(r"w\d+", w) for w in words)


class ScriptedWhisper:
    """An engine that hears word `wN` in the N-th half second of a window wherever that
    half second is loud, and keeps the forced prefix as the `Engine` contract says.

    Deterministic and instant, so the server's tests check transport and limits, not
    Whisper's words. `fail_if(request)` true makes that window fail (an engine fault);
    `gate` (cleared) holds every model call until it is set.
    """

    name = "scripted"
    capabilities = EngineCapabilities()

    def __init__(self, fail_if: Callable[[DecodeRequest], bool] | None = None) -> None:
        self.fail_if = fail_if
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()

    def transcribe(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        self.gate.wait(30)
        self.calls += 1
        if self.fail_if is not None and any(self.fail_if(r) for r in requests):
            raise RuntimeError("simulated engine fault")
        return [self._one(r) for r in requests]

    @staticmethod
    def _one(request: DecodeRequest) -> Hypothesis:
        slot = round(SLOT_S * SR)
        audio = np.asarray(request.audio, np.float32)
        words = []
        for i in range(len(audio) // slot):
            part = audio[i * slot : (i + 1) * slot]
            if float(np.sqrt(np.mean(np.square(part)))) > LOUD_RMS:
                words.append(
                    Word(f" {scripted_word(i)}", i * SLOT_S, i * SLOT_S + 0.4, 0.9, (1000 + i,))
                )
        forced = list(request.prefix_tokens)
        heard = [w.tokens[0] for w in words[: len(forced)]]
        if heard != forced:  # keep the promise: the promised words, then what follows
            end = len(audio) / SR
            kept = [Word(f" {scripted_word(t - 1000)}", end, end, 0.9, (t,)) for t in forced]
            words = kept + [w for w in words if w.tokens[0] > max(forced, default=-1)]
        return Hypothesis(tuple(words), no_speech_prob=0.01, avg_logprob=-0.2)
