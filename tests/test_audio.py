"""Audio intake: frame decoding, format validation and streaming resampling to 16 kHz."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.audio import (
    MODEL_SAMPLE_RATE_HZ,
    AudioFormat,
    AudioFormatError,
    StreamResampler,
    decode_frame,
)

PCM16 = AudioFormat(MODEL_SAMPLE_RATE_HZ, "pcm_s16le")
F32 = AudioFormat(MODEL_SAMPLE_RATE_HZ, "f32le")


def sine(freq_hz: float, rate_hz: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate_hz * seconds)) / rate_hz
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def resample_in_chunks(signal: np.ndarray, rate_hz: int, chunk_lengths: list[int]) -> np.ndarray:
    """Feed `signal` in consecutive chunks of the given lengths, then the final flush."""
    resampler = StreamResampler(rate_hz)
    out: list[np.ndarray] = []
    position = 0
    for length in chunk_lengths:
        out.append(resampler.process(signal[position : position + length]))
        position += length
    assert position >= len(signal), "chunk lengths must cover the signal"
    out.append(resampler.process(np.zeros(0, np.float32), last=True))
    return np.concatenate(out)


def random_chunk_lengths(total: int, rng: np.random.Generator, largest: int = 2000) -> list[int]:
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(rng.integers(1, largest)))
    return lengths


def peak_frequency_hz(signal: np.ndarray, rate_hz: int) -> float:
    windowed = signal * np.hanning(len(signal))
    spectrum = np.abs(np.fft.rfft(windowed))
    return float(np.fft.rfftfreq(len(signal), 1 / rate_hz)[int(np.argmax(spectrum))])


# decode_frame -----------------------------------------------------------------------


def test_pcm_s16le_decodes_to_floats_scaled_by_32768() -> None:
    data = np.array([0, 16384, -16384, -32768, 32767], dtype="<i2").tobytes()

    samples = decode_frame(data, PCM16)

    assert samples.dtype == np.float32
    np.testing.assert_array_equal(samples, [0.0, 0.5, -0.5, -1.0, 32767 / 32768])


def test_pcm_s16le_is_little_endian() -> None:
    assert decode_frame(b"\x00\x40", PCM16)[0] == 0.5  # 0x4000 = 16384


def test_f32le_decodes_values_exactly() -> None:
    values = np.array([0.0, 0.25, -0.5, 1.0, -1.0, 1e-7], dtype="<f4")

    samples = decode_frame(values.tobytes(), F32)

    assert samples.dtype == np.float32
    np.testing.assert_array_equal(samples, values)


def test_empty_frame_decodes_to_no_samples() -> None:
    assert len(decode_frame(b"", PCM16)) == 0
    assert len(decode_frame(b"", F32)) == 0


@pytest.mark.parametrize(
    ("fmt", "size", "width"),
    [(PCM16, 1, 2), (PCM16, 3, 2), (PCM16, 1001, 2), (F32, 2, 4), (F32, 6, 4), (F32, 7, 4)],
)
def test_frame_with_partial_sample_is_refused_with_helpful_message(
    fmt: AudioFormat, size: int, width: int
) -> None:
    with pytest.raises(AudioFormatError) as caught:
        decode_frame(b"\x00" * size, fmt)

    message = str(caught.value)
    assert f"{size} bytes" in message
    assert fmt.encoding in message
    assert f"{width} bytes each" in message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_f32le_non_finite_samples_are_refused(bad: float) -> None:
    data = np.array([0.1, bad, 0.2], dtype="<f4").tobytes()

    with pytest.raises(AudioFormatError, match="NaN or infinite"):
        decode_frame(data, F32)


def test_f32le_out_of_range_samples_are_clipped() -> None:
    data = np.array([1.5, -2.0, 0.5, 1e30, -1e30], dtype="<f4").tobytes()

    samples = decode_frame(data, F32)

    np.testing.assert_array_equal(samples, [1.0, -1.0, 0.5, 1.0, -1.0])


def test_audio_format_error_is_a_value_error() -> None:
    assert issubclass(AudioFormatError, ValueError)


# AudioFormat ------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8_000, 11_025, 16_000, 22_050, 44_100, 48_000])
def test_audio_format_accepts_rates_from_8_to_48_khz(rate: int) -> None:
    assert AudioFormat(rate, "pcm_s16le").sample_rate_hz == rate


@pytest.mark.parametrize("rate", [-16_000, 0, 7_999, 48_001, 96_000])
def test_audio_format_rejects_rates_outside_8_to_48_khz(rate: int) -> None:
    with pytest.raises(
        AudioFormatError,
        match=f"sample_rate must be an integer number of Hz from 8000 to 48000, not {rate}",
    ):
        AudioFormat(rate, "pcm_s16le")


@pytest.mark.parametrize("encoding", ["mulaw", "pcm_s24le", "f32be", "PCM_S16LE", ""])
def test_audio_format_rejects_unknown_encodings_and_names_the_valid_ones(encoding: str) -> None:
    with pytest.raises(AudioFormatError) as caught:
        AudioFormat(16_000, encoding)  # type: ignore[arg-type]

    assert "pcm_s16le" in str(caught.value)
    assert "f32le" in str(caught.value)


def test_audio_format_bytes_per_sample() -> None:
    assert PCM16.bytes_per_sample == 2
    assert F32.bytes_per_sample == 4


def test_audio_format_defaults_to_16_khz_pcm() -> None:
    assert AudioFormat() == PCM16


# StreamResampler --------------------------------------------------------------------


@pytest.mark.parametrize("rate", [48_000, 8_000, 22_050])
def test_resampler_in_random_chunks_gives_16_khz_length_and_keeps_440_hz(rate: int) -> None:
    seconds = 2.0
    signal = sine(440.0, rate, seconds)
    lengths = random_chunk_lengths(len(signal), np.random.default_rng(rate))

    out = resample_in_chunks(signal, rate, lengths)

    assert out.dtype == np.float32
    expected = seconds * MODEL_SAMPLE_RATE_HZ
    assert abs(len(out) - expected) <= 4
    assert peak_frequency_hz(out, MODEL_SAMPLE_RATE_HZ) == pytest.approx(440.0, abs=1.0)
    # Away from the edges the amplitude survives (no dropped or clicking chunk joins).
    middle = out[2000:-2000]
    assert np.max(np.abs(middle)) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("rate", [48_000, 8_000, 22_050])
def test_resampler_chunked_output_matches_one_shot_output(rate: int) -> None:
    signal = sine(440.0, rate, 1.0)
    lengths = random_chunk_lengths(len(signal), np.random.default_rng(7), largest=700)

    chunked = resample_in_chunks(signal, rate, lengths)
    whole = resample_in_chunks(signal, rate, [len(signal)])

    assert abs(len(chunked) - len(whole)) <= 2
    n = min(len(chunked), len(whole))
    np.testing.assert_allclose(chunked[:n], whole[:n], atol=1e-4)


def test_resampler_at_16_khz_passes_samples_through_unchanged() -> None:
    resampler = StreamResampler(MODEL_SAMPLE_RATE_HZ)
    signal = sine(440.0, MODEL_SAMPLE_RATE_HZ, 0.1)

    out = resampler.process(signal)
    tail = resampler.process(np.zeros(0, np.float32), last=True)

    np.testing.assert_array_equal(out, signal)
    assert out.dtype == np.float32
    assert len(tail) == 0


def test_resampler_passthrough_converts_to_float32() -> None:
    out = StreamResampler(MODEL_SAMPLE_RATE_HZ).process(np.array([0.5, -0.25], dtype=np.float64))

    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [0.5, -0.25])


@settings(max_examples=40, deadline=None)
@given(
    rate=st.sampled_from([8_000, 11_025, 22_050, 32_000, 44_100, 48_000]),
    cuts=st.lists(st.integers(min_value=0, max_value=4_000), max_size=12),
)
def test_any_chunking_gives_the_same_total_length(rate: int, cuts: list[int]) -> None:
    signal = sine(300.0, rate, 0.25)
    bounds = sorted([0, len(signal), *(min(c, len(signal)) for c in cuts)])  # empty chunks too
    lengths = [b - a for a, b in itertools.pairwise(bounds)]

    chunked = resample_in_chunks(signal, rate, lengths)
    whole = resample_in_chunks(signal, rate, [len(signal)])

    assert abs(len(chunked) - len(whole)) <= 3
    assert abs(len(chunked) - 0.25 * MODEL_SAMPLE_RATE_HZ) <= 4


def test_a_16_bit_wav_read_and_written_back_keeps_every_sample() -> None:
    """The client and the benchmark stream a file's samples exactly as it holds them."""
    import io
    import wave

    from streaming.audio import read_wav, to_pcm_s16le

    pcm = np.random.default_rng(0).integers(-32768, 32768, 16_000).astype("<i2").tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16_000)
        wav.writeframes(pcm)
    samples, rate = read_wav(buffer.getvalue())
    assert rate == 16_000 and to_pcm_s16le(samples) == pcm
