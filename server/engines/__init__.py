"""Speech recognition engines behind `streaming.engine.Engine`, and the model files they load.

`build_engine` is the one place that knows the backends (for the server and the
benchmark); each backend is imported only when it is built, so the torch engine's
PyTorch is needed only by those who choose it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from server.config import ModelSection
from streaming.engine import Engine, EngineLoadError, Word

TORCH_INSTALL = "pip install -e '.[torch]'"


class WhisperEngine(Engine, Protocol):
    """An `Engine` that can also time a known transcript: the benchmark's reference word
    times come from it, measured as the server's are. Both backends are one."""

    def align_words(
        self, audio: np.ndarray, words: Sequence[str], language: str = "en"
    ) -> list[Word]: ...


def build_engine(model: ModelSection) -> WhisperEngine:
    """The engine `model` asks for (`model.engine`: ctranslate2 or torch)."""
    # Both backends take these; the torch engine's own savings come on top.
    common: dict[str, Any] = {
        "timestamps": model.timestamps,
        "workers": model.worker_count,
        "feature_threads": model.feature_threads,
        "device": model.device,
    }
    if model.engine == "torch":
        try:
            from server.engines.torch_whisper import TorchWhisper
        except ImportError as exc:
            raise EngineLoadError(
                f"model.engine: torch needs PyTorch, which is not installed ({exc}): "
                f"{TORCH_INSTALL}, or use model.engine: ctranslate2"
            ) from exc
        return TorchWhisper(
            model.name,
            model.compute_type,
            model.cpu_threads,
            model.beam_size,
            encoder_reuse_s=model.encoder_reuse_s,
            **common,
        )
    from server.engines.ct2 import CTranslate2Whisper

    return CTranslate2Whisper(
        model.name,
        model.compute_type,
        model.cpu_threads,
        model.beam_size,
        **common,
    )


def whisper_languages() -> list[str]:
    """The codes of every language Whisper knows (what a multilingual model transcribes)."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return sorted(_LANGUAGE_CODES)
