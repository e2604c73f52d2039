"""Bad input gets a protocol error a user can act on, and other sessions carry on.

The middle layer: a real server on a free port with the scripted engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
import websockets
from fakes import scripted_words
from harness import check_invariants
from speech import Utterance

from client.stream import stream_file


async def _exchange(url: str, frames: list[str | bytes]) -> tuple[list[dict[str, Any]], int | None]:
    """Send frames, then stop, and collect everything until the server closes."""
    messages: list[dict[str, Any]] = []
    async with websockets.connect(url) as ws:
        for frame in frames:
            await ws.send(frame)
        with contextlib.suppress(websockets.ConnectionClosed):  # closed on a fatal error
            await ws.send(json.dumps({"type": "stop"}))
        try:
            async for raw in ws:
                messages.append(json.loads(raw))
        except websockets.ConnectionClosedError:
            pass  # a 4xxx close: the code is checked by the caller
        return messages, ws.close_code


def _errors(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "error"]


@pytest.mark.parametrize(
    ("frames", "code", "words"),
    [
        (["{not json"], "bad_request", "not valid JSON"),
        (['["a", "list"]'], "bad_request", "JSON object"),
        (['{"type": "dance"}'], "bad_request", "unknown message type"),
        (
            [b"\x00\x00" * 800, '{"type": "start", "sample_rate": 16000}'],
            "bad_request",
            "before any audio",
        ),
        ([b"\x00\x01\x02"], "bad_audio", "whole number"),
        (['{"type": "start", "sample_rate": "fast"}'], "bad_request", "sample_rate"),
    ],
    ids=[
        "malformed-json",
        "not-an-object",
        "unknown-type",
        "start-after-audio",
        "odd-bytes",
        "bad-start-rate",
    ],
)
def test_recoverable_bad_input_gets_an_error_and_the_session_goes_on(
    scripted_url: str, frames: list[str | bytes], code: str, words: str
) -> None:
    messages, close_code = asyncio.run(_exchange(f"{scripted_url}/v1/stream", frames))
    errors = _errors(messages)
    assert errors and errors[0]["code"] == code and words in errors[0]["message"], messages
    # The session survived: stop was honoured with done and a normal close.
    assert messages[-1]["type"] == "done" and close_code == 1000, messages


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("sample_rate=96000", "48000, not 96000"),
        ("sample_rate=4000", "8000 to 48000"),
        ("encoding=mp3", "unsupported encoding 'mp3'"),
        ("language=fr", "English only"),
    ],
)
def test_unsupported_stream_parameters_are_refused_with_a_reason(
    scripted_url: str, query: str, words: str
) -> None:
    messages, close_code = asyncio.run(_exchange(f"{scripted_url}/v1/stream?{query}", []))
    assert messages[0]["type"] == "error" and messages[0]["code"] == "bad_request"
    assert words in messages[0]["message"], messages
    assert close_code == 4400


def test_start_with_unsupported_encoding_ends_the_session_clearly(scripted_url: str) -> None:
    messages, close_code = asyncio.run(
        _exchange(f"{scripted_url}/v1/stream", ['{"type": "start", "encoding": "opus"}'])
    )
    assert messages[0]["type"] == "ready"
    assert _errors(messages)[0]["code"] == "bad_request"
    assert "opus" in _errors(messages)[0]["message"]
    assert close_code == 4400


def test_audio_after_stop_is_refused_and_nothing_follows_done(scripted_url: str) -> None:
    async def run() -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        async with websockets.connect(f"{scripted_url}/v1/stream") as ws:
            await ws.send(json.dumps({"type": "stop"}))
            await ws.send(b"\x00\x00" * 160)
            async for raw in ws:
                messages.append(json.loads(raw))
        return messages

    messages = asyncio.run(run())
    assert messages[-1]["type"] == "done"
    check_invariants(messages)


def test_bad_sessions_do_not_disturb_a_good_one(scripted_url: str, other_speech: Utterance) -> None:
    async def run() -> Any:
        good = asyncio.create_task(
            stream_file(other_speech.path, f"{scripted_url}/v1/stream", speed=2.0)
        )
        bad = [
            _exchange(f"{scripted_url}/v1/stream", ["{oops", b"\x01", '{"type": "x"}']),
            _exchange(f"{scripted_url}/v1/stream?encoding=wav", []),
            _exchange(f"{scripted_url}/v1/stream", [b"\x00" * 3201] * 5),
        ]
        bad_results = await asyncio.gather(*bad)
        return await good, bad_results

    transcript, bad_results = asyncio.run(run())
    assert all(_errors(messages) for messages, _ in bad_results)
    check_invariants(transcript.messages)
    assert transcript.of_type("done"), "the good session was not finished"
    assert scripted_words(transcript.text), transcript.text
