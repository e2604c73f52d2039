"""Speech recognition engines behind `streaming.engine.Engine`, and the model files they load.

`build_engine` is the one place that knows the backends (for the server and the
benchmark); each backend is imported only when it is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.config import ModelSection

if TYPE_CHECKING:
    from server.engines.ct2 import CTranslate2Whisper


def build_engine(model: ModelSection) -> CTranslate2Whisper:
    """The engine `model` asks for. Typed as the one backend there is, not as `Engine`:
    the benchmark's reference timing calls CTranslate2Whisper.align_words, which the
    `Engine` interface does not have."""
    from server.engines.ct2 import CTranslate2Whisper

    return CTranslate2Whisper(
        model.name, model.compute_type, model.cpu_threads, model.beam_size,
        timestamps=model.timestamps, workers=model.worker_count,
        feature_threads=model.feature_threads,
    )


def whisper_languages() -> list[str]:
    """The codes of every language Whisper knows (what a multilingual model transcribes)."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return sorted(_LANGUAGE_CODES)
