"""Clean-up guards the engine applies to a decoded hypothesis before the policy sees it.

Whisper, decoding a window that ends mid-speech, loops, starts its text over, or invents
words after the real speech; these cut such text. `trim_repetition` works on the generated
tokens; `prefix_words` finds the words of the forced prefix (promised already), and the
`drop_*` guards never touch those first `keep` words. The guards the session applies
itself (`drop_trailing_echo`, `drop_hallucination`) stay in streaming/policy.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from streaming.engine import Word
from streaming.policy import normalize_word

END_MARGIN_S = 0.1  # a timestamp this close to the end (or past it) closes the transcript
# A word the alignment gives this little audio or less was not heard (invented text).
UNHEARD_WORD_S = 0.04


def trim_repetition(tokens: list[int], max_period: int = 12, min_repeats: int = 3) -> list[int]:
    """Cut a decoding loop: keep one copy of a block repeated `min_repeats` times in a row.

    Hand-written because the decoder's own `no_repeat_ngram_size` would also forbid
    legitimate repeats ("very very"); only a run of identical blocks is a loop.
    """
    for end in range(len(tokens) + 1):
        for period in range(1, max_period + 1):
            start = end - period * min_repeats
            if start < 0:
                break
            block = tokens[end - period : end]
            if all(tokens[start + k * period : start + (k + 1) * period] == block
                   for k in range(min_repeats)):
                return tokens[: start + period]
    return tokens


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
    when `run` words after the promised ones repeat the window's first words, or the
    first new words, everything from there on is dropped.
    """
    words = list(words)
    normalized = [normalize_word(w) for w in words]
    starts = {0, keep} if keep < len(words) else {0}
    for j in range(max(keep, 1), len(words) - run + 1):
        if any(s < j and normalized[j : j + run] == normalized[s : s + run] for s in starts):
            return words[:j]
    return words


def drop_stacked_words(words: Sequence[Word], keep: int, run: int = 3) -> list[Word]:
    """Cut the hypothesis at `run` new words in a row that the alignment gave no audio.

    When Whisper loops ("... next year, we'll be on Zoom and I hope that next year, ..."
    on a window that ends mid-sentence), the alignment stacks the invented words, each
    zero-length, at one instant, anywhere in the window. Heard words have a duration;
    three in a row at one instant were not heard.
    """
    words = list(words)
    short = 0
    for j in range(keep, len(words)):
        short = short + 1 if words[j].end_s - words[j].start_s <= UNHEARD_WORD_S else 0
        if short == run:
            return words[: j - run + 1]
    return words
