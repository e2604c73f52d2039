"""The engine the configuration asks for (one place, for the server and the benchmark)."""

from __future__ import annotations

from server.config import ModelSection
from server.engines.ct2 import CTranslate2Whisper


def build_engine(model: ModelSection) -> CTranslate2Whisper:
    return CTranslate2Whisper(
        model.name, model.compute_type, model.cpu_threads, model.beam_size,
        timestamps=model.timestamps, workers=model.worker_count,
        feature_threads=model.feature_threads,
    )
