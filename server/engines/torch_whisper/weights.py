"""Whisper weights for the PyTorch engine, from any of three formats, with no download:

- a CTranslate2 model folder (model.bin; the bundled tiny.en is one), converted at load
  time and the result cached under the user's cache folder;
- an openai-whisper checkpoint (`tiny.en.pt`: dims and state dict);
- a Hugging Face Whisper folder (config.json with model.safetensors or pytorch_model.bin).

Each becomes the state dict of model.py's `Whisper` (fused self-attention q/k/v, fused
cross-attention k/v), its `Dims`, and what the model folder says about decoding: the
alignment heads and the suppressed tokens.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from server.engines.torch_whisper.model import Dims
from streaming.engine import EngineLoadError

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]

# The cross-attention heads that follow the audio, per openai-whisper checkpoint, as its
# package ships them (base85 of a gzipped bool array [layers, heads]; MIT licence).
OPENAI_ALIGNMENT_HEADS = {
    "tiny.en": b"ABzY8J1N>@0{>%R00Bk>$p{7v037`oCl~+#00",
    "tiny": b"ABzY8bu8Lr0{>%RKn9Fp%m@SkK7Kt=7ytkO",
    "base.en": b"ABzY8;40c<0{>%RzzG;p*o+Vo09|#PsxSZm00",
    "base": b"ABzY8KQ!870{>%RzyTQH3`Q^yNP!>##QT-<FaQ7m",
    "small.en": b"ABzY8>?_)10{>%RpeA61k&I|OI3I$65C{;;pbCHh0B{qLQ;+}v00",
    "small": b"ABzY8DmU6=0{>%Rpa?J`kvJ6qF(V^F86#Xh7JUGMK}P<N0000",
    "medium.en": b"ABzY8usPae0{>%R7<zz_OvQ{)4kMa0BMw6u5rT}kRKX;$NfYBv00*Hl@qhsU00",
    "medium": b"ABzY8B0Jh+0{>%R7}kK1fFL7w6%<-Pf*t^=N)Qr&0RR9",
    "large-v1": b"ABzY8r9j$a0{>%R7#4sLmoOs{s)o3~84-RPdcFk!JR<kSfC2yj",
    "large-v2": b"ABzY8zd+h!0{>%R7=D0pU<_bnWW*tkYAhobTNnu$jnkEkXqp)j;w1Tzk)UH3X%SZd&fFZ2fC2yj",
    "large-v3": b"ABzY8gWO1E0{>%R7(9S+Kn!D~%ngiGaR?*L!iJG9p-nab0JQ=-{D1-g00",
    "large-v3-turbo": b"ABzY8j^C+e0{>%RARaKHP%t(lGR*)0g!tONPyhe`",
}
OPENAI_ALIGNMENT_HEADS["large"] = OPENAI_ALIGNMENT_HEADS["large-v3"]
OPENAI_ALIGNMENT_HEADS["turbo"] = OPENAI_ALIGNMENT_HEADS["large-v3-turbo"]

CACHE_FORMAT = 1  # bump when the converted state dict changes shape or names


@dataclass
class LoadedWeights:
    dims: Dims
    state: StateDict
    # (layer, head) pairs; empty: the model folder names none (the caller picks).
    alignment_heads: list[tuple[int, int]] = field(default_factory=list)
    suppress_ids: list[int] | None = None  # None: derive from the tokenizer
    suppress_ids_begin: list[int] | None = None
    tokenizer_dir: Path | None = None  # the folder holding tokenizer.json, if any


def decode_alignment_heads(dump: bytes, n_layer: int, n_head: int) -> list[tuple[int, int]]:
    mask = np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool)
    return [(int(i), int(j)) for i, j in np.argwhere(mask.reshape(n_layer, n_head))]


def default_alignment_heads(dims: Dims) -> list[tuple[int, int]]:
    """openai-whisper's default: every head of the last half of the decoder layers."""
    return [
        (i, j)
        for i in range(dims.n_text_layer // 2, dims.n_text_layer)
        for j in range(dims.n_text_head)
    ]


# --- CTranslate2 -------------------------------------------------------------------------

_CT2_DTYPES: dict[int, Any] = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2_variables(file: Path) -> dict[str, np.ndarray]:
    """The named arrays of a CTranslate2 model.bin.

    The format (CTranslate2's models/model.cc): uint32 binary version, the spec name
    (uint16 length, then bytes ending in NUL), uint32 spec revision, uint32 count, then
    per variable: its name, uint8 rank, rank x uint32 dims, uint8 dtype, uint32 byte
    count, raw little-endian data; then uint32 count of aliases, each (alias, target).
    """
    data = memoryview(file.read_bytes())
    offset = 0

    def take(fmt: str) -> Any:
        nonlocal offset
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def name() -> str:
        nonlocal offset
        size = take("<H")
        text = bytes(data[offset : offset + size]).rstrip(b"\0").decode()
        offset += size
        return text

    version = take("<I")
    if version < 5:
        raise ValueError(f"model.bin format version {version} is older than this reader")
    spec = name()
    if spec != "WhisperSpec":
        raise ValueError(f"model.bin holds a {spec}, not a Whisper model")
    take("<I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        key = name()
        shape = [take("<I") for _ in range(take("<B"))]
        dtype_id, size = take("<B"), take("<I")
        if dtype_id not in _CT2_DTYPES:
            raise ValueError(
                f"variable {key} has data type {dtype_id} (bfloat16 or "
                "quantized weights cannot be converted; use float16 or float32)"
            )
        raw = np.frombuffer(data[offset : offset + size], dtype=_CT2_DTYPES[dtype_id])
        variables[key] = raw.reshape(shape) if shape else raw
        offset += size
    for _ in range(take("<I")):
        alias, target = name(), name()
        variables[alias] = variables[target]
    return variables


def _ct2_int(variables: dict[str, np.ndarray], key: str) -> int:
    return int(variables[key].reshape(-1)[0])


def convert_ct2(variables: dict[str, np.ndarray]) -> tuple[Dims, StateDict]:
    """model.py's state dict from CTranslate2's Whisper variables (float16 kept)."""

    def layers(prefix: str) -> int:
        return len(
            {k.split("/")[1] for k in variables if re.fullmatch(rf"{prefix}/layer_\d+/.*", k)}
        )

    def norm(src: str) -> dict[str, np.ndarray]:
        return {"weight": variables[f"{src}/gamma"], "bias": variables[f"{src}/beta"]}

    def linear(src: str) -> dict[str, np.ndarray]:
        out = {"weight": variables[f"{src}/weight"]}
        if f"{src}/bias" in variables:
            out["bias"] = variables[f"{src}/bias"]
        return out

    state: dict[str, np.ndarray] = {}

    def put(dst: str, parts: dict[str, np.ndarray]) -> None:
        for suffix, value in parts.items():
            state[f"{dst}.{suffix}"] = value

    embedding = variables["decoder/embeddings/weight"]
    n_enc, n_dec = layers("encoder"), layers("decoder")
    conv1 = variables["encoder/conv1/weight"]
    dims = Dims(
        n_mels=int(conv1.shape[1]),
        n_audio_ctx=int(variables["encoder/position_encodings/encodings"].shape[0]),
        n_audio_state=int(conv1.shape[0]),
        n_audio_head=_ct2_int(variables, "encoder/num_heads"),
        n_audio_layer=n_enc,
        n_vocab=int(embedding.shape[0]),
        n_text_ctx=int(variables["decoder/position_encodings/encodings"].shape[0]),
        n_text_state=int(embedding.shape[1]),
        n_text_head=_ct2_int(variables, "decoder/num_heads"),
        n_text_layer=n_dec,
    )
    for conv in ("conv1", "conv2"):
        put(f"encoder.{conv}", linear(f"encoder/{conv}"))
    state["encoder.positional_embedding"] = variables["encoder/position_encodings/encodings"]
    for i in range(n_enc):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        put(f"{dst}.attn_ln", norm(f"{src}/self_attention/layer_norm"))
        put(f"{dst}.attn.qkv", linear(f"{src}/self_attention/linear_0"))
        put(f"{dst}.attn.out", linear(f"{src}/self_attention/linear_1"))
        put(f"{dst}.mlp_ln", norm(f"{src}/ffn/layer_norm"))
        put(f"{dst}.mlp.fc1", linear(f"{src}/ffn/linear_0"))
        put(f"{dst}.mlp.fc2", linear(f"{src}/ffn/linear_1"))
    put("encoder.ln_post", norm("encoder/layer_norm"))
    state["decoder.token_embedding.weight"] = embedding
    state["decoder.positional_embedding"] = variables["decoder/position_encodings/encodings"]
    for i in range(n_dec):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        put(f"{dst}.attn_ln", norm(f"{src}/self_attention/layer_norm"))
        put(f"{dst}.attn.qkv", linear(f"{src}/self_attention/linear_0"))
        put(f"{dst}.attn.out", linear(f"{src}/self_attention/linear_1"))
        put(f"{dst}.cross_ln", norm(f"{src}/attention/layer_norm"))
        put(f"{dst}.cross.query", linear(f"{src}/attention/linear_0"))
        put(f"{dst}.cross.kv", linear(f"{src}/attention/linear_1"))
        put(f"{dst}.cross.out", linear(f"{src}/attention/linear_2"))
        put(f"{dst}.mlp_ln", norm(f"{src}/ffn/layer_norm"))
        put(f"{dst}.mlp.fc1", linear(f"{src}/ffn/linear_0"))
        put(f"{dst}.mlp.fc2", linear(f"{src}/ffn/linear_1"))
    put("decoder.ln", norm("decoder/layer_norm"))
    # CTranslate2 stores fused projections with a bias for every part; Whisper's key has
    # none, and the converter writes zeros there: the same layer.
    return dims, {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "whisperstream" / "torch"


def _cache_file(model_bin: Path) -> Path:
    stat = model_bin.stat()
    key = f"{model_bin.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_FORMAT}"
    return cache_dir() / f"ct2-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"


def load_ct2_folder(folder: Path, use_cache: bool = True) -> LoadedWeights:
    """A CTranslate2 Whisper folder: model.bin converted (or its cached conversion)."""
    model_bin = folder / "model.bin"
    cached = _cache_file(model_bin) if use_cache else None
    dims: Dims | None = None
    state: StateDict | None = None
    if cached is not None and cached.is_file():
        try:
            saved = torch.load(cached, map_location="cpu", weights_only=True)
            dims, state = Dims(**saved["dims"]), saved["state"]
        except Exception as exc:  # a truncated or foreign file: convert again
            log.warning("ignoring the cached conversion %s (%s)", cached, exc)
    if dims is None or state is None:
        try:
            dims, state = convert_ct2(read_ct2_variables(model_bin))
        except (OSError, ValueError, KeyError, struct.error) as exc:
            raise EngineLoadError(
                f"{model_bin} cannot be converted for the torch engine: {exc}"
            ) from exc
        if cached is not None:
            _save_cache(cached, dims, state)
    config: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
    return LoadedWeights(
        dims,
        state,
        alignment_heads=[(int(a), int(b)) for a, b in config.get("alignment_heads", [])],
        suppress_ids=config.get("suppress_ids"),
        suppress_ids_begin=config.get("suppress_ids_begin"),
        tokenizer_dir=folder,
    )


def _save_cache(file: Path, dims: Dims, state: StateDict) -> None:
    """Write the conversion where the next start finds it; a cache that cannot be
    written only costs the conversion again."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"dims": dims.__dict__, "state": state}, tmp)
        tmp.replace(file)
    except OSError as exc:
        log.warning("cannot cache the converted weights in %s (%s)", file, exc)


# --- openai-whisper ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where a checkpoint keeps what model.py calls each layer (per block, then the rest)."""

    block: str  # the block prefix, with {part} and {i}
    attn_ln: str
    qkv: tuple[str, str, str]  # fused into model.py's attn.qkv
    attn_out: str
    mlp_ln: str
    fc1: str
    fc2: str
    cross_ln: str
    cross_query: str
    cross_kv: tuple[str, str]  # fused into cross.kv
    cross_out: str
    ln_post: str
    decoder_ln: str
    encoder_positions: str
    token_embedding: str
    decoder_positions: str


_OPENAI = _Layout(
    block="{part}.blocks.{i}",
    attn_ln="attn_ln",
    qkv=("attn.query", "attn.key", "attn.value"),
    attn_out="attn.out",
    mlp_ln="mlp_ln",
    fc1="mlp.0",
    fc2="mlp.2",
    cross_ln="cross_attn_ln",
    cross_query="cross_attn.query",
    cross_kv=("cross_attn.key", "cross_attn.value"),
    cross_out="cross_attn.out",
    ln_post="encoder.ln_post",
    decoder_ln="decoder.ln",
    encoder_positions="encoder.positional_embedding",
    token_embedding="decoder.token_embedding.weight",
    decoder_positions="decoder.positional_embedding",
)
_HF = _Layout(
    block="{part}.layers.{i}",
    attn_ln="self_attn_layer_norm",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attn_out="self_attn.out_proj",
    mlp_ln="final_layer_norm",
    fc1="fc1",
    fc2="fc2",
    cross_ln="encoder_attn_layer_norm",
    cross_query="encoder_attn.q_proj",
    cross_kv=("encoder_attn.k_proj", "encoder_attn.v_proj"),
    cross_out="encoder_attn.out_proj",
    ln_post="encoder.layer_norm",
    decoder_ln="decoder.layer_norm",
    encoder_positions="encoder.embed_positions.weight",
    token_embedding="decoder.embed_tokens.weight",
    decoder_positions="decoder.embed_positions.weight",
)


def _convert(state: StateDict, dims: Dims, layout: _Layout) -> StateDict:
    """model.py's state dict from a checkpoint laid out as `layout` says: the same
    renaming for every source, q/k/v fused into one projection."""
    out: StateDict = {}

    def fuse(dst: str, parts: list[str]) -> None:
        weights = [state[f"{p}.weight"] for p in parts]
        biases = [
            state.get(f"{p}.bias", torch.zeros(w.shape[0], dtype=w.dtype))
            for p, w in zip(parts, weights, strict=True)
        ]
        out[f"{dst}.weight"] = torch.cat(weights)
        out[f"{dst}.bias"] = torch.cat(biases)

    def copy(dst: str, src: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in state:
                out[f"{dst}.{suffix}"] = state[f"{src}.{suffix}"]

    for part, n_layer in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
        for i in range(n_layer):
            src, dst = layout.block.format(part=part, i=i), f"{part}.blocks.{i}"
            copy(f"{dst}.attn_ln", f"{src}.{layout.attn_ln}")
            fuse(f"{dst}.attn.qkv", [f"{src}.{p}" for p in layout.qkv])
            copy(f"{dst}.attn.out", f"{src}.{layout.attn_out}")
            copy(f"{dst}.mlp_ln", f"{src}.{layout.mlp_ln}")
            copy(f"{dst}.mlp.fc1", f"{src}.{layout.fc1}")
            copy(f"{dst}.mlp.fc2", f"{src}.{layout.fc2}")
            if part == "decoder":
                copy(f"{dst}.cross_ln", f"{src}.{layout.cross_ln}")
                copy(f"{dst}.cross.query", f"{src}.{layout.cross_query}")
                fuse(f"{dst}.cross.kv", [f"{src}.{p}" for p in layout.cross_kv])
                copy(f"{dst}.cross.out", f"{src}.{layout.cross_out}")
    copy("encoder.conv1", "encoder.conv1")
    copy("encoder.conv2", "encoder.conv2")
    copy("encoder.ln_post", layout.ln_post)
    copy("decoder.ln", layout.decoder_ln)
    out["encoder.positional_embedding"] = state[layout.encoder_positions]
    out["decoder.token_embedding.weight"] = state[layout.token_embedding]
    out["decoder.positional_embedding"] = state[layout.decoder_positions]
    return out


def convert_openai(state: StateDict, dims: Dims) -> StateDict:
    """model.py's state dict from openai-whisper's (separate q/k/v, mlp.0/mlp.2, ...)."""
    return _convert(state, dims, _OPENAI)


def load_openai_checkpoint(file: Path) -> LoadedWeights:
    """An openai-whisper `.pt` checkpoint; alignment heads by its name (tiny.en.pt ...)."""
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        dims = Dims(**checkpoint["dims"])
        state = convert_openai(checkpoint["model_state_dict"], dims)
    except Exception as exc:  # torch.load raises many kinds
        raise EngineLoadError(
            f"{file} is not a readable openai-whisper checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    dump = OPENAI_ALIGNMENT_HEADS.get(file.stem)
    heads = decode_alignment_heads(dump, dims.n_text_layer, dims.n_text_head) if dump else []
    has_tokenizer = (file.parent / "tokenizer.json").is_file()
    return LoadedWeights(
        dims, state, alignment_heads=heads, tokenizer_dir=file.parent if has_tokenizer else None
    )


# --- Hugging Face ------------------------------------------------------------------------

_SAFETENSORS_DTYPES: dict[str, Any] = {
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
}


def read_safetensors(file: Path) -> StateDict:
    """A .safetensors file: uint64 header size, a JSON header (name -> dtype, shape,
    data_offsets), then the raw data. Read here so that no extra package is needed."""
    data = file.read_bytes()
    (size,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + size])
    base = 8 + size
    out: StateDict = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[base + start : base + end]
        if info["dtype"] == "BF16":
            words = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            array = words.view(np.float32)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            array = np.frombuffer(raw, dtype=_SAFETENSORS_DTYPES[info["dtype"]])
        else:
            raise ValueError(f"tensor {key} has data type {info['dtype']}")
        out[key] = torch.from_numpy(array.reshape(info["shape"]).copy())
    return out


def convert_hf(state: StateDict, dims: Dims) -> StateDict:
    """model.py's state dict from Hugging Face's WhisperForConditionalGeneration."""
    return _convert({k.removeprefix("model."): v for k, v in state.items()}, dims, _HF)


def load_hf_folder(folder: Path) -> LoadedWeights:
    """A Hugging Face Whisper folder (config.json, model.safetensors or pytorch_model.bin,
    and generation_config.json for the alignment heads and suppressed tokens)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        dims = Dims(
            n_mels=int(config["num_mel_bins"]),
            n_audio_ctx=int(config["max_source_positions"]),
            n_audio_state=int(config["d_model"]),
            n_audio_head=int(config["encoder_attention_heads"]),
            n_audio_layer=int(config["encoder_layers"]),
            n_vocab=int(config["vocab_size"]),
            n_text_ctx=int(config["max_target_positions"]),
            n_text_state=int(config["d_model"]),
            n_text_head=int(config["decoder_attention_heads"]),
            n_text_layer=int(config["decoder_layers"]),
        )
        if (folder / "model.safetensors").is_file():
            raw = read_safetensors(folder / "model.safetensors")
        else:
            raw = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        state = convert_hf(raw, dims)
    except Exception as exc:  # missing files and keys, bad JSON, torch.load's many kinds
        raise EngineLoadError(
            f"{folder} is not a readable Hugging Face Whisper folder ({type(exc).__name__}: {exc})"
        ) from exc
    generation: dict[str, Any] = {}
    if (folder / "generation_config.json").is_file():
        generation = json.loads((folder / "generation_config.json").read_text())
    return LoadedWeights(
        dims,
        state,
        alignment_heads=[(int(a), int(b)) for a, b in generation.get("alignment_heads", [])],
        suppress_ids=generation.get("suppress_tokens"),
        suppress_ids_begin=generation.get("begin_suppress_tokens"),
        tokenizer_dir=folder if (folder / "tokenizer.json").is_file() else None,
    )


def is_hf_folder(folder: Path) -> bool:
    if not (folder / "config.json").is_file() or (folder / "model.bin").is_file():
        return False
    try:
        return bool(json.loads((folder / "config.json").read_text()).get("model_type") == "whisper")
    except (OSError, ValueError):
        return False
