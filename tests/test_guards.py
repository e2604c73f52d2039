"""The engine's clean-up guards (server/engines/guards.py), on hand-made hypotheses.

Each guard gets a case of the failure it cuts and a case of real-speech-like words it
must keep.
"""

from __future__ import annotations

from server.engines.guards import drop_restart, drop_stacked_words
from streaming.engine import Word


def texts(words: list[Word]) -> list[str]:
    return [w.text for w in words]


def _words(text: str) -> list[Word]:
    return [Word(f" {t}", i * 0.3, i * 0.3 + 0.25, 0.9, (i,)) for i, t in enumerate(text.split())]


# drop_restart ----------------------------------------------------------------------------


def test_a_restart_of_the_window_text_is_cut() -> None:
    words = _words("streaming speech recognition, spoken words streaming speech recognition, "
                   "spoken words and text")
    kept = drop_restart(words, keep=0)
    assert " ".join(w.text.strip() for w in kept) == "streaming speech recognition, spoken words"


def test_a_restart_never_cuts_promised_words_and_ordinary_text_stays() -> None:
    promised = _words("one of the best and one of the best")
    assert drop_restart(promised, keep=9) == promised
    ordinary = _words("the cat sat on the mat and then the dog sat down")
    assert drop_restart(ordinary, keep=0) == ordinary


# drop_stacked_words ----------------------------------------------------------------------


def _timed(*spans: tuple[str, float, float]) -> list[Word]:
    return [Word(f" {t}", a, b, 0.9, (i,)) for i, (t, a, b) in enumerate(spans)]


def test_a_loop_stacked_at_one_instant_is_cut_where_it_starts() -> None:
    # Measured on a real recording (earnings22): the window ended after "next year" and
    # tiny.en looped; the alignment put the invented words, zero-length, at 3.8 s.
    heard = [("We", 0.0, 0.38), ("already", 0.38, 0.74), ("on", 0.74, 0.96),
             ("Zoom", 0.96, 1.24), ("next", 2.4, 3.38), ("year,", 3.38, 3.8)]
    looped = [("we'll", 3.8, 3.8), ("be", 3.8, 3.8), ("on", 3.8, 3.8), ("Zoom", 3.8, 3.8),
              ("next", 3.8, 3.8), ("year,", 3.8, 4.04), ("we'll", 4.04, 4.24)]
    words = _timed(*heard, *looped)
    assert texts(drop_stacked_words(words, keep=0)) == texts(_timed(*heard))
    assert drop_stacked_words(words, keep=4) == words[:6]  # the cut is after promised words


def test_short_words_that_are_not_three_in_a_row_stay() -> None:
    words = _timed(("a", 0.0, 0.02), ("b", 0.02, 0.04), ("cat", 0.04, 0.4),
                   ("a", 0.4, 0.42), ("dog", 0.42, 0.8))
    assert drop_stacked_words(words, keep=0) == words
    promised = _timed(("x", 1.0, 1.0), ("y", 1.0, 1.0), ("z", 1.0, 1.0), ("end", 1.0, 1.5))
    assert drop_stacked_words(promised, keep=3) == promised  # promised words are never cut
