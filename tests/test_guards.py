"""The engine's clean-up guards (server/engines/guards.py), on hand-made hypotheses.

Each guard gets a case of the failure it cuts and a case of real-speech-like words it
must keep, and the two differ in the alignment's evidence, not only in their text: a
repetition that was said has audio of its own (durations, later in time), an invented one
is stacked at one instant or squeezed after the words it repeats. The invented cases'
times are as tiny.en's alignment gave them on the bench's recordings.
"""

from __future__ import annotations

from functools import cache

import tokenizers

from server.engines.guards import (
    clean_tail,
    drop_restart,
    drop_squeezed_tail,
    drop_stacked_words,
    prefix_words,
    trim_repetition,
)
from server.engines.models import load_tokenizer, resolve_model_path
from streaming.engine import Word


def texts(words: list[Word]) -> list[str]:
    return [w.text for w in words]


def _words(text: str) -> list[Word]:
    return [Word(f" {t}", i * 0.3, i * 0.3 + 0.25, 0.9, (i,)) for i, t in enumerate(text.split())]


def _timed(*spans: tuple[str, float, float]) -> list[Word]:
    return [Word(f" {t}", a, b, 0.9, (i,)) for i, (t, a, b) in enumerate(spans)]


@cache
def _tokenizer() -> tokenizers.Tokenizer:
    return load_tokenizer(resolve_model_path("bundled"))  # the bundled model's, no model load


def _tokens(text: str) -> list[int]:
    return list(_tokenizer().encode(text, add_special_tokens=False).ids)


def _text(tokens: list[int]) -> str:
    return str(_tokenizer().decode(tokens))


# trim_repetition -------------------------------------------------------------------------


def test_a_decoding_loop_is_cut_to_one_copy() -> None:
    # A loop: the decoder says the same block again and again until its token budget ends.
    looped = _tokens(" Thank you. Thank you. Thank you. Thank you.")
    assert _text(trim_repetition(looped)) == " Thank you."
    said = _tokens(" and so on and so on and so on and so on")
    assert _text(trim_repetition(said)) == " and so on"


def test_a_loop_cut_by_the_token_budget_mid_copy_keeps_one_copy() -> None:
    # As tiny.en looped on an earnings call: the budget ended it inside a copy.
    looped = _tokens(" on Zoom and I hope that next year, next year, next year, next year")
    assert _text(trim_repetition(looped)) == " on Zoom and I hope that next year,"
    gathered = _tokens(" are gathered gathered gathered gathered gathered gathered")
    assert _text(trim_repetition(gathered)) == " are gathered"


def test_a_repeat_said_twice_stays() -> None:
    for text in (
        " it was very very good",
        " one two, one two, buckle my shoe",
        " the the meeting starts now",
    ):
        assert _text(trim_repetition(_tokens(text))) == text


def test_a_word_said_three_times_stays() -> None:
    # The decoder moved on after the repeats: a loop never does.
    for text in (" no, no, no, not that one", " very very very good", " I said no, no, no."):
        assert _text(trim_repetition(_tokens(text))) == text


def test_a_repeat_the_decoder_ended_itself_is_left_to_the_alignment() -> None:
    # "bye bye bye" then the end of text: no loop ran into the budget; the word guards
    # decide with the words' times whether the copies were heard.
    text = " Bye bye bye bye"
    assert _text(trim_repetition(_tokens(text))) == " Bye bye"
    assert _text(trim_repetition(_tokens(text), ended=True)) == text


# prefix_words ----------------------------------------------------------------------------


def test_the_words_of_the_forced_prefix_are_the_ones_kept() -> None:
    # The forced prefix is the promised words' tokens; a word may span several tokens.
    words = [
        Word(" Streaming", 0.0, 0.5, 0.9, (1, 2)),
        Word(" speech", 0.5, 0.9, 0.9, (3,)),
        Word(" recognition", 0.9, 1.6, 0.9, (4, 5)),
        Word(" now", 1.6, 1.9, 0.9, (6,)),
    ]
    assert prefix_words(words, [1, 2, 3]) == words[:2]
    assert prefix_words(words, []) == []  # nothing promised: every word may go
    assert prefix_words(words, [1, 2, 3, 4, 5, 6, 7]) == words  # all promised
    # Those words are what the guards never cut, even when they look invented.
    squeezed = [*words[:2], Word(" you", 2.0, 2.0, 0.9, (7,))]
    keep = len(prefix_words(squeezed, [1, 2, 3, 7]))
    assert drop_squeezed_tail(squeezed, keep, duration_s=2.0) == squeezed


# drop_squeezed_tail ----------------------------------------------------------------------


def test_words_squeezed_into_the_end_of_the_window_are_dropped() -> None:
    # Text invented after the speech: the alignment had no audio left to give it.
    heard = _timed(("the", 0.0, 0.3), ("river", 0.3, 0.9), ("bank", 0.9, 1.6))
    invented = [Word(" Thank", 1.95, 1.95, 0.5, (10,)), Word(" you.", 1.95, 1.97, 0.5, (11,))]
    assert drop_squeezed_tail([*heard, *invented], keep=0, duration_s=2.0) == heard
    promised = drop_squeezed_tail([*heard, *invented], keep=4, duration_s=2.0)
    assert promised == [*heard, invented[0]]  # promised words stay


def test_a_real_last_word_at_the_end_of_the_window_stays() -> None:
    # The speaker is still talking at the window's end: the last word has its own duration,
    # and a short word before the last instant is not squeezed either.
    words = _timed(("a", 0.0, 0.02), ("cat", 0.02, 0.5), ("sat", 0.5, 1.0), ("down", 1.92, 2.0))
    assert drop_squeezed_tail(words, keep=0, duration_s=2.0) == words
    early = _timed(("it", 0.0, 0.2), ("is", 1.5, 1.5), ("on", 1.6, 1.9))
    assert drop_squeezed_tail(early, keep=0, duration_s=2.0) == early


# drop_restart ----------------------------------------------------------------------------


def test_a_restart_of_the_window_text_is_cut() -> None:
    # Whisper starts over; the alignment has no audio for the second saying: it stacks it
    # at the end of the words before it.
    said = _words("streaming speech recognition, spoken words")
    end = said[-1].end_s
    again = [
        Word(f" {t}", end, end, 0.5, (20 + i,))
        for i, t in enumerate(
            ["streaming", "speech", "recognition,", "spoken", "words", "and", "text"]
        )
    ]
    kept = drop_restart([*said, *again], keep=0)
    assert " ".join(w.text.strip() for w in kept) == "streaming speech recognition, spoken words"


def test_a_restart_squeezed_into_a_sliver_of_audio_is_cut() -> None:
    # The second saying gets durations, but a fifth of the first one's pace.
    said = _timed(
        ("he", 0.0, 0.22),
        ("was", 0.22, 0.44),
        ("a", 0.44, 0.54),
        ("head", 0.54, 0.78),
        ("shorter", 0.78, 1.0),
    )
    again = _timed(("he", 1.0, 1.05), ("was", 1.05, 1.1), ("a", 1.1, 1.15), ("head", 1.15, 1.2))
    assert drop_restart([*said, *again], keep=0) == said


def test_a_restart_of_the_first_new_words_is_cut_after_the_promised_ones() -> None:
    promised = _words("well")
    new = _timed(
        ("we", 0.3, 0.5),
        ("will", 0.5, 0.8),
        ("be", 0.8, 1.1),
        ("we", 1.1, 1.1),
        ("will", 1.1, 1.1),
        ("be", 1.1, 1.1),
    )
    assert drop_restart([*promised, *new], keep=1) == [*promised, *new[:3]]


def test_a_restart_never_cuts_promised_words_and_ordinary_text_stays() -> None:
    promised = _words("one of the best and one of the best")
    assert drop_restart(promised, keep=9) == promised
    ordinary = _words("the cat sat on the mat and then the dog sat down")
    assert drop_restart(ordinary, keep=0) == ordinary


# A phrase really said twice: the second saying has its own audio, later in time.
SAID_TWICE = _timed(
    ("thank", 0.0, 0.3),
    ("you", 0.3, 0.5),
    ("very", 0.5, 0.8),
    ("much,", 0.8, 1.2),
    ("thank", 1.6, 1.9),
    ("you", 1.9, 2.1),
    ("very", 2.1, 2.4),
    ("much", 2.4, 2.8),
    ("everyone.", 2.8, 3.4),
)


def test_a_real_repeated_phrase_with_its_own_audio_stays() -> None:
    assert drop_restart(SAID_TWICE, keep=0) == SAID_TWICE
    assert drop_restart(SAID_TWICE, keep=2) == SAID_TWICE


def test_a_sentence_whose_end_repeats_the_window_start_stays() -> None:
    # Issue 15: the window began with "The invention of"; the speaker ended the sentence
    # with "the invention of the art of printing", each word with its own audio.
    words = _words(
        "The invention of movable metal letters may justly be considered as "
        "the invention of the art of printing."
    )
    assert drop_restart(words, keep=0) == words
    assert drop_restart(words, keep=11) == words  # "... considered as" promised


def test_a_repetition_is_heard_though_the_first_word_took_in_the_pause_before_it() -> None:
    # tiny.en on the suite's voice: "We" got the 0.5 s of silence before it, so the first
    # saying of "we will meet" spans twice the time of the second; word for word, the
    # second saying's pace is the first one's.
    words = _timed(
        ("We", 0.0, 0.68),
        ("will", 0.68, 0.84),
        ("meet", 0.84, 1.02),
        ("again", 1.02, 1.32),
        ("tomorrow,", 1.32, 2.0),
        ("and", 2.0, 2.18),
        ("we", 2.18, 2.32),
        ("will", 2.32, 2.48),
        ("meet", 2.48, 2.68),
        ("again", 2.68, 2.92),
        ("next", 2.92, 3.22),
        ("week.", 3.22, 4.54),
    )
    assert drop_restart(words, keep=0) == words


def test_a_repetition_said_faster_still_counts_as_heard() -> None:
    # The second saying needs half the first one's pace (median word length), not the same.
    said = _timed(("I", 0.0, 0.2), ("think", 0.2, 0.6), ("so,", 0.6, 1.2))
    quick = _timed(("I", 1.3, 1.4), ("think", 1.4, 1.6), ("so", 1.6, 1.9), ("too.", 1.9, 2.3))
    assert drop_restart([*said, *quick], keep=0) == [*said, *quick]


# drop_stacked_words ----------------------------------------------------------------------


def test_a_loop_stacked_at_one_instant_is_cut_where_it_starts() -> None:
    # Measured on a real recording (earnings22): the window ended after "next year" and
    # tiny.en looped; the alignment put the invented words, zero-length, at 3.8 s.
    heard = [
        ("We", 0.0, 0.38),
        ("already", 0.38, 0.74),
        ("on", 0.74, 0.96),
        ("Zoom", 0.96, 1.24),
        ("next", 2.4, 3.38),
        ("year,", 3.38, 3.8),
    ]
    looped = [
        ("we'll", 3.8, 3.8),
        ("be", 3.8, 3.8),
        ("on", 3.8, 3.8),
        ("Zoom", 3.8, 3.8),
        ("next", 3.8, 3.8),
        ("year,", 3.8, 4.04),
        ("we'll", 4.04, 4.24),
    ]
    words = _timed(*heard, *looped)
    assert texts(drop_stacked_words(words, keep=0)) == texts(_timed(*heard))
    assert drop_stacked_words(words, keep=4) == words[:6]  # the cut is after promised words


def test_three_short_words_that_move_on_in_time_stay() -> None:
    # Fast speech: the alignment gives each 40 ms, but they follow one another.
    words = _timed(
        ("it", 0.0, 0.3),
        ("is", 0.3, 0.34),
        ("a", 0.34, 0.38),
        ("of", 0.38, 0.42),
        ("cat", 0.42, 0.8),
    )
    assert drop_stacked_words(words, keep=0) == words


def test_short_words_that_are_not_three_in_a_row_stay() -> None:
    words = _timed(
        ("a", 0.0, 0.02),
        ("b", 0.02, 0.04),
        ("cat", 0.04, 0.4),
        ("a", 0.4, 0.42),
        ("dog", 0.42, 0.8),
    )
    assert drop_stacked_words(words, keep=0) == words
    promised = _timed(("x", 1.0, 1.0), ("y", 1.0, 1.0), ("z", 1.0, 1.0), ("end", 1.0, 1.5))
    assert drop_stacked_words(promised, keep=3) == promised  # promised words are never cut


# clean_tail: the guards in the engine's order --------------------------------------------


def test_the_guards_together_cut_a_stacked_restart_and_keep_a_heard_repeat() -> None:
    # tiny.en on cathy_arctic_a0013 at 2.4 s: the window's text said again at 1.86 s.
    heard = _timed(
        ("He", 0.0, 0.22),
        ("was", 0.22, 0.44),
        ("a", 0.44, 0.54),
        ("head", 0.54, 0.78),
        ("shorter", 0.78, 1.0),
        ("than", 1.0, 1.26),
        ("his", 1.26, 1.58),
        ("companion.", 1.58, 1.86),
    )
    restart = [
        Word(f" {t}", 1.86, 1.86, 0.4, (30 + i,))
        for i, t in enumerate(["He", "was", "a", "head", "shorter", "than", "his"])
    ]
    restart.append(Word(" companion.", 1.86, 2.38, 0.4, (40,)))
    assert clean_tail([*heard, *restart], prefix=[], duration_s=2.4) == heard
    # The same words said twice, each with its own audio, stay through every guard.
    twice = [*heard, *_timed(*((w.text.strip(), w.start_s + 2.0, w.end_s + 2.0) for w in heard))]
    assert clean_tail(twice, prefix=[], duration_s=4.2) == twice
    assert clean_tail(SAID_TWICE, prefix=[], duration_s=3.6) == SAID_TWICE
