"""Transcripts on the MQTT bus, against a real Mosquitto broker the tests start themselves."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import websockets
from broker import Broker, Received, Subscriber, retained, running_broker
from fakes import free_port
from harness import check_invariants, serving
from prometheus_client import CollectorRegistry
from speech import Utterance, read_pcm, synthesize, wer

from client.stream import Transcript, run_session, stream_url
from server.config import LimitsSection, MqttSection, Settings
from server.mqtt import MqttLink, Outgoing, SessionPublisher
from streaming.protocol import Final, Partial

pytestmark = pytest.mark.model
PREFIX = "whisperstream"
FRAME_S = 0.1
SIX_SENTENCES = [
    "The library opens at nine in the morning on weekdays.",
    "Our train was delayed by twenty minutes because of the snow.",
    "She painted the kitchen a bright shade of yellow last summer.",
    "Please remember to water the plants while I am away.",
    "The meeting will continue after a short coffee break.",
    "He bought three apples and a loaf of bread at the market.",
]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path) as b:
        yield b


@pytest.fixture(scope="session")
def six_sentences() -> Utterance:
    return synthesize(SIX_SENTENCES)


def _settings(port: int, limits: dict[str, Any] | None = None, **mqtt: Any) -> Settings:
    return Settings(
        mqtt=MqttSection(enabled=True, port=port, reconnect_max_s=0.5, **mqtt),
        limits=LimitsSection(**(limits or {})),
    )


async def _chunks(
    path: Path, speed: float, start: dict[str, Any] | None = None
) -> AsyncIterator[bytes | str]:
    """An optional `start` message, then the WAV's PCM in 100 ms frames at `speed`."""
    pcm, rate = read_pcm(path)
    if start is not None:
        yield json.dumps({"type": "start", "sample_rate": rate, **start})
    step = int(rate * FRAME_S)
    began = time.monotonic()
    for i, offset in enumerate(range(0, len(pcm), step)):
        if speed > 0:
            await asyncio.sleep(max(0.0, began + i * FRAME_S / speed - time.monotonic()))
        yield pcm[offset : offset + step].tobytes()


def _bus_finals(sub: Subscriber, session: str) -> list[dict[str, Any]]:
    return [m.json() for m in sub.on(f"/sessions/{session}/final")]


def _in_order_once(finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """QoS 1 is at least once: drop repeats of a segment already seen (a resend)."""
    seen: dict[int, dict[str, Any]] = {}
    for final in finals:
        if final["segment"] in seen:
            assert final["text"] == seen[final["segment"]]["text"], (final, seen)
            continue
        seen[final["segment"]] = final
    return list(seen.values())


def test_finals_partials_and_vad_events_reach_their_topics_with_the_client_labels(
    engine: object, broker: Broker, three_sentences: Utterance
) -> None:
    settings = _settings(broker.port, publish_partials=True, publish_vad=True)
    labels = {"speaker": "alice", "room": "blue"}

    async def scenario(url: str) -> tuple[Transcript, Subscriber]:
        async with Subscriber(broker.port, [f"{PREFIX}/#"]) as sub:
            await sub.wait_for(
                lambda: any(m.payload == b"online" for m in sub.on("/status")), 10, "status online"
            )
            transcript = await run_session(
                stream_url(f"{url}/v1/stream", source="meeting"),
                _chunks(three_sentences.path, 2.0, {"labels": labels}),  # type: ignore[arg-type]
            )
            session = transcript.messages[0]["session"]
            await sub.wait_for(lambda: bool(sub.on(f"/sessions/{session}/done")), 30, "done")
            return transcript, sub

    with serving(engine, settings) as live:  # type: ignore[arg-type]
        transcript, sub = asyncio.run(scenario(live.url))
    check_invariants(transcript.messages)
    session = transcript.messages[0]["session"]
    ws_finals = transcript.of_type("final")
    bus_finals = _bus_finals(sub, session)
    assert len(ws_finals) == 3
    # Every final, once, in order, exactly as the client got it, with the labels of both
    # the query string and the `start` message.
    assert [f["segment"] for f in bus_finals] == [0, 1, 2]
    for on_bus, on_ws in zip(bus_finals, ws_finals, strict=True):
        assert on_bus["session"] == session
        assert on_bus["type"] == "final"
        for key in ("segment", "text", "start", "end", "words"):
            assert on_bus[key] == on_ws[key], key
        assert on_bus["labels"] == {"source": "meeting", **labels}
        assert abs(on_bus["time"] - time.time()) < 120
    assert wer(three_sentences.text, " ".join(f["text"] for f in bus_finals)) <= 0.10
    done = [m.json() for m in sub.on(f"/sessions/{session}/done")]
    assert len(done) == 1 and done[0]["segments"] == 3
    partials = [m.json() for m in sub.on(f"/sessions/{session}/partial")]
    assert partials and all(
        p["type"] == "partial" and p["labels"]["speaker"] == "alice" for p in partials
    )
    vad = [m.json()["type"] for m in sub.on(f"/sessions/{session}/vad")]
    assert vad.count("speech_start") == vad.count("speech_end") == 3
    # Topics in order of the session: a segment's partials come before its final.
    order = [
        (m.topic.rsplit("/", 1)[1], m.json().get("segment"))
        for m in sub.messages
        if f"/sessions/{session}/" in m.topic
    ]
    for k in range(3):
        assert order.index(("final", k)) > max(
            (i for i, item in enumerate(order) if item == ("partial", k)), default=-1
        )
    # Status: retained, and `offline` once the server has shut down.
    assert asyncio.run(retained(broker.port, f"{PREFIX}/status")) == b"offline"


def test_a_client_that_leaves_without_stop_still_gets_its_finals_published_and_is_freed(
    engine: object, broker: Broker, three_sentences: Utterance
) -> None:
    settings = _settings(broker.port, limits={"max_sessions": 1})
    pcm, rate = read_pcm(three_sentences.path)

    async def scenario(url: str, live: Any) -> tuple[str, Subscriber]:
        async with Subscriber(broker.port, [f"{PREFIX}/sessions/#"]) as sub:
            full = stream_url(f"{url}/v1/stream", sample_rate=rate, speaker="bob")
            async with websockets.connect(full) as ws:
                session = json.loads(await ws.recv())["session"]
                step = int(rate * FRAME_S)
                for offset in range(0, len(pcm), step):
                    await ws.send(pcm[offset : offset + step].tobytes())
            # Gone without `stop`: the session is finished for the bus alone.
            await sub.wait_for(lambda: bool(sub.on(f"/sessions/{session}/done")), 60, "done")
            deadline = time.monotonic() + 10
            while live.app.active_sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert live.app.active_sessions == 0, "the session was not freed"
            # And its place is free again (limits.max_sessions is 1).
            async with websockets.connect(full) as ws:
                assert json.loads(await ws.recv())["type"] == "ready"
            return session, sub

    with serving(engine, settings) as live:  # type: ignore[arg-type]
        session, sub = asyncio.run(scenario(live.url, live))
    finals = _bus_finals(sub, session)
    assert [f["segment"] for f in finals] == list(range(len(finals)))
    assert all(f["labels"] == {"speaker": "bob"} for f in finals)
    text = " ".join(f["text"] for f in finals)
    assert wer(three_sentences.text, text) <= 0.15, text
    done = sub.on(f"/sessions/{session}/done")[0].json()
    assert done["segments"] == len(finals)


def test_a_broker_restart_mid_stream_loses_no_final_and_keeps_their_order(
    engine: object, broker: Broker, six_sentences: Utterance
) -> None:
    settings = _settings(broker.port)
    ws_finals_at: list[float] = []

    def on_message(message: dict[str, Any]) -> None:
        if message["type"] == "final":
            ws_finals_at.append(time.monotonic())

    async def scenario(url: str, live: Any) -> tuple[Transcript, Subscriber, int]:
        # A persistent subscriber: the broker keeps its queue across the restart.
        async with Subscriber(broker.port, [f"{PREFIX}/#"], client_id="restart-test") as sub:
            stream = asyncio.create_task(
                run_session(
                    stream_url(f"{url}/v1/stream", sample_rate=six_sentences.sample_rate),
                    _chunks(six_sentences.path, 1.5),  # type: ignore[arg-type]
                    on_message,
                )
            )
            await sub.wait_for(lambda: len(sub.on("/final")) >= 1, 60, "a first final")
            await asyncio.to_thread(broker.stop)
            stopped_at = time.monotonic()
            # Transcription goes on without the broker; finals wait in the outbox.
            await asyncio.wait_for(
                _until(lambda: sum(t > stopped_at for t in ws_finals_at) >= 2), 60
            )
            queued_in_outage = cast(SessionPublisher, live.app.sinks[0]).link.queued
            await asyncio.to_thread(broker.start)
            transcript = await stream
            session = transcript.messages[0]["session"]
            await sub.wait_for(lambda: bool(sub.on(f"/sessions/{session}/done")), 60, "done")
            return transcript, sub, queued_in_outage

    with serving(engine, settings) as live:  # type: ignore[arg-type]
        transcript, sub, queued_in_outage = asyncio.run(scenario(live.url, live))
        stats = cast(SessionPublisher, live.app.sinks[0]).stats
    assert queued_in_outage >= 2
    assert stats.connections >= 2 and stats.dropped_essential == 0
    check_invariants(transcript.messages)
    session = transcript.messages[0]["session"]
    ws_finals = transcript.of_type("final")
    assert len(ws_finals) == len(SIX_SENTENCES)
    bus_finals = _bus_finals(sub, session)
    segments = [f["segment"] for f in bus_finals]
    assert segments == sorted(segments), f"finals out of order: {segments}"
    once = _in_order_once(bus_finals)
    assert [(f["segment"], f["text"]) for f in once] == [
        (f["segment"], f["text"]) for f in ws_finals
    ]
    assert asyncio.run(retained(broker.port, f"{PREFIX}/status")) == b"offline"


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.05)


def test_with_no_broker_transcription_goes_on_and_finals_wait_in_the_outbox(
    engine: object, other_speech: Utterance, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(free_port())  # nothing listens there
    with (
        caplog.at_level(logging.WARNING, logger="server.mqtt"),
        serving(
            engine,  # type: ignore[arg-type]
            settings,
        ) as live,
    ):
        began = time.monotonic()
        transcript = asyncio.run(
            run_session(
                stream_url(f"{live.url}/v1/stream", sample_rate=other_speech.sample_rate),
                _chunks(other_speech.path, 0),  # type: ignore[arg-type]
            )
        )
        took_s = time.monotonic() - began
        publisher = cast(SessionPublisher, live.app.sinks[0])
        queued = publisher.link.queued
    check_invariants(transcript.messages)
    assert transcript.close_code == 1000 and transcript.of_type("done")
    assert wer(other_speech.text, transcript.text) <= 0.10
    assert took_s < 20
    assert queued == len(transcript.of_type("final")) + 1  # the finals and `done`
    assert "no connection to the broker" in caplog.text
    assert "never delivered" in caplog.text


def test_a_full_outbox_drops_finals_counted_in_a_metric_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> SessionPublisher:
        registry = CollectorRegistry()
        publisher = SessionPublisher(
            MqttSection(enabled=True, port=free_port(), queue_size=2, publish_partials=True),
            registry,
        )
        for k in range(5):
            publisher.publish("s1", {"speaker": "x"}, Final(k, f"text {k}", k, k + 1.0))
        publisher.publish("s1", {}, Partial(5, "live", 5.0, 5.5))  # broker away: dropped
        assert registry.get_sample_value("whisperstream_mqtt_dropped_total", {"kind": "final"}) == 3
        assert (
            registry.get_sample_value("whisperstream_mqtt_dropped_total", {"kind": "interim"}) == 1
        )
        assert registry.get_sample_value("whisperstream_mqtt_queued") == 2
        return publisher

    with caplog.at_level(logging.WARNING, logger="server.mqtt"):
        publisher = asyncio.run(scenario())
    assert publisher.stats.dropped_essential == 3
    assert publisher.stats.dropped_interim == 1
    assert "dropped final of session s1 segment 4" in caplog.text


def test_the_outbox_keeps_order_and_delivers_once_the_broker_is_up(tmp_path: Path) -> None:
    """Messages queued before the broker is up leave in order once it is."""
    from broker import mosquitto_binary

    broker = Broker(mosquitto_binary(), tmp_path)

    async def register() -> None:  # a persistent subscriber the broker will remember
        async with Subscriber(broker.port, ["t/#"], client_id="late"):
            pass

    async def scenario() -> list[Received]:
        link = MqttLink(
            MqttSection(port=broker.port, reconnect_max_s=0.2), name="t", queue_size=100
        )
        async with link.running():
            for k in range(20):
                link.send(
                    Outgoing(f"t/{k % 3}", str(k).encode(), qos=1), essential=True, what=str(k)
                )
            await asyncio.sleep(0.5)  # a few failed attempts
            assert link.queued == 20 and not link.stats.connected
            await asyncio.to_thread(broker.start)
            async with Subscriber(broker.port, ["t/#"], client_id="late") as sub:
                await sub.wait_for(lambda: len(sub.messages) >= 20, 10, "20 messages")
        return sub.messages

    broker.start()
    try:
        asyncio.run(register())
        broker.stop()
        messages = asyncio.run(scenario())
    finally:
        broker.stop()
    assert [int(m.payload) for m in messages] == list(range(20))


def test_the_last_will_says_offline_when_the_server_dies(broker: Broker) -> None:
    script = (
        "import asyncio\n"
        "from server.config import MqttSection\n"
        "from server.mqtt import MqttLink\n"
        "async def main():\n"
        f"    link = MqttLink(MqttSection(port={broker.port}), name='will', queue_size=10,\n"
        "                    status_topic='will-test/status')\n"
        "    async with link.running():\n"
        "        while not link.stats.connected:\n"
        "            await asyncio.sleep(0.05)\n"
        "        print('connected', flush=True)\n"
        "        await asyncio.sleep(120)\n"
        "asyncio.run(main())\n"
    )
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=root, text=True, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "connected"

        async def status_becomes(value: bytes) -> None:
            for _ in range(100):
                if await retained(broker.port, "will-test/status", 0.5) == value:
                    return
            raise AssertionError(f"status never became {value!r}")

        asyncio.run(status_becomes(b"online"))
        process.kill()  # no clean disconnect: the broker publishes the will
        process.wait(10)
        asyncio.run(status_becomes(b"offline"))
    finally:
        process.kill()
        process.wait(10)
