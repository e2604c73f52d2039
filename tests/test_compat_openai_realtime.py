"""OpenAI's Realtime API, transcription sessions (`/v1/realtime?intent=transcription`),
through the `openai` SDK's realtime client pointed at the test server: deltas arrive
before the speaker stops, only append, and join to the completed text; both session
shapes; bad input gets an `error` event and the session goes on."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
import soxr
import websockets
from fakes import ScriptedWhisper, scripted_words
from harness import LiveServer, serving, settings_with
from openai.resources.realtime.realtime import RealtimeConnection
from speech import Utterance, read_pcm, wer

from server.compat.openai_realtime import BadEvent, RealtimeSettings, apply_update
from server.engines.ct2 import CTranslate2Whisper

KEY = "realtime-test-key"
CHUNK_S = 0.1
GA_SESSION = {
    "type": "transcription",
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
            "turn_detection": {
                "type": "server_vad",
                "threshold": 0.5,
                "prefix_padding_ms": 300,
                "silence_duration_ms": 500,
            },
        }
    },
}


def _connect(live: LiveServer, key: str = KEY) -> Any:
    client = openai.OpenAI(base_url=f"{live.compat_url}/v1", api_key=key, max_retries=0)
    return client.realtime.connect(extra_query={"intent": "transcription"})


def _pcm24(utterance: Utterance) -> np.ndarray:
    pcm, rate = read_pcm(utterance.path)
    audio = soxr.resample(pcm.astype(np.float32) / 32768.0, rate, 24_000)
    samples: np.ndarray = np.clip(audio * 32767, -32768, 32767).astype("<i2")
    return samples


def _events(
    connection: RealtimeConnection, until: Any
) -> tuple[list[dict[str, Any]], threading.Thread]:
    """Every event as a dict with its arrival time (`_at`), read on a thread until
    `until(events)` holds or the connection closes."""
    got: list[dict[str, Any]] = []

    def read() -> None:
        for event in connection:
            got.append({**event.model_dump(), "_at": time.monotonic()})
            if until(got):
                return

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return got, thread


def _append(connection: RealtimeConnection, pcm: np.ndarray, speed: float) -> None:
    step = int(24_000 * CHUNK_S)
    started = time.monotonic()
    for n, offset in enumerate(range(0, len(pcm), step)):
        chunk = base64.b64encode(pcm[offset : offset + step].tobytes()).decode()
        connection.input_audio_buffer.append(audio=chunk)
        if speed:
            delay = started + (n + 1) * CHUNK_S / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def _completed(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"
    ]


def _of(
    events: list[dict[str, Any]], kind: str, item_id: str | None = None
) -> list[dict[str, Any]]:
    return [
        e for e in events if e["type"] == kind and (item_id is None or e.get("item_id") == item_id)
    ]


@pytest.fixture(scope="module")
def model_server(engine: CTranslate2Whisper) -> Iterator[LiveServer]:
    with serving(engine, settings_with(compat={"enabled": True})) as live:
        yield live


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[LiveServer]:
    with serving(
        ScriptedWhisper(), settings_with(compat={"enabled": True}, auth={"api_keys": [KEY]})
    ) as live:
        yield live


@pytest.mark.model
def test_server_vad_items_deltas_before_the_speaker_stops_join_to_the_completed_text(
    model_server: LiveServer, three_sentences: Utterance
) -> None:
    with _connect(model_server) as connection:
        connection.session.update(session=GA_SESSION)
        events, reader = _events(connection, lambda got: len(_completed(got)) == 3)
        _append(connection, _pcm24(three_sentences), speed=1.5)
        reader.join(30)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["session.created", "session.updated"], kinds
    assert events[1]["session"]["audio"]["input"]["transcription"]["language"] == "en"
    completed = _completed(events)
    assert len(completed) == 3, kinds
    text = " ".join(e["transcript"] for e in completed)
    assert wer(three_sentences.text, text) <= 0.1, text
    early = 0
    for done in completed:
        item = done["item_id"]
        sequence = [e["type"].rsplit(".", 1)[-1] for e in events if e.get("item_id") == item]
        assert sequence[0] == "speech_started" and sequence[-1] == "completed", sequence
        assert sequence.index("speech_stopped") < sequence.index("committed"), sequence
        deltas = _of(events, "conversation.item.input_audio_transcription.delta", item)
        assert "".join(d["delta"] for d in deltas) == done["transcript"]  # only appends
        stopped = _of(events, "input_audio_buffer.speech_stopped", item)[0]
        early += deltas[0]["_at"] < stopped["_at"]
        started = _of(events, "input_audio_buffer.speech_started", item)[0]
        assert started["audio_start_ms"] < stopped["audio_end_ms"]
    assert early == 3, "promised words came only after the speaker stopped"
    committed = _of(events, "input_audio_buffer.committed")
    assert [c["previous_item_id"] for c in committed] == [
        None,
        completed[0]["item_id"],
        completed[1]["item_id"],
    ]


@pytest.mark.model
def test_beta_shape_without_turn_detection_ends_the_item_at_commit(
    model_server: LiveServer, other_speech: Utterance
) -> None:
    with _connect(model_server) as connection:
        connection.send(
            {
                "type": "transcription_session.update",
                "session": {
                    "input_audio_format": "pcm16",
                    "turn_detection": None,
                    "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                    "include": ["item.input_audio_transcription.logprobs"],
                },
            }
        )
        events, reader = _events(connection, lambda got: bool(_completed(got)))
        _append(connection, _pcm24(other_speech), speed=2.0)
        connection.input_audio_buffer.commit()
        reader.join(30)
    kinds = [e["type"] for e in events]
    assert kinds[1] == "transcription_session.updated", kinds
    assert events[1]["session"]["turn_detection"] is None
    assert "input_audio_buffer.speech_started" not in kinds
    assert kinds.index("input_audio_buffer.committed") < kinds.index(
        "conversation.item.input_audio_transcription.completed"
    )
    done = _completed(events)[0]
    assert wer(other_speech.text, done["transcript"]) <= 0.1, done["transcript"]
    deltas = _of(events, "conversation.item.input_audio_transcription.delta")
    assert "".join(d["delta"] for d in deltas) == done["transcript"]
    assert done["logprobs"] and all(p["logprob"] <= 0 for p in done["logprobs"])
    assert done["usage"]["type"] == "duration" and done["usage"]["seconds"] > 3


def _raw(
    live: LiveServer, sends: list[dict[str, Any] | str], wait_for: str | None = None, count: int = 1
) -> list[dict[str, Any]]:
    """Events after sending these, over a plain WebSocket, until `count` events of type
    `wait_for` (or a quiet half second)."""

    async def run() -> list[dict[str, Any]]:
        url = f"{live.compat_url.replace('http', 'ws')}/v1/realtime?intent=transcription"
        got: list[dict[str, Any]] = []
        async with websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {KEY}"}
        ) as ws:
            for item in sends:
                await ws.send(item if isinstance(item, str) else json.dumps(item))
            while True:
                try:
                    raw = await asyncio.wait_for(ws.recv(), 3 if wait_for else 0.5)
                except TimeoutError:
                    return got
                got.append(json.loads(raw))
                if wait_for and sum(e["type"] == wait_for for e in got) >= count:
                    return got

    return asyncio.run(run())


def _append_events(utterance: Utterance) -> list[dict[str, Any] | str]:
    pcm = _pcm24(utterance)
    step = int(24_000 * CHUNK_S)
    return [
        {
            "type": "input_audio_buffer.append",
            "audio": base64.b64encode(pcm[o : o + step].tobytes()).decode(),
        }
        for o in range(0, len(pcm), step)
    ]


def test_bad_events_get_an_error_event_and_the_session_goes_on(
    scripted_server: LiveServer, other_speech: Utterance
) -> None:
    bad: list[dict[str, Any] | str] = [
        {"type": "input_audio_buffer.append", "audio": "not base64!", "event_id": "e1"},
        "{not json",
        {"type": "response.create"},
        {"type": "dance"},
        {"type": "session.update", "session": {"type": "realtime"}},
        {
            "type": "session.update",
            "session": {
                "type": "transcription",
                "audio": {"input": {"format": {"type": "audio/pcmu"}}},
            },
        },
        {"type": "input_audio_buffer.commit", "event_id": "e7"},
    ]
    events = _raw(
        scripted_server,
        [*bad, *_append_events(other_speech)],
        wait_for="conversation.item.input_audio_transcription.completed",
    )
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert [e["code"] for e in errors] == [
        "invalid_value",
        "invalid_json",
        "unsupported_event",
        "invalid_value",
        "invalid_value",
        "unsupported_value",
        "input_audio_buffer_commit_empty",
    ], errors
    assert errors[0]["param"] == "audio" and errors[0]["event_id"] == "e1"
    assert "not valid base64" in errors[0]["message"]
    assert "transcription sessions only" in errors[4]["message"]
    assert errors[6]["event_id"] == "e7"
    assert all(e["type"] == "invalid_request_error" for e in errors)
    done = _completed(events)
    assert done and scripted_words(done[0]["transcript"]), events


def test_settings_change_only_before_audio_and_clear_drops_the_item(
    scripted_server: LiveServer, other_speech: Utterance
) -> None:
    audio = _append_events(other_speech)
    events = _raw(
        scripted_server,
        [
            {
                "type": "session.update",
                "session": {**GA_SESSION, "audio": {"input": {"turn_detection": None}}},
            },
            *audio[:25],  # 2.5 s of speech, then cleared
            {"type": "input_audio_buffer.clear"},
            {
                "type": "session.update",
                "session": {
                    "type": "transcription",
                    "audio": {"input": {"transcription": {"language": "de"}}},
                },
            },
            *audio[25:],
            {"type": "input_audio_buffer.commit"},
        ],
        wait_for="conversation.item.input_audio_transcription.completed",
    )
    kinds = [e["type"] for e in events]
    assert "input_audio_buffer.cleared" in kinds
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert len(errors) == 1 and "English only" in errors[0]["message"], errors
    done = _completed(events)
    assert len(done) == 1
    cleared_item = {e["item_id"] for e in events if e.get("item_id")} - {done[0]["item_id"]}
    assert len(cleared_item) <= 1  # its deltas, if any, went out before the clear
    committed = _of(events, "input_audio_buffer.committed")
    assert [c["item_id"] for c in committed] == [done[0]["item_id"]]
    deltas = _of(events, "conversation.item.input_audio_transcription.delta", done[0]["item_id"])
    assert "".join(d["delta"] for d in deltas) == done[0]["transcript"]


def test_a_wrong_key_and_other_intents_are_refused(scripted_server: LiveServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as caught, _connect(scripted_server, "wrong"):
        pass
    assert caught.value.response.status_code == 401
    assert b"invalid_api_key" in caught.value.response.body

    async def conversation() -> int:
        url = f"{scripted_server.compat_url.replace('http', 'ws')}/v1/realtime?model=gpt-realtime"
        try:
            async with websockets.connect(
                url, additional_headers={"Authorization": f"Bearer {KEY}"}
            ):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(conversation()) == 101  # no intent: taken as transcription

    async def browser() -> str | None:
        url = f"{scripted_server.compat_url.replace('http', 'ws')}/v1/realtime?intent=transcription"
        protocols = ["realtime", f"openai-insecure-api-key.{KEY}"]
        async with websockets.connect(url, subprotocols=protocols) as ws:  # type: ignore[arg-type]
            await ws.recv()
            return ws.subprotocol

    assert asyncio.run(browser()) == "realtime"


def test_both_session_shapes_read_into_the_same_settings() -> None:
    ga = apply_update(RealtimeSettings(), {"type": "session.update", "session": GA_SESSION})
    beta = apply_update(
        RealtimeSettings(),
        {
            "type": "transcription_session.update",
            "session": {
                "input_audio_format": "pcm16",
                "input_audio_transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.5,
                    "prefix_padding_ms": 300,
                    "silence_duration_ms": 500,
                },
            },
        },
    )
    assert (
        ga
        == beta
        == RealtimeSettings(
            model="gpt-4o-transcribe", language="en", prefix_padding_ms=300, silence_duration_ms=500
        )
    )
    with pytest.raises(BadEvent, match="silence_duration_ms"):
        apply_update(
            RealtimeSettings(),
            {
                "type": "transcription_session.update",
                "session": {"turn_detection": {"silence_duration_ms": "long"}},
            },
        )


def test_the_bench_streams_a_file_through_the_realtime_api(
    scripted_server: LiveServer, three_sentences: Utterance
) -> None:
    from server.bench.manifest import Item
    from server.bench.realtime import stream_one_realtime

    item = Item("three", three_sentences.path, three_sentences.text)
    sent: list[float] = []
    record = asyncio.run(
        stream_one_realtime(
            item, f"{scripted_server.compat_url.replace('http', 'ws')}/v1", 4.0, KEY, sent.append
        )
    )
    assert record.error is None and record.close_code == 1000, record.error
    assert abs(sum(sent) - three_sentences.duration_s) < 0.05
    kinds = [m["type"] for _, m in record.messages]
    assert kinds[-1] == "done" and "error" not in kinds, kinds
    # The commit after the last audio ends an item of the trailing silence: empty.
    finals = [m for _, m in record.messages if m["type"] == "final" and m["text"]]
    assert [m["segment"] for m in finals] == [0, 1, 2]
    assert all(scripted_words(m["text"]) for m in finals)
    for final in finals:  # partials are the promised text: a final only extends them
        partials = [
            m
            for _, m in record.messages
            if m["type"] == "partial" and m["segment"] == final["segment"]
        ]
        assert partials and all(final["text"].startswith(p["text"]) for p in partials)
    times = [t for t, _ in record.messages]
    assert times == sorted(times) and times[-1] < three_sentences.duration_s / 4 + 5
