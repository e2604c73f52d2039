"""Audio intake: decode client frames and resample them to the model's 16 kHz."""

from __future__ import annotations

import io
import wave
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
                f"sample_rate must be an integer number of Hz from {MIN_SAMPLE_RATE_HZ} to "
                f"{MAX_SAMPLE_RATE_HZ}, not {self.sample_rate_hz}"
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


def read_wav(data: bytes, name: str = "WAV data") -> tuple[np.ndarray, int]:
    """The samples (float32 mono in [-1, 1], channels averaged) and sample rate of a PCM
    WAV file's bytes (a file's, or a Hermes audioFrame's: a small WAV file). `name` is
    what an error message calls it.

    The standard library's `wave` reads the container; 8-bit WAV is unsigned, 16- and
    32-bit are signed little-endian. The caller reads the file: the core does no I/O.
    """
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            rate, width, channels = wav.getframerate(), wav.getsampwidth(), wav.getnchannels()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise AudioFormatError(f"{name} is not a readable PCM WAV file ({exc})") from None
    if width == 2:
        samples = np.frombuffer(frames, "<i2").astype(np.float32) / 32768.0
    elif width == 1:
        samples = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 4:
        samples = np.frombuffer(frames, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise AudioFormatError(f"{name} has {8 * width}-bit samples; 8, 16 or 32-bit PCM only")
    if channels > 1:
        samples = samples[: len(samples) - len(samples) % channels]
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples.astype("<f4"), rate


def to_pcm_s16le(samples: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] as 16-bit little-endian PCM: the inverse of the reader's
    scaling (x / 32768), so a 16-bit file's samples come back exactly as they were."""
    scaled = np.clip(np.round(np.asarray(samples, np.float64) * 32768.0), -32768, 32767)
    return bytes(scaled.astype("<i2").tobytes())
