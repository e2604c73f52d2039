"""The compatible APIs' listener (`compat.host`, `compat.port`): one aiohttp application,
so that HTTP uploads, Server-Sent Events and WebSockets share one base URL:

- `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/audio/transcriptions`: OpenAI's
  files API (server/compat/openai_files.py);
- `GET /v1/realtime?intent=transcription`: OpenAI's Realtime transcription sessions
  (server/compat/openai_realtime.py);
- `GET /v1/listen`: Deepgram's live streaming API (server/compat/deepgram.py).

Why a listener of its own: the native port is websockets' server, whose HTTP parser
takes only GET, so a POST upload cannot reach it. Every request passes the same checks
as on the native port (server/admission.py): without API keys only loopback Host names
and `server.allowed_hosts` (DNS rebinding), a browser's Origin only when allowed (no
page elsewhere may post audio to a local server), then the API's own key check.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from server.admission import Gate
from server.compat import deepgram, openai_files, openai_realtime
from server.compat.common import CompatState, openai_error
from server.host import SessionHost

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _AccessLog(AbstractAccessLogger):
    """One line a request: method, path (never the query, which may hold a key), status."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %.3f s',
            request.remote,
            request.method,
            request.path,
            response.status,
            time,
        )


class CompatServer:
    def __init__(self, host: SessionHost) -> None:
        self.host = host
        self.settings = host.settings
        self.state = CompatState(host, Gate(host.settings))
        self.app = web.Application(middlewares=[self._guard])
        bind = partial
        self.app.add_routes(
            [
                web.get("/v1/models", bind(openai_files.models, self.state)),
                web.get("/v1/models/{model}", bind(openai_files.model, self.state)),
                web.post("/v1/audio/transcriptions", bind(openai_files.transcriptions, self.state)),
                web.get("/v1/listen", bind(deepgram.listen, self.state)),
                web.get("/v1/realtime", bind(openai_realtime.realtime, self.state)),
            ]
        )
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        cfg = self.settings.compat
        self._runner = web.AppRunner(
            self.app,
            access_log_class=_AccessLog,
            handle_signals=False,
            shutdown_timeout=self.settings.limits.shutdown_timeout_s,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.port, ssl_context=ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        scheme = "https" if ssl_context else "http"
        log.info("compat: OpenAI and Deepgram APIs at %s://%s:%d/v1", scheme, cfg.host, self.port)

    async def close(self) -> None:
        """Stop listening, wait (up to limits.shutdown_timeout_s) for what is running."""
        self.state.host.accepting = False  # new uploads and sessions are refused meanwhile
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        gate = self.state.gate
        host = request.headers.get("Host", "")
        if not gate.host_ok(host):
            self.host.metrics.refused_sessions.labels("host").inc()
            return openai_error(
                421,
                "this server does not answer to that host name (server.allowed_hosts)",
                code="misdirected_request",
            )
        if not gate.origin_ok(request.headers.get("Origin"), host):
            self.host.metrics.refused_sessions.labels("origin").inc()
            return openai_error(
                403,
                "this page's origin may not use this server (auth.allowed_origins)",
                code="origin_not_allowed",
            )
        try:
            return await handler(request)
        except web.HTTPException as exc:  # the router's 404 and 405, in OpenAI's shape
            if exc.status < 400:
                raise
            headers: dict[str, Any] = {}
            if "Allow" in exc.headers:
                headers["Allow"] = exc.headers["Allow"]
            # The path is not echoed: the answer says nothing a client did not know.
            return openai_error(
                exc.status,
                "no such endpoint" if exc.status == 404 else f"{exc.reason}",
                code="not_found" if exc.status == 404 else None,
                headers=headers or None,
            )
