"""Whisper in PyTorch (`model.engine: torch`): model.py the transformer, weights.py the
loaders (CTranslate2 model.bin, openai-whisper .pt, Hugging Face folders), alignment.py
the word timing, engine.py the `Engine`. Needs the `torch` extra."""

from server.engines.torch_whisper.engine import TorchWhisper

__all__ = ["TorchWhisper"]
