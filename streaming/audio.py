"""Audio intake: decode client frames and resample them to the model's 16 kHz."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import soxr

MODEL_SAMPLE_RATE_HZ = 16_000
MIN_SAMPLE_RATE_HZ = 8_000
MAX_SAMPLE_RATE_HZ = 48_000

Encoding = Literal["pcm_s16le", "f32le"]
ENCODINGS: dict[str, int] = {"pcm_s16le": 2, "f32le": 4}  # bytes per sample


class AudioFormatError(ValueError):
    """A frame or a format the server cannot take; the message is meant for the user."""


@dataclass(frozen=True)
class AudioFormat:
    sample_rate_hz: int = MODEL_SAMPLE_RATE_HZ
    encoding: Encoding = "pcm_s16le"

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise AudioFormatError(
                f"unsupported encoding {self.encoding!r}; use one of: {', '.join(ENCODINGS)}"
            )
        if not MIN_SAMPLE_RATE_HZ <= self.sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
            raise AudioFormatError(
                f"unsupported sample_rate {self.sample_rate_hz}; use an integer number of Hz "
                f"from {MIN_SAMPLE_RATE_HZ} to {MAX_SAMPLE_RATE_HZ}"
            )

    @property
    def bytes_per_sample(self) -> int:
        return ENCODINGS[self.encoding]


def decode_frame(data: bytes, fmt: AudioFormat) -> np.ndarray:
    """Turn one binary frame into float32 samples in [-1, 1].

    f32le samples that are NaN or infinite are refused, and finite ones are clipped to
    [-1, 1], so that one bad frame cannot poison the model's input.
    """
    width = fmt.bytes_per_sample
    if len(data) % width:
        raise AudioFormatError(
            f"binary frame of {len(data)} bytes is not a whole number of {fmt.encoding} "
            f"samples ({width} bytes each); send mono audio with whole samples only"
        )
    if fmt.encoding == "pcm_s16le":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(samples)):
        raise AudioFormatError("f32le frame holds NaN or infinite samples; send finite values")
    return np.clip(samples, -1.0, 1.0)


class StreamResampler:
    """Resamples a stream of chunks of any length to 16 kHz, keeping filter state.

    soxr's streaming mode is used rather than resampling chunk by chunk, which would
    click at every chunk edge.
    """

    def __init__(self, input_rate_hz: int, output_rate_hz: int = MODEL_SAMPLE_RATE_HZ) -> None:
        self._passthrough = input_rate_hz == output_rate_hz
        self._stream = (
            None
            if self._passthrough
            else soxr.ResampleStream(input_rate_hz, output_rate_hz, 1, dtype="float32")
        )

    def process(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return samples.astype(np.float32, copy=False)
        return np.asarray(self._stream.resample_chunk(samples, last=last), dtype=np.float32)
