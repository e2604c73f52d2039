"""Silero VAD as the segmenter's detector (server/vad_silero.py), against webrtcvad.

The speech is the suite's Piper voice; the noise is made and mixed here, at a set SNR, so
both detectors hear exactly the same audio. The scripted-detector tests of the segmenter
itself are in test_vad.py and do not change with the detector.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import soxr
from speech import read_pcm, synthesize

from server import vad_silero
from server.config import ConfigError, load_settings
from server.host import frame_classifier
from server.vad_silero import WINDOW_SAMPLES, SileroClassifier, SileroUnavailable, model_path
from streaming.audio import MODEL_SAMPLE_RATE_HZ
from streaming.vad import (
    FrameClassifier,
    SegmentClosed,
    VadOptions,
    VadSegmenter,
    WebRtcClassifier,
)

SR = MODEL_SAMPLE_RATE_HZ
LEAD_S = 2.0  # noise alone before the speech, and after it
SENTENCE = "The weather today is sunny with a light breeze from the west."


@cache
def speech() -> np.ndarray:
    """The sentence at 16 kHz, without leading or trailing silence."""
    utterance = synthesize([SENTENCE], lead_s=0.0, tail_s=0.0)
    pcm, rate = read_pcm(utterance.path)
    return np.asarray(soxr.resample(pcm.astype(np.float32) / 32768, rate, SR), np.float32)


def noise(n: int, kind: str, seed: int = 7) -> np.ndarray:
    """Unit-RMS noise: white, or pink (power falling as 1/f, like most room noise)."""
    white = np.random.default_rng(seed).standard_normal(n)
    if kind == "pink":
        spectrum = np.fft.rfft(white)
        spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
        white = np.fft.irfft(spectrum, n)
    return np.asarray(white / np.sqrt(np.mean(np.square(white))))


def noisy(snr_db: float, kind: str) -> tuple[np.ndarray, float, float]:
    """Noise, the sentence in noise, noise: the mix and where the sentence is heard (s)."""
    clean = speech()
    lead = np.zeros(int(LEAD_S * SR))
    signal = np.concatenate([lead, clean, lead])
    level = float(np.sqrt(np.mean(np.square(clean)))) / 10 ** (snr_db / 20)
    mix = np.asarray(signal + level * noise(len(signal), kind), np.float32)
    # The audible sentence: its 10 ms frames within 40 dB of the loudest.
    hop = SR // 100
    rms = np.sqrt(np.mean(np.square(clean[: len(clean) // hop * hop].reshape(-1, hop)), 1))
    loud = np.flatnonzero(rms > 0.01 * rms.max())
    return mix, LEAD_S + loud[0] * hop / SR, LEAD_S + (loud[-1] + 1) * hop / SR


def segments(
    classifier: FrameClassifier, audio: np.ndarray, options: VadOptions | None = None
) -> list[tuple[float, float]]:
    """The audio of each segment (padding included: what the model transcribes), in s."""
    vad = VadSegmenter(options or VadOptions(), classifier)
    events = vad.push(audio) + vad.flush(final=True)
    return [
        (e.start_sample / SR, e.end_sample / SR) for e in events if isinstance(e, SegmentClosed)
    ]


def covers(found: list[tuple[float, float]], start: float, end: float) -> bool:
    """One segment holds the whole sentence."""
    return any(a <= start and b >= end for a, b in found)


@pytest.mark.parametrize("kind", ["white", "pink"])
def test_both_detectors_find_the_speech_in_noise_at_20_db(kind: str) -> None:
    audio, start, end = noisy(20.0, kind)

    for classifier in (WebRtcClassifier(2), SileroClassifier()):
        found = segments(classifier, audio)
        assert covers(found, start, end), (type(classifier).__name__, found, start, end)


@pytest.mark.parametrize("snr_db", [20.0, 5.0, 0.0])
def test_silero_opens_no_segment_on_noise_alone(snr_db: float) -> None:
    # Measured here: webrtcvad (mode 2) takes pink noise at 10 dB and below for speech
    # from the first frame to the last; Silero keeps to the sentence down to 0 dB.
    audio, start, end = noisy(snr_db, "pink")

    found = segments(SileroClassifier(), audio)

    assert covers(found, start, end), found
    # Nothing but the sentence: its segment, with the padding (240 ms) and the
    # hysteresis (450 ms) around it, and no other.
    assert len(found) == 1 and found[0][0] > start - 0.5 and found[0][1] < end + 0.8, found


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_silero_reads_whole_windows_whatever_the_frame_size(frame_ms: int) -> None:
    # The segmenter's frames (10, 20, 30 ms) are buffered into Silero's 512-sample
    # windows: the model runs once per window, and the same audio gives the same
    # probabilities in any framing, so the segments do not depend on it either.
    audio, start, end = noisy(20.0, "pink")
    reference = SileroClassifier()
    expected = [
        _probability_after(reference, audio[i : i + WINDOW_SAMPLES])
        for i in range(0, len(audio) - WINDOW_SAMPLES + 1, WINDOW_SAMPLES)
    ]
    classifier = SileroClassifier()
    runs: list[float] = []
    frame = SR * frame_ms // 1000
    last = None
    for i in range(0, len(audio) - frame + 1, frame):
        classifier.is_speech(audio[i : i + frame])
        if (i + frame) // WINDOW_SAMPLES != (i // WINDOW_SAMPLES):  # a window completed
            runs.append(classifier.probability)
        last = classifier.probability
    assert last is not None
    assert runs == pytest.approx(expected[: len(runs)], abs=1e-5)
    options = VadOptions(frame_ms=frame_ms)
    found = segments(SileroClassifier(), audio, options)
    assert covers(found, start, end), found


def _probability_after(classifier: SileroClassifier, window: np.ndarray) -> float:
    classifier.is_speech(window)
    return classifier.probability


def test_silero_needs_no_download_the_package_ships_the_model() -> None:
    path = model_path()
    assert path.name == "silero_vad.onnx" and path.stat().st_size > 1_000_000
    assert "site-packages" in path.parts or "dist-packages" in path.parts


def test_the_detector_is_chosen_by_config() -> None:
    assert isinstance(frame_classifier(VadOptions()), WebRtcClassifier)
    chosen = frame_classifier(VadOptions(detector="silero", silero_threshold=0.6))
    assert isinstance(chosen, SileroClassifier) and chosen.threshold == 0.6
    settings = load_settings(None, {"vad": {"detector": "silero"}})
    assert settings.vad.options().detector == "silero"
    with pytest.raises(ConfigError, match=r"vad\.detector"):
        load_settings(None, {"vad": {"detector": "energy"}})
    with pytest.raises(ValueError):
        VadOptions(detector="silero", silero_threshold=0.95)


def test_a_missing_model_is_a_config_error_that_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing() -> Path:
        raise SileroUnavailable(
            "vad.detector: silero needs the silero-vad package's ONNX "
            "model: pip install --no-deps silero-vad==6.2.3"
        )

    monkeypatch.setattr(vad_silero, "model_path", missing)
    with pytest.raises(ConfigError, match="pip install --no-deps silero-vad"):
        load_settings(None, {"vad": {"detector": "silero"}})
