"""What the Whisper engines share around the model: window limits, the decoding budget,
the tokenizers, the clean-up of generated tokens, and words with their timings.

Both engines (CTranslate2 in ct2.py, PyTorch in torch_whisper/) build their hypotheses
here, so that the session sees the same shape whichever runs: the forced prefix split at
its own word boundaries, word times from the alignment heads' DTW path, the same guards.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tokenizers
from faster_whisper.tokenizer import Tokenizer

from server.engines.guards import END_MARGIN_S, trim_repetition
from server.engines.guards import clean_tail as guarded_tail
from streaming.engine import Word

HOP_SAMPLES = 160  # one mel frame: 10 ms at 16 kHz
TOKENS_PER_SECOND = 50  # encoder positions: one per 20 ms
# Silence after the window: without it, short windows loop instead of ending. Half as
# much (0.5) saved 1 % of the CPU and cost 13 words in 2706 with every step on time over
# the 81 real recordings (136 against 123 errors; README "Engines").
TAIL_PAD_S = 1.0
MIN_AUDIO_S = 0.1  # shorter windows hold no word
MAX_WINDOW_S = 29.0  # the mel input (window + tail pad) must fit Whisper's 30 s
MAX_DECODE_TOKENS = 448  # Whisper's text context
MAX_PROMPT_TOKENS = 223  # as openai/whisper: half the context, minus one
TOKENS_PER_AUDIO_SECOND = 8  # generous bound on speech rate; stops runaway loops
MEDIAN_FILTER_WIDTH = 7  # of the attention weights along time, as openai/whisper


class Tokenizers:
    """One faster-whisper `Tokenizer` per language over a model's tokenizer.json."""

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, multilingual: bool) -> None:
        self._hf_tokenizer = hf_tokenizer
        self.multilingual = multilingual
        self._by_language: dict[str, Tokenizer] = {}

    def get(self, language: str) -> Tokenizer:
        key = language if self.multilingual else "en"
        if key not in self._by_language:
            self._by_language[key] = Tokenizer(
                self._hf_tokenizer,
                self.multilingual,
                task="transcribe",
                language=key if self.multilingual else None,
            )
        return self._by_language[key]


def prompt_tokens(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The context tokens of earlier text (its last MAX_PROMPT_TOKENS), without sot_prev."""
    return tokenizer.encode(" " + prompt.strip())[-MAX_PROMPT_TOKENS:] if prompt else []


def decode_budget(start_len: int, duration_s: float) -> int:
    """The `max_length` the CTranslate2 engine asks for: the start sequence (prompt, task
    tokens, forced prefix) plus room for TOKENS_PER_AUDIO_SECOND of text."""
    return min(MAX_DECODE_TOKENS, start_len + int(TOKENS_PER_AUDIO_SECOND * duration_s) + 8)


def decode_steps(budget: int, prompt_len: int) -> int:
    """Decoder steps after the prompt that CTranslate2 runs for `budget`: the forced
    prefix and the new tokens together, end of text included (its Whisper `generate` caps
    them at half the budget). The PyTorch engine applies the same cap, so that both stop
    a runaway decode at the same token."""
    return max(1, min(budget // 2, budget - prompt_len))


def text_tokens(
    generated: Sequence[int],
    tokenizer: Tokenizer,
    duration_s: float,
    ended: bool = False,
    budget: int = 0,
) -> list[int]:
    """Text tokens up to the end of text, or up to a timestamp past the real audio, with
    decoding loops trimmed. `ended`: the decoder ended the text itself, also when
    `generated` holds no end of text (CTranslate2 leaves it out); a decode that ran into
    its budget did not (see trim_repetition). `budget`: the request's own
    (DecodeRequest.max_new_tokens; 0: none): the first `budget` tokens only, and a decode
    it stopped is no loop the decoder never left, so its repetitions are left to the word
    guards, as when the decoder ends the text itself."""
    if 0 < budget <= len(generated):
        generated, ended = generated[:budget], True
    text: list[int] = []
    for token in generated:
        if token == tokenizer.eot:
            ended = True
            break
        if token >= tokenizer.timestamp_begin:
            if text and (token - tokenizer.timestamp_begin) * 0.02 >= duration_s - END_MARGIN_S:
                ended = True
                break  # a new span at the end of the audio: text invented in the padding
            continue
        if token < tokenizer.eot:
            text.append(token)
    return trim_repetition(text, ended=ended)


def split_words(tokenizer: Tokenizer, tokens: Sequence[int]) -> list[list[int]]:
    """Word token groups; a word starts with a leading space."""
    if not tokens:
        return []
    subwords, groups = tokenizer.split_tokens_on_unicode(list(tokens))
    words: list[list[int]] = []
    for subword, group in zip(subwords, groups, strict=True):
        if subword.startswith(" ") or not words:
            words.append(list(group))
        else:
            words[-1].extend(group)
    return words


def word_groups(
    tokenizer: Tokenizer, prefix: Sequence[int], new_tokens: Sequence[int]
) -> list[list[int]]:
    """The words of prefix and new text, split apart, so that a promised word is never
    merged with new text."""
    return split_words(tokenizer, prefix) + split_words(tokenizer, new_tokens)


def timed_words(
    tokenizer: Tokenizer,
    groups: Sequence[Sequence[int]],
    text_indices: np.ndarray,
    time_indices: np.ndarray,
    probs: Sequence[float] | np.ndarray,
) -> list[Word]:
    """Words from a DTW path over the alignment heads' attention: a word starts where the
    path first reaches its first token and ends where it reaches the next word's."""
    probs = np.asarray(probs, dtype=np.float64)
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND
    boundaries = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(int)
    last = len(jump_times) - 1
    words: list[Word] = []
    for i, group in enumerate(groups):
        lo, hi = int(boundaries[i]), int(boundaries[i + 1])
        start = float(jump_times[min(lo, last)]) if last >= 0 else 0.0
        end = float(jump_times[min(hi, last)]) if last >= 0 else 0.0
        words.append(
            Word(
                text=tokenizer.decode(list(group)),
                start_s=start,
                end_s=max(end, start),
                probability=float(np.mean(probs[lo:hi])) if hi > lo else 0.0,
                tokens=tuple(group),
            )
        )
    return words


def other_case_token(tokenizer: Tokenizer, tokens: Sequence[int]) -> int | None:
    """The one token that spells this one-token word with its first letter in the other
    case (" the" -> " The"), or None: a word of several tokens, no letter first, or an
    other-case spelling that is not one token. (Several tokens would take the engine more
    decoder passes to score; the words this is for, a segment's first "the", "and",
    "since", are one token either way.)"""
    if len(tokens) != 1:
        return None
    text = tokenizer.decode(list(tokens))
    word = text.lstrip()
    if not word or not word[0].isalpha() or word[0].swapcase() == word[0]:
        return None
    other = tokenizer.encode(text[: len(text) - len(word)] + word[0].swapcase() + word[1:])
    return other[0] if len(other) == 1 and other[0] != tokens[0] else None


def clean_tail(words: list[Word], prefix: Sequence[int], duration_s: float) -> list[Word]:
    """The engine's guards after the promised words (guards.clean_tail)."""
    return guarded_tail(words, prefix, duration_s)
