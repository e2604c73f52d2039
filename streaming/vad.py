"""Voice activity segmentation: per-frame speech decisions turned into speech segments.

The hysteresis lives here, apart from the detector (as in pipecat's VADAnalyzer): a
detector only says whether one frame is speech, so a scripted detector makes the tests
exact and another detector can slot in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import webrtcvad

from streaming.audio import MODEL_SAMPLE_RATE_HZ

Detector = Literal["webrtc", "silero"]  # which FrameClassifier the server gives a session


@dataclass(frozen=True)
class VadOptions:
    detector: Detector = "webrtc"
    aggressiveness: int = 2  # webrtcvad mode, 0 (least) to 3 (most aggressive)
    silero_threshold: float = 0.5  # Silero's speech probability that starts speech
    frame_ms: int = 30  # webrtcvad takes 10, 20 or 30 ms frames
    start_ms: int = 90  # speech must last this long to open a segment
    end_ms: int = 450  # silence must last this long to close it
    pad_ms: int = 240  # audio kept before the first and after the last speech frame
    max_segment_s: float = 15.0  # a longer segment is cut at its quietest frame
    normalize_level: bool = True  # boost quiet recordings for the detector (see LevelNormalizer)

    def __post_init__(self) -> None:
        if self.detector not in ("webrtc", "silero"):
            raise ValueError("vad.detector must be webrtc or silero")
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError("vad.aggressiveness must be 0, 1, 2 or 3")
        if not 0.2 <= self.silero_threshold <= 0.9:
            raise ValueError("vad.silero_threshold must lie between 0.2 and 0.9")
        if self.frame_ms not in (10, 20, 30):
            raise ValueError("vad.frame_ms must be 10, 20 or 30")
        if min(self.start_ms, self.end_ms, self.pad_ms) < 0:
            raise ValueError("vad durations must not be negative")
        if not 2.0 <= self.max_segment_s <= 28.0:
            raise ValueError("vad.max_segment_s must lie between 2 and 28 (Whisper sees 30 s)")

    @property
    def frame_samples(self) -> int:
        return MODEL_SAMPLE_RATE_HZ * self.frame_ms // 1000

    def frames(self, duration_ms: float) -> int:
        return max(1, round(duration_ms / self.frame_ms))


class FrameClassifier(Protocol):
    def is_speech(self, frame: np.ndarray) -> bool:
        """Whether one frame of 16 kHz float32 samples holds speech."""
        ...


class WebRtcClassifier:
    def __init__(self, aggressiveness: int) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: np.ndarray) -> bool:
        pcm = (np.clip(frame, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        return bool(self._vad.is_speech(pcm, MODEL_SAMPLE_RATE_HZ))


class LevelNormalizer:
    """Gain for the detector only: webrtcvad misses speech recorded 40 dB below full scale.

    The speech level (95th percentile of recent frame RMS) is raised towards TARGET_RMS,
    but only when it stands clearly above the noise floor (10th percentile): steady
    noise is never boosted, since webrtcvad takes loud broadband noise for speech.
    """

    TARGET_RMS = 0.05
    MAX_GAIN = 30.0  # 30 dB
    MIN_SNR = 4.0  # 12 dB between speech level and noise floor
    HISTORY_FRAMES = 333  # about 10 s of 30 ms frames

    def __init__(self) -> None:
        self._rms: deque[float] = deque(maxlen=self.HISTORY_FRAMES)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        self._rms.append(float(np.sqrt(np.mean(np.square(frame)))))
        floor, level = (float(v) for v in np.percentile(self._rms, [10, 95]))
        if level <= 0 or level >= self.TARGET_RMS or level < self.MIN_SNR * floor:
            return frame
        gain = min(self.MAX_GAIN, self.TARGET_RMS / level)
        return np.asarray(np.clip(frame * gain, -1.0, 1.0), dtype=np.float32)


@dataclass(frozen=True)
class SpeechStarted:
    sample: int  # first speech frame, in samples from the start of the stream
    segment_start_sample: int  # where the segment's audio begins, padding included


@dataclass(frozen=True)
class SegmentClosed:
    start_sample: int
    audio: np.ndarray
    speech_ended: bool  # False when the segment was cut at its maximum length
    speech_end_sample: int  # end of the last speech frame
    # True when the detector heard the silence that ends speech (`end_ms`); False when a
    # flush or the end of the stream closed the segment before it could be sure.
    heard_silence: bool = True

    @property
    def end_sample(self) -> int:
        return self.start_sample + len(self.audio)


VadEvent = SpeechStarted | SegmentClosed


class VadSegmenter:
    """Cuts a 16 kHz stream into speech segments, with hysteresis and padding."""

    def __init__(self, options: VadOptions, classifier: FrameClassifier) -> None:
        self.options = options
        self._classifier = classifier
        self._frame = options.frame_samples
        self._start_frames = options.frames(options.start_ms)
        self._end_frames = options.frames(options.end_ms)
        self._pad_frames = options.frames(options.pad_ms) if options.pad_ms else 0
        self._max_frames = options.frames(options.max_segment_s * 1000)
        self._pending = np.zeros(0, dtype=np.float32)
        self._position = 0  # samples consumed into whole frames
        self._preroll: deque[np.ndarray] = deque(maxlen=self._pad_frames + self._start_frames)
        self._speech_run = 0
        self._segment: list[np.ndarray] | None = None  # frames of the open segment
        self._segment_start = 0
        self._silence_run = 0
        self._last_speech_frame = 0  # frames of the segment up to its last speech frame
        self._protected_until = 0  # a cut may not fall before this sample
        self._level = LevelNormalizer() if options.normalize_level else None

    @property
    def in_speech(self) -> bool:
        return self._segment is not None

    @property
    def trailing_silence_samples(self) -> int:
        """Non-speech at the end of the open segment so far (0 when none is open)."""
        return self._silence_run * self._frame if self._segment is not None else 0

    def current_segment(self) -> tuple[int, np.ndarray] | None:
        """The open segment so far: its start sample and audio."""
        if not self._segment:
            return None
        return self._segment_start, np.concatenate(self._segment)

    def protect_until(self, sample: int) -> None:
        """Ask that a length cut falls after this sample (the end of committed words)."""
        self._protected_until = max(self._protected_until, sample)

    def push(self, samples: np.ndarray) -> list[VadEvent]:
        events: list[VadEvent] = []
        data = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        whole = len(data) - len(data) % self._frame
        for offset in range(0, whole, self._frame):
            events.extend(self._push_frame(data[offset : offset + self._frame]))
        self._pending = data[whole:].astype(np.float32, copy=True)
        return events

    def flush(self, final: bool = False) -> list[VadEvent]:
        """Close the open segment now; at the end of the stream keep the partial frame."""
        if self._segment is None:
            return []
        if final and len(self._pending):
            self._segment.append(self._pending)
            self._position += len(self._pending)
            self._pending = np.zeros(0, dtype=np.float32)
            if self._silence_run == 0:  # speech went on to the end: the tail counts as speech
                self._last_speech_frame = len(self._segment)
        return [self._close(len(self._segment), speech_ended=True, heard_silence=False)]

    def _push_frame(self, frame: np.ndarray) -> list[VadEvent]:
        speech = self._classifier.is_speech(self._level(frame) if self._level else frame)
        self._position += len(frame)
        if self._segment is None:
            return self._push_quiet_frame(frame, speech)
        self._segment.append(frame)
        if speech:
            self._silence_run = 0
            self._last_speech_frame = len(self._segment)
        else:
            self._silence_run += 1
        if self._silence_run >= self._end_frames:
            keep = min(len(self._segment), self._last_speech_frame + self._pad_frames)
            return [self._close(keep, speech_ended=True)]
        if len(self._segment) >= self._max_frames:
            return [self._cut()]
        return []

    def _push_quiet_frame(self, frame: np.ndarray, speech: bool) -> list[VadEvent]:
        self._preroll.append(frame)
        self._speech_run = self._speech_run + 1 if speech else 0
        if self._speech_run < self._start_frames:
            return []
        keep = min(len(self._preroll), self._speech_run + self._pad_frames)
        frames = list(self._preroll)[-keep:]
        self._preroll.clear()
        self._segment = frames
        self._segment_start = self._position - keep * self._frame
        self._silence_run = 0
        self._last_speech_frame = len(frames)
        return [SpeechStarted(self._position - self._speech_run * self._frame, self._segment_start)]

    def _close(
        self, keep_frames: int, speech_ended: bool, heard_silence: bool = True
    ) -> SegmentClosed:
        assert self._segment is not None
        frames = self._segment
        audio = np.concatenate(frames[:keep_frames])
        # The last frame may be the stream's partial tail: never end speech after the audio.
        speech_end = min(min(self._last_speech_frame, keep_frames) * self._frame, len(audio))
        closed = SegmentClosed(
            start_sample=self._segment_start,
            audio=audio,
            speech_ended=speech_ended,
            speech_end_sample=self._segment_start + speech_end,
            heard_silence=heard_silence,
        )
        self._segment = None
        self._speech_run = 0
        self._preroll.clear()
        self._preroll.extend(frames[keep_frames:])
        return closed

    def _cut(self) -> SegmentClosed:
        """Split an over-long segment at its quietest frame; speech goes on after it."""
        assert self._segment is not None
        frames = self._segment
        protected = (self._protected_until - self._segment_start) // self._frame + 1
        first = min(max(len(frames) // 2, protected), len(frames) - 1)
        energies = [float(np.mean(np.square(f))) for f in frames[first:]]
        # Cut after the quietest frame, but keep at least one frame for the rest: an empty
        # open segment cannot be closed (nothing to concatenate on flush).
        cut = min(first + int(np.argmin(energies)) + 1, len(frames) - 1)
        start = self._segment_start
        closed = SegmentClosed(
            start_sample=start,
            audio=np.concatenate(frames[:cut]),
            speech_ended=False,
            speech_end_sample=start + cut * self._frame,
        )
        rest = frames[cut:]
        self._segment = rest
        self._segment_start = start + cut * self._frame
        self._last_speech_frame = len(rest)
        self._silence_run = 0
        return closed
