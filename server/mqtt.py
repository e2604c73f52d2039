"""MQTT: every WebSocket session's transcript on a broker, off the path of transcription.

Topics (PREFIX is `mqtt.topic_prefix`, "whisperstream" by default):

- `PREFIX/status`: retained `online` while the server is connected; `offline` on a clean
  shutdown and, as the connection's last will, when it is lost.
- `PREFIX/sessions/SESSION/final`: every final, as JSON, with QoS `mqtt.qos` (1).
- `PREFIX/sessions/SESSION/done`: the session's transcript is complete (same QoS).
- `PREFIX/sessions/SESSION/partial`, `PREFIX/sessions/SESSION/vad`: partials and
  speech_start / speech_end events, QoS 0, when `mqtt.publish_partials` / `publish_vad`.

The server hands messages over without waiting (`SessionPublisher.publish`). They wait in
one bounded, ordered outbox and leave it one at a time over a connection that reconnects
with backoff; a final leaves the outbox only when the broker has acknowledged it, so a
broker outage delays finals (in order) and loses none until the outbox is full. What does
not fit is counted (`whisperstream_mqtt_dropped{kind="final"}`) and logged. Partials and
VAD events are live news: while the broker is away or the outbox is half full they are
dropped, and counted too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt
from prometheus_client import CollectorRegistry, Counter, Gauge

from server.config import MqttSection
from streaming.protocol import Done, Final, Partial, ServerMessage, SpeechEnd, SpeechStart

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # also the longest wait for a broker's acknowledgement
RECONNECT_MIN_S = 0.5  # first wait after a failed connection; doubles up to reconnect_max_s
FLUSH_TIMEOUT_S = 5.0  # at shutdown, time to deliver what is still queued
ONLINE, OFFLINE = b"online", b"offline"


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass
class LinkStats:
    connected: bool = False
    connections: int = 0  # successful connections so far
    published: int = 0  # messages the broker took (acknowledged, for QoS 1 and 2)
    dropped_essential: int = 0  # finals and `done` that found the outbox full
    dropped_interim: int = 0  # partials and VAD events dropped while the broker was away


def to_json(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode()


def tls_context(cfg: MqttSection) -> ssl.SSLContext | None:
    if cfg.tls is False:
        return None
    if cfg.tls is True:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=str(cfg.tls))


class MqttLink:
    """One connection to the broker that comes back by itself: an ordered, bounded outbox,
    optional subscriptions whose messages go to `on_message`, and an optional retained
    status topic (online, offline, last will)."""

    def __init__(
        self,
        cfg: MqttSection,
        *,
        name: str,
        queue_size: int,
        status_topic: str | None = None,
        subscriptions: Sequence[tuple[str, int]] = (),
        on_message: Callable[[aiomqtt.Message], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = name
        self.stats = LinkStats()
        self._queue_size = queue_size
        self._status_topic = status_topic
        self._subscriptions = list(subscriptions)
        self._on_message = on_message
        self._outbox: deque[Outgoing] = deque()
        self._more = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return len(self._outbox)

    def send(self, message: Outgoing, *, essential: bool, what: str) -> bool:
        """Queue a message without waiting; False when it was dropped (and counted)."""
        if essential:
            if len(self._outbox) >= self._queue_size:
                self.stats.dropped_essential += 1
                log.warning(
                    "mqtt %s: %d messages already wait for the broker at %s:%d (the "
                    "queue_size limit): dropped %s; %d dropped so far",
                    self.name,
                    len(self._outbox),
                    self.cfg.host,
                    self.cfg.port,
                    what,
                    self.stats.dropped_essential,
                )
                return False
        elif not self.stats.connected or len(self._outbox) >= self._queue_size // 2:
            self.stats.dropped_interim += 1
            return False
        self._outbox.append(message)
        self._more.set()
        return True

    @contextlib.asynccontextmanager
    async def running(self, flush_timeout_s: float = FLUSH_TIMEOUT_S) -> AsyncIterator[None]:
        """Connect in the background; on exit, deliver what is queued (within the timeout),
        say `offline` and disconnect."""
        self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.name}")
        try:
            yield
        finally:
            self._closing.set()
            self._more.set()
            done, _ = await asyncio.wait({self._task}, timeout=flush_timeout_s)
            if not done:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            if self._outbox:
                log.warning(
                    "mqtt %s: %d messages were never delivered: the broker at %s:%d "
                    "was not reachable before shutdown",
                    self.name,
                    len(self._outbox),
                    self.cfg.host,
                    self.cfg.port,
                )

    def _client(self) -> aiomqtt.Client:
        cfg = self.cfg
        will = None
        if self._status_topic is not None:
            will = aiomqtt.Will(self._status_topic, OFFLINE, qos=1, retain=True)
        return aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password is not None else None,
            identifier=f"{cfg.client_id}-{self.name}" if cfg.client_id else None,
            will=will,
            tls_context=tls_context(cfg),
            timeout=CONNECT_TIMEOUT_S,
        )

    async def _run(self) -> None:
        delay_s = RECONNECT_MIN_S
        failures = 0
        while not self._closing.is_set():
            try:
                async with self._client() as client:
                    self.stats.connected = True
                    self.stats.connections += 1
                    delay_s, failures = RECONNECT_MIN_S, 0
                    log.info("mqtt %s: connected to %s:%d", self.name, self.cfg.host, self.cfg.port)
                    await self._connected(client)
                    return  # closing, and everything was delivered
            except aiomqtt.MqttError as exc:
                failures += 1
                level = logging.WARNING if failures == 1 else logging.INFO
                log.log(
                    level,
                    "mqtt %s: no connection to the broker at %s:%d (%s); %d messages "
                    "wait; retrying in %.1f s",
                    self.name,
                    self.cfg.host,
                    self.cfg.port,
                    exc,
                    len(self._outbox),
                    delay_s,
                )
            finally:
                self.stats.connected = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay_s)
            delay_s = min(delay_s * 2, self.cfg.reconnect_max_s)

    async def _connected(self, client: aiomqtt.Client) -> None:
        for topic, qos in self._subscriptions:
            await client.subscribe(topic, qos)
        if self._status_topic is not None:
            await client.publish(self._status_topic, ONLINE, qos=1, retain=True)
        # The receiver also notices a lost connection: the message iterator raises.
        receiver = asyncio.create_task(self._receive(client))
        sender = asyncio.create_task(self._send(client))
        try:
            done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiver, sender):
                task.cancel()
            await asyncio.gather(receiver, sender, return_exceptions=True)
        for task in done:
            task.result()  # MqttError: reconnect

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if self._on_message is None:
                continue
            try:
                self._on_message(message)
            except Exception:
                log.exception("mqtt %s: handling a message on %s failed", self.name, message.topic)
        raise aiomqtt.MqttError("message iteration ended")

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            if not self._outbox:
                if self._closing.is_set():
                    if self._status_topic is not None:
                        await client.publish(self._status_topic, OFFLINE, qos=1, retain=True)
                    return
                self._more.clear()
                await self._more.wait()
                continue
            message = self._outbox[0]
            await client.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=message.retain,
                timeout=CONNECT_TIMEOUT_S,
            )
            # Only now, acknowledged, does it leave the outbox: a lost connection resends
            # it (at least once; session and segment identify a final).
            self._outbox.popleft()
            self.stats.published += 1


class SessionPublisher:
    """The MQTT sink of the WebSocket sessions (see the module docstring for topics)."""

    def __init__(self, cfg: MqttSection, registry: CollectorRegistry | None = None) -> None:
        self.cfg = cfg
        self.prefix = cfg.topic_prefix
        self.link = MqttLink(
            cfg, name="publisher", queue_size=cfg.queue_size, status_topic=f"{self.prefix}/status"
        )
        self._dropped: Counter | None = None
        if registry is not None:
            self._dropped = Counter(
                "whisperstream_mqtt_dropped",
                "Messages not published to MQTT: finals that "
                "found the queue full, partials and VAD events while the broker was away",
                ["kind"],
                registry=registry,
            )
            Gauge(
                "whisperstream_mqtt_queued",
                "Messages waiting for the MQTT broker",
                registry=registry,
            ).set_function(lambda: self.link.queued)
            Gauge(
                "whisperstream_mqtt_connected",
                "1 while connected to the MQTT broker",
                registry=registry,
            ).set_function(lambda: float(self.link.stats.connected))

    @property
    def stats(self) -> LinkStats:
        return self.link.stats

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.link.running()

    def publish(self, session_id: str, labels: Mapping[str, str], message: ServerMessage) -> None:
        """Called on the event loop for every message a session makes; never waits."""
        if isinstance(message, Final | Done):
            essential = True
            kind, qos = ("final" if isinstance(message, Final) else "done"), self.cfg.qos
        elif isinstance(message, Partial) and self.cfg.publish_partials:
            essential, kind, qos = False, "partial", 0
        elif isinstance(message, SpeechStart | SpeechEnd) and self.cfg.publish_vad:
            essential, kind, qos = False, "vad", 0
        else:
            return
        payload = {
            "session": session_id,
            **message.to_dict(),
            "labels": dict(labels),
            "time": round(time.time(), 3),
        }
        topic = f"{self.prefix}/sessions/{session_id}/{kind}"
        what = f"{kind} of session {session_id}"
        if isinstance(message, Final):
            what += f" segment {message.segment}"
        sent = self.link.send(
            Outgoing(topic, to_json(payload), qos), essential=essential, what=what
        )
        if not sent and self._dropped is not None:
            self._dropped.labels("final" if essential else "interim").inc()


__all__ = ["LinkStats", "MqttLink", "Outgoing", "SessionPublisher"]
