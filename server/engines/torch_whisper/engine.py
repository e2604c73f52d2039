"""Whisper in PyTorch behind the `Engine` interface: the promised words in one pass.

Each step of a session feeds the words it has promised back as a forced prefix.
CTranslate2 reads a forced prefix one decoder step per token, so a promised token costs
what a new one does. This engine reads the whole start sequence (prompt, task tokens,
forced prefix) in one decoder pass, computes logits only at the rows it needs (the last
position, the probabilities of the prefix tokens, the no-speech probability), then
decodes greedily with a key/value cache. The cross-attention scores of the alignment
heads come out of the same passes, so word timings need no second decoder pass.

A step mostly hears again what the window's previous step heard after the prefix: the
session hands those tokens over as a draft (`DecodeRequest.draft_tokens`), and the first
pass reads them too, with an end of text after them. The new tokens that greedy decoding
chooses alike at those rows were fed already and need no step of their own (speculative
decoding, the previous hypothesis as the draft); from the first token that differs on,
the request decodes step by step. Measured with every step on time (81 files, an Intel
Xeon, two pairs of replays): 3 to 10 % less CPU; about a quarter of the new tokens were
accepted drafts (the rest: mostly words past the live edge, which the guards drop and
which differ from step to step).

A session's next step has most of its window in common with the previous one: with
`encoder_reuse_s`, the encoder computes only the window's last seconds again
(encoder_reuse.py).

Windows of different lengths share a batch without padding each other: every window is
encoded on its own length (plus TAIL_PAD_S of silence, as the CTranslate2 engine does),
attention runs request by request, and a request that has ended drops out of the
batch's later decoding steps. A window is encoded the same in a batch as alone, and
decoded the same but for the last bits of int8 steps of several requests (Int8Linear).

Hypotheses are built exactly as in ct2.py (server/engines/decoding.py): the forced prefix
split at its own word boundaries, the same budget, guards and word timing method.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import threadpoolctl
import torch
from faster_whisper.feature_extractor import FeatureExtractor
from faster_whisper.tokenizer import Tokenizer
from torch import Tensor

from server.engines.decoding import (
    HOP_SAMPLES,
    MAX_WINDOW_S,
    MEDIAN_FILTER_WIDTH,
    MIN_AUDIO_S,
    TAIL_PAD_S,
    TOKENS_PER_SECOND,
    Tokenizers,
    clean_tail,
    decode_budget,
    decode_steps,
    other_case_token,
    prompt_tokens,
    text_tokens,
    timed_words,
    word_groups,
)
from server.engines.models import BUNDLED_MODEL, load_tokenizer, resolve_model_path
from server.engines.torch_whisper.alignment import attention_matrix, dtw
from server.engines.torch_whisper.encoder_reuse import EncoderStates, KeptEncoding
from server.engines.torch_whisper.model import (
    KV,
    KVCache,
    Whisper,
    audio_positions,
    quantize_int8,
)
from server.engines.torch_whisper.weights import (
    LoadedWeights,
    default_alignment_heads,
    is_hf_folder,
    load_ct2_folder,
    load_hf_folder,
    load_openai_checkpoint,
)
from server.memory import release_free_memory
from streaming.audio import MODEL_SAMPLE_RATE_HZ
from streaming.engine import DecodeRequest, EngineCapabilities, EngineLoadError, Hypothesis, Word

log = logging.getLogger(__name__)

ENGLISH_VOCAB = 51864  # the .en models' vocabulary: GPT-2's and Whisper's special tokens
CPU_TYPES = {
    "int8": "int8",
    "int8_float32": "int8",
    "int8_float16": "int8",
    "int8_bfloat16": "int8",
    "float32": "float32",
    "default": "int8",
    "auto": "int8",
    "bfloat16": "bfloat16",
}
CUDA_TYPES = {
    "int8": "float16",
    "int8_float16": "float16",
    "int8_float32": "float32",
    "int8_bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
    "bfloat16": "bfloat16",
    "default": "float16",
    "auto": "float16",
}
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.float32,
}


def load_weights(model: str) -> LoadedWeights:
    """The bundled model, a CTranslate2 folder, an openai-whisper .pt file, a Hugging Face
    Whisper folder, or a hub name (a CTranslate2 model, downloaded as the other engine
    does)."""
    path = Path(model)
    if model not in (BUNDLED_MODEL, "tiny.en-bundled", "") and path.suffix == ".pt":
        if not path.is_file():
            raise EngineLoadError(f"{model} does not exist (an openai-whisper .pt file)")
        return load_openai_checkpoint(path)
    if path.is_dir() and is_hf_folder(path):
        return load_hf_folder(path)
    if path.is_dir() and not (path / "model.bin").is_file():
        raise EngineLoadError(
            f"{model} has no model.bin: not a CTranslate2 model folder (nor a Hugging Face "
            "Whisper folder with config.json; the torch engine also reads a .pt file)"
        )
    return load_ct2_folder(Path(resolve_model_path(model)))


@dataclass
class _Row:
    """Where one request sits in a batch."""

    start: list[int]  # prompt, task tokens, forced prefix
    prefix: list[int]
    pad: int  # left padding in the first pass
    sot_at: int  # position of the first task token, padding included
    max_new: int  # new tokens allowed, end of text included
    budget: int  # the request's own (DecodeRequest.max_new_tokens; 0: none)
    duration_s: float
    frames: int  # mel frames of the real audio (without the tail pad)
    stop_edge: int  # AlignAtt: stop where attention reaches this many last positions
    # Fed in the first pass after the start: the request's draft and an end of text, at
    # most max_new tokens. The new tokens that greedy decoding chooses alike need no step.
    guess: list[int] = field(default_factory=list)
    fed_new: int = 0  # new tokens fed to the decoder so far (accepted guesses included)
    new: list[int] = field(default_factory=list)
    new_probs: list[float] = field(default_factory=list)
    logprob_sum: float = 0.0  # of the new tokens: as CTranslate2, forced ones count 0
    # Without a prefix, when the request asks (DecodeRequest.other_case): the first new
    # token's probabilities among the text tokens, for the first word's other letter case
    # (Word.other_case_probability).
    other_case: bool = False
    first_probs: Tensor | None = None
    ended: bool = False  # reached end of text or its budget

    @property
    def end(self) -> int:
        """The column after its start sequence (padding included): new token k's."""
        return self.pad + len(self.start)


class TorchWhisper:
    """An `Engine` running Whisper with PyTorch, on the CPU or a CUDA GPU."""

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
        encoder_reuse_s: float = 0.0,
    ) -> None:
        """As CTranslate2Whisper's arguments; `cpu_threads` sets PyTorch's intra-op
        threads for the whole process (0: PyTorch's default), and calls from `workers`
        threads run at once on the one model. With `encoder_reuse_s`, a request with a
        stream key reuses the encoder states of its audio over that many seconds before
        its end from the previous request with the key (encoder_reuse.py; 0: never)."""
        if beam_size != 1:
            raise EngineLoadError(
                "the torch engine decodes greedily: set model.beam_size: 1 "
                "(or use model.engine: ctranslate2 for beam search)"
            )
        if timestamps:
            raise EngineLoadError(
                "the torch engine decodes without timestamp tokens: set "
                "model.timestamps: false (or use model.engine: ctranslate2)"
            )
        if feature_threads > 0:
            threadpoolctl.threadpool_limits(feature_threads, user_api="blas")
        if cpu_threads > 0:
            torch.set_num_threads(cpu_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineLoadError(
                f"model.device is cuda, but PyTorch finds no CUDA GPU (torch {torch.__version__})"
            )
        kinds = CUDA_TYPES if device == "cuda" else CPU_TYPES
        if compute_type not in kinds:
            raise EngineLoadError(
                f"the torch engine has no compute type {compute_type!r} on {device}; "
                f"use one of {', '.join(sorted(kinds))}"
            )
        self._reuse_s = encoder_reuse_s
        self._states = EncoderStates() if encoder_reuse_s > 0 else None
        self.compute = kinds[compute_type]
        self.device = torch.device(device)
        self.dtype = DTYPES[self.compute]
        self.name = (
            "whisper-tiny.en (bundled, torch)"
            if model in (BUNDLED_MODEL, "")
            else f"{model} (torch)"
        )

        weights = load_weights(model)
        self.dims = weights.dims
        self._tokenizers = Tokenizers(
            load_tokenizer(str(self._tokenizer_dir(weights, model))),
            multilingual=self.dims.n_vocab > ENGLISH_VOCAB,
        )
        tokenizer = self._tokenizers.get("en")
        self.eot = tokenizer.eot
        self.model = self._build(weights, tokenizer)
        release_free_memory()  # the conversion's and float32 weights' freed heap
        self.capabilities = EngineCapabilities(
            languages=None if self._tokenizers.multilingual else frozenset({"en"}),
            translation=self._tokenizers.multilingual,
            device=device,
        )
        suppress = weights.suppress_ids
        if suppress is None:
            suppress = [
                *tokenizer.non_speech_tokens,
                tokenizer.transcribe,
                tokenizer.translate,
                tokenizer.sot,
                tokenizer.sot_prev,
                tokenizer.sot_lm,
                tokenizer.no_speech,
            ]
        begin = weights.suppress_ids_begin
        if begin is None:
            begin = [*tokenizer.encode(" "), tokenizer.eot]
        self._suppress = torch.tensor(sorted({t for t in suppress if t >= 0}), device=self.device)
        self._suppress_begin = torch.tensor(sorted(set(begin)), device=self.device)
        self._features = FeatureExtractor(feature_size=self.dims.n_mels)
        log.info(
            "loaded Whisper model %s (PyTorch %s, %s, %s)",
            self.name,
            torch.__version__,
            self.compute,
            device,
        )

    @staticmethod
    def _tokenizer_dir(weights: LoadedWeights, model: str) -> Path:
        if weights.tokenizer_dir is not None:
            return weights.tokenizer_dir
        if weights.dims.n_vocab == ENGLISH_VOCAB:  # every .en model has this one
            return Path(resolve_model_path(BUNDLED_MODEL))
        raise EngineLoadError(
            f"{model}: put the model's tokenizer.json beside it (a "
            "multilingual model's tokenizer is not bundled)"
        )

    def _build(self, weights: LoadedWeights, tokenizer: Tokenizer) -> Whisper:
        model = Whisper(weights.dims)
        # Copied (and cast to float32) into the model's own tensors; the loaded ones are
        # dropped at once: tiny.en's peak memory at load was 845 MB with a float32 copy.
        missing, unexpected = model.load_state_dict(weights.state, strict=False)
        weights.state.clear()
        missing = [
            k for k in missing if not k.startswith(("decoder.text_out", "decoder.special_out"))
        ]
        if missing or unexpected:
            raise EngineLoadError(
                f"the weights do not fit Whisper {weights.dims}: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}"
            )
        model.decoder.split_output(tokenizer.eot)
        heads = weights.alignment_heads or default_alignment_heads(weights.dims)
        for layer, head in heads:
            model.decoder.alignment_heads.setdefault(layer, []).append(head)
        model.eval().requires_grad_(False)
        if self.compute == "int8":
            model = quantize_int8(model)
        else:
            model = model.to(self.device, self.dtype)
        return model

    # --- Engine ----------------------------------------------------------------------

    def transcribe(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        """Transcribe windows as one batch: one encoder call, one decoder pass over every
        start sequence and draft, then one decoder step per new token the draft lacked."""
        live = [
            i for i, r in enumerate(requests) if len(r.audio) >= MIN_AUDIO_S * MODEL_SAMPLE_RATE_HZ
        ]
        results = [Hypothesis(words=()) for _ in requests]
        if live:
            with torch.inference_mode():
                hypotheses = self._transcribe_batch([requests[i] for i in live])
            for i, hypothesis in zip(live, hypotheses, strict=True):
                results[i] = hypothesis
        return results

    def _encode(
        self, audios: list[np.ndarray], keys: Sequence[str] = ()
    ) -> tuple[list[KV], list[int]]:
        """The decoder's cross-attention keys and values (per layer, [batch, head,
        positions, state/head]) of each window plus TAIL_PAD_S of silence, and the mel
        frames each one has. A window with a stream key reuses the positions kept for
        it by its previous step (encoder_reuse.py) and keeps those now over
        `encoder_reuse_s` before its end."""
        tail = int(TAIL_PAD_S * MODEL_SAMPLE_RATE_HZ)
        mels = [self._features(np.pad(a, (0, tail)), padding=0) for a in audios]
        frames = [m.shape[-1] for m in mels]
        states = self._states
        if states is None or not keys:
            keys = [""] * len(audios)
        kept = [
            states.take(k, a) if states is not None and k else None
            for k, a in zip(keys, audios, strict=True)
        ]
        starts = [k.positions if k else 0 for k in kept]
        encoder, decoder = self.model.encoder, self.model.decoder
        new_rows, new_kv = encoder.extend(
            [torch.from_numpy(m).to(self.device, self.dtype) for m in mels],
            starts,
            [k.self_kv if k else None for k in kept],
        )
        # Computed on every window's new rows in one sequence, without padding.
        new_cross = decoder.cross_keys_values(torch.cat(new_rows)[None])
        lengths = [len(r) for r in new_rows]
        total = max(audio_positions(f) for f in frames)
        cross: list[KV] = []
        for layer, (k_new, v_new) in enumerate(new_cross):
            k_all = k_new.new_zeros((len(audios), *k_new.shape[1:2], total, k_new.shape[3]))
            v_all = k_all.clone()
            windows = zip(
                kept,
                starts,
                torch.split(k_new[0], lengths, 1),
                torch.split(v_new[0], lengths, 1),
                strict=True,
            )
            for i, (old, start, k, v) in enumerate(windows):
                if old is not None:
                    k_all[i, :, :start] = old.cross_kv[layer][0][0]
                    v_all[i, :, :start] = old.cross_kv[layer][1][0]
                k_all[i, :, start : start + k.shape[1]] = k
                v_all[i, :, start : start + v.shape[1]] = v
            cross.append((k_all, v_all))
        for i, key in enumerate(keys):
            if key:
                self._keep(key, audios[i], kept[i], starts[i], new_rows[i], new_kv[i], cross, i)
        return cross, frames

    def _keep(
        self,
        key: str,
        audio: np.ndarray,
        old: KeptEncoding | None,
        start: int,
        rows: Tensor,
        self_kv: list[KV],
        cross: list[KV],
        i: int,
    ) -> None:
        """Keep window i's positions over `encoder_reuse_s` before its end for its next
        step (those already kept stay)."""
        seconds = len(audio) / MODEL_SAMPLE_RATE_HZ - self._reuse_s
        upto = max(start, audio_positions(int(seconds * MODEL_SAMPLE_RATE_HZ) // HOP_SAMPLES))
        if upto <= 0:
            return
        more = upto - start
        kv = [(k[:, :, :more], v[:, :, :more]) for k, v in self_kv]
        output = rows[:more]
        if old is not None:
            kv = [
                (torch.cat([ko, k], dim=2), torch.cat([vo, v], dim=2))
                for (ko, vo), (k, v) in zip(old.self_kv, kv, strict=True)
            ]
            output = torch.cat([old.output, output])
        else:
            # Copies, not views: a view would keep the whole encoder call's tensors
            # (every window of its group, every position) for as long as this is kept.
            kv = [(k.clone(), v.clone()) for k, v in kv]
            output = output.clone()
        assert self._states is not None
        self._states.put(
            key,
            KeptEncoding(
                audio.copy(),
                kv,
                output,
                [
                    (k[i : i + 1, :, :upto].clone(), v[i : i + 1, :, :upto].clone())
                    for k, v in cross
                ],
            ),
        )

    def _transcribe_batch(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        max_samples = int(MAX_WINDOW_S * MODEL_SAMPLE_RATE_HZ)
        audios = [np.asarray(r.audio, dtype=np.float32)[:max_samples] for r in requests]
        cross_kv, mel_frames = self._encode(audios, [r.stream_key for r in requests])
        decoder = self.model.decoder
        heard = [(0, audio_positions(f)) for f in mel_frames]

        tokenizers = [self._tokenizers.get(r.language) for r in requests]
        rows: list[_Row] = []
        for request, tokenizer, samples in zip(requests, tokenizers, audios, strict=True):
            context = prompt_tokens(tokenizer, request.prompt)
            prefix = list(request.prefix_tokens)
            room = self.dims.n_text_ctx - len(tokenizer.sot_sequence) - 2 - len(prefix) - 16
            context = context[len(context) - max(0, min(len(context), room)) :]
            prompt = [tokenizer.sot_prev, *context] if context else []
            start = [*prompt, *tokenizer.sot_sequence, tokenizer.no_timestamps, *prefix]
            duration_s = len(samples) / MODEL_SAMPLE_RATE_HZ
            steps = decode_steps(
                decode_budget(len(start), duration_s), len(prompt) + len(tokenizer.sot_sequence)
            )
            max_new = max(1, min(steps - len(prefix), self.dims.n_text_ctx - len(start)))
            if request.max_new_tokens:  # an end of text within it ends the text sooner
                max_new = min(max_new, request.max_new_tokens)
            draft = list(request.draft_tokens)
            draft = draft[: next((k for k, t in enumerate(draft) if t >= self.eot), len(draft))]
            rows.append(
                _Row(
                    start,
                    prefix,
                    0,
                    len(prompt),
                    max_new,
                    request.max_new_tokens,
                    duration_s,
                    len(samples) // HOP_SAMPLES,
                    round(request.stop_edge_s * TOKENS_PER_SECOND),
                    guess=[*draft, self.eot][:max_new],
                    other_case=request.other_case and not prefix,
                )
            )
        # Left-aligned by padding: every request's last fed token (its start, then its
        # guess: the draft and an end of text) is at width - 1.
        width = max(len(r.start) + len(r.guess) for r in rows)
        for r in rows:
            r.pad = width - len(r.start) - len(r.guess)
            r.sot_at += r.pad
        batch = len(rows)

        tokens = torch.full((batch, width), self.eot, dtype=torch.long)
        positions = torch.zeros((batch, width), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, r.pad :] = torch.tensor(r.start + r.guess)
            positions[i, r.pad :] = torch.arange(len(r.start) + len(r.guess))
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        spans = [(r.pad, width) for r in rows]

        cache = KVCache(
            self.dims.n_text_layer,
            batch,
            self.dims.n_text_head,
            max(r.end + r.max_new for r in rows),
            self.dims.n_text_state // self.dims.n_text_head,
            self.dtype if self.compute != "int8" else torch.float32,
            self.device,
        )
        layer_scores: list[Tensor] = []
        hidden = decoder(tokens, positions, cache, cross_kv, spans, spans, heard, layer_scores)
        # Per request, its alignment heads' scores [heads, tokens fed, audio], call by call.
        first_scores = torch.cat(layer_scores, dim=1)

        # The first pass's logits: the prefix tokens' probabilities, the no-speech
        # probability (at the start of transcript), and the new tokens' choices at the
        # last start token and at each guessed token.
        prefix_probs = self._prefix_probs(hidden, rows)
        # Rows as [batch, 1, state]: one per request, like a step's (see Int8Linear).
        specials = hidden[torch.arange(batch), torch.tensor([r.sot_at for r in rows])]
        no_speech = decoder.logits(specials[:, None])[:, 0].softmax(dim=-1)[
            :, tokenizers[0].no_speech
        ]
        choosers = torch.cat([hidden[i, r.end - 1 : width - 1] for i, r in enumerate(rows)])
        guessed = torch.split(decoder.logits(choosers[:, None])[:, 0], [len(r.guess) for r in rows])
        pending: dict[int, int] = {}  # request -> its chosen token, not fed yet
        fed: list[list[Tensor]] = []
        for i, r in enumerate(rows):
            token = self._check_guess(r, guessed[i], first_scores[i])
            if token is not None:
                pending[i] = token
            fed.append([first_scores[i, :, : r.end + r.fed_new]])

        while pending:
            # Every chosen token goes through the decoder once more, the end of text
            # included: its row of cross-attention scores is part of the alignment. The
            # requests that chose none have ended: the steps go on without them.
            live = sorted(pending)
            columns = [rows[i].end + rows[i].fed_new for i in live]
            layer_scores = []
            hidden = decoder(
                torch.tensor([[pending[i]] for i in live], device=self.device),
                torch.tensor(
                    [[c - rows[i].pad] for c, i in zip(columns, live, strict=True)],
                    device=self.device,
                ),
                cache,
                cross_kv,
                [(0, 1)] * len(live),
                [(rows[i].pad, c + 1) for c, i in zip(columns, live, strict=True)],
                [heard[i] for i in live],
                layer_scores,
                slots=live if len(live) < batch else None,
                columns=columns,
            )
            step_scores = torch.cat(layer_scores, dim=1)
            going = []
            for k, i in enumerate(live):
                fed[i].append(step_scores[k])
                rows[i].fed_new += 1
                if not rows[i].ended and not self._at_edge(step_scores[k, :, -1], rows[i]):
                    going.append(k)
                else:
                    rows[i].ended = True
            pending = {}
            if not going:
                break
            logits = decoder.logits(hidden[going, -1:])[:, 0]
            chosen = self._pick(logits, [rows[live[k]] for k in going])
            for k, token in zip(going, chosen, strict=True):
                pending[live[k]] = token

        return [
            self._hypothesis(
                tokenizer, r, torch.cat(fed[i], dim=1), prefix_probs[i], float(no_speech[i])
            )
            for i, (tokenizer, r) in enumerate(zip(tokenizers, rows, strict=True))
        ]

    def _prefix_probs(self, hidden: Tensor, rows: list[_Row]) -> list[list[float]]:
        """Per request, each prefix token's probability among the text tokens, as the
        alignment reports it: text logits at its prefix rows only, in one product (per
        request, so that the int8 kernel is the one it gets alone)."""
        out: list[list[float]] = []
        for i, r in enumerate(rows):
            if not r.prefix:
                out.append([])
                continue
            # Row end - 1 - p + k predicts prefix token k: no-timestamps, then the prefix.
            picked = hidden[i : i + 1, r.end - 1 - len(r.prefix) : r.end - 1]
            text = self.model.decoder.text_logits(picked)[0].log_softmax(dim=-1)
            targets = torch.tensor(r.prefix, device=self.device)[:, None]
            out.append(text.gather(1, targets)[:, 0].exp().tolist())
        return out

    def _check_guess(self, r: _Row, logits: Tensor, scores: Tensor) -> int | None:
        """Choose request r's new tokens along its guess, as steps would have chosen them:
        `logits[k]` [len(guess), vocab] and `scores` [heads, tokens fed, audio] are the
        first pass's at the row before guessed token k. A choice that is the guessed token
        was fed already; the first that differs is returned, to be fed by the next step
        (None: the request ended, at its end of text, its budget or the live edge)."""
        begins = [k == 0 and not r.prefix for k in range(len(r.guess))]
        tokens, logprobs, text_probs = self._choices(logits, begins)
        for k, guessed in enumerate(r.guess):
            if self._at_edge(scores[:, r.end - 1 + k], r):
                r.ended = True
                return None
            self._record(r, tokens[k], logprobs[k], text_probs[k])
            if tokens[k] != guessed:
                return tokens[k]
            r.fed_new += 1
            if r.ended:
                return None
        raise AssertionError("a guess ends with end of text or at the budget")

    @staticmethod
    def _at_edge(last: Tensor, r: _Row) -> bool:
        """AlignAtt: whether the alignment heads' scores `last` [heads, audio], at the row
        that would choose the request's next token, attend most to the last `stop_edge`
        positions of its audio: that token would be about audio not heard yet."""
        heard = r.frames // 2
        if not r.stop_edge or heard == 0:
            return False
        attention = last[:, :heard].softmax(dim=-1).mean(dim=0)
        return int(attention.argmax()) >= heard - r.stop_edge

    def _pick(self, logits: Tensor, rows: list[_Row]) -> list[int]:
        """Each request's next token from its row of `logits` [requests, vocab], recorded."""
        tokens, logprobs, text_probs = self._choices(
            logits, [not r.prefix and not r.new for r in rows]
        )
        for k, r in enumerate(rows):
            self._record(r, tokens[k], logprobs[k], text_probs[k])
        return tokens

    def _choices(self, logits: Tensor, begins: list[bool]) -> tuple[list[int], list[float], Tensor]:
        """Greedy choices for rows of `logits` [n, vocab]: never a suppressed token, and
        where `begins[k]` (the first new token, with no prefix: CTranslate2's
        suppress_blank) no blank nor end of text. With each choice's log probability and
        each row's probabilities among the text tokens."""
        text_probs = logits[:, : self.eot].softmax(dim=-1)
        logits = logits.clone()
        logits[:, self._suppress] = float("-inf")
        for k, begin in enumerate(begins):
            if begin:
                logits[k, self._suppress_begin] = float("-inf")
        logprobs = logits.log_softmax(dim=-1)
        chosen = logprobs.argmax(dim=-1)
        return chosen.tolist(), logprobs.gather(1, chosen[:, None])[:, 0].tolist(), text_probs

    def _record(self, r: _Row, token: int, logprob: float, text_probs: Tensor) -> None:
        """Token as request r's next new token; ends r at the end of text or its budget."""
        if not r.new and r.other_case:
            r.first_probs = text_probs
        r.new.append(token)
        r.logprob_sum += logprob
        r.new_probs.append(float(text_probs[token]) if token < self.eot else 0.0)
        if token == self.eot or len(r.new) >= r.max_new:
            r.ended = True

    def _hypothesis(
        self,
        tokenizer: Tokenizer,
        r: _Row,
        fed: Tensor,
        prefix_probs: list[float],
        no_speech: float,
    ) -> Hypothesis:
        kept = text_tokens(r.new, tokenizer, r.duration_s, budget=r.budget)
        at = [k for k, t in enumerate(r.new) if t < tokenizer.eot][: len(kept)]
        groups = word_groups(tokenizer, r.prefix, kept)
        avg = r.logprob_sum / max(1, len(r.prefix) + len(r.new))
        if not groups:
            return Hypothesis(words=(), no_speech_prob=no_speech, avg_logprob=avg)
        # Rows of the fed sequence: task tokens, no-timestamps and the prefix (first
        # pass), the new tokens (the draft's accepted ones in the first pass too, then one
        # per step: new token k at row end + k), and the end of text when it was fed
        # right after the kept text (as CTranslate2's align feeds it).
        first = list(range(r.sot_at, r.end))
        new_rows = [r.end + k for k in at]
        whole = len(kept) == len(r.new) - (r.new[-1:] == [self.eot]) and at == list(
            range(len(kept))
        )
        eot_row = [r.end + len(r.new) - 1] if whole and r.new[-1:] == [self.eot] else []
        rows = first + new_rows + eot_row
        n_task = len(tokenizer.sot_sequence)
        matrix = attention_matrix(fed[:, rows], r.frames // 2, MEDIAN_FILTER_WIDTH)
        matrix = matrix[n_task : n_task + 1 + len(r.prefix) + len(kept)]
        text_indices, time_indices = dtw(-matrix)
        probs = prefix_probs + [r.new_probs[k] for k in at]
        words = timed_words(tokenizer, groups, text_indices, time_indices, probs)
        other = other_case_token(tokenizer, words[0].tokens) if at[:1] == [0] else None
        if other is not None and r.first_probs is not None:
            words[0] = replace(words[0], other_case_probability=float(r.first_probs[other]))
        return Hypothesis(
            words=tuple(clean_tail(words, r.prefix, r.duration_s)),
            no_speech_prob=no_speech,
            avg_logprob=avg,
        )

    def align_words(
        self, audio: np.ndarray, words: Sequence[str], language: str = "en"
    ) -> list[Word]:
        """Forced alignment of a known transcript, as CTranslate2Whisper.align_words: one
        decoder pass over the task tokens, the words and the end of text."""
        tokenizer = self._tokenizers.get(language)
        audio = np.asarray(audio, dtype=np.float32)[: int(MAX_WINDOW_S * MODEL_SAMPLE_RATE_HZ)]
        groups = [tokenizer.encode(" " + w.strip()) for w in words]
        tokens = [t for g in groups for t in g]
        if not tokens or len(audio) < HOP_SAMPLES:
            return [
                Word(" " + w.strip(), 0.0, 0.0, 0.0, tuple(g))
                for w, g in zip(words, groups, strict=True)
            ]
        with torch.inference_mode():
            cross_kv, mel_frames = self._encode([audio])
            decoder = self.model.decoder
            sequence = [*tokenizer.sot_sequence, tokenizer.no_timestamps, *tokens, tokenizer.eot]
            n = len(sequence)
            cache = KVCache(
                self.dims.n_text_layer,
                1,
                self.dims.n_text_head,
                n,
                self.dims.n_text_state // self.dims.n_text_head,
                torch.float32 if self.compute == "int8" else self.dtype,
                self.device,
            )
            scores: list[Tensor] = []
            hidden = decoder(
                torch.tensor([sequence], device=self.device),
                torch.arange(n, device=self.device)[None],
                cache,
                cross_kv,
                [(0, n)],
                [(0, n)],
                [(0, audio_positions(mel_frames[0]))],
                scores,
            )
            n_task = len(tokenizer.sot_sequence)
            text = decoder.text_logits(hidden[0, n_task : n_task + len(tokens)]).softmax(-1)
            probs = text.gather(1, torch.tensor(tokens, device=self.device)[:, None])[:, 0]
            matrix = attention_matrix(
                torch.cat(scores, dim=1)[0], (len(audio) // HOP_SAMPLES) // 2, MEDIAN_FILTER_WIDTH
            )[n_task:-1]
        text_indices, time_indices = dtw(-matrix)
        timed = timed_words(tokenizer, groups, text_indices, time_indices, probs.tolist())
        return [replace(t, text=" " + w.strip()) for t, w in zip(timed, words, strict=True)]
