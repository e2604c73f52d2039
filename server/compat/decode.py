"""Uploaded files as 16 kHz mono float32: any container and codec FFmpeg reads (WAV, FLAC,
OGG/Opus, MP3, M4A/AAC, WebM, ...), through PyAV, at any rate and channel count.

Channels are averaged; the rate is converted with soxr's streaming resampler as the
live sessions' audio is, chunk by chunk, so that a long file is never held at its own
rate. Decoding stops, with an error, once the audio is longer than `max_seconds`.
"""

from __future__ import annotations

import io
import logging

import av
import numpy as np
import soxr

from streaming.audio import MODEL_SAMPLE_RATE_HZ

log = logging.getLogger(__name__)

av.logging.set_level(av.logging.PANIC)  # FFmpeg's own warnings about a bad file: ours say it


class UndecodableAudio(ValueError):
    """The file holds no audio that can be decoded; the message says why, for the client."""


class AudioTooLong(ValueError):
    pass


def _why(exc: Exception) -> str:
    return str(getattr(exc, "strerror", None) or exc)


def decode_to_16k(data: bytes, max_seconds: float) -> np.ndarray:
    """The file's first audio stream, mono, 16 kHz, float32 in [-1, 1]."""
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as exc:  # OSError: older PyAV
        raise UndecodableAudio(
            f"the file is not audio in a format this server reads ({_why(exc)})"
        ) from None
    with container:
        if not container.streams.audio:
            raise UndecodableAudio("the file holds no audio stream")
        stream = container.streams.audio[0]
        resampler: soxr.ResampleStream | None = None
        to_float: av.AudioResampler | None = None
        chunks: list[np.ndarray] = []
        samples = 0
        limit = int(max_seconds * MODEL_SAMPLE_RATE_HZ)
        try:
            for frame in container.decode(stream):
                if resampler is None:
                    rate = frame.sample_rate
                    resampler = soxr.ResampleStream(rate, MODEL_SAMPLE_RATE_HZ, 1, "float32")
                    # Planar float at the first frame's rate, whatever comes after.
                    to_float = av.AudioResampler(format="fltp", rate=rate)
                assert to_float is not None
                for converted in to_float.resample(frame):
                    planes = converted.to_ndarray()  # (channels, samples)
                    mono = planes.mean(axis=0, dtype=np.float32)
                    out = resampler.resample_chunk(np.ascontiguousarray(mono, np.float32))
                    chunks.append(out)
                    samples += len(out)
                if samples > limit:
                    raise AudioTooLong(
                        f"the audio is longer than {max_seconds:g} s (compat.max_upload_s)"
                    )
        except av.FFmpegError as exc:
            if not chunks:
                raise UndecodableAudio(f"the audio cannot be decoded ({_why(exc)})") from None
            log.warning("upload: decoding stopped early: %s; transcribing what was decoded", exc)
        if resampler is None:
            raise UndecodableAudio("the audio stream holds no samples")
        chunks.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    return np.clip(audio, -1.0, 1.0)
