"""The WebSocket front door, `/v1/stream` (docs/protocol.md): its I/O and nothing more.

Per connection: a receive loop that turns frames into the driver's audio and control
messages, and a send loop that drains one bounded queue (the session's `Outlet`), so
messages leave in the order the session made them and the close comes after them. The
session driver (server/driver.py) runs both, with the inference steps and the limits.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from server.config import LimitsSection
from server.driver import CLOSE_BAD_REQUEST, SessionDriver
from server.forwarding import IPNetwork, forwarded_client
from server.host import SessionHost
from server.outlet import QueuedOutlet
from streaming.audio import AudioFormatError
from streaming.protocol import (
    Error,
    ProtocolError,
    Ready,
    ServerMessage,
    Start,
    Started,
    StreamParams,
    parse_client_text,
    parse_params,
)

log = logging.getLogger(__name__)

STREAM_PATH = "/v1/stream"


def client_address(connection: ServerConnection, trusted_proxies: Sequence[IPNetwork] = ()) -> str:
    """The client's address, for the per-client limit and the logs: the peer's, or, from
    a trusted proxy (`server.trusted_proxies`), the one it forwarded."""
    remote = connection.remote_address
    peer = str(remote[0]) if remote else "?"
    if not trusted_proxies or connection.request is None:
        return peer
    return forwarded_client(peer, connection.request.headers, trusted_proxies)


class WebSocketOutlet(QueuedOutlet[ServerMessage]):
    """The session's messages as JSON text frames, then the close, in order."""

    # Audio the client sent before closing may still wait to be read: the receive loop
    # reads it, then sees the close itself and tells the driver.
    gone = (ConnectionClosed,)

    def __init__(self, ws: ServerConnection, max_messages: int) -> None:
        super().__init__(max_messages)
        self.ws = ws

    def deliver(self, message: ServerMessage) -> None:
        self.put(message)

    async def _write(self, item: ServerMessage) -> None:
        await self.ws.send(item.to_json())

    async def _write_close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)


class WebSocketSession:
    """One connection's receive loop around its driver."""

    def __init__(
        self, ws: ServerConnection, driver: SessionDriver, limits: LimitsSection, host: SessionHost
    ) -> None:
        self.ws = ws
        self.driver = driver
        self.limits = limits
        self.host = host
        self.bad_messages = 0

    def _error(self, code: str, message: str) -> None:
        self.driver.send_error(code, message)
        if code in ("bad_request", "bad_audio", "limit"):
            self.bad_messages += 1

    async def receive_loop(self) -> None:
        try:
            await self._receive_until_stop()
            if not self.driver.live:
                return  # ended by a limit or a fault: its error and close are queued
            # After stop: the driver finishes; more from the client is refused.
            async for _ in self.ws:
                if not self.driver.stopped_by_server and self.driver.live:
                    self._error("bad_request", "nothing may follow 'stop'; ignored")
        except ConnectionClosed:
            pass
        self.driver.client_gone()

    async def _receive_until_stop(self) -> None:
        driver, limits = self.driver, self.limits
        first = True
        while driver.live and not driver.session.stopping:
            await driver.wait_for_room()
            if not driver.live:
                return
            data = await self.ws.recv()
            try:
                if isinstance(data, bytes):
                    if len(data) > limits.max_frame_bytes:
                        raise ProtocolError(
                            "limit",
                            f"frame of {len(data)} bytes is larger than "
                            f"limits.max_frame_bytes ({limits.max_frame_bytes}); dropped, send "
                            "smaller frames",
                        )
                    driver.receive_audio(data)
                else:
                    if len(data.encode()) > limits.max_text_bytes:
                        raise ProtocolError(
                            "limit",
                            f"text message larger than limits.max_text_bytes "
                            f"({limits.max_text_bytes} bytes); ignored",
                        )
                    self._receive_text(data, first)
            except AudioFormatError as exc:
                self._error("bad_audio", str(exc))
            except ProtocolError as exc:
                if exc.fatal:
                    driver.fail(CLOSE_BAD_REQUEST, exc.code, exc.message)
                    return
                self._error(exc.code, exc.message)
            first = False
            if self.bad_messages >= limits.max_bad_messages:
                driver.fail(
                    CLOSE_BAD_REQUEST,
                    "bad_request",
                    f"{self.bad_messages} bad "
                    "messages (limits.max_bad_messages); the session was closed",
                )
                return

    def _receive_text(self, data: str, first: bool) -> None:
        message = parse_client_text(data)
        if not isinstance(message, Start):
            self.driver.receive_message(message)
            return
        if not first:
            raise ProtocolError(
                "bad_request",
                "'start' is only allowed as the first message, before any audio; ignored",
            )
        config = self.host.session_config(message.params)
        self.driver.session.reconfigure(config)
        self.driver.labels.update(message.params.labels)
        self.driver.send(
            Started(
                config.audio.sample_rate_hz,
                config.audio.encoding,
                config.language,
                config.interim,
                *_resumed(message.params),
            )
        )


def _resumed(params: StreamParams) -> tuple[float | None, int | None]:
    """What `ready` or `started` confirms of a resumed stream: both, or neither."""
    if params.offset_s is None and params.first_segment is None:
        return None, None
    return params.offset_s or 0.0, params.first_segment or 0


async def handle_stream(host: SessionHost, ws: ServerConnection) -> None:
    """Serve one `/v1/stream` connection, from `ready` to the close."""
    session_id = uuid.uuid4().hex[:12]
    assert ws.request is not None
    query = {k: v[-1] for k, v in parse_qs(urlsplit(ws.request.path).query).items()}
    query.pop("token", None)
    try:
        params = parse_params(query)
        config = host.session_config(params)
    except ProtocolError as exc:
        host.metrics.errors.labels(exc.code).inc()
        await ws.send(Error(exc.code, exc.message).to_json())
        await ws.close(CLOSE_BAD_REQUEST, exc.code)
        return
    limits = host.settings.limits
    outlet = WebSocketOutlet(ws, limits.max_outbound_messages)
    address = client_address(ws, host.settings.server.trusted_proxies)
    driver = host.open_session(
        session_id, config, outlet, labels=params.labels, client_address=address
    )
    resumed = _resumed(params)
    if resumed != (None, None):
        log.info(
            "session %s: opened from %s (%s), resuming a stream at %.3f s, segment %d",
            session_id,
            address,
            config.audio,
            config.offset_s,
            config.first_segment,
        )
    else:
        log.info("session %s: opened from %s (%s)", session_id, address, config.audio)
    driver.send(
        Ready(
            session_id,
            config.audio.sample_rate_hz,
            config.audio.encoding,
            host.engine_name,
            config.language,
            config.interim,
            offset_s=resumed[0],
            first_segment=resumed[1],
        )
    )
    connection = WebSocketSession(ws, driver, limits, host)
    await host.serve(driver, outlet.send_loop(), connection.receive_loop())
    if driver.close_code is not None:
        # The close did not go out through the queue (a client that does not read).
        with contextlib.suppress(ConnectionClosed):
            await ws.close(driver.close_code, "session ended")
