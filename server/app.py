"""The WebSocket endpoint and HTTP routes.

Per connection, three tasks around one sans-I/O `Session`: the receive loop feeds it,
the job loop runs its inference steps through the shared `InferenceScheduler`, and the
send loop drains one bounded queue, so messages leave in the order the session made them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import logging
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from server.config import Settings
from server.metrics import Metrics
from server.mqtt import mqtt_services
from server.scheduler import InferenceScheduler
from streaming.audio import AudioFormat, AudioFormatError
from streaming.engine import Engine
from streaming.protocol import (
    Error,
    Final,
    ProtocolError,
    Ready,
    ServerMessage,
    Start,
    Started,
    Stop,
    StreamParams,
    parse_client_text,
    parse_params,
)
from streaming.session import Session, SessionConfig
from streaming.vad import WebRtcClassifier

log = logging.getLogger(__name__)

STREAM_PATH = "/v1/stream"
WEB_ROOT = Path(__file__).resolve().parent.parent / "client" / "web"
CLOSE_BAD_REQUEST = 4400  # the session cannot start or go on with what the client sent
CLOSE_LIMIT = 4408  # a configured limit ended the session
CLOSE_TOO_SLOW = 4429  # the client did not read its messages
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL = 1011
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript",
                  ".mjs": "text/javascript", ".css": "text/css", ".png": "image/png",
                  ".svg": "image/svg+xml", ".ico": "image/x-icon"}


class SessionSink(Protocol):
    """Somewhere else a session's messages go (MQTT); called on the event loop."""

    def publish(self, session_id: str, labels: Mapping[str, str],
                message: ServerMessage) -> None: ...


class RedactSecrets(logging.Filter):
    """Keeps API keys out of logs: websockets logs request lines and headers at DEBUG."""

    _SECRET = re.compile(r"(token=|authorization:\s*bearer\s+)[^\s&'\"]+", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self._SECRET.sub(r"\1[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


_REDACT = RedactSecrets()
logging.getLogger("websockets.server").addFilter(_REDACT)


def _client_address(connection: ServerConnection) -> str:
    remote = connection.remote_address
    return str(remote[0]) if remote else "?"


def _ok(body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-cache")])
    return Response(http.HTTPStatus.OK.value, "OK", headers, body)


class TranscriptionServer:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = Metrics()
        self.scheduler = InferenceScheduler(
            engine, settings.model.max_batch_size, on_batch=self.metrics.observe_batch,
            workers=settings.model.worker_count,
            release_memory_every_s=settings.model.release_memory_s,
        )
        self.sinks: list[SessionSink] = []
        self._connections: dict[str, _Connection] = {}
        self._keys = [k.get_secret_value().encode() for k in settings.auth.api_keys]
        self._draining = False
        self._ready = False

    @property
    def active_sessions(self) -> int:
        # A session whose last message is out no longer counts, though its close
        # handshake may still run: a client that reconnects at once is not refused.
        return sum(1 for c in self._connections.values() if not c.finished)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Server]:
        """Serve until the context exits, then shut down gracefully."""
        cfg = self.settings.server
        # websockets refuses frames over max_size with close 1009 and no word of why; let
        # frames up to 4x the limit in, so that the limit is answered with an `error`.
        # MQTT (sinks, Hermes) starts first and stops last: sessions finish into it.
        async with mqtt_services(self), serve(
            self._handle,
            cfg.host,
            cfg.port,
            process_request=self._process_request,
            max_size=4 * self.settings.limits.max_frame_bytes,
            max_queue=64,
            open_timeout=self.settings.limits.handshake_timeout_s,
            ssl=self._tls_context(),
        ) as server:
            self.scheduler.start()
            self._ready = True
            try:
                yield server
            finally:
                await self.shutdown(server)
        await self.scheduler.close()

    def _tls_context(self) -> ssl.SSLContext | None:
        cfg = self.settings.server
        if cfg.tls_cert is None or cfg.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        return context

    async def shutdown(self, server: Server) -> None:
        """Stop accepting, finish every live session (finals, done), then close."""
        self._draining = True
        self._ready = False
        server.close(close_connections=False)
        live = list(self._connections.values())
        if live:
            log.info("shutdown: finishing %d live sessions", len(live))
        for connection in live:
            connection.finish()
        timeout = self.settings.limits.shutdown_timeout_s
        try:
            await asyncio.wait_for(server.wait_closed(), timeout)
        except TimeoutError:
            log.warning("shutdown: sessions still open after %.0f s; closing them", timeout)
            server.close(close_connections=True)
            await server.wait_closed()

    # HTTP ------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if not self._keys:
            return True
        presented = ""
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            presented = header[7:].strip()
        else:
            presented = parse_qs(urlsplit(request.path).query).get("token", [""])[0]
        candidate = presented.encode()
        # Compare against every key in constant time, so timing tells nothing.
        return any([hmac.compare_digest(candidate, key) for key in self._keys])

    def _origin_allowed(self, request: Request) -> bool:
        """Browsers send Origin; other clients do not. The server's own page is allowed."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        allowed = self.settings.auth.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        return urlsplit(origin).netloc == request.headers.get("Host", "")

    def _sessions_from(self, address: str) -> int:
        return sum(1 for c in self._connections.values()
                   if c.client_address == address and not c.finished)

    def _refuse(self, connection: ServerConnection, status: http.HTTPStatus, reason: str,
                text: str) -> Response:
        self.metrics.refused_sessions.labels(reason).inc()
        return connection.respond(status, text)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            if self._draining:
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if not self._ready:
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")
            return connection.respond(http.HTTPStatus.OK, "ready\n")
        if path == "/metrics":
            return _ok(self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        if path == STREAM_PATH:
            if not self._authorized(request):
                return self._refuse(connection, http.HTTPStatus.UNAUTHORIZED, "auth",
                                    "missing or wrong API key\n")
            if not self._origin_allowed(request):
                return self._refuse(connection, http.HTTPStatus.FORBIDDEN, "origin",
                                    "this page's origin may not connect (auth.allowed_origins)\n")
            if self._draining:
                return self._refuse(connection, http.HTTPStatus.SERVICE_UNAVAILABLE,
                                    "shutdown", "server shutting down; try again later\n")
            address = _client_address(connection)
            if self._sessions_from(address) >= self.settings.limits.max_sessions_per_client:
                return self._refuse(
                    connection, http.HTTPStatus.TOO_MANY_REQUESTS, "per_client",
                    f"too many sessions from {address} "
                    "(limits.max_sessions_per_client); close one first\n",
                )
            if self.active_sessions >= self.settings.limits.max_sessions:
                return self._refuse(
                    connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "max_sessions",
                    f"server busy: {self.active_sessions} sessions, the configured maximum "
                    f"(limits.max_sessions); try again later\n",
                )
            return None
        return self._static(connection, path)

    def _static(self, connection: ServerConnection, path: str) -> Response:
        name = "index.html" if path == "/" else path.lstrip("/")
        file = (WEB_ROOT / name).resolve()
        if WEB_ROOT.resolve() not in file.parents or not file.is_file():
            return connection.respond(http.HTTPStatus.NOT_FOUND, f"no such page: {path}\n")
        return _ok(file.read_bytes(),
                   _CONTENT_TYPES.get(file.suffix, "application/octet-stream"))

    # WebSocket -------------------------------------------------------------------

    def session_config(self, params: StreamParams) -> SessionConfig:
        s = self.settings.streaming
        try:
            audio = AudioFormat(
                params.sample_rate if params.sample_rate is not None else s.sample_rate,
                params.encoding if params.encoding is not None else s.encoding,  # type: ignore[arg-type]
            )
        except AudioFormatError as exc:
            raise ProtocolError("bad_request", str(exc), fatal=True) from None
        language = params.language or s.language
        supports = getattr(self.engine, "supports_language", None)
        if supports is not None and not supports(language):
            raise ProtocolError(
                "bad_request",
                f"language {language!r} is not supported by model {self.engine.name}; "
                "this model transcribes English only (language=en)",
                fatal=True,
            )
        return SessionConfig(
            audio=audio,
            language=language,
            interim=s.interim if params.interim is None else params.interim,
            vad=self.settings.vad.options(),
            policy=s.policy(),
        )

    async def _handle(self, ws: ServerConnection) -> None:
        session_id = uuid.uuid4().hex[:12]
        assert ws.request is not None
        query = {k: v[-1] for k, v in parse_qs(urlsplit(ws.request.path).query).items()}
        query.pop("token", None)
        try:
            params = parse_params(query)
            config = self.session_config(params)
        except ProtocolError as exc:
            self.metrics.errors.labels(exc.code).inc()
            await ws.send(Error(exc.code, exc.message).to_json())
            await ws.close(CLOSE_BAD_REQUEST, exc.code)
            return
        session = Session(session_id, config, WebRtcClassifier(config.vad.aggressiveness))
        connection = _Connection(self, ws, session, dict(params.labels))
        self._connections[session_id] = connection
        self.metrics.sessions.inc()
        self.metrics.active_sessions.inc()
        log.info("session %s: opened from %s (%s)", session_id, ws.remote_address, config.audio)
        try:
            await connection.run()
        finally:
            self._connections.pop(session_id, None)
            self.metrics.active_sessions.dec()
            log.info("session %s: closed after %.1f s of audio", session_id,
                     session.received_seconds)


class _Connection:
    """One WebSocket session: the glue between the socket, the core and the scheduler."""

    def __init__(self, server: TranscriptionServer, ws: ServerConnection, session: Session,
                 labels: dict[str, str]) -> None:
        self.server = server
        self.ws = ws
        self.session = session
        self.labels = labels
        self.limits = server.settings.limits
        self.outbound: asyncio.Queue[ServerMessage | None] = asyncio.Queue(
            self.limits.max_outbound_messages
        )
        self.wake = asyncio.Event()
        self.ended = asyncio.Event()
        self.connected = True
        self.finishing_for_server = False
        self.overloaded = False
        self.close_code: int | None = None
        self.finished = False  # the session's last message is sent (or it was ended)
        self.client_address = _client_address(ws)
        self.bad_messages = 0

    # Lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        config = self.session.config
        self.outbound.put_nowait(Ready(
            self.session.id, config.audio.sample_rate_hz, config.audio.encoding,
            self.server.engine.name, config.language, config.interim,
        ))
        tasks = [
            asyncio.create_task(self._send_loop()),
            asyncio.create_task(self._job_loop()),
            asyncio.create_task(self._receive_loop()),
        ]
        try:
            await self.ended.wait()
            if self.close_code is None and self.connected:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.limits.shutdown_timeout_s):
                        await asyncio.shield(tasks[0])
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception) and not isinstance(
                    result, ConnectionClosed | asyncio.CancelledError
                ):
                    log.error("session %s: failed", self.session.id, exc_info=result)
            if self.close_code is not None:
                with contextlib.suppress(ConnectionClosed):
                    await self.ws.close(self.close_code, "session ended")

    def finish(self) -> None:
        """Server shutdown: transcribe what was received, send the finals and `done`."""
        self.finishing_for_server = True
        if not self.session.stopping:
            self.session.receive_message(Stop())
            self._emit()
        self.wake.set()

    def _fail(self, code: int) -> None:
        self.finished = True
        self.close_code = code
        self.ended.set()

    # Messages --------------------------------------------------------------------

    def _emit(self, extra: ServerMessage | None = None) -> None:
        messages = self.session.take_messages()
        if extra is not None:
            messages.insert(0, extra)
        metrics = self.server.metrics
        for message in messages:
            if isinstance(message, Error):
                metrics.errors.labels(message.code).inc()
            elif isinstance(message, Final):
                metrics.finals.inc()
            for sink in self.server.sinks:
                try:
                    sink.publish(self.session.id, self.labels, message)
                except Exception:
                    log.exception("session %s: publishing failed", self.session.id)
            if self.connected:
                try:
                    self.outbound.put_nowait(message)
                except asyncio.QueueFull:
                    self._slow_client()
        if self.session.done:
            if self.connected:
                with contextlib.suppress(asyncio.QueueFull):
                    self.outbound.put_nowait(None)  # close after the last message
            else:
                self.ended.set()

    def _error(self, code: str, message: str) -> None:
        self._emit(Error(code, message))
        if code in ("bad_request", "bad_audio", "limit"):
            self.bad_messages += 1

    async def _send_loop(self) -> None:
        try:
            while True:
                message = await self.outbound.get()
                if message is None:
                    self.finished = True
                    await self.ws.close(1000, "done")
                    self.ended.set()
                    return
                await self.ws.send(message.to_json())
        except ConnectionClosed:
            # Audio the client sent before closing may still wait to be read: the receive
            # loop reads it, then sees the close itself and stops the session.
            self._disconnected(read_all=False)

    def _disconnected(self, read_all: bool = True) -> None:
        """The client went away: finish its session for the sinks, or drop it."""
        first, self.connected = self.connected, False
        if self.session.done or not self.server.sinks:
            self.ended.set()  # nobody is left to tell: it costs nothing more
            return
        if first:
            log.info("session %s: client left; finishing its finals for publishing",
                     self.session.id)
        if read_all and not self.session.stopping:
            self.session.receive_message(Stop())
            self._emit()
        self.wake.set()

    # Inference -------------------------------------------------------------------

    async def _job_loop(self) -> None:
        metrics = self.server.metrics
        while not self.session.done:
            job = self.session.next_job()
            if job is None:
                await self.wake.wait()
                self.wake.clear()
                continue
            queued = time.monotonic()
            try:
                hypothesis = await self.server.scheduler.transcribe(job.request)
            except Exception:
                log.exception("session %s: engine failed on segment %d",
                              self.session.id, job.segment)
                self.session.abandon_job(job)
                self._error("internal", "transcription failed on the server; the session "
                            "was closed, please reconnect")
                await asyncio.sleep(0.5)  # let the error reach the client
                self._fail(CLOSE_INTERNAL)
                return
            kind = "final" if job.final else "partial"
            metrics.steps.labels(kind).inc()
            metrics.step_latency.labels(kind).observe(time.monotonic() - queued)
            self.session.complete_job(job, hypothesis)
            self._check_lag(job.start_sample + len(job.request.audio))
            self._emit()

    def _check_lag(self, decoded_until_sample: int) -> None:
        lag_s = self.session.received_seconds - decoded_until_sample / 16_000
        self.server.metrics.lag.observe(max(lag_s, 0.0))
        if lag_s > self.limits.max_lag_s and not self.overloaded:
            self.overloaded = True
            self._error("overloaded", f"the server is {lag_s:.1f} s behind this stream; "
                        "partials are skipped until it catches up, finals still follow")
        elif lag_s < self.limits.max_lag_s / 2:
            self.overloaded = False

    def _slow_client(self) -> None:
        """The outbound queue is full: close, wherever the message came from (a loop,
        shutdown's finish, a disconnect), and queue nothing more for this client."""
        log.warning("session %s: client does not read; closing", self.session.id)
        self.connected = False
        self._fail(CLOSE_TOO_SLOW)

    # Input -----------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        try:
            await self._receive_until_stop()
            # After stop: the job loop finishes; more from the client is refused.
            async for _ in self.ws:
                if not self.finishing_for_server:
                    self._error("bad_request", "nothing may follow 'stop'; ignored")
        except ConnectionClosed:
            self._disconnected()

    async def _receive_until_stop(self) -> None:
        session, limits = self.session, self.limits
        first = True
        while not session.stopping:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancel that
                # lands as a frame arrives, and the session then never ends.
                async with asyncio.timeout(limits.idle_timeout_s):
                    data = await self.ws.recv()
            except TimeoutError:
                self._error("limit", f"no audio or message for {limits.idle_timeout_s:g} s "
                            "(limits.idle_timeout_s); the session was closed")
                await asyncio.sleep(0.2)
                self._fail(CLOSE_LIMIT)
                return
            try:
                if isinstance(data, bytes):
                    if len(data) > limits.max_frame_bytes:
                        raise ProtocolError(
                            "limit", f"frame of {len(data)} bytes is larger than "
                            f"limits.max_frame_bytes ({limits.max_frame_bytes}); dropped, send "
                            "smaller frames")
                    received = session.received_seconds
                    session.receive_audio(data)
                    self.server.metrics.audio_seconds.inc(session.received_seconds - received)
                else:
                    if len(data.encode()) > limits.max_text_bytes:
                        raise ProtocolError(
                            "limit", f"text message larger than limits.max_text_bytes "
                            f"({limits.max_text_bytes} bytes); ignored")
                    self._receive_text(data, first)
            except AudioFormatError as exc:
                self._error("bad_audio", str(exc))
            except ProtocolError as exc:
                self._error(exc.code, exc.message)
                if exc.fatal:
                    await asyncio.sleep(0.2)
                    self._fail(CLOSE_BAD_REQUEST)
                    return
            first = False
            if self.bad_messages >= limits.max_bad_messages:
                self._error("bad_request", f"{self.bad_messages} bad messages "
                            "(limits.max_bad_messages); the session was closed")
                await asyncio.sleep(0.2)
                self._fail(CLOSE_BAD_REQUEST)
                return
            if session.received_seconds > limits.max_session_s and not session.stopping:
                self._error("limit", f"the session reached its maximum length of "
                            f"{limits.max_session_s:g} s of audio (limits.max_session_s); "
                            "finishing it")
                session.receive_message(Stop())
            self._emit()
            self.wake.set()

    def _receive_text(self, data: str, first: bool) -> None:
        message = parse_client_text(data)
        if not isinstance(message, Start):
            self.session.receive_message(message)
            return
        if not first:
            raise ProtocolError(
                "bad_request",
                "'start' is only allowed as the first message, before any audio; ignored",
            )
        config = self.server.session_config(message.params)
        self.session.reconfigure(config)
        self.labels.update(message.params.labels)
        self._emit(Started(config.audio.sample_rate_hz, config.audio.encoding,
                           config.language, config.interim))

