"""VadSegmenter: hysteresis, padding, flushing and length cuts, with a scripted detector.

The detector calls a frame speech when its energy exceeds a threshold, so a tone is speech
and zeros are silence, and every boundary below can be computed to the sample.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from fakes import EnergyClassifier
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.audio import MODEL_SAMPLE_RATE_HZ
from streaming.vad import (
    SegmentClosed,
    SpeechStarted,
    VadEvent,
    VadOptions,
    VadSegmenter,
    WebRtcClassifier,
)

# 30 ms frames of 480 samples; start 3 frames, end 10 frames, pad 2 frames, max 67 frames.
OPTIONS = VadOptions(frame_ms=30, start_ms=90, end_ms=300, pad_ms=60, max_segment_s=2.0)
F = OPTIONS.frame_samples
SPEECH = 0.3  # frame amplitudes
SILENCE = 0.0


def frames_signal(amplitudes: Sequence[float], freq_hz: float = 440.0) -> np.ndarray:
    """A 440 Hz tone whose amplitude is set per 30 ms frame (0 gives digital silence)."""
    envelope = np.repeat(np.asarray(amplitudes, dtype=np.float64), F)
    t = np.arange(len(envelope)) / MODEL_SAMPLE_RATE_HZ
    return (envelope * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def segmenter(options: VadOptions = OPTIONS) -> VadSegmenter:
    return VadSegmenter(options, EnergyClassifier())


def push_frame_by_frame(vad: VadSegmenter, signal: np.ndarray) -> dict[int, list[VadEvent]]:
    """Events keyed by the index of the frame whose push produced them."""
    events: dict[int, list[VadEvent]] = {}
    for index in range(len(signal) // F):
        produced = vad.push(signal[index * F : (index + 1) * F])
        if produced:
            events[index] = produced
    return events


def closed(events: Sequence[VadEvent]) -> list[SegmentClosed]:
    return [e for e in events if isinstance(e, SegmentClosed)]


def describe(events: Sequence[VadEvent]) -> list[tuple[Any, ...]]:
    """Events as comparable tuples (arrays by their exact bytes)."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        if isinstance(e, SpeechStarted):
            out.append(("started", e.sample, e.segment_start_sample))
        else:
            out.append(
                (
                    "closed",
                    e.start_sample,
                    e.end_sample,
                    e.speech_ended,
                    e.speech_end_sample,
                    e.audio.astype(np.float32).tobytes(),
                )
            )
    return out


# Options ------------------------------------------------------------------------------


def test_options_convert_durations_to_whole_frames() -> None:
    assert F == 480
    assert OPTIONS.frames(90) == 3
    assert OPTIONS.frames(300) == 10
    assert OPTIONS.frames(2000) == 67
    assert OPTIONS.frames(0) == 1  # never zero frames


@pytest.mark.parametrize(
    "kwargs",
    [
        {"aggressiveness": 4},
        {"frame_ms": 25},
        {"start_ms": -1},
        {"pad_ms": -30},
        {"max_segment_s": 1.0},
        {"max_segment_s": 29.0},
    ],
)
def test_options_reject_invalid_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        VadOptions(**kwargs)


# Opening --------------------------------------------------------------------------------


def test_speech_blips_shorter_than_start_ms_open_no_segment() -> None:
    vad = segmenter()
    signal = frames_signal(
        [SILENCE] * 10
        + [SPEECH] * 2
        + [SILENCE] * 20
        + [SPEECH] * 2
        + [SILENCE] * 5
        + [SPEECH]
        + [SILENCE] * 5
    )

    assert vad.push(signal) == []
    assert not vad.in_speech
    assert vad.current_segment() is None
    assert vad.flush(final=True) == []


def test_segment_opens_on_the_frame_completing_start_ms_with_padding_before() -> None:
    vad = segmenter()
    signal = frames_signal([SILENCE] * 10 + [SPEECH] * 20)

    events = push_frame_by_frame(vad, signal)

    assert list(events) == [12]  # speech frames 10, 11, 12
    assert events[12] == [SpeechStarted(sample=10 * F, segment_start_sample=8 * F)]
    assert vad.in_speech
    current = vad.current_segment()
    assert current is not None
    start, audio = current
    assert start == 8 * F
    np.testing.assert_array_equal(audio, signal[8 * F : 30 * F])


def test_padding_before_speech_is_limited_by_the_stream_start() -> None:
    vad = segmenter()

    events = vad.push(frames_signal([SILENCE] + [SPEECH] * 5))

    assert events == [SpeechStarted(sample=F, segment_start_sample=0)]


def test_without_padding_the_segment_is_exactly_the_speech_frames() -> None:
    options = VadOptions(frame_ms=30, start_ms=90, end_ms=300, pad_ms=0, max_segment_s=2.0)
    vad = segmenter(options)

    events = vad.push(frames_signal([SILENCE] * 10 + [SPEECH] * 20 + [SILENCE] * 10))

    assert events[0] == SpeechStarted(sample=10 * F, segment_start_sample=10 * F)
    (segment,) = closed(events)
    assert (segment.start_sample, segment.end_sample) == (10 * F, 30 * F)


# Closing --------------------------------------------------------------------------------


def test_segment_closes_after_end_ms_of_silence_keeping_padding_after() -> None:
    vad = segmenter()
    signal = frames_signal([SILENCE] * 10 + [SPEECH] * 20 + [SILENCE] * 30)

    events = push_frame_by_frame(vad, signal)

    assert list(events) == [12, 39]  # the 10th silent frame (30..39) closes it
    (segment,) = events[39]
    assert isinstance(segment, SegmentClosed)
    assert segment.speech_ended
    assert segment.start_sample == 8 * F  # 2 frames of padding before
    assert segment.speech_end_sample == 30 * F
    assert segment.end_sample == 32 * F  # 2 frames of padding after
    np.testing.assert_array_equal(segment.audio, signal[8 * F : 32 * F])
    assert not vad.in_speech


def test_pauses_shorter_than_end_ms_keep_the_segment_open() -> None:
    vad = segmenter()
    signal = frames_signal(
        [SILENCE] * 10 + [SPEECH] * 10 + [SILENCE] * 9 + [SPEECH] * 10 + [SILENCE] * 12
    )

    events = vad.push(signal)

    assert [type(e) for e in events] == [SpeechStarted, SegmentClosed]
    segment = closed(events)[0]
    assert (segment.start_sample, segment.speech_end_sample, segment.end_sample) == (
        8 * F,
        39 * F,
        41 * F,
    )


def test_consecutive_segments_never_overlap_even_when_padding_exceeds_the_pause() -> None:
    # end 2 frames, pad 5 frames: the pause is shorter than both paddings together.
    options = VadOptions(frame_ms=30, start_ms=90, end_ms=60, pad_ms=150, max_segment_s=2.0)
    vad = segmenter(options)
    signal = frames_signal(([SPEECH] * 6 + [SILENCE] * 3) * 4)

    events = vad.push(signal) + vad.flush(final=True)

    segments = closed(events)
    assert len(segments) == 4
    for before, after in itertools.pairwise(segments):
        assert before.end_sample <= after.start_sample
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    assert [s.sample for s in starts] == [0, 9 * F, 18 * F, 27 * F]


def test_second_segment_gets_its_own_speech_started_and_padding() -> None:
    vad = segmenter()
    signal = frames_signal(
        [SILENCE] * 10 + [SPEECH] * 10 + [SILENCE] * 12 + [SPEECH] * 10 + [SILENCE] * 12
    )

    events = vad.push(signal)

    assert describe(events)[0] == ("started", 10 * F, 8 * F)
    assert describe(events)[2] == ("started", 32 * F, 30 * F)
    first, second = closed(events)
    assert (first.start_sample, first.end_sample) == (8 * F, 22 * F)
    assert (second.start_sample, second.end_sample) == (30 * F, 44 * F)


# Flushing -------------------------------------------------------------------------------


def test_flush_closes_the_open_segment_and_keeps_the_partial_frame_pending() -> None:
    vad = segmenter()
    signal = frames_signal([SILENCE] * 10 + [SPEECH] * 21)[: 30 * F + 100]

    vad.push(signal)
    (segment,) = vad.flush()

    assert isinstance(segment, SegmentClosed)
    assert segment.speech_ended
    assert (segment.start_sample, segment.end_sample) == (8 * F, 30 * F)
    assert segment.speech_end_sample == 30 * F
    assert not vad.in_speech
    assert vad.flush() == []
    assert vad.flush(final=True) == []  # no open segment: the partial frame is dropped


def test_flush_final_keeps_the_trailing_partial_frame() -> None:
    vad = segmenter()
    signal = frames_signal([SILENCE] * 10 + [SPEECH] * 21)[: 30 * F + 100]

    vad.push(signal)
    (segment,) = vad.flush(final=True)

    assert isinstance(segment, SegmentClosed)
    assert (segment.start_sample, segment.end_sample) == (8 * F, 30 * F + 100)
    np.testing.assert_array_equal(segment.audio, signal[8 * F :])
    assert segment.speech_end_sample <= segment.end_sample


def test_flush_final_after_a_pause_ends_speech_at_the_last_speech_frame() -> None:
    vad = segmenter()
    signal = frames_signal([SILENCE] * 10 + [SPEECH] * 10 + [SILENCE] * 6)[: 25 * F + 100]

    vad.push(signal)
    (segment,) = vad.flush(final=True)

    assert isinstance(segment, SegmentClosed)
    assert segment.end_sample == 25 * F + 100  # all the audio, the unclassified tail too
    assert segment.speech_end_sample == 20 * F  # but speech stopped at frame 20


def test_flush_before_silence_ends_the_segment_at_the_audio_received() -> None:
    vad = segmenter()
    vad.push(frames_signal([SILENCE] * 10 + [SPEECH] * 10 + [SILENCE] * 4))

    (segment,) = vad.flush()

    assert isinstance(segment, SegmentClosed)
    assert segment.speech_end_sample == 20 * F
    assert segment.end_sample == 24 * F  # the whole segment so far, padding is not trimmed


def test_speech_after_a_flush_opens_a_new_segment_at_the_right_position() -> None:
    vad = segmenter()
    signal = frames_signal([SILENCE] * 10 + [SPEECH] * 30)

    vad.push(signal[: 20 * F + 100])
    vad.flush()
    events = vad.push(signal[20 * F + 100 :])

    # The pending 100 samples plus frames 21, 22 complete frames 20..22 of speech.
    assert events == [SpeechStarted(sample=20 * F, segment_start_sample=20 * F)]


# Length cuts ---------------------------------------------------------------------------


def long_speech_with_dips(dips: dict[int, float], speech_frames: int = 80) -> np.ndarray:
    """Silence 0..9, speech from frame 10, with quieter (still speech) frames at `dips`."""
    amplitudes = [SILENCE] * 10 + [SPEECH] * speech_frames + [SILENCE] * 20
    for index, amplitude in dips.items():
        amplitudes[index] = amplitude
    return frames_signal(amplitudes)


def test_long_segment_is_cut_at_its_quietest_frame_in_the_second_half() -> None:
    # The segment starts at frame 8 and reaches 67 frames with frame 74; candidates start
    # at its half (frame 41), so the quieter dip at frame 20 is not eligible.
    vad = segmenter()
    signal = long_speech_with_dips({20: 0.02, 50: 0.05})

    events = push_frame_by_frame(vad, signal)

    assert list(events) == [12, 74, 99]
    (cut,) = events[74]
    assert isinstance(cut, SegmentClosed)
    assert not cut.speech_ended
    assert (cut.start_sample, cut.end_sample) == (8 * F, 51 * F)  # just after the dip
    assert cut.speech_end_sample == cut.end_sample
    np.testing.assert_array_equal(cut.audio, signal[8 * F : 51 * F])


def test_after_a_cut_the_rest_continues_as_an_open_segment() -> None:
    vad = segmenter()
    signal = long_speech_with_dips({50: 0.05})

    vad.push(signal[: 75 * F])
    assert vad.in_speech
    current = vad.current_segment()
    assert current is not None
    start, audio = current
    assert start == 51 * F
    np.testing.assert_array_equal(audio, signal[51 * F : 75 * F])

    events = vad.push(signal[75 * F :])
    assert [type(e) for e in events] == [SegmentClosed]  # no second SpeechStarted
    (rest,) = closed(events)
    assert rest.speech_ended
    assert (rest.start_sample, rest.speech_end_sample, rest.end_sample) == (
        51 * F,
        90 * F,
        92 * F,
    )


def test_protect_until_moves_the_cut_after_the_protected_sample() -> None:
    vad = segmenter()
    signal = long_speech_with_dips({50: 0.05, 65: 0.1})
    vad.push(signal[: 60 * F])

    vad.protect_until(60 * F + 17)  # inside frame 60: the cut must fall after frame 60
    vad.protect_until(10 * F)  # an earlier request does not lower the protection
    events = vad.push(signal[60 * F : 75 * F])

    (cut,) = closed(events)
    assert not cut.speech_ended
    assert cut.end_sample == 66 * F  # after the dip at frame 65, not the deeper one at 50


def test_without_protection_the_same_audio_is_cut_at_the_deeper_dip() -> None:
    vad = segmenter()

    events = vad.push(long_speech_with_dips({50: 0.05, 65: 0.1})[: 75 * F])

    assert closed(events)[0].end_sample == 51 * F


def test_cut_never_leaves_an_empty_rest_when_the_last_frame_is_the_quietest() -> None:
    # Speech pauses exactly on the frame that reaches the maximum length.
    vad = segmenter()
    amplitudes = [SILENCE] * 10 + [SPEECH] * 64 + [SILENCE] + [SPEECH] * 5
    signal = frames_signal(amplitudes)

    events = vad.push(signal[: 75 * F])

    (cut,) = closed(events)
    assert cut.end_sample == 74 * F  # just before the silent frame
    assert vad.current_segment() is not None
    (rest,) = closed(vad.flush(final=True))  # used to fail: nothing to concatenate
    assert (rest.start_sample, rest.end_sample) == (74 * F, 75 * F)


def test_protection_beyond_the_segment_still_leaves_a_non_empty_rest() -> None:
    vad = segmenter()
    signal = long_speech_with_dips({50: 0.05})
    vad.push(signal[: 60 * F])

    vad.protect_until(10**9)
    events = vad.push(signal[60 * F : 75 * F])

    (cut,) = closed(events)
    assert cut.end_sample == 74 * F
    assert closed(vad.flush()) != []


def test_cut_segments_tile_the_speech_without_gaps() -> None:
    vad = segmenter()
    signal = long_speech_with_dips({50: 0.05, 100: 0.05, 140: 0.05}, speech_frames=185)

    events = vad.push(signal) + vad.flush(final=True)

    segments = closed(events)
    assert [s.speech_ended for s in segments] == [False, False, False, True]
    for before, after in itertools.pairwise(segments):
        assert before.end_sample == after.start_sample
    assert all(len(s.audio) <= 67 * F for s in segments)


# Chunking ------------------------------------------------------------------------------

MIXED = frames_signal(
    [SILENCE] * 5
    + [SPEECH] * 2
    + [SILENCE] * 8  # a blip
    + [SPEECH] * 20
    + [SILENCE] * 15  # an utterance
    + [SPEECH] * 40
    + [0.05]
    + [SPEECH] * 40
    + [SILENCE] * 3  # a long one, cut once
)[:-123]  # end on a partial frame


def run_in_chunks(signal: np.ndarray, cuts: Sequence[int]) -> list[tuple[Any, ...]]:
    vad = segmenter()
    bounds = sorted([0, len(signal), *cuts])
    events: list[VadEvent] = []
    for a, b in itertools.pairwise(bounds):
        events.extend(vad.push(signal[a:b]))
    events.extend(vad.flush(final=True))
    return describe(events)


REFERENCE = run_in_chunks(MIXED, [])


def test_reference_run_holds_every_kind_of_event() -> None:
    kinds = [(e[0], e[3]) if e[0] == "closed" else (e[0],) for e in REFERENCE]
    assert kinds == [
        ("started",),
        ("closed", True),
        ("started",),
        ("closed", False),
        ("closed", True),
    ]


@pytest.mark.parametrize("chunk", [1, 7, 160, 479, 480, 481, 4000])
def test_fixed_chunk_sizes_give_identical_events(chunk: int) -> None:
    assert run_in_chunks(MIXED, range(chunk, len(MIXED), chunk)) == REFERENCE


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(MIXED)), max_size=25))
def test_any_chunking_gives_identical_events(cuts: list[int]) -> None:
    assert run_in_chunks(MIXED, cuts) == REFERENCE


# The real detector -----------------------------------------------------------------------


def voiced(seconds: float) -> np.ndarray:
    """A buzz with a 150 Hz fundamental and harmonics, which webrtcvad calls speech."""
    t = np.arange(round(seconds * MODEL_SAMPLE_RATE_HZ)) / MODEL_SAMPLE_RATE_HZ
    buzz = sum(0.1 / k * np.sin(2 * np.pi * 150 * k * t) for k in range(1, 20))
    return np.asarray(buzz, dtype=np.float32)


def test_webrtc_classifier_segments_a_voiced_buzz_between_silences() -> None:
    options = VadOptions()  # the defaults: 30 ms frames, 90 ms start, 450 ms end, 240 ms pad
    vad = VadSegmenter(options, WebRtcClassifier(options.aggressiveness))
    silence = np.zeros(MODEL_SAMPLE_RATE_HZ // 2, np.float32)
    signal = np.concatenate([silence, voiced(1.5), silence, silence])

    events = vad.push(signal)

    assert [type(e) for e in events] == [SpeechStarted, SegmentClosed]
    started, segment = events
    assert isinstance(started, SpeechStarted) and isinstance(segment, SegmentClosed)
    # Speech is frames 16 (7680..8160, the buzz starts at 8000) to 66 (the buzz ends at
    # 32000); webrtcvad may add a few frames of its own hangover at the end.
    assert started.sample == 16 * 480
    assert segment.speech_ended
    assert 67 * 480 <= segment.speech_end_sample <= 72 * 480
    assert segment.start_sample == started.sample - options.frames(options.pad_ms) * 480
    assert segment.end_sample == segment.speech_end_sample + options.frames(options.pad_ms) * 480


def test_webrtc_classifier_finds_no_speech_in_silence() -> None:
    classifier = WebRtcClassifier(3)
    assert not any(classifier.is_speech(np.zeros(480, np.float32)) for _ in range(3))
