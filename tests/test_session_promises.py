"""Promised words survive an engine that groups the forced prefix into words its own way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from fakes import EnergyClassifier

from streaming.engine import DecodeRequest, Hypothesis, Word
from streaming.policy import PolicyOptions
from streaming.protocol import Final, Partial, Stop
from streaming.session import Session, SessionConfig

# Token ids: 1 " streaming", 2 " speech", 3 " recognition", 4 ",", 5 " spoken", 6 " words",
# 7 " turns". The engine first hears "streaming speech recognition turns", then revises
# to "streaming speech recognition, spoken words".
TEXT = {
    1: " streaming",
    2: " speech",
    3: " recognition",
    4: ",",
    5: " spoken",
    6: " words",
    7: " turns",
}
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
        for part in (prefix, script[len(prefix) :]):
            for i, t in enumerate(part):
                if TEXT[t].startswith(" ") or i == 0:
                    groups.append([t])
                else:
                    groups[-1].append(t)
        return Hypothesis(
            tuple(
                Word("".join(TEXT[t] for t in g), i * 0.3, i * 0.3 + 0.25, 0.9, tuple(g))
                for i, g in enumerate(groups)
            )
        )


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


def test_words_read_as_the_text_when_punctuation_comes_as_a_word_of_its_own() -> None:
    # As CTranslate2Whisper groups them after the prefix "streaming speech recognition":
    # "," a word of its own. Deepgram's clients rebuild the transcript from the words.
    class LonePunctuationEngine:
        name = "lone-punctuation"

        def transcribe(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
            tokens = [1, 2, 3, 4, 5, 6]
            return [
                Hypothesis(
                    tuple(
                        Word(TEXT[t], i * 0.3, i * 0.3 + 0.25, 0.9, (t,))
                        for i, t in enumerate(tokens)
                    )
                )
                for _ in requests
            ]

    session = Session("s", SessionConfig(), EnergyClassifier())
    audio = (np.ones(16_000 * 4) * 0.3 * 32767).astype("<i2")
    messages, _ = _run(session, LonePunctuationEngine(), audio)
    shown = [m for m in messages if isinstance(m, Partial | Final) and m.text]
    assert any("recognition," in m.text for m in shown), [m.text for m in shown]
    for message in shown:
        assert [w.word for w in message.words] == message.text.split(), message
        assert all(w.start <= w.end for w in message.words), message


def _run(session: Session, engine: Any, audio: np.ndarray) -> tuple[list[Any], list[Any]]:
    messages, jobs = [], []
    for offset in range(0, len(audio), 1600):
        session.receive_audio(audio[offset : offset + 1600].tobytes())
        while (job := session.next_job()) is not None:
            jobs.append(job)
            session.complete_job(job, engine.transcribe([job.request])[0])
        messages += session.take_messages()
    session.receive_message(Stop())
    while (job := session.next_job()) is not None:
        jobs.append(job)
        session.complete_job(job, engine.transcribe([job.request])[0])
    return messages + session.take_messages(), jobs


class FickleEngine:
    """Hears a word per half second, but spells every word after the forced prefix with
    new tokens on each call: no two hypotheses ever agree on a new word."""

    name = "fickle"

    def __init__(self) -> None:
        self.calls = 0

    def transcribe(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        return [self._one(r) for r in requests]

    def _one(self, request: DecodeRequest) -> Hypothesis:
        self.calls += 1
        prefix = list(request.prefix_tokens)
        heard = int(len(request.audio) / 16_000 / 0.5)
        return Hypothesis(
            tuple(
                Word(
                    f" w{i}",
                    i * 0.5,
                    i * 0.5 + 0.4,
                    0.9,
                    (prefix[i],) if i < len(prefix) else (10**6 * self.calls + i,),
                )
                for i in range(max(heard, len(prefix)))
            )
        )


def test_alignatt_promises_from_one_hypothesis_and_asks_partials_to_stop_at_the_edge() -> None:
    audio = (np.ones(16_000 * 4) * 0.3 * 32767).astype("<i2")
    stable: dict[str, str] = {}
    for name in ("local_agreement", "alignatt"):
        config = SessionConfig(policy=PolicyOptions(policy=name))
        messages, jobs = _run(Session("s", config, EnergyClassifier()), FickleEngine(), audio)
        stable[name] = max(
            (m.stable for m in messages if isinstance(m, Partial)), key=len, default=""
        )
        edges = {job.final: job.request.stop_edge_s for job in jobs}
        # A final hears its segment out; only AlignAtt's partial steps may stop early.
        assert edges == {False: 0.5 if name == "alignatt" else 0.0, True: 0.0}
        final = next(m for m in messages if isinstance(m, Final))
        assert final.text.startswith(stable[name]), (final.text, stable[name])
    assert stable["local_agreement"] == ""  # never two hypotheses alike
    assert stable["alignatt"].startswith("w0 w1 w2"), stable


class UnsureEngine:
    """Hears a word per half second, the same words every call, each with probability
    0.5: below the early-commit probability (0.6), above the default context floor."""

    name = "unsure"

    def transcribe(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        return [self._one(r) for r in requests]

    @staticmethod
    def _one(request: DecodeRequest) -> Hypothesis:
        heard = int(len(request.audio) / 16_000 / 0.5)
        return Hypothesis(
            tuple(Word(f" w{i}", i * 0.5, i * 0.5 + 0.4, 0.5, (100 + i,)) for i in range(heard))
        )


def test_early_words_heard_alike_or_heard_past_are_promised_before_the_early_phase_ends() -> None:
    audio = (np.ones(16_000 * 5) * 0.3 * 32767).astype("<i2")
    first_promise: dict[str, float] = {}
    rules = {
        "off": PolicyOptions(early_commit_agreements=0, early_commit_context_s=0),
        "alike": PolicyOptions(early_commit_agreements=4, early_commit_context_s=0),
        "heard after": PolicyOptions(early_commit_agreements=0, early_commit_context_s=1.5),
        "heard after, below the floor": PolicyOptions(
            early_commit_agreements=0,
            early_commit_context_s=1.5,
            early_commit_context_probability=0.55,
        ),
    }
    for rule, policy in rules.items():
        session = Session("s", SessionConfig(policy=policy), EnergyClassifier())
        messages, _ = _run(session, UnsureEngine(), audio)
        first_promise[rule] = min(
            m.end - m.start for m in messages if isinstance(m, Partial) and m.stable
        )
        final = next(m for m in messages if isinstance(m, Final))
        assert final.text.startswith("w0 w1 w2 w3 w4 w5 w6"), final.text
    # Off, unsure words wait for a 3 s window (early_commit_s); four steps alike (1.2 s)
    # promise them sooner, and so does 1.5 s of audio after the first word (ends at 0.4 s)
    # unless the model gives the words less than early_commit_context_probability.
    assert first_promise["off"] >= 3.0, first_promise
    assert first_promise["heard after, below the floor"] >= 3.0, first_promise
    assert first_promise["alike"] < 2.5, first_promise
    assert first_promise["heard after"] < 2.5, first_promise


class CaseSplitEngine:
    """Hears " The w1 w2 ..." (a word per half second), its first word split between the
    letter cases (0.45 and 0.4) as Whisper splits a window's first "The"; like the real
    engines it scores the other case only when asked (DecodeRequest.other_case)."""

    name = "case split"

    def transcribe(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        return [self._one(r) for r in requests]

    @staticmethod
    def _one(request: DecodeRequest) -> Hypothesis:
        heard = int(len(request.audio) / 16_000 / 0.5)
        scored = request.other_case and not request.prefix_tokens
        return Hypothesis(
            tuple(
                Word(" The", 0.0, 0.4, 0.45, (100,), 0.4 if scored else 0.0)
                if i == 0
                else Word(f" w{i}", i * 0.5, i * 0.5 + 0.4, 0.9, (100 + i,))
                for i in range(heard)
            )
        )


def test_a_capitalized_first_word_split_between_cases_is_promised_early_as_one_word() -> None:
    audio = (np.ones(16_000 * 5) * 0.3 * 32767).astype("<i2")
    first_promise: dict[bool, float] = {}
    for ignore_case in (True, False):
        policy = PolicyOptions(early_commit_ignore_case=ignore_case)
        session = Session("s", SessionConfig(policy=policy), EnergyClassifier())
        messages, jobs = _run(session, CaseSplitEngine(), audio)
        first_promise[ignore_case] = min(
            m.end - m.start for m in messages if isinstance(m, Partial) and m.stable
        )
        # The session asks for the other case only where the early-commit rule reads it:
        # partial steps of a window shorter than early_commit_s (3 s).
        asked = {(job.final, job.audio_seconds < 3.0) for job in jobs if job.request.other_case}
        assert asked == ({(False, True)} if ignore_case else set()), asked
    assert first_promise[True] < 2.0, first_promise
    assert first_promise[False] >= 3.0, first_promise
