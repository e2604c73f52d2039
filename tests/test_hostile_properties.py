"""Property-based tests: whatever a client sends, the parser and the audio intake answer
with protocol errors or results, never a crash, and never pass NaN to the model."""

from __future__ import annotations

import json

import numpy as np
from fakes import EnergyClassifier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming.audio import AudioFormat, AudioFormatError, decode_frame
from streaming.engine import Hypothesis
from streaming.protocol import Flush, ProtocolError, Start, Stop, parse_client_text
from streaming.session import Session, SessionConfig
from streaming.vad import FrameClassifier

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(st.text(max_size=200))
def test_any_text_frame_parses_or_raises_a_protocol_error(text: str) -> None:
    try:
        message = parse_client_text(text)
    except ProtocolError as exc:
        assert exc.code == "bad_request" and exc.message
    else:
        assert isinstance(message, Start | Flush | Stop)


@given(
    st.dictionaries(
        st.sampled_from(
            ["type", "sample_rate", "encoding", "language", "interim", "source", "labels"]
        ),
        json_values,
    )
)
def test_any_json_object_parses_or_raises_a_protocol_error(obj: dict[str, object]) -> None:
    try:
        parse_client_text(json.dumps(obj))
    except ProtocolError as exc:
        assert exc.message


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60_000), st.sampled_from(["[", '{"a":', '[{"b":']), st.booleans())
def test_any_nesting_depth_is_parsed_or_refused_never_a_crash(
    depth: int, opener: str, closed: bool
) -> None:
    closer = {"[": "]", '{"a":': "}", '[{"b":': "}]"}[opener]
    inner = "0" + closer * depth if closed else ""
    text = '{"type": "flush", "x": ' + opener * depth + inner + "}"
    try:
        assert isinstance(parse_client_text(text), Flush)
    except ProtocolError as exc:
        assert exc.code == "bad_request"
        assert "deeper than" in exc.message or "not valid JSON" in exc.message


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 20_000),
    st.sampled_from(["", "-", "0.", "1e"]),
    st.sampled_from(["sample_rate", "x"]),
)
def test_any_number_length_is_parsed_or_refused_never_a_crash(
    digits: int, sign: str, field: str
) -> None:
    text = f'{{"type": "start", "{field}": {sign}{"7" * digits}}}'
    try:
        parse_client_text(text)
    except ProtocolError as exc:
        assert exc.code == "bad_request" and exc.message


@given(st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=8))
def test_only_ascii_digits_make_a_sample_rate(digits: str) -> None:
    try:
        message = parse_client_text(json.dumps({"type": "start", "sample_rate": digits}))
    except ProtocolError as exc:
        assert "sample_rate must be an integer number of Hz" in exc.message
    else:
        assert isinstance(message, Start) and digits.isascii()


@given(st.binary(max_size=4096), st.sampled_from(["pcm_s16le", "f32le"]))
def test_any_binary_frame_decodes_to_finite_samples_or_is_refused(
    data: bytes, encoding: str
) -> None:
    try:
        samples = decode_frame(data, AudioFormat(16_000, encoding))  # type: ignore[arg-type]
    except AudioFormatError as exc:
        assert str(exc)
    else:
        assert samples.dtype == np.float32
        assert np.all(np.isfinite(samples)) and np.all(np.abs(samples) <= 1.0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.binary(max_size=3000) | st.sampled_from(['{"type":"flush"}', "{", "[]"]), max_size=30
    ),
    st.sampled_from([8_000, 16_000, 22_050, 44_100, 48_000]),
    st.sampled_from(["pcm_s16le", "f32le"]),
)
def test_a_session_survives_any_sequence_of_frames(
    frames: list[bytes | str], rate: int, encoding: str
) -> None:
    classifier: FrameClassifier = EnergyClassifier()
    config = SessionConfig(audio=AudioFormat(rate, encoding))  # type: ignore[arg-type]
    session = Session("prop", config, classifier)
    for frame in frames:
        try:
            if isinstance(frame, bytes):
                session.receive_audio(frame)
            else:
                session.receive_message(parse_client_text(frame))
        except (ProtocolError, AudioFormatError):
            pass
        while (job := session.next_job()) is not None:
            assert np.all(np.isfinite(job.request.audio))
            session.abandon_job(job)
            break
    session.receive_message(Stop())
    while not session.done:  # every segment still owed a final gets one, then done
        job = session.next_job()
        assert job is not None, "stopped session neither done nor asking for work"
        session.complete_job(job, Hypothesis(words=()))
    messages = [m.to_dict() for m in session.take_messages()]
    finals = [m for m in messages if m["type"] == "final"]
    assert messages[-1]["type"] == "done" and messages[-1]["segments"] == len(finals)
