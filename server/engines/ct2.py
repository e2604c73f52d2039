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

from server.engines.decoding import (
    HOP_SAMPLES,
    MAX_WINDOW_S,
    MEDIAN_FILTER_WIDTH,
    MIN_AUDIO_S,
    TAIL_PAD_S,
    Tokenizers,
    clean_tail,
    decode_budget,
    other_case_token,
    prompt_tokens,
    text_tokens,
    timed_words,
    word_groups,
)
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


class CTranslate2Whisper:
    """An `Engine` running Whisper with CTranslate2, on the CPU or a CUDA GPU."""

    def __init__(
        self,
        model: str = BUNDLED_MODEL,
        compute_type: str = "int8",
        cpu_threads: int = 0,
        beam_size: int = 1,
        timestamps: bool = False,
        workers: int = 1,
        feature_threads: int = 1,
        device: str = "cpu",
    ) -> None:
        """`cpu_threads` per model call, up to `workers` calls at once (CTranslate2
        replicas sharing the weights); `feature_threads` for numpy's BLAS (0: its own
        default, one per core); `device` "cpu", "cuda" or "auto" (CUDA when CTranslate2
        sees a GPU)."""
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
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        try:
            self._model = ctranslate2.models.Whisper(
                path,
                device=device,
                compute_type=compute_type,
                intra_threads=cpu_threads,
                inter_threads=workers,
            )
        except (RuntimeError, ValueError) as exc:  # a broken model.bin, a bad compute type
            raise EngineLoadError(
                f"CTranslate2 cannot load the Whisper model in {path} with compute type "
                f"{compute_type!r} on {device}: {exc}"
            ) from exc
        self._multilingual = bool(self._model.is_multilingual)
        self.capabilities = EngineCapabilities(
            languages=None if self._multilingual else frozenset({"en"}),
            translation=self._multilingual,
            device=device,
        )
        self._tokenizers = Tokenizers(load_tokenizer(path), self._multilingual)
        self._features = FeatureExtractor(feature_size=self._model.n_mels)
        log.info(
            "loaded Whisper model %s from %s (CTranslate2, %s, %s)",
            self.name,
            path,
            compute_type,
            device,
        )

    def _tokenizer(self, language: str) -> Tokenizer:
        return self._tokenizers.get(language)

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
        mels = np.stack(
            [self._features(np.pad(a, (0, padded_len - len(a))), padding=0) for a in audios]
        )
        encoded = self._model.encode(ctranslate2.StorageView.from_array(mels), to_cpu=True)

        # The start-of-transcript token must sit at one position in the whole batch, so
        # every prompt is cut to the shortest one.
        contexts = [prompt_tokens(tokenizer, r.prompt) for r in requests]
        context_len = min(len(c) for c in contexts)
        starts: list[list[int]] = []
        budget = 1
        prompt_lens = []
        for request, context, audio in zip(requests, contexts, audios, strict=True):
            prompt = (
                [tokenizer.sot_prev, *context[len(context) - context_len :]] if context_len else []
            )
            prompt_lens.append(len(prompt))
            mode = tokenizer.timestamp_begin if self.timestamps else tokenizer.no_timestamps
            start = [*prompt, *tokenizer.sot_sequence, mode, *request.prefix_tokens]
            starts.append(start)
            # CTranslate2 counts the whole start sequence in max_length (a budget below it
            # crashes the process), so the budget for new text comes on top of it.
            own = decode_budget(len(start), len(audio) / MODEL_SAMPLE_RATE_HZ)
            if request.max_new_tokens:
                # What CTranslate2 returns is at most half of max_length, less the prompt
                # (see ran_out below): the prefix and the new tokens.
                steps = len(request.prefix_tokens) + request.max_new_tokens
                own = min(own, max(2 * steps, steps + len(prompt) + len(tokenizer.sot_sequence)))
            budget = max(budget, own)
        generated = self._model.generate(
            encoded,
            starts,
            beam_size=self.beam_size,
            max_length=budget,
            return_scores=True,
            return_no_speech_prob=True,
            # The first step's logits score the first word's other letter case at no
            # extra model call (an `align` of that token cost ~7 ms a step, 8 % of the CPU).
            return_logits_vocab=any(_scores_other_case(r) for r in requests),
            suppress_blank=not any(r.prefix_tokens for r in requests),
        )
        encoded_array = np.array(encoded)
        hypotheses = []
        for i, (request, audio, result) in enumerate(zip(requests, audios, generated, strict=True)):
            prefix = list(request.prefix_tokens)
            sequence = list(result.sequences_ids[0])
            # The result repeats the prefix (after special tokens, in some versions)
            # before what it generated.
            first_step = 0
            while sequence and sequence[0] >= tokenizer.eot:
                sequence.pop(0)
                first_step += 1
            # CTranslate2 leaves out the end of text; a decode that ran into its budget
            # (half of max_length, less the prompt, as measured) never reached it.
            ran_out = len(sequence) >= min(budget // 2, budget - prompt_lens[i])
            tail = sequence[len(prefix) :] if sequence[: len(prefix)] == prefix else sequence
            duration_s = len(audio) / MODEL_SAMPLE_RATE_HZ
            # The request's own budget: a batch's may be larger.
            new_tokens = text_tokens(
                tail, tokenizer, duration_s, ended=not ran_out, budget=request.max_new_tokens
            )
            groups = word_groups(tokenizer, prefix, new_tokens)
            frames = len(audio) // HOP_SAMPLES
            words = (
                self._align_groups(tokenizer, encoded_array[i : i + 1], groups, frames)
                if groups
                else []
            )
            if words and _scores_other_case(request):
                words[0] = _with_other_case(tokenizer, words[0], result, first_step)
            hypotheses.append(
                Hypothesis(
                    words=tuple(clean_tail(words, prefix, duration_s)),
                    no_speech_prob=float(result.no_speech_prob),
                    avg_logprob=float(result.scores[0]) if result.scores else 0.0,
                )
            )
        return hypotheses

    def _align_groups(
        self, tokenizer: Tokenizer, encoded: np.ndarray, groups: list[list[int]], num_frames: int
    ) -> list[Word]:
        """Time each group of tokens (a word) with the alignment heads' DTW path."""
        text_tokens = [t for g in groups for t in g]
        alignment = self._model.align(
            ctranslate2.StorageView.from_array(encoded),
            tokenizer.sot_sequence,
            [text_tokens],
            max(num_frames, 1),
            median_filter_width=MEDIAN_FILTER_WIDTH,
        )[0]
        text_indices = np.array([pair[0] for pair in alignment.alignments])
        time_indices = np.array([pair[1] for pair in alignment.alignments])
        return timed_words(
            tokenizer, groups, text_indices, time_indices, alignment.text_token_probs
        )

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
            return [
                Word(" " + w.strip(), 0.0, 0.0, 0.0, tuple(g))
                for w, g in zip(words, groups, strict=True)
            ]
        padded = np.pad(audio, (0, int(TAIL_PAD_S * MODEL_SAMPLE_RATE_HZ)))
        mel = self._features(padded, padding=0)
        encoded = self._model.encode(ctranslate2.StorageView.from_array(mel[None]), to_cpu=True)
        timed = self._align_groups(tokenizer, np.array(encoded), groups, len(audio) // HOP_SAMPLES)
        return [replace(t, text=" " + w.strip()) for t, w in zip(timed, words, strict=True)]


def _scores_other_case(request: DecodeRequest) -> bool:
    return request.other_case and not request.prefix_tokens


def _with_other_case(
    tokenizer: Tokenizer, first: Word, result: ctranslate2.WhisperGenerationResult, step: int
) -> Word:
    """The window's first word with the probability the model gives the same word in the
    other letter case in its place (Word.other_case_probability), from the logits of the
    step that chose it. Those logits come after CTranslate2 suppressed tokens (end of
    text, blank), which the word's own probability from the alignment did not, so the
    other spelling is scaled from the first: their ratio is the same in both."""
    other = other_case_token(tokenizer, first.tokens)
    steps = result.logits[0] if result.logits else []
    if other is None or step >= len(steps) or result.sequences_ids[0][step] != first.tokens[0]:
        return first
    logits = np.asarray(steps[step])
    ratio = float(np.exp(np.float64(logits[other]) - np.float64(logits[first.tokens[0]])))
    return replace(first, other_case_probability=min(1.0, first.probability * ratio))
