"""The streaming policy: LocalAgreement commitment and the hallucination filter."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from streaming.engine import Hypothesis, Word
from streaming.policy import (
    PolicyOptions,
    agreed_prefix,
    attended_prefix,
    drop_hallucination,
    drop_trailing_echo,
    heard_again,
    promised_prefix,
    tentative_words,
)

OPTIONS = PolicyOptions(holdback_s=0.5)


def word(text: str, start_s: float, end_s: float, probability: float = 0.9) -> Word:
    """A word whose tokens are derived from its text, so equal text means equal tokens."""
    return Word(text, start_s, end_s, probability, tuple(ord(c) for c in text))


def sentence(*texts: str, step_s: float = 0.5, probability: float = 0.9) -> list[Word]:
    """Consecutive words, each `step_s` long, from 0 s."""
    return [word(t, i * step_s, (i + 1) * step_s, probability) for i, t in enumerate(texts)]


def texts(words: list[Word]) -> list[str]:
    return [w.text for w in words]


# agreed_prefix ---------------------------------------------------------------------------


def test_agreed_prefix_is_the_common_prefix_of_two_hypotheses() -> None:
    previous = sentence(" the", " quick", " brown", " fax", " jumps")
    current = sentence(" the", " quick", " brown", " fox", " jumped", " over")

    assert texts(agreed_prefix(previous, current, 10.0, OPTIONS)) == [" the", " quick", " brown"]


def test_agreed_prefix_stops_at_the_first_disagreement_even_if_later_words_agree() -> None:
    previous = sentence(" a", " b", " c", " d", " e")
    current = sentence(" a", " x", " c", " d", " e", " f")

    assert texts(agreed_prefix(previous, current, 10.0, OPTIONS)) == [" a"]


def test_agreed_prefix_never_includes_the_last_word_of_the_current_hypothesis() -> None:
    same = sentence(" hello", " world")

    assert texts(agreed_prefix(same, same, 10.0, OPTIONS)) == [" hello"]
    assert agreed_prefix(same[:1], same[:1], 10.0, OPTIONS) == []


def test_agreed_prefix_may_include_the_last_word_of_the_previous_hypothesis() -> None:
    previous = sentence(" one", " two")
    current = sentence(" one", " two", " three")

    assert texts(agreed_prefix(previous, current, 10.0, OPTIONS)) == [" one", " two"]


def test_agreed_prefix_holds_back_words_ending_near_the_window_end() -> None:
    # Words end at 0.5, 1.0, 1.5, 2.0, 2.5; the window is 2.4 s, so the limit is 1.9 s.
    words = sentence(" a", " b", " c", " d", " e")

    assert texts(agreed_prefix(words, words, 2.4, OPTIONS)) == [" a", " b", " c"]


def test_a_word_ending_exactly_at_the_holdback_limit_may_be_promised() -> None:
    words = sentence(" a", " b", " c", " d", " e")

    assert texts(agreed_prefix(words, words, 2.0, OPTIONS)) == [" a", " b", " c"]


def test_without_holdback_every_agreed_word_but_the_last_is_promised() -> None:
    words = sentence(" a", " b", " c", " d")

    agreed = agreed_prefix(words, words, 2.0, PolicyOptions(holdback_s=0.0))

    assert texts(agreed) == [" a", " b", " c"]


def test_agreed_prefix_of_nothing_is_nothing() -> None:
    current = sentence(" a", " b", " c")

    assert agreed_prefix([], current, 10.0, OPTIONS) == []
    assert agreed_prefix(current, [], 10.0, OPTIONS) == []


def test_words_agree_by_their_tokens_not_their_spelling_or_timing() -> None:
    previous = [Word(" read", 0.0, 0.4, 0.9, (1,)), Word(" it", 0.4, 0.6, 0.9, (2,))]
    current = [
        Word(" read", 0.0, 0.5, 0.5, (1,)),  # same tokens, new timing: agrees
        Word(" it", 0.5, 0.7, 0.9, (3,)),  # same spelling, other tokens: does not
        Word(" now", 0.7, 1.0, 0.9, (4,)),
    ]

    assert agreed_prefix(previous, current, 10.0, OPTIONS) == current[:1]


def test_agreed_words_are_the_current_hypothesis_words() -> None:
    previous = [word(" hi", 0.0, 0.3), word(" there", 0.3, 0.6)]
    current = [word(" hi", 0.0, 0.35), word(" there", 0.35, 0.6), word(" you", 0.6, 0.9)]

    agreed = agreed_prefix(previous, current, 10.0, OPTIONS)

    assert agreed == current[:2]  # with the newer timings


@pytest.mark.parametrize(
    "kwargs", [{"step_s": 0.05}, {"step_s": 11.0}, {"holdback_s": -0.1}, {"alignatt_edge_s": -0.1}]
)
def test_policy_options_reject_invalid_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PolicyOptions(**kwargs)


# drop_hallucination ------------------------------------------------------------------------


def hypothesis(
    text_words: list[Word], no_speech_prob: float = 0.0, avg_logprob: float = -0.2
) -> Hypothesis:
    return Hypothesis(tuple(text_words), no_speech_prob, avg_logprob)


THANK_YOU = [word(" Thank", 0.0, 0.3), word(" you.", 0.3, 0.6)]


def test_thank_you_with_high_no_speech_probability_is_dropped() -> None:
    assert drop_hallucination(hypothesis(THANK_YOU, 0.9, -1.5), OPTIONS)
    assert drop_hallucination(hypothesis(THANK_YOU, 0.4, -0.2), OPTIONS)  # above half the bar


def test_thank_you_with_a_low_word_probability_is_dropped() -> None:
    shaky = [word(" Thank", 0.0, 0.3, 0.9), word(" you.", 0.3, 0.6, 0.2)]

    assert drop_hallucination(hypothesis(shaky, 0.05), OPTIONS)


def test_a_confidently_heard_thank_you_is_kept() -> None:
    assert not drop_hallucination(hypothesis(THANK_YOU, 0.05, -0.2), OPTIONS)


@pytest.mark.parametrize(
    "phrase",
    [
        " Thank you.",
        " thank you",
        " Thanks for watching!",
        " Thank you for watching.",
        " Please subscribe.",
        " you",
        " Bye.",
        " ...",
    ],
)
def test_known_subtitle_inventions_on_silence_are_dropped(phrase: str) -> None:
    words = sentence(*(" " + w for w in phrase.split()), step_s=0.2)
    assert hypothesis(words).text == phrase.strip()

    assert drop_hallucination(hypothesis(words, 0.5), OPTIONS)


def test_real_speech_is_kept_even_with_a_high_no_speech_probability() -> None:
    speech = sentence(" Thank", " you", " for", " coming", " today.")

    assert not drop_hallucination(hypothesis(speech, 0.9, -0.3), OPTIONS)
    assert not drop_hallucination(hypothesis(speech, 0.0, -0.3), OPTIONS)


def test_anything_with_high_no_speech_and_low_logprob_is_dropped() -> None:
    speech = sentence(" the", " meeting", " starts", " now")

    assert drop_hallucination(hypothesis(speech, 0.9, -1.5), OPTIONS)
    assert not drop_hallucination(hypothesis(speech, 0.9, -0.5), OPTIONS)
    assert not drop_hallucination(hypothesis(speech, 0.5, -1.5), OPTIONS)


def test_an_empty_hypothesis_is_only_dropped_by_the_no_speech_rule() -> None:
    assert not drop_hallucination(hypothesis([], 0.5, -0.2), OPTIONS)
    assert drop_hallucination(hypothesis([], 0.9, -1.5), OPTIONS)


def test_thresholds_come_from_the_options() -> None:
    strict = PolicyOptions(no_speech_threshold=0.95, logprob_threshold=-2.0)

    assert not drop_hallucination(hypothesis(sentence(" hello", " there"), 0.9, -1.5), strict)


def _words(text: str) -> list[Word]:
    return [Word(f" {t}", i * 0.3, i * 0.3 + 0.25, 0.9, (i,)) for i, t in enumerate(text.split())]


def _echoed(text: str, echo: str, at_s: float | None = None, each_s: float = 0.0) -> list[Word]:
    """`text` as heard, then `echo` with no audio of its own: stacked at `at_s` (default:
    the end of the heard words), or `each_s` apiece from there."""
    heard = _words(text)
    at = heard[-1].end_s if at_s is None else at_s
    return [
        *heard,
        *(
            Word(f" {t}", at + i * each_s, at + (i + 1) * each_s, 0.5, (50 + i,))
            for i, t in enumerate(echo.split())
        ),
    ]


def test_a_trailing_echo_of_three_words_or_more_is_cut() -> None:
    words = _echoed("calling to each other across the water.", "Other across the water")
    kept = drop_trailing_echo(words, keep=0)
    assert " ".join(w.text.strip() for w in kept) == "calling to each other across the water."
    # Squeezed after the first saying (a tenth of its time) it is no more heard.
    squeezed = _echoed(
        "calling to each other across the water.", "Other across the water", each_s=0.03
    )
    assert len(drop_trailing_echo(squeezed, keep=0)) == 7


def test_a_near_echo_after_a_sentence_end_is_cut() -> None:
    # The final CI once printed: Whisper said the last phrase again with one word bent.
    words = _echoed("near the river early in the morning.", "Earlier in the morning.")
    kept = drop_trailing_echo(words, keep=0)
    assert " ".join(w.text.strip() for w in kept) == "near the river early in the morning."


def test_a_phrase_really_said_twice_at_the_end_stays() -> None:
    # The same text as the echoes above, but the second saying has its own audio.
    for text in (
        "calling to each other across the water. Other across the water",
        "near the river early in the morning. Earlier in the morning.",
        "thank you very much, thank you very much",
    ):
        words = _words(text)
        assert drop_trailing_echo(words, keep=0) == words


def test_heard_again_needs_audio_of_its_own_after_the_first_saying() -> None:
    first = sentence(" the", " art", " of", step_s=0.3)  # 0.0 to 0.9 s
    later = [word(w.text, w.start_s + 1.0, w.end_s + 1.0) for w in first]
    assert heard_again(first, later)
    stacked = [word(w.text, 0.9, 0.9) for w in first]
    assert not heard_again(first, stacked)
    squeezed = [word(w.text, 0.9 + 0.05 * i, 0.95 + 0.05 * i) for i, w in enumerate(first)]
    assert not heard_again(first, squeezed)  # 50 ms a word where the first took 300
    overlapping = [word(w.text, w.start_s + 0.5, w.end_s + 0.5) for w in first]
    assert not heard_again(first, overlapping)  # starts before the first saying ended
    one_short = [later[0], word(" art", 1.3, 1.32), later[2]]
    assert heard_again(first, one_short)  # "a", "of" may get 20 ms
    assert not heard_again(first, [])


def test_similar_phrases_in_one_sentence_stay() -> None:
    words = _words("we met in the morning, and in the evening")
    assert drop_trailing_echo(words, keep=0) == words
    after_stop = _words("she walks in the morning. He walks in the evening.")
    assert drop_trailing_echo(after_stop, keep=0) == after_stop


def test_short_repeats_and_promised_words_are_kept() -> None:
    very = _words("it was very very good")
    assert drop_trailing_echo(very, keep=0) == very
    echo = _words("over the hill over the hill")
    assert drop_trailing_echo(echo, keep=6) == echo  # all promised: never touched


def test_early_on_words_the_model_is_unsure_of_are_not_promised() -> None:
    sure = PolicyOptions(
        holdback_s=0.0, early_commit_s=3.0, early_commit_probability=0.6, early_commit_context_s=0
    )
    before = _words("the weather today is sunny")
    now = [replace(w, probability=0.3) if w.text == " weather" else w for w in before]
    assert [w.text for w in agreed_prefix(before, now, 2.0, sure)] == [" the"]
    assert len(agreed_prefix(before, before, 2.0, sure)) == 4  # all but the last word
    assert len(agreed_prefix(before, now, 3.5, sure)) == 4  # past the early phase: any


def test_early_on_an_unsure_word_heard_alike_long_enough_is_promised() -> None:
    steady = PolicyOptions(
        holdback_s=0.0, early_commit_s=3.0, early_commit_agreements=4, early_commit_context_s=0
    )
    heard = _words("the weather today is sunny")
    unsure = [replace(w, probability=0.3) if w.text == " weather" else w for w in heard]
    misheard = [replace(w, tokens=(99,)) if w.text == " weather" else w for w in unsure]
    # Four hypotheses in a row (these two and two earlier) heard "weather" alike.
    assert len(agreed_prefix(unsure, unsure, 2.0, steady, [unsure, unsure])) == 4
    # One of the four heard it otherwise, or there were only three: not yet.
    assert texts(agreed_prefix(unsure, unsure, 2.0, steady, [misheard, unsure])) == [" the"]
    assert texts(agreed_prefix(unsure, unsure, 2.0, steady, [unsure])) == [" the"]
    # Off (the default), the probability alone decides, however long it was heard alike.
    off = replace(steady, early_commit_agreements=0)
    assert texts(agreed_prefix(unsure, unsure, 2.0, off, [unsure] * 9)) == [" the"]


def test_early_on_an_unsure_word_with_enough_audio_after_it_is_promised() -> None:
    heard = PolicyOptions(holdback_s=0.0, early_commit_s=3.0, early_commit_context_s=1.5)
    words = _words("the weather today is sunny")  # "weather" ends at 0.55 s
    unsure = [replace(w, probability=0.5) if w.text == " weather" else w for w in words]
    assert texts(agreed_prefix(unsure, unsure, 2.0, heard)) == [" the"]  # 1.45 s after it
    assert len(agreed_prefix(unsure, unsure, 2.1, heard)) == 4  # 1.55 s after it
    # Two hypotheses must still agree on it, and off (0) the probability alone decides.
    misheard = [replace(w, tokens=(99,)) if w.text == " weather" else w for w in unsure]
    assert texts(agreed_prefix(misheard, unsure, 2.1, heard)) == [" the"]
    off = replace(heard, early_commit_context_s=0)
    assert texts(agreed_prefix(unsure, unsure, 2.9, off)) == [" the"]


def test_early_commit_context_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="early_commit_context_s"):
        PolicyOptions(early_commit_context_s=-0.1)


def test_a_word_below_the_context_floor_waits_however_much_was_heard_after_it() -> None:
    floored = PolicyOptions(
        holdback_s=0.0,
        early_commit_s=3.0,
        early_commit_context_s=1.5,
        early_commit_context_probability=0.4,
    )
    words = _words("the weather today is sunny")  # "weather" ends at 0.55 s
    doubtful = [replace(w, probability=0.3) if w.text == " weather" else w for w in words]
    unsure = [replace(w, probability=0.45) if w.text == " weather" else w for w in words]
    assert texts(agreed_prefix(doubtful, doubtful, 2.9, floored)) == [" the"]
    assert len(agreed_prefix(unsure, unsure, 2.1, floored)) == 4
    # Past the early phase the floor has no say: agreement alone promises.
    assert len(agreed_prefix(doubtful, doubtful, 3.1, floored)) == 4


def test_early_on_a_capitalized_first_word_split_between_its_letter_cases_is_one_word() -> None:
    # A window cannot hear whether it starts a sentence: " Since" 0.45, " since" 0.4.
    early = PolicyOptions(holdback_s=0.0, early_commit_s=3.0, early_commit_context_s=0)
    words = [
        replace(w, text=" Since") if w.text == " since" else w
        for w in _words("since then physicists have found")
    ]
    split = [replace(words[0], probability=0.45, other_case_probability=0.4), *words[1:]]
    assert split[0].caseless_probability == pytest.approx(0.85)
    assert len(agreed_prefix(split, split, 2.0, early)) == 4
    assert texts(attended_prefix(split, 2.0, replace(early, policy="alignatt"))) == texts(split[:4])
    # Lower case, it waits: forced as the prefix, a lower-case first word leads tiny.en
    # into its unpunctuated style, in which it drops repeated words ("it was very very
    # cold." for "It was very, very, very cold.").
    lower = [replace(split[0], text=" since"), *words[1:]]
    assert agreed_prefix(lower, lower, 2.0, early) == []
    # A word the model is unsure of in either case still waits; so does this one, with
    # the rule off.
    unsure = [replace(words[0], probability=0.3, other_case_probability=0.2), *words[1:]]
    assert agreed_prefix(unsure, unsure, 2.0, early) == []
    cased = replace(early, early_commit_ignore_case=False)
    assert agreed_prefix(split, split, 2.0, cased) == []
    assert attended_prefix(split, 2.0, replace(cased, policy="alignatt")) == []
    # The context floor counts both cases too.
    floored = replace(
        early,
        early_commit_probability=0.95,
        early_commit_context_s=1.5,
        early_commit_context_probability=0.5,
    )
    low = [replace(words[0], probability=0.3, other_case_probability=0.3), *words[1:]]
    assert len(agreed_prefix(low, low, 1.8, floored)) == 1  # 1.55 s heard after "Since"
    assert agreed_prefix(low, low, 1.8, replace(floored, early_commit_ignore_case=False)) == []


@pytest.mark.parametrize("floor", [-0.1, 1.1])
def test_early_commit_context_probability_must_be_a_probability(floor: float) -> None:
    with pytest.raises(ValueError, match="early_commit_context_probability"):
        PolicyOptions(early_commit_context_probability=floor)


@pytest.mark.parametrize("agreements", [-1, 1, 2])
def test_early_commit_agreements_must_ask_more_than_local_agreement(agreements: int) -> None:
    with pytest.raises(ValueError, match="early_commit_agreements"):
        PolicyOptions(early_commit_agreements=agreements)


# tentative_words -------------------------------------------------------------------------


def test_partials_show_every_tentative_word_by_default() -> None:
    previous = sentence(" the", " quick", " brown")
    current = sentence(" the", " quick", " brawn", " fox")
    every = PolicyOptions(tentative="all", tentative_edge_s=0.0)
    shown = tentative_words(previous, current, 1, 2.0, every)
    assert texts(shown) == [" the", " quick", " brawn", " fox"]


def test_agreed_partials_stop_at_the_first_word_the_last_hypothesis_disagreed_on() -> None:
    previous = sentence(" the", " quick", " brown")
    current = sentence(" the", " quick", " brawn", " fox")
    agreed = PolicyOptions(tentative="agreed", tentative_edge_s=0.0)
    assert texts(tentative_words(previous, current, 1, 2.0, agreed)) == [" the", " quick"]
    # Promised words are always shown, agreed or not.
    assert texts(tentative_words((), current, 2, 2.0, agreed)) == [" the", " quick"]


def test_words_at_the_live_edge_wait_but_promised_words_never_do() -> None:
    current = sentence(" the", " quick", " brown", " fox")  # the fox ends at 2.0 s
    edge = PolicyOptions(tentative="all", tentative_edge_s=0.3, tentative_edge_probability=0.95)
    assert texts(tentative_words((), current, 0, 2.1, edge)) == [" the", " quick", " brown"]
    assert texts(tentative_words((), current, 0, 2.4, edge)) == texts(current)
    assert texts(tentative_words((), current, 4, 2.0, edge)) == texts(current)


def test_a_word_at_the_live_edge_shows_when_the_model_is_sure_of_it() -> None:
    sure = [*sentence(" the", " quick"), word(" fox", 1.0, 1.5, probability=0.97)]
    unsure = [*sentence(" the", " quick"), word(" fax", 1.0, 1.5, probability=0.4)]
    edge = PolicyOptions(tentative="all", tentative_edge_s=0.5, tentative_edge_probability=0.9)
    assert texts(tentative_words((), sure, 0, 1.6, edge)) == [" the", " quick", " fox"]
    assert texts(tentative_words((), unsure, 0, 1.6, edge)) == [" the", " quick"]


# AlignAtt ----------------------------------------------------------------------------------

ALIGNATT = PolicyOptions(policy="alignatt", alignatt_edge_s=0.5)


def test_alignatt_promises_heard_words_from_one_hypothesis() -> None:
    current = sentence(" the", " quick", " brown", " fox", " jumps")  # ends at 2.5 s
    # Words ending by 3.0 - 0.5 s, but never the last word: no earlier hypothesis needed.
    assert texts(attended_prefix(current, 3.0, ALIGNATT)) == [" the", " quick", " brown", " fox"]
    assert texts(attended_prefix(current, 2.4, ALIGNATT)) == [" the", " quick", " brown"]
    assert texts(promised_prefix([], current, 3.0, ALIGNATT)) == texts(current[:-1])
    assert promised_prefix([], current, 3.0, OPTIONS) == []  # LocalAgreement: two needed


def test_alignatt_early_on_promises_only_words_the_model_is_sure_of() -> None:
    current = sentence(" the", " quick", " brown", " fox")
    current[1] = replace(current[1], probability=0.3)
    early = replace(ALIGNATT, early_commit_s=3.0, early_commit_context_s=0)
    assert texts(attended_prefix(current, 2.5, early)) == [" the"]  # window < 3 s
    assert texts(attended_prefix(current, 3.5, early)) == [" the", " quick", " brown"]
    # early_commit_context_s is LocalAgreement's: however much AlignAtt heard after it.
    heard = replace(early, early_commit_context_s=1.5)
    assert texts(attended_prefix(current, 2.9, heard)) == [" the"]


def test_alignatt_of_nothing_is_nothing() -> None:
    assert attended_prefix([], 5.0, ALIGNATT) == []
    assert attended_prefix(sentence(" one"), 5.0, ALIGNATT) == []
