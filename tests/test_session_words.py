"""A segment's final never loses the words its partials promised, and says why it lacks a
word the partials showed two steps in a row (issue 15).

Scripted, as in test_session.py: value-coded audio, an engine that reads it back, and
rewrites of its hypotheses for the final decode that lose words in each way a real final
can (it hears nothing, hears other words, is taken for a hallucination, or loses the
forced prefix).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
from test_session import (
    CONFIG,
    DECODE_FINALS,
    Rewrite,
    Run,
    compose,
    make_word,
    run_session,
    words_of,
)

from streaming.engine import Hypothesis, Word
from streaming.session import Job, SessionConfig

AUDIO, _ = compose([0.5, [0, 1, 2, 3, 4, 5, 6, 7], 1.0])
# Words are shown as soon as two steps agree; promised only once past the hold-back.
SHOWING = replace(DECODE_FINALS, policy=replace(DECODE_FINALS.policy, holdback_s=1.2))


def last_stable(run: Run, segment: int = 0) -> list[str]:
    stables = [p.stable.split() for p in run.partials if p.segment == segment]
    return stables[-1] if stables else []


def shown_twice(run: Run, segment: int = 0) -> list[str]:
    """The words the last two partials of the segment both began with."""
    texts = [p.text.split() for p in run.partials if p.segment == segment]
    if len(texts) < 2:
        return []
    a, b = texts[-2:]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def promised_only(job: Job, hypothesis: Hypothesis) -> Hypothesis:
    """The final decode hears nothing after the promised words."""
    if not job.final:
        return hypothesis
    return Hypothesis(hypothesis.words[: len(job.request.prefix_tokens)], 0.01, -0.2)


def nothing_at_all(job: Job, hypothesis: Hypothesis) -> Hypothesis:
    """The final decode returns no words, not even the forced prefix."""
    return Hypothesis(()) if job.final else hypothesis


def other_words(job: Job, hypothesis: Hypothesis) -> Hypothesis:
    """The final decode hears the last three words as something else."""
    if not job.final:
        return hypothesis
    words = list(hypothesis.words)
    tail = [make_word(40 + i, w.start_s, w.end_s) for i, w in enumerate(words[-3:])]
    return Hypothesis((*words[:-3], *tail), 0.01, -0.2)


def invented(job: Job, hypothesis: Hypothesis) -> Hypothesis:
    """The final decode looks like a hallucination (no speech, low log-probability)."""
    if not job.final:
        return hypothesis
    return Hypothesis(hypothesis.words, no_speech_prob=0.9, avg_logprob=-1.5)


def scrambled_prefix(job: Job, hypothesis: Hypothesis) -> Hypothesis:
    """The final decode ignores the forced prefix: other tokens where it should be."""
    if not job.final or not job.request.prefix_tokens:
        return hypothesis
    words = [replace(w, tokens=(w.tokens[0] + 500,)) for w in hypothesis.words]
    return Hypothesis(tuple(words), 0.01, -0.2)


@pytest.mark.parametrize(
    "rewrite", [promised_only, nothing_at_all, other_words, invented, scrambled_prefix]
)
@pytest.mark.parametrize(
    "config",
    [CONFIG, SHOWING, DECODE_FINALS],
    ids=["endpoint step", "shown, not promised", "decoded"],
)
def test_the_final_keeps_every_word_the_last_partial_showed_as_stable(
    rewrite: Rewrite,
    config: SessionConfig,
) -> None:
    run = run_session(AUDIO, config=config, rewrite=rewrite)

    (final,) = run.finals
    stable = last_stable(run)
    assert stable, "the scenario must promise words before the final"
    assert words_of(final)[: len(stable)] == stable


@pytest.mark.parametrize(
    ("rewrite", "reason"),
    [
        (promised_only, "the final's decode ended before them"),
        (nothing_at_all, "the final's decode ended before them"),
        (other_words, "the final's decode heard 'w40 w41 w42' there instead"),
        (
            invented,
            "the hallucination filter took the final's unpromised words for invented "
            "text (no_speech_prob 0.90, avg_logprob -1.50)",
        ),
    ],
)
def test_a_word_shown_twice_that_the_final_lacks_is_logged_with_the_reason(
    rewrite: Rewrite,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="streaming.session")

    run = run_session(AUDIO, config=SHOWING, rewrite=rewrite)

    (final,) = run.finals
    seen = shown_twice(run)
    missing = [w for w in seen[len(last_stable(run)) :] if w not in words_of(final)]
    assert missing, f"the scenario must show words the final lacks: {seen} / {final.text}"
    lines = [r.getMessage() for r in caplog.records if "showed two steps in a row" in r.message]
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("session s1: the final of segment 0 lacks ")
    assert all(w in line for w in missing)
    assert f"in a row: {reason}" in line
    assert all(
        r.levelno == logging.DEBUG for r in caplog.records if "showed two steps" in r.message
    )


def test_no_line_when_the_final_has_every_shown_word(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="streaming.session")

    run = run_session(AUDIO, config=SHOWING)

    (final,) = run.finals
    assert words_of(final) == [f"w{k}" for k in range(8)]
    assert not [r for r in caplog.records if "showed two steps in a row" in r.message]


def echo_in_final(job: Job, hypothesis: Hypothesis) -> Hypothesis:
    """The final decode says the last three words again, squeezed at the window's end."""
    if not job.final:
        return hypothesis
    end = job.audio_seconds
    again = tuple(Word(w.text, end, end, 0.5, w.tokens) for w in hypothesis.words[-3:])
    return Hypothesis((*hypothesis.words, *again), 0.01, -0.2)


def test_an_echo_without_audio_is_cut_from_the_final_and_a_heard_one_is_not() -> None:
    run = run_session(AUDIO, config=DECODE_FINALS, rewrite=echo_in_final)
    (final,) = run.finals
    assert words_of(final) == [f"w{k}" for k in range(8)]

    # The same words said twice, each with its own audio: all of them reach the final.
    twice, _ = compose([0.5, [0, 1, 2, 3, 4, 5, 3, 4, 5], 1.0])
    run = run_session(twice, config=DECODE_FINALS)
    (final,) = run.finals
    assert words_of(final) == ["w0", "w1", "w2", "w3", "w4", "w5", "w3", "w4", "w5"]
    assert np.all(np.diff([w.start for w in final.words]) > 0)
