"""Whisper's transformer in PyTorch, shaped for streaming.

The layers are Whisper's (openai/whisper's model.py is the reference); what differs is
how they are called:

- the encoder runs on each window's real length (the positional embedding is sliced, as
  whisper.cpp's audio_ctx does), and windows of different lengths share a batch: their
  rows go through the encoder as one sequence without padding, attention runs request by
  request on each one's own rows (`attend`), so a window is encoded exactly as alone;
- a decoding step computes only the requests still decoding (`slots`); in float a
  window decodes exactly as alone, in int8 a step of several requests may round the
  last bits apart (Int8Linear);
- the decoder keeps a key/value cache and reads a whole token sequence (prompt, task
  tokens, forced prefix) in one forward pass: matrix-matrix products instead of one
  matrix-vector step per token;
- the output projection is split into text tokens and special tokens, and the caller
  asks for logits only at the rows it needs;
- the cross-attention scores of the alignment heads are handed out as they are computed,
  for word timings (DTW) without a second decoder pass.

Self-attention's query, key and value projections are one fused linear layer, and the
cross-attention's key and value another (as CTranslate2 stores them): fewer, larger
products. weights.py maps openai-whisper, Hugging Face and CTranslate2 weights onto it.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Dims:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


def _heads(x: Tensor, n_head: int) -> Tensor:
    """[batch, time, state] -> [batch, head, time, state/head]."""
    b, t, d = x.shape
    return x.view(b, t, n_head, d // n_head).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class Mlp(nn.Module):
    def __init__(self, n_state: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_state, 4 * n_state)
        self.fc2 = nn.Linear(4 * n_state, n_state)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(F.gelu(self.fc1(x)))
        return out


KV = tuple[Tensor, Tensor]  # keys and values [batch, head, time, state/head]
Spans = list[tuple[int, int]]  # per request of a batch: its rows [lo, hi) along time


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rows: Spans,
    keys: Spans,
    causal: bool = False,
    scores: list[Tensor] | None = None,
    heads: list[int] | None = None,
    slots: list[int] | None = None,
) -> Tensor:
    """Attention, request by request: request i's query rows `rows[i]` attend to its key
    rows `keys[i]` only (causally when `causal`), so that no request sees another's
    padding and a request computes exactly what it computes alone: the same products on
    the same shapes, whatever the batch (no masks: their kernels round differently).
    Rows outside a request's span come out zero. With `heads`, the scores of those
    heads (before the softmax) are appended to `scores`, [batch, heads, len, keys],
    -inf past a request's keys. With `slots`, request i's keys and values are those of
    batch row `slots[i]` of `k` and `v` (a decoding step of some of a batch's requests)."""
    out = q.new_zeros(q.shape)
    if heads:
        found = q.new_full(
            (q.shape[0], len(heads), q.shape[2], k.shape[2]), float("-inf"), dtype=torch.float32
        )
    for i, ((lo, hi), (klo, khi)) in enumerate(zip(rows, keys, strict=True)):
        j = slots[i] if slots is not None else i
        qi, ki, vi = q[i : i + 1, :, lo:hi], k[j : j + 1, :, klo:khi], v[j : j + 1, :, klo:khi]
        if not heads:
            out[i : i + 1, :, lo:hi] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal)
            continue
        # Written out for the alignment heads' scores.
        qk = (qi @ ki.transpose(-1, -2)) * (qi.shape[-1] ** -0.5)
        if causal:
            qk = qk + torch.full(
                qk.shape[-2:], float("-inf"), device=qk.device, dtype=qk.dtype
            ).triu(1)
        found[i, :, lo:hi, : khi - klo] = qk[0, heads].float()
        out[i : i + 1, :, lo:hi] = qk.softmax(dim=-1) @ vi
    if heads and scores is not None:
        scores.append(found)
    return out


class SelfAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_state, 3 * n_state)  # the key's bias part is zero
        self.out = nn.Linear(n_state, n_state)

    def forward(
        self,
        x: Tensor,
        rows: Spans,
        keys: Spans,
        causal: bool,
        cache: KVCache | None = None,
        layer: int = 0,
        slots: list[int] | None = None,
        columns: list[int] | None = None,
    ) -> Tensor:
        q, k, v = (_heads(t, self.n_head) for t in self.qkv(x).chunk(3, dim=-1))
        if cache is not None:
            k, v = cache.extend(layer, k, v, slots, columns)
        out: Tensor = self.out(_merge(attend(q, k, v, rows, keys, causal, slots=slots)))
        return out


class CrossAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.kv = nn.Linear(n_state, 2 * n_state)  # the key's bias part is zero
        self.out = nn.Linear(n_state, n_state)

    def keys_values(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [batch, head, audio, state/head], contiguous: every step reads
        them again (measured: a third faster products than on the strided views)."""
        k, v = self.kv(audio).chunk(2, dim=-1)
        return _heads(k, self.n_head).contiguous(), _heads(v, self.n_head).contiguous()

    def forward(
        self,
        x: Tensor,
        kv: tuple[Tensor, Tensor],
        rows: Spans,
        audio: Spans,
        heads: list[int] | None,
        scores: list[Tensor] | None,
        slots: list[int] | None = None,
    ) -> Tensor:
        q = _heads(self.query(x), self.n_head)
        attended = attend(
            q,
            kv[0],
            kv[1],
            rows,
            audio,
            scores=scores,
            heads=heads if scores is not None else None,
            slots=slots,
        )
        out: Tensor = self.out(_merge(attended))
        return out


class EncoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn_ln = nn.LayerNorm(n_state)
        self.attn = SelfAttention(n_state, n_head)
        self.mlp_ln = nn.LayerNorm(n_state)
        self.mlp = Mlp(n_state)


class DecoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn_ln = nn.LayerNorm(n_state)
        self.attn = SelfAttention(n_state, n_head)
        self.cross_ln = nn.LayerNorm(n_state)
        self.cross = CrossAttention(n_state, n_head)
        self.mlp_ln = nn.LayerNorm(n_state)
        self.mlp = Mlp(n_state)


class KVCache:
    """The decoder's self-attention keys and values, preallocated for `length` positions."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch, n_head, length, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.length = 0  # positions filled (the same in every layer once a pass is done)
        self._pending = 0

    def extend(
        self,
        layer: int,
        k: Tensor,
        v: Tensor,
        slots: list[int] | None = None,
        columns: list[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Write `k` and `v` [batch, head, len, state/head] after the filled positions (of
        batch rows `slots` only: the other rows' positions there are left unwritten, for
        requests that have ended); the keys and values so far, of every row. With
        `columns` (a decoding step: len 1), request i's key and value go to its own
        column `columns[i]`: requests that accepted drafts of different lengths are at
        different columns, and a column past a request's own is never attended."""
        if columns is not None:
            device = k.device
            requests = torch.tensor(slots or range(len(columns)), device=device)
            at = torch.tensor(columns, device=device)
            self.keys[layer][requests, :, at] = k[:, :, 0]
            self.values[layer][requests, :, at] = v[:, :, 0]
            end = max(columns) + 1
            return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        batch_rows = slice(None) if slots is None else slots
        end = self.length + k.shape[2]
        self.keys[layer][batch_rows, :, self.length : end] = k
        self.values[layer][batch_rows, :, self.length : end] = v
        self._pending = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def commit(self) -> None:
        self.length = self._pending


ENCODER_GROUP_POSITIONS = 1000  # encoder positions (20 ms each) computed in one call


class AudioEncoder(nn.Module):
    positional_embedding: Tensor

    def __init__(self, dims: Dims) -> None:
        super().__init__()
        d = dims.n_audio_state
        self.conv1 = nn.Conv1d(dims.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", torch.zeros(dims.n_audio_ctx, d))
        self.blocks = nn.ModuleList(
            EncoderBlock(d, dims.n_audio_head) for _ in range(dims.n_audio_layer)
        )
        self.ln_post = nn.LayerNorm(d)

    def extend(
        self, mels: list[Tensor], starts: list[int], past: list[list[KV] | None]
    ) -> tuple[list[Tensor], list[list[KV]]]:
        """Window i's encoder output from position `starts[i]` on, its earlier positions
        not computed again: their keys and values `past[i]` (per layer, [1, head,
        starts[i], state/head], as an earlier call returned them) stand in for them, as
        a decoder's cache does. `mels[i]`: [n_mels, frames], the whole window. Returns per
        window its new rows [len, state] and per layer their keys and values. Each window
        is computed on its own rows only, so a batch changes no window's result.

        Windows go through in groups of at most ENCODER_GROUP_POSITIONS new positions:
        measured on 16 windows of 2-6 s (int8, one thread, an AMD EPYC), all in one call
        took 560-620 ms against 390-450 in groups of at most 500-2000 positions or one by
        one: past a few thousand rows the passes over the activations leave the caches."""
        rows: list[Tensor] = []
        new_kv: list[list[KV]] = []
        first, size = 0, 0
        for i, (mel, start) in enumerate(zip(mels, starts, strict=True)):
            positions = audio_positions(mel.shape[-1]) - start
            if i > first and size + positions > ENCODER_GROUP_POSITIONS:
                group = self._extend_group(mels[first:i], starts[first:i], past[first:i])
                rows += group[0]
                new_kv += group[1]
                first, size = i, 0
            size += positions
        if first < len(mels):
            group = self._extend_group(mels[first:], starts[first:], past[first:])
            rows += group[0]
            new_kv += group[1]
        return rows, new_kv

    def _extend_group(
        self, mels: list[Tensor], starts: list[int], past: list[list[KV] | None]
    ) -> tuple[list[Tensor], list[list[KV]]]:
        """`extend` on one group of windows, in one call."""
        rows: list[Tensor] = []
        for mel, start in zip(mels, starts, strict=True):
            # conv2's position p reads conv1's frames 2p-1..2p+1, conv1's frame f mel
            # frames f-1..f+1: from mel frame 2·start-2 on, all but the first output is
            # exact (that one saw conv1's zero padding).
            cut = max(0, 2 * start - 2)
            x = F.gelu(self.conv2(F.gelu(self.conv1(mel[None, :, cut:]))))[0].t()
            x = x[1:] if start else x
            rows.append(x + self.positional_embedding[start : start + len(x)].to(x.dtype))
        lengths = [len(r) for r in rows]
        # One sequence of every window's rows, no padding: the layers that work row by
        # row (linear layers, layer norms, GELU) compute no one's padding.
        x = torch.cat(rows)[None]
        new_kv: list[list[KV]] = [[] for _ in rows]
        for layer, block in enumerate(cast(list[EncoderBlock], list(self.blocks))):
            attn = block.attn
            q, k, v = (_heads(t, attn.n_head) for t in attn.qkv(block.attn_ln(x)).chunk(3, dim=-1))
            attended = []
            windows = zip(
                torch.split(q, lengths, 2),
                torch.split(k, lengths, 2),
                torch.split(v, lengths, 2),
                past,
                strict=True,
            )
            for i, (qi, ki, vi, before) in enumerate(windows):
                new_kv[i].append((ki, vi))
                if before is not None:
                    ki = torch.cat([before[layer][0], ki], dim=2)
                    vi = torch.cat([before[layer][1], vi], dim=2)
                attended.append(F.scaled_dot_product_attention(qi, ki, vi))
            x = x + attn.out(_merge(torch.cat(attended, dim=2)))
            x = x + block.mlp(block.mlp_ln(x))
        x = self.ln_post(x)
        return list(torch.split(x[0], lengths)), new_kv


def audio_positions(frames: int) -> int:
    """Encoder positions for `frames` mel frames (the second convolution has stride 2)."""
    return (frames + 1) // 2


class TextDecoder(nn.Module):
    def __init__(self, dims: Dims) -> None:
        super().__init__()
        d = dims.n_text_state
        self.n_head = dims.n_text_head
        self.token_embedding = nn.Embedding(dims.n_vocab, d)
        self.positional_embedding = nn.Parameter(torch.zeros(dims.n_text_ctx, d))
        self.blocks = nn.ModuleList(
            DecoderBlock(d, dims.n_text_head) for _ in range(dims.n_text_layer)
        )
        self.ln = nn.LayerNorm(d)
        # The output projection (tied to the token embedding), split at the first special
        # token by `split_output`: text rows, then special rows.
        self.text_out = nn.Linear(d, 1, bias=False)
        self.special_out = nn.Linear(d, 1, bias=False)
        self.n_text_vocab = 0
        # Per layer, the heads whose cross-attention scores `forward` reports.
        self.alignment_heads: dict[int, list[int]] = {}

    def split_output(self, n_text_vocab: int) -> None:
        """Tie the output projection to the embedding: rows [0, n_text_vocab) are text."""
        weight = self.token_embedding.weight
        self.n_text_vocab = n_text_vocab
        self.text_out.weight = nn.Parameter(weight[:n_text_vocab], requires_grad=False)
        self.special_out.weight = nn.Parameter(weight[n_text_vocab:], requires_grad=False)

    def layers(self) -> list[DecoderBlock]:
        return cast(list[DecoderBlock], list(self.blocks))

    def cross_keys_values(self, audio: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every layer's cross-attention keys and values, computed once per batch."""
        return [block.cross.keys_values(audio) for block in self.layers()]

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        cross_kv: list[tuple[Tensor, Tensor]],
        rows: Spans,
        keys: Spans,
        audio: Spans,
        scores: list[Tensor] | None = None,
        slots: list[int] | None = None,
        columns: list[int] | None = None,
    ) -> Tensor:
        """Hidden states [batch, len, state] of `tokens` [batch, len] at `positions`,
        written after the cache's positions. Request i's tokens are `rows[i]` (the rest
        is padding); they attend to its cache positions `keys[i]` (causally within this
        call) and to its audio positions `audio[i]`. With `scores`, the alignment heads'
        cross-attention scores [batch, heads, len, audio] are appended, layer by layer.
        With `slots`, request i is batch row `slots[i]` of the cache and `cross_kv`: a
        step of the requests that have not ended computes nothing for those that have.
        With `columns` (a step of one token each), request i's token is written to cache
        column `columns[i]` (KVCache.extend)."""
        causal = tokens.shape[1] > 1
        x = self.token_embedding(tokens) + self.positional_embedding[positions]
        for i, block in enumerate(self.layers()):
            x = x + block.attn(block.attn_ln(x), rows, keys, causal, cache, i, slots, columns)
            x = x + block.cross(
                block.cross_ln(x),
                cross_kv[i],
                rows,
                audio,
                self.alignment_heads.get(i),
                scores,
                slots,
            )
            x = x + block.mlp(block.mlp_ln(x))
        cache.commit()
        out: Tensor = self.ln(x)
        return out

    def text_logits(self, hidden: Tensor) -> Tensor:
        """Logits over the text tokens only (before the first special token)."""
        out: Tensor = self.text_out(hidden)
        return out.float()

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits over the whole vocabulary."""
        return torch.cat([self.text_out(hidden), self.special_out(hidden)], dim=-1).float()


class Whisper(nn.Module):
    def __init__(self, dims: Dims) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims)
        self.decoder = TextDecoder(dims)


def _has_vnni() -> bool:
    """Whether the CPU has VNNI (AVX512-VNNI or AVX-VNNI), whose int8 dot products sum
    into 32 bits. Without it fbgemm's pairs of u8 x s8 products saturate 16 bits unless
    the inputs keep to 7 bits (its reduce_range)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


REDUCE_RANGE = not _has_vnni()  # fbgemm's 7-bit inputs, where 8 bits could saturate
QMAX = 127 if REDUCE_RANGE else 255  # fbgemm's largest input code
HALF = (QMAX + 1) // 2
_PINNED_ENDS = torch.tensor([-HALF, QMAX - HALF], dtype=torch.float32)


@functools.cache
def int8_products_are_slow() -> bool:
    """Whether torch._int_mm is much slower here than a float32 matrix product.

    On the CPU it is oneDNN's int8 kernel only where PyTorch has one for the CPU; elsewhere
    a plain loop (measured on an AMD EPYC with AVX2 and no AVX-512: 235 ms against 4 ms in
    float32 for 256 x 384 by 384 x 1536, so that one stream's steps fell ten seconds
    behind). Timed once rather than guessed from CPU flags, which PyTorch's choice of
    kernel does not document; the gap is too wide for timing noise to flip it."""
    a, b = torch.ones(64, 384, dtype=torch.int8), torch.ones(384, 384, dtype=torch.int8)
    af, bf = a.float(), b.float()

    def best(product: Callable[[], Tensor]) -> float:
        product()  # warm up: oneDNN builds its kernel on the first call
        times = []
        for _ in range(3):
            start = time.perf_counter()
            product()
            times.append(time.perf_counter() - start)
        return min(times)

    return best(lambda: torch._int_mm(a, b)) > 4 * best(lambda: af @ bf)


class Int8Linear(nn.Module):
    """A linear layer in int8: weights per output row, inputs per input row, int32 sums.

    As CTranslate2's int8 does it. PyTorch's own dynamic quantization (torch.ao) scales
    a whole input by one number: measured on the test speech, that cost tiny.en several
    words per hundred against float32 (CTranslate2's int8: one in a hundred), and it
    made a window's result depend on what else was in its batch. A scale per row keeps
    the accuracy and keeps the requests of a batch independent.

    Three kernels: torch._int_mm for inputs of many rows (the encoder, a prefix); for
    the rows of a decoding step (one per request), fbgemm's dynamic linear: on one row it
    is the fastest matrix-vector product here (measured: 0.8 against 4.4 ms for tiny.en's
    51864 x 384 output projection) and its one input scale is the row's own. A step of
    several requests goes through fbgemm in one call (`_step_rows`): each row quantized by
    itself as fbgemm quantizes a lone row (its own minimum and maximum, 8 bits, or 7 with
    REDUCE_RANGE), its codes handed over with one extra row that pins fbgemm's own input
    scale to 1, so its integer sums are exactly those of the row alone; the row's scale
    and zero point are applied after. Measured at 8 rows: 2.3 against 6.4 ms for the
    output projection, 0.07 against 0.15 ms for a 384 x 384 layer, where row-by-row calls
    read the weights once a row. A row's integer products are those it has alone; the
    float scaling after them may round the last bit differently.

    Where torch._int_mm is slow (`int8_products_are_slow`), the same int8 rows and
    weights are multiplied as float32 instead: their integer products summed exactly
    while a sum stays under 2**24, and rounded by float32 past it.
    """

    weight_t: Tensor
    weight_scale: Tensor
    bias: Tensor | None
    weight_float_t: Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        quantized = torch.round(weight / scale[:, None]).clamp(-127, 127)
        self.register_buffer("weight_t", quantized.to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.register_buffer(
            "weight_float_t", self.weight_t.float() if int8_products_are_slow() else None
        )
        self._packed = self._fbgemm_weight(bias)
        self._unbiased: object | None = None  # the packed weight without the bias
        self._column_sums = torch.empty(0)

    def _fbgemm_weight(self, bias: Tensor | None) -> object:
        """The int8 weights (and `bias`) packed for fbgemm's dynamic linear."""
        with warnings.catch_warnings():  # quantized tensors are deprecated, not yet gone
            warnings.simplefilter("ignore")
            weight = torch.quantize_per_channel(
                self.weight_t.t().float() * self.weight_scale[:, None],
                self.weight_scale.double(),
                torch.zeros_like(self.weight_scale, dtype=torch.long),
                axis=0,
                dtype=torch.qint8,
            )
            return torch.ops.quantized.linear_prepack(weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in]; a decoding step's input [batch, 1, in] takes fbgemm's kernel, one
        row at a time in effect, whatever the batch (see the class)."""
        rows = x.reshape(-1, x.shape[-1]).float()
        if x.dim() == 3 and x.shape[1] == 1:
            out = (
                torch.ops.quantized.linear_dynamic(rows, self._packed, REDUCE_RANGE)
                if rows.shape[0] == 1
                else self._step_rows(rows)
            )
        else:
            # (abs().amax() and a multiplication: vector_norm and a division by a column
            # took 15 times as long here.)
            peak = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
            quantized = (rows * (127 / peak)).round_()
            sums = (
                quantized @ self.weight_float_t  # integers, as torch._int_mm sums them
                if self.weight_float_t is not None
                else torch._int_mm(quantized.to(torch.int8), self.weight_t).float()
            )
            out = sums * (peak * (self.weight_scale / 127))
            if self.bias is not None:
                out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _step_rows(self, rows: Tensor) -> Tensor:
        """fbgemm's dynamic linear on several rows [n, in] at once, each quantized as a
        lone row (see the class). fbgemm scales an input by its minimum and maximum: the
        codes shifted to [-HALF, QMAX - HALF] plus a row holding both ends make that scale
        exactly 1 and its zero point HALF, so the codes reach the integer products as
        they are. Hand-written because PyTorch has no per-row dynamic int8 linear."""
        if self._unbiased is None:  # packed on first use: the encoder's layers never are
            self._column_sums = self.weight_t.sum(dim=0, dtype=torch.float64).float() * (
                self.weight_scale
            )
            self._unbiased = self._packed if self.bias is None else self._fbgemm_weight(None)
        n = rows.shape[0]
        low = rows.amin(dim=1, keepdim=True).clamp_max_(0)
        high = rows.amax(dim=1, keepdim=True).clamp_min_(0)
        scale = ((high - low) / QMAX).clamp_min_(1e-12)
        zero = (-low / scale).round_()
        codes = torch.empty((n + 1, rows.shape[1]))
        codes[n] = 0
        codes[n, :2] = _PINNED_ENDS
        torch.div(rows, scale, out=codes[:n]).add_(zero).round_().clamp_(0, QMAX).sub_(HALF)
        sums: Tensor = torch.ops.quantized.linear_dynamic(codes, self._unbiased, REDUCE_RANGE)
        out = (sums[:n] + (HALF - zero) * self._column_sums) * scale
        return out + self.bias if self.bias is not None else out


def quantize_int8(model: Whisper) -> Whisper:
    """Every linear layer of `model` as an `Int8Linear` (the convolutions stay float)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model
