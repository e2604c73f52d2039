"""Deepgram's live streaming API (`/v1/listen`) through Deepgram's own Python SDK
(`deepgram-sdk`), pointed at the test server: interim results before finals,
`speech_final` at the pauses, `Finalize`, `CloseStream`, and refusals."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import soxr
import websockets
from deepgram import DeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.socket_client import V1SocketClient
from fakes import ScriptedWhisper, scripted_words
from harness import LiveServer, serving, settings_with
from speech import Utterance, read_pcm, wer

from server.compat.deepgram import BadParameter, ListenParams, parse_query
from server.engines.ct2 import CTranslate2Whisper

KEY = "deepgram-test-key"
CHUNK_S = 0.1


def _client(live: LiveServer, key: str = KEY) -> DeepgramClient:
    base = live.compat_url
    ws = base.replace("http://", "ws://")
    env = DeepgramClientEnvironment(base=base, production=ws, agent=ws, agent_rest=base)
    return DeepgramClient(api_key=key, environment=env)


def _pcm(utterance: Utterance, rate: int = 16_000, channels: int = 1) -> np.ndarray:
    pcm, source_rate = read_pcm(utterance.path)
    audio = soxr.resample(pcm.astype(np.float32) / 32768.0, source_rate, rate)
    samples = np.clip(audio * 32767, -32768, 32767).astype("<i2")
    return np.repeat(samples, channels) if channels > 1 else samples


def _messages(socket: V1SocketClient) -> tuple[list[dict[str, Any]], threading.Thread]:
    """Every message the socket receives, as dicts, collected on a thread (with the
    monotonic time it arrived, as `_at`)."""
    got: list[dict[str, Any]] = []

    def read() -> None:
        for message in socket:
            if not isinstance(message, bytes):
                got.append({**message.dict(), "_at": time.monotonic()})

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return got, thread


def _send(
    socket: V1SocketClient,
    pcm: np.ndarray,
    rate: int,
    speed: float,
    channels: int = 1,
    until_s: float | None = None,
) -> None:
    step = int(rate * CHUNK_S) * channels
    end = len(pcm) if until_s is None else int(until_s * rate) * channels
    started = time.monotonic()
    for n, offset in enumerate(range(0, end, step)):
        socket.send_media(pcm[offset : min(offset + step, end)].tobytes())
        if speed:
            delay = started + (n + 1) * CHUNK_S / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def _results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "Results"]


def _transcript(m: dict[str, Any]) -> str:
    return str(m["channel"]["alternatives"][0]["transcript"])


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[LiveServer]:
    with serving(
        ScriptedWhisper(), settings_with(compat={"enabled": True}, auth={"api_keys": [KEY]})
    ) as live:
        yield live


@pytest.mark.model
def test_interim_results_then_speech_final_at_each_pause(
    engine: CTranslate2Whisper, three_sentences: Utterance
) -> None:
    pcm = _pcm(three_sentences)
    with (
        serving(engine, settings_with(compat={"enabled": True})) as live,
        _client(live, key="any").listen.v1.connect(
            model="nova-3",
            encoding="linear16",
            sample_rate=16000,
            interim_results="true",
            endpointing=300,
            utterance_end_ms=1000,
            vad_events="true",
            smart_format="true",
        ) as socket,
    ):
        messages, reader = _messages(socket)
        _send(socket, pcm, 16_000, speed=1.5)
        socket.send_close_stream()
        reader.join(60)
    kinds = [m["type"] for m in messages]
    assert kinds[-1] == "Metadata", kinds
    assert abs(messages[-1]["duration"] - three_sentences.duration_s) < 0.2
    results = _results(messages)
    finals = [m for m in results if m["is_final"]]
    assert [m["speech_final"] for m in finals] == [True] * 3, [_transcript(m) for m in finals]
    text = " ".join(_transcript(m) for m in finals)
    assert wer(three_sentences.text, text) <= 0.1, text
    assert text.rstrip().endswith("."), text  # smart_format: punctuated
    previous_end = 0.0
    for final in finals:
        # Interim results of this utterance came before its final, and while it was spoken.
        index = messages.index(final)
        before = [
            m
            for m in results[: results.index(final)]
            if not m["is_final"] and m["start"] >= previous_end - 0.5
        ]
        assert before, f"no interim result before {_transcript(final)!r}"
        assert before[-1]["_at"] < final["_at"]
        for interim in before:  # interim results carry their words and times too
            alternative = interim["channel"]["alternatives"][0]
            spoken = [w["punctuated_word"] for w in alternative["words"]]
            assert spoken == _transcript(interim).split(), interim
            assert 0 < alternative["confidence"] <= 1
            for w in alternative["words"]:
                end = interim["start"] + interim["duration"] + 0.001
                assert interim["start"] <= w["start"] <= w["end"] <= end, interim
        words = final["channel"]["alternatives"][0]["words"]
        assert words and 0 < final["channel"]["alternatives"][0]["confidence"] <= 1
        for w in words:
            assert final["start"] <= w["start"] <= w["end"] <= final["start"] + final["duration"]
            assert 0 < w["confidence"] <= 1 and w["word"] == w["word"].lower()
            assert w["punctuated_word"].strip(".,?!").lower() == w["word"]
        assert index > 0
        previous_end = final["start"] + final["duration"]
    assert kinds.count("SpeechStarted") == 3
    ends = [m for m in messages if m["type"] == "UtteranceEnd"]
    assert len(ends) >= 2  # after the first two sentences (the third ends with the stream)
    assert all(
        m["last_word_end"] <= f["start"] + f["duration"] + 0.01
        for m, f in zip(ends, finals, strict=False)
    )


def test_finalize_gives_the_open_segments_final_now_and_closestream_ends(
    scripted_server: LiveServer, other_speech: Utterance
) -> None:
    pcm = _pcm(other_speech)
    with _client(scripted_server).listen.v1.connect(
        model="nova-3", encoding="linear16", sample_rate=16000, interim_results="true"
    ) as socket:
        messages, reader = _messages(socket)
        _send(socket, pcm, 16_000, speed=0, until_s=3.0)  # mid-speech
        socket.send_keep_alive()
        socket.send_finalize()
        deadline = time.monotonic() + 10
        while not any(m.get("from_finalize") for m in messages) and time.monotonic() < deadline:
            time.sleep(0.05)
        finalized = [m for m in _results(messages) if m.get("from_finalize")]
        assert len(finalized) == 1, messages
        assert finalized[0]["is_final"] and not finalized[0]["speech_final"]
        assert scripted_words(_transcript(finalized[0]))
        step = 1600
        for offset in range(48_000, len(pcm), step):  # the rest of the speech
            socket.send_media(pcm[offset : offset + step].tobytes())
        socket.send_close_stream()
        reader.join(30)
    assert not reader.is_alive(), "the server did not close after CloseStream"
    assert messages[-1]["type"] == "Metadata" and messages[-1]["channels"] == 1
    finals = [m for m in _results(messages) if m["is_final"]]
    assert len(finals) == 2 and not finals[1]["from_finalize"]
    assert all(
        not m["is_final"]
        for m in _results(messages)[: messages.index(finalized[0])]
        if m is not finalized[0]
    )


def test_interim_results_are_off_by_default_and_stereo_48k_is_averaged(
    scripted_server: LiveServer, other_speech: Utterance
) -> None:
    pcm = _pcm(other_speech, rate=48_000, channels=2)
    with _client(scripted_server).listen.v1.connect(
        model="nova-3", encoding="linear16", sample_rate=48000, channels=2
    ) as socket:
        messages, reader = _messages(socket)
        # Frames that end mid-sample are taken: the server keeps the odd bytes.
        raw = pcm.tobytes()
        for offset in range(0, len(raw), 3001):
            socket.send_media(raw[offset : offset + 3001])
        socket.send_close_stream()
        reader.join(30)
    results = _results(messages)
    assert results and all(m["is_final"] for m in results)
    assert scripted_words(" ".join(_transcript(m) for m in results))
    assert messages[-1]["type"] == "Metadata" and messages[-1]["channels"] == 2


def test_a_wrong_key_is_refused_with_401(scripted_server: LiveServer) -> None:
    # The SDK raises its ApiError, or with websockets 14+ the handshake's InvalidStatus.
    with (
        pytest.raises((ApiError, websockets.InvalidStatus)) as caught,
        _client(scripted_server, key="wrong").listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=16000
        ),
    ):
        pass
    error = caught.value
    if isinstance(error, ApiError):
        status = error.status_code
    else:
        assert isinstance(error, websockets.InvalidStatus)
        status = error.response.status_code
    assert status == 401
    url = f"{scripted_server.compat_url.replace('http', 'ws')}/v1/listen"
    status, body = _refusal(url, {"Authorization": "Token wrong"})
    assert status == 401 and body["err_code"] == "INVALID_AUTH", body
    assert "Authorization: Token KEY" in body["err_msg"]
    assert _refusal(url, {"Authorization": f"Bearer {KEY}"})[0] == 101


def _refusal(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async def connect() -> tuple[int, dict[str, Any]]:
        try:
            async with websockets.connect(url, additional_headers=headers or {}):
                return 101, {}
        except websockets.InvalidStatus as exc:
            return exc.response.status_code, json.loads(exc.response.body or b"{}")

    return asyncio.run(connect())


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("encoding=opus", "not supported"),
        ("diarize=true", "'diarize' is not supported"),
        ("sample_rate=96000", "sample_rate must be"),
        ("interim_results=maybe", "interim_results must be true or false"),
        ("language=de", "English only"),
    ],
)
def test_unsupported_parameters_are_refused_with_400_saying_which(
    scripted_server: LiveServer, query: str, words: str
) -> None:
    url = f"{scripted_server.compat_url.replace('http', 'ws')}/v1/listen?{query}"
    status, body = _refusal(url, {"Authorization": f"Token {KEY}"})
    assert status == 400 and body["err_code"] == "INVALID_QUERY_PARAMETER", body
    assert words in body["err_msg"], body


def test_bad_text_messages_get_an_error_and_the_session_goes_on(
    scripted_server: LiveServer, other_speech: Utterance
) -> None:
    async def run() -> list[dict[str, Any]]:
        url = f"{scripted_server.compat_url.replace('http', 'ws')}/v1/listen?sample_rate=16000"
        got = []
        # The browser's way to present the key: the subprotocols token, KEY.
        async with websockets.connect(url, subprotocols=["token", KEY]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "token"
            await ws.send("{not json")
            await ws.send(json.dumps({"type": "Dance"}))
            await ws.send(_pcm(other_speech).tobytes())
            await ws.send(json.dumps({"type": "CloseStream"}))
            async for raw in ws:
                got.append(json.loads(raw))
        return got

    messages = asyncio.run(run())
    errors = [m for m in messages if m["type"] == "Error"]
    assert [e["variant"] for e in errors] == ["bad_request", "bad_request"]
    assert "KeepAlive" in errors[1]["description"]
    assert scripted_words(" ".join(_transcript(m) for m in _results(messages)))
    assert messages[-1]["type"] == "Metadata"


def test_parameters_as_deepgram_documents_them() -> None:
    assert parse_query({}) == ListenParams()
    params = parse_query(
        {
            "endpointing": "false",
            "punctuate": "false",
            "smart_format": "true",
            "language": "en-US",
            "utterance_end_ms": "1000",
            "tag": "x",
        }
    )
    assert params.endpointing_ms is None and params.punctuate and params.language == "en"
    assert params.utterance_end_ms == 1000
    check: Callable[[dict[str, str]], object] = parse_query
    for bad in ({"endpointing": "soon"}, {"channels": "0"}, {"encoding": "mulaw"}):
        with pytest.raises(BadParameter):
            check(bad)


def test_shutdown_finishes_a_live_session_with_its_finals_and_metadata(
    other_speech: Utterance,
) -> None:
    async def run(live: LiveServer) -> tuple[list[dict[str, Any]], int | None]:
        url = f"{live.compat_url.replace('http', 'ws')}/v1/listen?sample_rate=16000"
        got = []
        async with websockets.connect(url) as ws:
            await ws.send(_pcm(other_speech)[: 16_000 * 3].tobytes())  # mid-speech
            await asyncio.sleep(0.3)
            live.stop()  # as on SIGTERM
            async for raw in ws:
                got.append(json.loads(raw))
        return got, ws.close_code

    with serving(ScriptedWhisper(), settings_with(compat={"enabled": True})) as live:
        messages, code = asyncio.run(run(live))
    assert code == 1000
    assert messages[-1]["type"] == "Metadata"
    finals = [m for m in _results(messages) if m["is_final"]]
    assert finals and scripted_words(_transcript(finals[-1]))
