"""The streaming policy: which words of a hypothesis may be promised (`stable`).

Two policies (`PolicyOptions.policy`):

- LocalAgreement-2 (Machacek et al., whisper_streaming), the default: a word is
  committed once two consecutive hypotheses of the growing window agree on it. Two
  guards on top: the last word of a hypothesis is never committed (it may be cut
  mid-word), nor is a word that ends in the last `holdback_s` of the window, where
  Whisper still tends to revise.
- AlignAtt (Papi et al., SimulStreaming): one hypothesis is enough. A word is committed
  when the alignment heads place it (its DTW end) at least `alignatt_edge_s` before
  the window's end: the model has heard audio after it. The last word is never
  committed either. An engine that sees its cross-attention while it decodes (torch)
  also stops decoding there (`DecodeRequest.stop_edge_s`), saving the tokens after.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from streaming.engine import Hypothesis, Word

Tentative = Literal["all", "agreed"]  # which unpromised words a partial shows
Policy = Literal["local_agreement", "alignatt"]  # how words are promised


@dataclass(frozen=True)
class PolicyOptions:
    # Steps of 0.3 s with a 0.3 s hold-back settle words ~0.4 s sooner than 0.5 / 0.5 for
    # about 1.8x the CPU (81 real recordings: settled p50/p90 0.64/1.92 vs 1.07/2.31 s).
    step_s: float = 0.3  # decode the live segment again after this much new audio
    holdback_s: float = 0.3  # never commit words ending this close to the window's end
    prompt_chars: int = 0  # earlier final text given to the decoder as context (0: none)
    max_window_s: float = 0.0  # slide the decoded window past promised words (0: never)
    # Short windows mishear a segment's first words with conviction: while the window is
    # shorter than early_commit_s, a word is promised only if the model is this sure of it.
    # 2 s against 3 s settles words sooner (p90 1.38 against 1.95 s on the long-form
    # recordings) but promises more misheard first words: WER +0.3 points on 75
    # utterances, +0.5 on the long-form ones (noisy ones most), so 3 s stays.
    early_commit_s: float = 3.0
    early_commit_probability: float = 0.6
    # ...or if this many consecutive hypotheses (this one included) have heard it so: a
    # mishearing of a short window tends to change as the window grows, a word heard the
    # same for several steps less so. 0 (off): the probability alone decides. 3 settles
    # the slowest words ~0.5 s sooner (75 real utterances: p90 1.33 against 2.06 s) but
    # its forced unsure prefixes derail the decoder: over the 81 real recordings with
    # every step on time WER 4.73 against 4.47 % (long-form 4.95 against 4.44 %), and
    # with "it" promised, "It was very, very, very cold." lost a "very" (README "Engines").
    early_commit_agreements: int = 0
    # ...or (LocalAgreement) if the window holds this much audio after it (0: off) and the
    # model gives it at least early_commit_context_probability: a mishearing of a short
    # window's first words tends to change once the model has heard more of what follows,
    # and the words it is least sure of are those it mishears. Without the floor, 1.5 s
    # cost long-form recordings words (16 streams: 179 against 161 errors). With 1.5 and
    # a floor, over the 81 real recordings at real time (AMD EPYC, README "Engines"): 0.5
    # made 111 errors against 113 without the rule, settled p90 1.67 against 1.99 s; 0.4
    # settled them by 1.59 s but made 115 (4 more in noisy long-form speech, in two runs).
    early_commit_context_s: float = 1.5
    early_commit_context_probability: float = 0.5
    # Early on, how sure the model is of a capitalized first word, its letter case aside:
    # a window cannot hear whether it starts a sentence, so a segment's first word is
    # split between " The" and " the" (0.45 and 0.41), held back by both thresholds above
    # although the model is sure of the word (of the early words held back over 81 real
    # recordings, 83 % were a window's first). Not a lower-case one: promised, it becomes
    # the forced prefix, after which tiny.en writes unpunctuated and drops repeated words
    # ("it was very very cold." for "It was very, very, very cold.", as in README
    # "Engines" for early_commit_agreements).
    early_commit_ignore_case: bool = True
    # Partials show promised words and then the tentative words worth showing: "all" of
    # them, or those two consecutive hypotheses "agreed" on; but not a word ending within
    # tentative_edge_s of the live edge (often cut mid-word, then revised) unless the
    # model gives it tentative_edge_probability. Measured on 30 real recordings: revisions
    # 28.7 -> 6.5 a minute, first correct p50 0.44 -> 0.64 s ("agreed": 3.4 and 1.11 s).
    # At 0.3 s steps "all" revises 17 times a minute, "agreed" 10 (81 recordings: 9.8, first
    # correct p50 0.52 s), so "agreed" is the default.
    tentative: Tentative = "agreed"
    tentative_edge_s: float = 0.5
    tentative_edge_probability: float = 0.9
    # Endpointing: once the VAD has heard this much silence after speech, a step runs at
    # once, and when the VAD then closes the segment that step's hypothesis is its final
    # (it heard the whole segment), instead of one more decode after the close. 0: always
    # decode the closed segment again.
    endpoint_silence_s: float = 0.2
    no_speech_threshold: float = 0.6  # with a low log-probability: treat as no speech
    logprob_threshold: float = -1.0
    policy: Policy = "local_agreement"
    alignatt_edge_s: float = 0.5  # AlignAtt: promise words ending this far from the edge
    # A final whose last word ends this long before the VAD's end of speech missed words
    # (measured: a misheard promised prefix after which the decoder stopped, 4 words lost
    # of a sentence): the audio after that word is decoded again, without the prefix,
    # and what it hears is appended. 0: never.
    tail_gap_s: float = 1.0

    def __post_init__(self) -> None:
        if self.alignatt_edge_s < 0:
            raise ValueError("streaming.alignatt_edge_s must not be negative")
        if not 0.1 <= self.step_s <= 10.0:
            raise ValueError("streaming.step_s must lie between 0.1 and 10 seconds")
        if self.holdback_s < 0:
            raise ValueError("streaming.holdback_s must not be negative")
        if self.endpoint_silence_s < 0:
            raise ValueError("streaming.endpoint_silence_s must not be negative")
        if self.early_commit_context_s < 0:
            raise ValueError("streaming.early_commit_context_s must not be negative")
        if not 0.0 <= self.early_commit_context_probability <= 1.0:
            raise ValueError("streaming.early_commit_context_probability must lie in [0, 1]")
        if self.tail_gap_s < 0:
            raise ValueError("streaming.tail_gap_s must not be negative")
        # (two hypotheses agreeing is LocalAgreement itself: early_commit_s 0 says that)
        if self.early_commit_agreements < 0 or self.early_commit_agreements in (1, 2):
            raise ValueError("streaming.early_commit_agreements must be 0 (off) or at least 3")


def _same(a: Word, b: Word) -> bool:
    return a.tokens == b.tokens


def tentative_words(
    previous: Sequence[Word],
    current: Sequence[Word],
    promised: int,
    window_s: float,
    options: PolicyOptions,
) -> list[Word]:
    """The words of `current` a partial shows: the promised ones, then tentative ones."""
    shown = list(current[:promised])
    for k in range(promised, len(current)):
        if options.tentative == "agreed" and (
            k >= len(previous) or not _same(previous[k], current[k])
        ):
            break
        shown.append(current[k])
    while (
        len(shown) > promised
        and shown[-1].end_s > window_s - options.tentative_edge_s
        and shown[-1].probability < options.tentative_edge_probability
    ):
        shown.pop()
    return shown


def agreed_prefix(
    previous: Sequence[Word],
    current: Sequence[Word],
    window_s: float,
    options: PolicyOptions,
    earlier: Sequence[Sequence[Word]] = (),
) -> list[Word]:
    """Words of `current` that `previous` agrees on and that are safe to promise.

    `earlier`: the hypotheses before `previous`, newest last (for
    `early_commit_agreements`)."""
    agreed: list[Word] = []
    limit = window_s - options.holdback_s
    early = _early(window_s, options)
    for k, (before, now) in enumerate(zip(previous, current[:-1], strict=False)):
        if not _same(before, now) or now.end_s > limit:
            break
        if (
            early
            and min(_sure(before, options), _sure(now, options)) < options.early_commit_probability
            and not _heard_alike(k, now, earlier, options.early_commit_agreements - 2)
            and not _heard_after(now, window_s, options)
        ):
            break
        agreed.append(now)
    return agreed


def _early(window_s: float, options: PolicyOptions) -> bool:
    """Whether a window of this length is in the early phase, where the early-commit
    thresholds hold back words the model is unsure of."""
    return window_s < options.early_commit_s


def reads_other_case(window_s: float, options: PolicyOptions) -> bool:
    """Whether the policy reads a first word's other letter case for a window of this
    length (`_sure`): only early on, with `early_commit_ignore_case`. The session asks the
    engine for it (DecodeRequest.other_case) only then."""
    return options.early_commit_ignore_case and _early(window_s, options)


def _sure(word: Word, options: PolicyOptions) -> float:
    """How sure the model is of `word`, for the early-commit thresholds."""
    capital = word.text.lstrip()[:1].isupper()
    return (
        word.caseless_probability
        if options.early_commit_ignore_case and capital
        else word.probability
    )


def _heard_alike(k: int, word: Word, earlier: Sequence[Sequence[Word]], count: int) -> bool:
    """Whether the `count` newest of `earlier` (count > 0) all have `word` as word k."""
    if count <= 0 or len(earlier) < count:
        return False
    return all(k < len(h) and _same(h[k], word) for h in earlier[-count:])


def _heard_after(word: Word, window_s: float, options: PolicyOptions) -> bool:
    """Whether the window holds `early_commit_context_s` of audio after `word`, a word
    given at least `early_commit_context_probability`."""
    context = options.early_commit_context_s
    return (
        context > 0
        and window_s - word.end_s >= context
        and _sure(word, options) >= options.early_commit_context_probability
    )


def attended_prefix(current: Sequence[Word], window_s: float, options: PolicyOptions) -> list[Word]:
    """AlignAtt: the words of `current` (never its last) that end at least
    `alignatt_edge_s` before the window's end; early on, only words the model is sure of
    (as LocalAgreement's `early_commit_probability`; not `early_commit_context_s`: with
    every step on time it cost AlignAtt 5 errors in 2706 words, 4.92 -> 5.10 % WER)."""
    limit = window_s - options.alignatt_edge_s
    early = _early(window_s, options)
    attended: list[Word] = []
    for now in current[:-1]:
        if now.end_s > limit or (early and _sure(now, options) < options.early_commit_probability):
            break
        attended.append(now)
    return attended


def promised_prefix(
    previous: Sequence[Word],
    current: Sequence[Word],
    window_s: float,
    options: PolicyOptions,
    earlier: Sequence[Sequence[Word]] = (),
) -> list[Word]:
    """The words of `current` that `options.policy` promises (`earlier`: as
    `agreed_prefix`'s)."""
    if options.policy == "alignatt":
        return attended_prefix(current, window_s, options)
    return agreed_prefix(previous, current, window_s, options, earlier)


# Whisper's best-known inventions on silence and noise (it was trained on subtitles).
_HALLUCINATIONS = re.compile(
    r"^\s*(thank you\.?|thanks for watching[.!]?|thank you for watching[.!]?|"
    r"please subscribe[.!]?|you|bye\.?|\.+)\s*$",
    re.IGNORECASE,
)


def normalize_word(word: Word) -> str:
    """A word as guards compare it: lower case, without punctuation."""
    return re.sub(r"[^\w']", "", word.text.lower())


# The alignment's evidence that words were heard. A word it gives this little audio or
# less was not (invented text has no audio left to be given: it is stacked, zero-length,
# at one instant). A phrase said again is said at about the pace of the first time;
# Whisper's echoes and restarts of it get a fraction of that, squeezed after it.
UNHEARD_WORD_S = 0.04
ALIGN_STEP_S = 0.02  # one step of the alignment (an encoder position)
SAID_AGAIN_PACE = 0.5


def _median_duration(words: Sequence[Word]) -> float:
    durations = sorted(w.end_s - w.start_s for w in words)
    return durations[len(durations) // 2]


def heard_again(first: Sequence[Word], again: Sequence[Word]) -> bool:
    """Whether `again`, words that repeat `first`, have audio of their own.

    Said again, the words come after the first saying (from its end on, within one
    alignment step), move forward in time with durations (at most one in three as short
    as an unheard word: "a" may get 20 ms), and at least SAID_AGAIN_PACE of the first
    saying's pace: their median duration against its median (a median, because an edge
    word takes in the pause next to it: "We" of "We will meet" got 0.68 s with the
    silence before it). A restart or echo that re-uses the first saying's audio is
    stacked at one instant or squeezed into a sliver of audio after it.
    """
    if not first or not again:
        return False
    if again[0].start_s < first[-1].end_s - ALIGN_STEP_S:
        return False
    unheard = sum(w.end_s - w.start_s <= UNHEARD_WORD_S for w in again)
    if unheard > len(again) // 3:
        return False
    # (1e-9: times are sums of 20 ms steps in floating point)
    return _median_duration(again) >= SAID_AGAIN_PACE * _median_duration(first) - 1e-9


def drop_trailing_echo(words: Sequence[Word], keep: int, min_words: int = 3) -> list[Word]:
    """Remove a run of words at the end that repeats the run just before it.

    Whisper, near the end of a window, likes to say the last phrase again ("each other
    across the water. Other across the water"): repeated text at a boundary, with no
    audio of its own (the alignment squeezes it after the first saying). A speaker who
    says a phrase twice ("thank you very much, thank you very much") gives the second
    saying its own time, so only an echo that was not `heard_again` is cut; the first
    `keep` words (promised ones) are never touched.
    """
    words = list(words)
    cut = True
    while cut:  # a loop may have said it several times
        cut = False
        for size in range(len(words) // 2, min_words - 1, -1):
            tail, before = words[-size:], words[-2 * size : -size]
            if (
                len(words) - size >= keep
                and _echoes(tail, before)
                and not heard_again(before, tail)
            ):
                words, cut = words[:-size], True
                break
    return words


def _echoes(tail: Sequence[Word], before: Sequence[Word]) -> bool:
    """Whether `tail` says `before` again: word for word, or nearly after a sentence end.

    The loose form allows one word to differ in its ending ("early in the morning.
    Earlier in the morning.", seen in CI); it needs the sentence end and a shared stem so
    that "she walks in the morning. He walks in the evening." stays.
    """
    said, again = [normalize_word(w) for w in before], [normalize_word(w) for w in tail]
    if said == again:
        return True
    if not before[-1].text.rstrip().endswith((".", "!", "?")):
        return False
    differ = [(a, b) for a, b in zip(said, again, strict=True) if a != b]
    return len(differ) == 1 and _same_stem(*differ[0])


def _same_stem(a: str, b: str, stem: int = 4) -> bool:
    return len(a) >= stem and len(b) >= stem and a[:stem] == b[:stem]


def drop_hallucination(hypothesis: Hypothesis, options: PolicyOptions) -> bool:
    """Whether the unpromised text of this hypothesis looks invented rather than heard."""
    if (
        hypothesis.no_speech_prob > options.no_speech_threshold
        and hypothesis.avg_logprob < options.logprob_threshold
    ):
        return True
    return (
        bool(hypothesis.words)
        and bool(_HALLUCINATIONS.match(hypothesis.text))
        and (
            hypothesis.no_speech_prob > options.no_speech_threshold / 2
            or min(w.probability for w in hypothesis.words) < 0.3
        )
    )
