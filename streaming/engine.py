"""The interface between the streaming policy and a speech recognition model.

The policy only asks for transcriptions of audio windows, optionally forcing a decoder
prefix (the words it has already promised) and a prompt (earlier text for context), so
that a scripted fake, CTranslate2 or a PyTorch backend can stand behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Word:
    text: str  # as the model spells it, with its leading space
    start_s: float  # relative to the start of the decoded audio
    end_s: float
    probability: float
    tokens: tuple[int, ...]
    # A window's first word only: the model's probability of the same word with its
    # first letter in the other case (" the" for " The"), which an engine reports when
    # both spellings are one token each. Whether a window starts a sentence is not in its
    # audio, so a first word's probability is often split between the two.
    other_case_probability: float = 0.0

    @property
    def caseless_probability(self) -> float:
        """The model's probability of this word, its letter case aside."""
        return min(1.0, self.probability + self.other_case_probability)


@dataclass(frozen=True)
class Hypothesis:
    words: tuple[Word, ...]
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0

    @property
    def text(self) -> str:
        return "".join(w.text for w in self.words).strip()

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(t for w in self.words for t in w.tokens)


@dataclass(frozen=True)
class DecodeRequest:
    audio: np.ndarray = field(repr=False)  # 16 kHz mono float32
    prefix_tokens: tuple[int, ...] = ()  # forced start of the transcript
    prompt: str = ""  # earlier text, context only
    language: str = "en"
    # AlignAtt: an engine that sees its cross-attention while decoding may stop once the
    # alignment heads attend within this many seconds of the audio's end (0: decode to
    # the end). Others decode to the end, and the policy cuts by word times.
    stop_edge_s: float = 0.0
    # Names one growing window (a session's live window of one segment): the next
    # request with this key starts with the same audio, longer. An engine may keep
    # what it computed from that audio for it (the torch engine's encoder states).
    stream_key: str = ""
    # What this window's previous step heard after the same prefix (its tokens): an
    # engine may feed it in one pass and keep the tokens greedy decoding chooses alike,
    # instead of one decoder step each (the torch engine). Only a guess: the result is
    # what decoding without it gives, but for rounding.
    draft_tokens: tuple[int, ...] = ()
    # At most this many tokens after the prefix (the end of text aside; 0: as many as the
    # window's length allows). A partial step hears little more audio than the previous
    # one, and what a decoder writes past that is mostly text it invents past the live
    # edge, which the engine's guards drop: the session caps it (session.partial_budget).
    max_new_tokens: int = 0
    # Report the first word's other letter case (Word.other_case_probability) when the
    # window starts with no prefix: the session asks only while its early-commit rule
    # reads it, so that no step pays for a figure nobody uses.
    other_case: bool = False


class EngineLoadError(RuntimeError):
    """A model that cannot be found or loaded; the message is meant for the user.

    Every engine raises this one type, so the command line need not know the backends.
    """


@dataclass(frozen=True)
class EngineCapabilities:
    """What a loaded model can do, stated by the engine rather than probed by callers."""

    languages: frozenset[str] | None = frozenset({"en"})  # None: every language Whisper knows
    translation: bool = False  # can translate into English (multilingual models)
    device: str = "cpu"  # where the model runs: "cpu" or "cuda"

    def supports_language(self, language: str) -> bool:
        return self.languages is None or language in self.languages


class Engine(Protocol):
    # Read-only to callers: an engine may hold them as attributes or properties.
    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> EngineCapabilities: ...

    def transcribe(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        """Transcribe a batch of windows; one hypothesis per request, in order.

        A hypothesis starts with the words of `prefix_tokens`, split exactly at the word
        boundaries of the prefix, so that promised words are never merged with new ones.
        """
        ...
