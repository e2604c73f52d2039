"""Wire protocol v1: parsing client text frames and serialising server messages."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from streaming.protocol import (
    PROTOCOL_VERSION,
    Done,
    Error,
    Final,
    Flush,
    Partial,
    ProtocolError,
    Ready,
    ServerMessage,
    SpeechEnd,
    SpeechStart,
    Start,
    Started,
    Stop,
    StreamParams,
    WordTiming,
    parse_client_text,
)


def start(**fields: Any) -> str:
    return json.dumps({"type": "start", **fields})


def refused(text: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_client_text(text)
    assert caught.value.code == "bad_request"
    assert not caught.value.fatal
    assert str(caught.value) == caught.value.message
    return caught.value


# Client messages ---------------------------------------------------------------------------


def test_start_with_every_parameter() -> None:
    text = start(
        sample_rate=48000,
        encoding="f32le",
        language="de",
        interim=False,
        source="mic",
        speaker="alice",
        labels={"room": "1", "seat": 2},
    )

    assert parse_client_text(text) == Start(
        StreamParams(
            sample_rate=48000,
            encoding="f32le",
            language="de",
            interim=False,
            labels={"source": "mic", "speaker": "alice", "room": "1", "seat": "2"},
        )
    )


def test_start_without_parameters_leaves_every_setting_unset() -> None:
    assert parse_client_text('{"type": "start"}') == Start(StreamParams())


def test_flush_and_stop_ignore_extra_fields() -> None:
    assert parse_client_text('{"type": "flush"}') == Flush()
    assert parse_client_text('{"type": "stop", "reason": "done"}') == Stop()


@pytest.mark.parametrize("value", ["16000", " 16000 ", 16000])
def test_sample_rate_may_be_an_integer_or_a_string_of_digits(value: Any) -> None:
    message = parse_client_text(start(sample_rate=value))

    assert isinstance(message, Start)
    assert message.params.sample_rate == 16000


@pytest.mark.parametrize(
    "value", [True, False, 16000.5, 16000.0, "16k", "", "-16000", None, [16000], {"hz": 1}, "²"]
)
def test_sample_rate_of_another_type_is_refused_naming_the_field(value: Any) -> None:
    error = refused(start(sample_rate=value))

    assert "sample_rate" in error.message
    assert repr(value) in error.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("FALSE", False),
        ("1", True),
        ("0", False),
        ("yes", True),
        ("No", False),
    ],
)
def test_interim_may_be_a_bool_or_a_boolean_string(value: Any, expected: bool) -> None:
    message = parse_client_text(start(interim=value))

    assert isinstance(message, Start)
    assert message.params.interim is expected


@pytest.mark.parametrize("value", ["maybe", "", 1, 0, None, [True]])
def test_interim_of_another_value_is_refused(value: Any) -> None:
    error = refused(start(interim=value))

    assert "interim must be true or false" in error.message


@pytest.mark.parametrize(("field", "value"), [("encoding", 16), ("language", ["en"])])
def test_encoding_and_language_must_be_strings(field: str, value: Any) -> None:
    error = refused(start(**{field: value}))

    assert f"{field} must be a string" in error.message


@pytest.mark.parametrize(
    ("offset", "first", "expected"),
    [
        (12.5, 3, (12.5, 3)),
        ("12.5", "3", (12.5, 3)),
        (0, 0, (0.0, 0)),
        (" 7 ", " 0 ", (7.0, 0)),
        (1e7, 10**9, (1e7, 10**9)),
    ],
)
def test_a_resumed_stream_gives_its_offset_and_first_segment(
    offset: Any, first: Any, expected: tuple[float, int]
) -> None:
    message = parse_client_text(start(offset_s=offset, first_segment=first))

    assert isinstance(message, Start)
    assert (message.params.offset_s, message.params.first_segment) == expected


@pytest.mark.parametrize(
    "value", [-1, "-0.5", True, None, "", "nan", "inf", "1e400", 1e7 + 1, [1.0], "12 s", "x" * 50]
)
def test_an_offset_that_is_no_finite_number_of_seconds_is_refused(value: Any) -> None:
    error = refused(start(offset_s=value))

    assert "offset_s must be a number of seconds from 0 to 1e+07" in error.message


def test_an_offset_of_infinity_or_nan_in_json_is_refused() -> None:
    for text in ('{"type": "start", "offset_s": 1e999}', '{"type": "start", "offset_s": NaN}'):
        assert "offset_s must be a number of seconds" in refused(text).message


@pytest.mark.parametrize(
    "value", [-1, "-1", 1.5, "1.0", True, None, "", "²", 10**9 + 1, "3 segments"]
)
def test_a_first_segment_that_is_no_whole_number_is_refused(value: Any) -> None:
    error = refused(start(first_segment=value))

    assert "first_segment must be a whole number from 0 to 1000000000" in error.message


@pytest.mark.parametrize("text", ["", "{", "start", '{"type": "stop",}', "{'type': 'stop'}"])
def test_malformed_json_is_refused_with_the_position(text: str) -> None:
    error = refused(text)

    assert "not valid JSON" in error.message
    assert "at char" in error.message
    assert error.__cause__ is None and error.__suppress_context__


@pytest.mark.parametrize("text", ["[]", '["start"]', "42", '"stop"', "null", "true"])
def test_json_that_is_not_an_object_is_refused(text: str) -> None:
    assert "JSON object with a 'type'" in refused(text).message


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ('{"type": "pause"}', "'pause'"),
        ("{}", "None"),
        ('{"type": 3}', "3"),
        ('{"type": "START"}', "'START'"),
    ],
)
def test_unknown_message_types_are_refused_listing_the_known_ones(text: str, shown: str) -> None:
    message = refused(text).message

    assert f"unknown message type {shown}" in message
    assert "'start', 'flush' or 'stop'" in message


def test_protocol_error_can_be_fatal() -> None:
    error = ProtocolError("too_many", "bye", fatal=True)

    assert (error.code, error.message, error.fatal) == ("too_many", "bye", True)


# Server messages ---------------------------------------------------------------------------


def roundtrip(message: ServerMessage) -> dict[str, Any]:
    decoded = json.loads(message.to_json())
    assert next(iter(decoded)) == "type"  # type leads, for humans reading the stream
    return decoded  # type: ignore[no-any-return]


def test_ready_round_trips_with_the_protocol_version() -> None:
    ready = Ready(
        session="s1",
        sample_rate=16000,
        encoding="pcm_s16le",
        model="tiny.en",
        language="en",
        interim=True,
    )

    assert roundtrip(ready) == {
        "type": "ready",
        "session": "s1",
        "sample_rate": 16000,
        "encoding": "pcm_s16le",
        "model": "tiny.en",
        "language": "en",
        "interim": True,
        "protocol": PROTOCOL_VERSION,
    }
    assert PROTOCOL_VERSION == 1


def test_ready_confirms_a_resumed_stream_and_says_nothing_of_it_otherwise() -> None:
    fresh = Ready(
        session="s1",
        sample_rate=16000,
        encoding="pcm_s16le",
        model="tiny.en",
        language="en",
        interim=True,
    )
    resumed = Ready(
        session="s2",
        sample_rate=16000,
        encoding="pcm_s16le",
        model="tiny.en",
        language="en",
        interim=True,
        offset_s=0.0,
        first_segment=4,
    )

    assert "offset_s" not in roundtrip(fresh) and "first_segment" not in roundtrip(fresh)
    assert roundtrip(resumed)["offset_s"] == 0.0 and roundtrip(resumed)["first_segment"] == 4


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            Started(sample_rate=8000, encoding="f32le", language="fr", interim=False),
            {
                "type": "started",
                "sample_rate": 8000,
                "encoding": "f32le",
                "language": "fr",
                "interim": False,
            },
        ),
        (
            Partial(segment=2, text="hello wor", start=1.5, end=2.25, stable="hello"),
            {
                "type": "partial",
                "segment": 2,
                "text": "hello wor",
                "start": 1.5,
                "end": 2.25,
                "stable": "hello",
            },
        ),
        (SpeechStart(t=0.27), {"type": "speech_start", "t": 0.27}),
        (SpeechEnd(t=3.0), {"type": "speech_end", "t": 3.0}),
        (
            Error(code="bad_audio", message="odd frame"),
            {"type": "error", "code": "bad_audio", "message": "odd frame"},
        ),
        (
            Done(audio_seconds=12.5, segments=3),
            {"type": "done", "audio_seconds": 12.5, "segments": 3},
        ),
    ],
)
def test_server_messages_round_trip_through_json(
    message: ServerMessage, expected: dict[str, Any]
) -> None:
    assert roundtrip(message) == expected


def test_final_words_serialise_as_a_list_of_word_dicts() -> None:
    final = Final(
        segment=0,
        text="hello world",
        start=0.0,
        end=1.2,
        words=(WordTiming("hello", 0.1, 0.5, 0.98), WordTiming("world", 0.5, 1.1, 0.8765)),
    )

    decoded = roundtrip(final)

    assert decoded["words"] == [
        {"word": "hello", "start": 0.1, "end": 0.5, "probability": 0.98},
        {"word": "world", "start": 0.5, "end": 1.1, "probability": 0.8765},
    ]
    assert decoded["type"] == "final"


def test_falsy_values_are_kept_only_none_is_omitted() -> None:
    decoded = roundtrip(Partial(segment=0, text="", start=0.0, end=0.0))
    assert decoded == {
        "type": "partial",
        "segment": 0,
        "text": "",
        "start": 0.0,
        "end": 0.0,
        "stable": "",
    }
    assert roundtrip(Final(segment=0, text="", start=0.0, end=0.0))["words"] == []


@dataclass(frozen=True)
class _Optional(ServerMessage):
    present: int
    absent: str | None = None
    type: str = "probe"


def test_none_fields_are_omitted() -> None:
    assert roundtrip(_Optional(present=0)) == {"type": "probe", "present": 0}
    assert roundtrip(_Optional(present=1, absent="x")) == {
        "type": "probe",
        "present": 1,
        "absent": "x",
    }


def test_text_is_sent_as_utf8_not_escaped() -> None:
    text = Final(segment=0, text="grüße 東京", start=0.0, end=1.0).to_json()

    assert "grüße 東京" in text


def test_a_partial_keeps_its_words_off_the_native_wire() -> None:
    words = (WordTiming("hello", 0.1, 0.4, 0.9),)
    partial = Partial(segment=0, text="hello", start=0.0, end=0.5, stable="", words=words)
    assert json.loads(partial.to_json()) == {
        "type": "partial",
        "segment": 0,
        "text": "hello",
        "start": 0.0,
        "end": 0.5,
        "stable": "",
    }
