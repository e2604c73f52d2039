"""Promised words survive an engine that groups the forced prefix into words its own way."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from fakes import EnergyClassifier

from streaming.engine import DecodeRequest, Hypothesis, Word
from streaming.protocol import Final, Partial, Stop
from streaming.session import Session, SessionConfig

# Token ids: 1 " streaming", 2 " speech", 3 " recognition", 4 ",", 5 " spoken", 6 " words",
# 7 " turns". The engine first hears "streaming speech recognition turns", then revises
# to "streaming speech recognition, spoken words".
TEXT = {1: " streaming", 2: " speech", 3: " recognition", 4: ",", 5: " spoken", 6: " words",
        7: " turns"}
SCRIPT = [[1], [1, 2, 3, 7], [1, 2, 3, 7], [1, 2, 3, 4, 5, 6]]


class RegroupingEngine:
    """Groups tokens into words like CTranslate2Whisper: the forced prefix and the new
    text apart, a word starting at a leading space or at the start of either part. So a
    "," that arrives as new text is a word of its own, and joins the word before once it
    comes back inside the prefix."""

    name = "regrouping"

    def __init__(self) -> None:
        self.step = 0

    def transcribe(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        return [self._one(r) for r in requests]

    def _one(self, request: DecodeRequest) -> Hypothesis:
        script = SCRIPT[min(self.step, len(SCRIPT) - 1)]
        self.step += 1
        prefix = list(request.prefix_tokens)
        groups: list[list[int]] = []
        for part in (prefix, script[len(prefix):]):
            for i, t in enumerate(part):
                if TEXT[t].startswith(" ") or i == 0:
                    groups.append([t])
                else:
                    groups[-1].append(t)
        return Hypothesis(tuple(
            Word("".join(TEXT[t] for t in g), i * 0.3, i * 0.3 + 0.25, 0.9, tuple(g))
            for i, g in enumerate(groups)))


def test_promised_words_are_never_repeated_when_the_engine_regroups_them() -> None:
    session = Session("s", SessionConfig(), EnergyClassifier())
    engine = RegroupingEngine()
    audio = (np.ones(16_000 * 4) * 0.3 * 32767).astype("<i2")
    messages = []
    for offset in range(0, len(audio), 1600):
        session.receive_audio(audio[offset : offset + 1600].tobytes())
        while (job := session.next_job()) is not None:
            session.complete_job(job, engine.transcribe([job.request])[0])
        messages += session.take_messages()
    session.receive_message(Stop())
    while (job := session.next_job()) is not None:
        session.complete_job(job, engine.transcribe([job.request])[0])
    messages += session.take_messages()
    texts = [m.text for m in messages if isinstance(m, Partial | Final)]
    assert texts, "no partials or finals"
    for text in texts:
        assert text.count("streaming") <= 1, texts
    final = next(m for m in messages if isinstance(m, Final))
    assert final.text == "streaming speech recognition, spoken words"
