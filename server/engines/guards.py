"""Clean-up guards the engine applies to a decoded hypothesis before the policy sees it.

Whisper, decoding a window that ends mid-speech, loops, starts its text over, or invents
words after the real speech; these cut such text. Speech repeats itself too ("the ... of
the ...", lists, "I think, I think"), so a guard that deletes words decides on evidence
that they were not heard, not on their text alone. The evidence is the alignment: a
word that was said has audio of its own, a duration, and a repetition that was said
comes after the words it repeats and takes about as long to say. What Whisper invents
has no audio left to be given: the alignment stacks it, zero-length, at one instant
(measured on real recordings: every restart and loop the guards cut on the bench's
files sat at one instant, most at the window's end).

`trim_repetition` works on the generated tokens, before there are times, so it only
cuts a loop the decoder never left; `prefix_words` finds the words of the forced prefix
(promised already), and the `drop_*` guards never touch those first `keep` words.
`clean_tail` applies them in order. The guards the session applies itself
(`drop_trailing_echo`, `drop_hallucination`) stay in streaming/policy.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from streaming.engine import Word
from streaming.policy import UNHEARD_WORD_S, drop_trailing_echo, heard_again, normalize_word

log = logging.getLogger(__name__)

END_MARGIN_S = 0.1  # a timestamp this close to the end (or past it) closes the transcript
# Words stacked at one instant: `run` words in a row that together take this little audio
# (two alignment steps) were not said; three spoken words need several times that.
STACKED_SPAN_S = UNHEARD_WORD_S

__all__ = [
    "END_MARGIN_S",
    "STACKED_SPAN_S",
    "UNHEARD_WORD_S",
    "clean_tail",
    "drop_restart",
    "drop_squeezed_tail",
    "drop_stacked_words",
    "prefix_words",
    "trim_repetition",
]


def trim_repetition(
    tokens: list[int], max_period: int = 12, min_repeats: int = 3, ended: bool = False
) -> list[int]:
    """Cut a decoding loop: keep one copy of a block repeated `min_repeats` times in a row
    that the decoder never left.

    Hand-written because the decoder's own `no_repeat_ngram_size` would also forbid
    legitimate repeats ("very very"). Text alone cannot tell "no, no, no" from a loop, so
    only what no speaker does counts as one: the block repeats to the very end of the
    text (at most a partial copy after the last whole one) and the decoder did not end
    the text itself (`ended`: it reached the end of text or a timestamp past the audio);
    it ran into its token budget instead. A repetition that is followed by other words
    ("no, no, no, not that one") is speech the decoder moved on from, and one the
    decoder ended is left to the word guards, which have the alignment's evidence.
    """
    if ended:
        return tokens
    n, cut = len(tokens), len(tokens)
    for period in range(1, max_period + 1):
        # Each rotation of the block: whole copies counted back from the end, after a
        # partial copy (`rest` tokens of it) that the budget cut off.
        for rest in range(period):
            end = n - rest
            if end - period < 0:
                break
            block = tokens[end - period : end]
            if tokens[end:] != block[:rest]:
                continue
            start = end - period
            while start - period >= 0 and tokens[start - period : start] == block:
                start -= period
            if (end - start) // period >= min_repeats:
                cut = min(cut, start + period)
    return tokens[:cut]


def prefix_words(words: list[Word], prefix: list[int]) -> list[Word]:
    """The leading words that hold the forced prefix."""
    count, taken = 0, 0
    for word in words:
        if taken >= len(prefix):
            break
        taken += len(word.tokens)
        count += 1
    return words[:count]


def drop_squeezed_tail(words: list[Word], keep: int, duration_s: float) -> list[Word]:
    """Drop trailing words the alignment squeezes into the last instant of the audio.

    When Whisper invents text after the real speech (it repeats the window's start, or
    says "Thank you."), the alignment has no audio left to give those words: they end
    up stacked, zero-length, at the window's end. Real words there have a duration.
    """
    end = len(words)
    while end > keep:
        word = words[end - 1]
        if word.start_s < duration_s - END_MARGIN_S or word.end_s - word.start_s > UNHEARD_WORD_S:
            break
        end -= 1
    return words[:end]


def drop_restart(words: Sequence[Word], keep: int, run: int = 3) -> list[Word]:
    """Cut the hypothesis where Whisper starts the window's text over.

    On a window that ends mid-word Whisper sometimes begins again from the top
    ("streaming speech recognition, spoken words streaming speech recognition, ..."):
    `run` words after the promised ones repeat the window's first words, or the first
    new words. A restart re-uses audio that the first saying already had: the alignment
    puts the repeated words at the end of the words before them, stacked or squeezed
    into far less time than the first saying took. A phrase really said again ("the
    invention of ... considered as the invention of printing") has audio of its own,
    later in time and about as long (`heard_again`): it stays. Everything from a restart
    on is dropped.
    """
    words = list(words)
    normalized = [normalize_word(w) for w in words]
    starts = {0, keep} if keep < len(words) else {0}
    for j in range(max(keep, 1), len(words) - run + 1):
        for s in sorted(starts):
            # A copy that overlaps the words it repeats is a periodic repeat ("no no no
            # no"), not the window's text said over: that is trim_repetition's.
            if s + run > j or normalized[j : j + run] != normalized[s : s + run]:
                continue
            if not heard_again(words[s : s + run], words[j : j + run]):
                return words[:j]
    return words


def drop_stacked_words(words: Sequence[Word], keep: int, run: int = 3) -> list[Word]:
    """Cut the hypothesis at `run` new words in a row that the alignment stacks at one
    instant.

    When Whisper loops ("... next year, we'll be on Zoom and I hope that next year, ..."
    on a window that ends mid-sentence), the alignment stacks the invented words, each
    zero-length, at one instant, anywhere in the window. Heard words have a duration;
    `run` words in a row within STACKED_SPAN_S were not said (a short word the
    alignment gives 20 ms is no sign by itself: the next one moves on in time).
    """
    words = list(words)
    for j in range(keep, len(words) - run + 1):
        group = words[j : j + run]
        if (
            all(w.end_s - w.start_s <= UNHEARD_WORD_S for w in group)
            and group[-1].end_s - group[0].start_s <= STACKED_SPAN_S
        ):
            return words[:j]
    return words


def clean_tail(words: list[Word], prefix: Sequence[int], duration_s: float) -> list[Word]:
    """The guards after the promised words (the forced `prefix`), in order; each cut is
    logged at DEBUG with the words it removed."""
    keep = len(prefix_words(words, list(prefix)))
    guards: list[tuple[str, Callable[[list[Word]], list[Word]]]] = [
        ("squeezed tail", lambda ws: drop_squeezed_tail(ws, keep, duration_s)),
        ("stacked words", lambda ws: drop_stacked_words(ws, keep)),
        ("restart", lambda ws: drop_restart(ws, keep)),
        ("trailing echo", lambda ws: drop_trailing_echo(ws, keep)),
    ]
    for name, guard in guards:
        kept = guard(words)
        if len(kept) < len(words) and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "guard %s cut %r after %r",
                name,
                "".join(w.text for w in words[len(kept) :]),
                "".join(w.text for w in kept),
            )
        words = kept
    return words
