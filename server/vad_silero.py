"""Silero VAD behind the core's `FrameClassifier`, run with onnxruntime.

The model is the ONNX file that the PyPI package `silero-vad` ships; the package itself is
never imported (its `__init__` needs torch): the file is found through the package's
installed metadata, so `pip install --no-deps silero-vad` is all it takes, and nothing is
downloaded. One onnxruntime session (one thread, no spinning pool) serves every stream;
each classifier keeps its stream's recurrent state.

Silero reads windows of 512 samples at 16 kHz (32 ms) with the 64 samples before them as
context; the VAD state machine asks about frames of 10, 20 or 30 ms. The classifier
buffers the frames, runs the model once per whole window, and answers each frame with
the speech decision of the newest window (up to one window late, well inside the
segmenter's start_ms and pad_ms). It adds the hysteresis Silero's own iterator uses:
speech from `threshold` up, until the probability falls below `threshold - 0.15`.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np

from streaming.audio import MODEL_SAMPLE_RATE_HZ

PACKAGE = "silero-vad"
MODEL_FILE = "silero_vad/data/silero_vad.onnx"
WINDOW_SAMPLES = 512  # what the model reads at 16 kHz
CONTEXT_SAMPLES = 64  # the samples before each window that it reads with it
STATE_SHAPE = (2, 1, 128)
HYSTERESIS = 0.15  # speech ends below threshold - HYSTERESIS (as Silero's VADIterator)


class SileroUnavailable(RuntimeError):
    """The model file or onnxruntime is missing; the message says how to install them."""


def model_path() -> Path:
    """The ONNX model inside the installed `silero-vad` package."""
    hint = (
        f"vad.detector: silero needs the {PACKAGE} package's ONNX model: "
        f"pip install --no-deps {PACKAGE}==6.2.3 (its model file only; torch is not "
        "needed)"
    )
    try:
        located = importlib.metadata.distribution(PACKAGE).locate_file(MODEL_FILE)
    except importlib.metadata.PackageNotFoundError:
        raise SileroUnavailable(f"{hint}; it is not installed") from None
    path = Path(str(located))
    if not path.is_file():
        raise SileroUnavailable(f"{hint}; {path} is missing")
    return path


@functools.cache
def _session() -> Any:
    """The one onnxruntime session for every stream (its `run` is thread-safe)."""
    try:
        import onnxruntime
    except ImportError:
        raise SileroUnavailable(
            "vad.detector: silero needs onnxruntime: pip install onnxruntime"
        ) from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(
        str(model_path()), sess_options=options, providers=["CPUExecutionProvider"]
    )


def check_available() -> None:
    """Load the model now, so that a missing one fails at start, not in a session."""
    _session()


class SileroClassifier:
    """A `FrameClassifier` for one stream: Silero's speech probability per 512 samples."""

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError("the Silero threshold lies between 0 and 1")
        self.threshold = threshold
        self._session = _session()
        self._state = np.zeros(STATE_SHAPE, np.float32)
        # The model's input: context, then the window, filled as frames arrive.
        self._input = np.zeros((1, CONTEXT_SAMPLES + WINDOW_SAMPLES), np.float32)
        self._filled = 0  # window samples in self._input so far
        self._rate = np.array(MODEL_SAMPLE_RATE_HZ, dtype=np.int64)
        self._speaking = False
        self.probability = 0.0  # of the newest whole window

    def is_speech(self, frame: np.ndarray) -> bool:
        frame = np.asarray(frame, dtype=np.float32)
        taken = 0
        while taken < len(frame):
            room = WINDOW_SAMPLES - self._filled
            part = frame[taken : taken + room]
            start = CONTEXT_SAMPLES + self._filled
            self._input[0, start : start + len(part)] = part
            self._filled += len(part)
            taken += len(part)
            if self._filled == WINDOW_SAMPLES:
                self._run()
        return self._speaking

    def _run(self) -> None:
        out, self._state = self._session.run(
            None, {"input": self._input, "state": self._state, "sr": self._rate}
        )
        self.probability = float(out[0][0])
        if self.probability >= self.threshold:
            self._speaking = True
        elif self.probability < self.threshold - HYSTERESIS:
            self._speaking = False
        self._input[0, :CONTEXT_SAMPLES] = self._input[0, -CONTEXT_SAMPLES:]
        self._filled = 0
