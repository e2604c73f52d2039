"""Whisper on CTranslate2, behind the `Engine` interface.

faster-whisper supplies the pieces around the CTranslate2 model that are not ours to
rewrite (log-mel features, the tokenizer, hub download); the decoding loop is ours because
streaming needs what faster-whisper's `transcribe` does not offer: the encoder runs on
the window's real length (not padded to 30 s, several times faster on short windows),
a forced decoder prefix of promised words, and word timings from the alignment heads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import ctranslate2
import numpy as np
import threadpoolctl
from faster_whisper.feature_extractor import FeatureExtractor
from faster_whisper.tokenizer import Tokenizer

from server.engines.guards import END_MARGIN_S, clean_tail, trim_repetition
from server.engines.models import BUNDLED_MODEL, load_tokenizer, resolve_model_path
from streaming.audio import MODEL_SAMPLE_RATE_HZ
from streaming.engine import (
    DecodeRequest,
    EngineCapabilities,
    EngineLoadError,
    Hypothesis,
    Word,
)

log = logging.getLogger(__name__)

HOP_SAMPLES = 160  # one mel frame: 10 ms at 16 kHz
TOKENS_PER_SECOND = 50  # encoder positions: one per 20 ms
TAIL_PAD_S = 1.0  # silence after the window: without it, short windows loop instead of ending
MIN_AUDIO_S = 0.1  # shorter windows hold no word
MAX_WINDOW_S = 29.0  # the mel input (window + tail pad) must fit Whisper's 30 s
MAX_DECODE_TOKENS = 448  # Whisper's text context
MAX_PROMPT_TOKENS = 223  # as openai/whisper: half the context, minus one
TOKENS_PER_AUDIO_SECOND = 8  # generous bound on speech rate; stops runaway loops


class CTranslate2Whisper:
    """An `Engine` running Whisper with CTranslate2 on the CPU."""

    def __init__(
        self,
        model: str = BUNDLED_MODEL,
        compute_type: str = "int8",
        cpu_threads: int = 0,
        beam_size: int = 1,
        timestamps: bool = False,
        workers: int = 1,
        feature_threads: int = 1,
    ) -> None:
        """`cpu_threads` per model call, up to `workers` calls at once (CTranslate2
        replicas sharing the weights); `feature_threads` for numpy's BLAS (0: its own
        default, one per core)."""
        if feature_threads > 0:
            # The log-mel features are small matrix products; between them numpy's idle
            # BLAS threads spin and burn a core (measured: 107 -> 55 ms of CPU a step).
            # Process-wide, which is what the server wants.
            threadpoolctl.threadpool_limits(feature_threads, user_api="blas")
        path = resolve_model_path(model)
        self.name = "whisper-tiny.en (bundled)" if model in (BUNDLED_MODEL, "") else model
        self.path = path
        self.beam_size = beam_size
        # Without timestamp tokens Whisper ended windows more reliably (the last words of
        # vctk_p226_011 and p225_023 were lost to a hallucinated new span in that mode).
        self.timestamps = timestamps
        try:
            self._model = ctranslate2.models.Whisper(
                path, device="cpu", compute_type=compute_type, intra_threads=cpu_threads,
                inter_threads=workers,
            )
        except (RuntimeError, ValueError) as exc:  # a broken model.bin, a bad compute type
            raise EngineLoadError(
                f"CTranslate2 cannot load the Whisper model in {path} with compute type "
                f"{compute_type!r}: {exc}"
            ) from exc
        hf_tokenizer = load_tokenizer(path)
        self._multilingual = bool(self._model.is_multilingual)
        self.capabilities = EngineCapabilities(
            languages=None if self._multilingual else frozenset({"en"}),
            translation=self._multilingual, device="cpu",
        )
        self._hf_tokenizer = hf_tokenizer
        self._tokenizers: dict[str, Tokenizer] = {}
        self._features = FeatureExtractor(feature_size=self._model.n_mels)
        log.info("loaded Whisper model %s from %s (%s)", self.name, path, compute_type)

    def _tokenizer(self, language: str) -> Tokenizer:
        key = language if self._multilingual else "en"
        if key not in self._tokenizers:
            self._tokenizers[key] = Tokenizer(
                self._hf_tokenizer, self._multilingual, task="transcribe",
                language=key if self._multilingual else None,
            )
        return self._tokenizers[key]

    def transcribe(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        """Transcribe windows as one batch per start sequence (one model call each)."""
        results: list[Hypothesis | None] = [None] * len(requests)
        groups: dict[tuple[tuple[int, ...], bool], list[int]] = {}
        for i, request in enumerate(requests):
            if len(request.audio) < MIN_AUDIO_S * MODEL_SAMPLE_RATE_HZ:
                results[i] = Hypothesis(words=())
                continue
            tokenizer = self._tokenizer(request.language)
            key = (tuple(tokenizer.sot_sequence), bool(request.prompt))
            groups.setdefault(key, []).append(i)
        for (_, _), indices in groups.items():
            hypotheses = self._transcribe_batch([requests[i] for i in indices])
            for i, hypothesis in zip(indices, hypotheses, strict=True):
                results[i] = hypothesis
        return [r if r is not None else Hypothesis(words=()) for r in results]

    def _transcribe_batch(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        """One encoder and one decoder call for windows that share a start sequence.

        Windows are padded with silence to the longest one: Whisper expects silence
        after speech anyway (see TAIL_PAD_S), and CTranslate2 needs one length per batch.
        """
        tokenizer = self._tokenizer(requests[0].language)
        max_samples = int(MAX_WINDOW_S * MODEL_SAMPLE_RATE_HZ)
        audios = [np.asarray(r.audio, dtype=np.float32)[:max_samples] for r in requests]
        padded_len = max(len(a) for a in audios) + int(TAIL_PAD_S * MODEL_SAMPLE_RATE_HZ)
        mels = np.stack([
            self._features(np.pad(a, (0, padded_len - len(a))), padding=0) for a in audios
        ])
        encoded = self._model.encode(ctranslate2.StorageView.from_array(mels), to_cpu=True)

        # The start-of-transcript token must sit at one position in the whole batch, so
        # every prompt is cut to the shortest one.
        contexts = [tokenizer.encode(" " + r.prompt.strip())[-MAX_PROMPT_TOKENS:]
                    if r.prompt else [] for r in requests]
        context_len = min(len(c) for c in contexts)
        starts: list[list[int]] = []
        budget = 1
        prompt_lens = []
        for request, context, audio in zip(requests, contexts, audios, strict=True):
            prompt = [tokenizer.sot_prev, *context[len(context) - context_len:]] \
                if context_len else []
            prompt_lens.append(len(prompt))
            mode = tokenizer.timestamp_begin if self.timestamps else tokenizer.no_timestamps
            start = [*prompt, *tokenizer.sot_sequence, mode,
                     *request.prefix_tokens]
            starts.append(start)
            duration_s = len(audio) / MODEL_SAMPLE_RATE_HZ
            # CTranslate2 counts the whole start sequence in max_length (a budget below it
            # crashes the process), so the budget for new text comes on top of it.
            budget = max(budget, min(
                MAX_DECODE_TOKENS,
                len(start) + int(TOKENS_PER_AUDIO_SECOND * duration_s) + 8,
            ))
        generated = self._model.generate(
            encoded,
            starts,
            beam_size=self.beam_size,
            max_length=budget,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=not any(r.prefix_tokens for r in requests),
        )
        encoded_array = np.array(encoded)
        hypotheses = []
        for i, (request, audio, result) in enumerate(zip(requests, audios, generated,
                                                         strict=True)):
            prefix = list(request.prefix_tokens)
            sequence = list(result.sequences_ids[0])
            # The result repeats the prefix (after special tokens, in some versions)
            # before what it generated.
            while sequence and sequence[0] >= tokenizer.eot:
                sequence.pop(0)
            # CTranslate2 leaves out the end of text; a decode that ran into its budget
            # (half of max_length, less the prompt, as measured) never reached it.
            ran_out = len(sequence) >= min(budget // 2, budget - prompt_lens[i])
            tail = sequence[len(prefix):] if sequence[: len(prefix)] == prefix else sequence
            duration_s = len(audio) / MODEL_SAMPLE_RATE_HZ
            new_tokens = self._text_tokens(tail, tokenizer, duration_s, ended=not ran_out)
            words = self._words(tokenizer, encoded_array[i : i + 1], prefix, new_tokens,
                                len(audio) // HOP_SAMPLES)
            hypotheses.append(Hypothesis(
                words=tuple(clean_tail(words, prefix, duration_s)),
                no_speech_prob=float(result.no_speech_prob),
                avg_logprob=float(result.scores[0]) if result.scores else 0.0,
            ))
        return hypotheses

    @staticmethod
    def _text_tokens(generated: list[int], tokenizer: Tokenizer, duration_s: float,
                     ended: bool = False) -> list[int]:
        """Text tokens up to the end of text, or up to a timestamp past the real audio;
        `ended`: the decoder ended the text itself (see trim_repetition)."""
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

    def _split_words(self, tokenizer: Tokenizer, tokens: list[int]) -> list[list[int]]:
        """Word token groups; a word starts with a leading space."""
        if not tokens:
            return []
        subwords, groups = tokenizer.split_tokens_on_unicode(tokens)
        words: list[list[int]] = []
        for subword, group in zip(subwords, groups, strict=True):
            if subword.startswith(" ") or not words:
                words.append(list(group))
            else:
                words[-1].extend(group)
        return words

    def _words(
        self,
        tokenizer: Tokenizer,
        encoded: np.ndarray,
        prefix: list[int],
        new_tokens: list[int],
        num_frames: int,
    ) -> list[Word]:
        # Split prefix and new text apart, so a promised word is never merged with new text.
        groups = self._split_words(tokenizer, prefix) + self._split_words(tokenizer, new_tokens)
        text_tokens = [t for g in groups for t in g]
        if not text_tokens:
            return []
        return self._align_groups(tokenizer, encoded, groups, num_frames)

    def _align_groups(
        self, tokenizer: Tokenizer, encoded: np.ndarray, groups: list[list[int]], num_frames: int
    ) -> list[Word]:
        """Time each group of tokens (a word) with the alignment heads' DTW path."""
        text_tokens = [t for g in groups for t in g]
        alignment = self._model.align(
            ctranslate2.StorageView.from_array(encoded), tokenizer.sot_sequence, [text_tokens],
            max(num_frames, 1), median_filter_width=7,
        )[0]
        text_indices = np.array([pair[0] for pair in alignment.alignments])
        time_indices = np.array([pair[1] for pair in alignment.alignments])
        probs = np.asarray(alignment.text_token_probs, dtype=np.float64)
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
                    text=tokenizer.decode(group),
                    start_s=start,
                    end_s=max(end, start),
                    probability=float(np.mean(probs[lo:hi])) if hi > lo else 0.0,
                    tokens=tuple(group),
                )
            )
        return words

    def align_words(
        self, audio: np.ndarray, words: Sequence[str], language: str = "en"
    ) -> list[Word]:
        """Forced alignment of a known transcript: one `Word` per given word, in order.

        Times are relative to the start of `audio` (16 kHz mono float32, at most
        MAX_WINDOW_S: align a long recording window by window). The benchmark uses it
        for the reference text's word times, measured the same way as the server's.
        """
        tokenizer = self._tokenizer(language)
        audio = np.asarray(audio, dtype=np.float32)[: int(MAX_WINDOW_S * MODEL_SAMPLE_RATE_HZ)]
        groups = [tokenizer.encode(" " + w.strip()) for w in words]
        tokens = [t for g in groups for t in g]
        if not tokens or len(audio) < HOP_SAMPLES:
            return [Word(" " + w.strip(), 0.0, 0.0, 0.0, tuple(g)) for w, g in zip(words, groups,
                                                                                strict=True)]
        padded = np.pad(audio, (0, int(TAIL_PAD_S * MODEL_SAMPLE_RATE_HZ)))
        mel = self._features(padded, padding=0)
        encoded = self._model.encode(ctranslate2.StorageView.from_array(mel[None]), to_cpu=True)
        timed = self._align_groups(tokenizer, np.array(encoded), groups,
                                   len(audio) // HOP_SAMPLES)
        return [replace(t, text=" " + w.strip()) for t, w in zip(timed, words, strict=True)]
