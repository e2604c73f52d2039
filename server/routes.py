"""HTTP on the WebSocket port: health, readiness, metrics, the browser page, and the
checks a `/v1/stream` upgrade passes before it becomes a session (key, origin, limits).

`/healthz` is liveness only: 200 whenever the event loop answers, while the model loads
and while the server drains too (a liveness probe that failed then would have the
orchestrator kill a replica that is finishing its sessions). `/readyz` is what a load
balancer or a readiness probe asks: 503 with the reason before the model is loaded,
while the server drains (from SIGTERM on) and while it is at `limits.max_sessions`, 200
otherwise. Every refusal of a session that a later try may get past (503, 429) carries
`Retry-After`.

Every request is checked first: one that is malformed (control characters, a path over
`MAX_PATH_CHARS`, two Host, Origin or Authorization headers) gets 400, a method other
than GET or HEAD 405, and with no API keys a Host header that names neither a loopback
address nor one of `server.allowed_hosts` 421 (DNS rebinding). HEAD gets GET's answer
without its body.
"""

from __future__ import annotations

import dataclasses
import http
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from server.admission import Gate, presented_key, session_refusal
from server.forwarding import host_name
from server.host import SessionHost
from server.websocket import STREAM_PATH, client_address

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent.parent / "client" / "web"
PROBE_PATHS = ("/healthz", "/readyz", "/metrics")
MAX_PATH_CHARS = 2048
SINGLE_HEADERS = ("Host", "Origin", "Authorization")  # one each, or the request is refused
# Seconds a refused client should wait: through a balancer the next try may land on
# another replica at once, and one that is full frees a slot when a session ends.
RETRY_AFTER_S = 1
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}


class RedactSecrets(logging.Filter):
    """Keeps API keys out of logs: websockets logs request lines and headers at DEBUG.

    - A query parameter whose name decodes to `token` (`?tok%65n=KEY` is `token` to
      parse_qs, and so to the key check) has its value redacted.
    - `Authorization: ...` in a message is redacted, whatever the scheme.
    - websockets' request header lines ("< %s: %s") keep their value only for headers
      known to carry no secret; any other (X-Api-Key, Cookie, Proxy-Authorization, ...)
      is logged as its name and [redacted].
    """

    _PARAMETER = re.compile(r"(?<=[?&])([^=&\s'\"#]+)=([^&\s'\"#]*)")
    _AUTHORIZATION = re.compile(r"(authorization:\s*)\S[^'\"]*", re.IGNORECASE)
    SAFE_HEADERS = frozenset(
        {
            "host",
            "upgrade",
            "connection",
            "origin",
            "user-agent",
            "accept",
            "accept-encoding",
            "accept-language",
            "cache-control",
            "pragma",
            "content-length",
            "content-type",
            "sec-websocket-key",
            "sec-websocket-version",
            "sec-websocket-extensions",
            "sec-websocket-protocol",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-forwarded-port",
            "x-real-ip",
            "forwarded",
            "via",
            "dnt",
            "referer",
        }
    )

    @classmethod
    def _parameter(cls, match: re.Match[str]) -> str:
        if unquote_plus(match.group(1)).strip().lower() == "token":
            return f"{match.group(1)}=[redacted]"
        return match.group(0)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (
            record.msg == "< %s: %s"
            and isinstance(args, tuple)
            and len(args) == 2
            and str(args[0]).lower() not in self.SAFE_HEADERS
        ):
            record.args = (args[0], "[redacted]")
        message = record.getMessage()
        redacted = self._PARAMETER.sub(self._parameter, message)
        redacted = self._AUTHORIZATION.sub(r"\1[redacted]", redacted)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


_REDACT = RedactSecrets()
logging.getLogger("websockets.server").addFilter(_REDACT)


class _ProbeLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets logs every plain HTTP answer at INFO, twice; a load balancer or
    Kubernetes probing every few seconds would fill the log, so probes go to DEBUG."""

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


_PROBE_LOGGER = _ProbeLogger(logging.getLogger("websockets.server"))


def _ok(body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-cache"),
        ]
    )
    return Response(http.HTTPStatus.OK.value, "OK", headers, body)


def _malformed(request: Request) -> str | None:
    """Why a request cannot be answered (400), or None."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in request.path):
        return "control characters in the path"
    if len(request.path) > MAX_PATH_CHARS:
        return f"the path is longer than {MAX_PATH_CHARS} characters"
    for name in SINGLE_HEADERS:
        if len(request.headers.get_all(name)) > 1:
            return f"more than one {name} header"
    try:
        urlsplit(request.path)
    except ValueError:
        return "malformed path"
    return None


class HttpRoutes:
    """`process_request` for websockets' server: answers plain HTTP, admits upgrades."""

    def __init__(self, host: SessionHost) -> None:
        self.host = host
        self.settings = host.settings
        self.gate = Gate(host.settings)
        # Why the server does not serve yet ("starting", "loading the model"); None once
        # it does. Set by the server (app.py), as are the two below.
        self.starting: str | None = "starting"
        self.draining = False  # from SIGTERM on: /readyz answers 503

    def not_ready(self) -> str | None:
        """Why a balancer should send this replica no new session now, or None."""
        if self.starting is not None:
            return self.starting
        if self.draining:
            return "draining: shutting down, finishing its live sessions"
        active, limit = self.host.active_sessions, self.settings.limits.max_sessions
        if active >= limit:
            return f"full: {active} of {limit} sessions (limits.max_sessions)"
        return None

    def _authorized(self, request: Request) -> bool:
        if not self.gate.keys_required:
            return True
        presented = presented_key(request.headers.get("Authorization", ""))
        if not presented:
            presented = parse_qs(urlsplit(request.path).query).get("token", [""])[0]
        return self.gate.key_ok(presented)

    def _host_allowed(self, request: Request) -> bool:
        return self.gate.host_ok(request.headers.get("Host", ""))

    def _origin_allowed(self, request: Request) -> bool:
        return self.gate.origin_ok(request.headers.get("Origin"), request.headers.get("Host", ""))

    def _refuse(
        self, connection: ServerConnection, status: http.HTTPStatus, reason: str, text: str
    ) -> Response:
        self.host.metrics.refused_sessions.labels(reason).inc()
        response = connection.respond(status, text)
        if status in (http.HTTPStatus.SERVICE_UNAVAILABLE, http.HTTPStatus.TOO_MANY_REQUESTS):
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    def __call__(self, connection: ServerConnection, request: Request) -> Response | None:
        response = self._route(connection, request)
        if response is not None and request.method == "HEAD":
            response = dataclasses.replace(response, body=b"")
        return response

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        malformed = _malformed(request)
        if malformed is not None:
            return connection.respond(http.HTTPStatus.BAD_REQUEST, f"bad request: {malformed}\n")
        path = urlsplit(request.path).path
        if path in PROBE_PATHS:
            connection.logger = connection.protocol.logger = _PROBE_LOGGER
        allowed = "GET" if path == STREAM_PATH else "GET, HEAD"
        if request.method not in allowed.split(", "):
            response = connection.respond(
                http.HTTPStatus.METHOD_NOT_ALLOWED,
                f"method {request.method} not allowed here; use {allowed}\n",
            )
            response.headers["Allow"] = allowed
            return response
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            return self._readiness(connection)
        if not self._host_allowed(request):
            name = host_name(request.headers.get("Host", ""))
            text = (
                f"this server does not answer to the host name {name} (server.allowed_hosts)\n"
                if name
                else "missing or malformed Host header\n"
            )
            if path == STREAM_PATH:
                return self._refuse(connection, http.HTTPStatus.MISDIRECTED_REQUEST, "host", text)
            return connection.respond(http.HTTPStatus.MISDIRECTED_REQUEST, text)
        if path == "/metrics":
            if not self.settings.server.metrics_public and not self._authorized(request):
                response = connection.respond(
                    http.HTTPStatus.UNAUTHORIZED,
                    "missing or wrong API key (Authorization: "
                    "Bearer KEY; server.metrics_public: true makes /metrics public)\n",
                )
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
            return _ok(self.host.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        if path == STREAM_PATH:
            return self._admit(connection, request)
        return self._static(connection, path)

    def _readiness(self, connection: ServerConnection) -> Response:
        reason = self.not_ready()
        if reason is not None:
            response = connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {reason}\n"
            )
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response
        limits = self.settings.limits
        return connection.respond(
            http.HTTPStatus.OK,
            f"ready: {self.host.active_sessions} of {limits.max_sessions} sessions\n",
        )

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """None lets the upgrade go on; a response refuses it and says why."""
        if not self._authorized(request):
            return self._refuse(
                connection, http.HTTPStatus.UNAUTHORIZED, "auth", "missing or wrong API key\n"
            )
        if not self._origin_allowed(request):
            return self._refuse(
                connection,
                http.HTTPStatus.FORBIDDEN,
                "origin",
                "this page's origin may not connect (auth.allowed_origins)\n",
            )
        if self.starting is not None:
            return self._refuse(
                connection,
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "starting",
                f"server not ready yet ({self.starting}); try again shortly\n",
            )
        address = client_address(connection, self.settings.server.trusted_proxies)
        refusal = session_refusal(self.host, address)
        if refusal is not None:
            return self._refuse(connection, refusal.status, refusal.reason, refusal.text + "\n")
        return None

    def _static(self, connection: ServerConnection, path: str) -> Response:
        name = "index.html" if path == "/" else path.lstrip("/")
        try:  # a name too long for the file system is no page either
            file = (WEB_ROOT / name).resolve()
            if WEB_ROOT.resolve() in file.parents and file.is_file():
                return _ok(
                    file.read_bytes(), _CONTENT_TYPES.get(file.suffix, "application/octet-stream")
                )
        except (OSError, ValueError):
            pass
        # The path is not echoed: the answer says nothing a client did not know.
        return connection.respond(http.HTTPStatus.NOT_FOUND, "no such page\n")
