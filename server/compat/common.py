"""What the compatible APIs share: their state on the server, the client's address and
key as aiohttp shows them, OpenAI's error shape, and a WebSocket outlet."""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, web
from websockets.datastructures import Headers

from server.admission import Gate, Refusal, presented_key, session_refusal
from server.forwarding import forwarded_client
from server.host import SessionHost
from server.outlet import QueuedOutlet

log = logging.getLogger(__name__)


@dataclass
class CompatState:
    """The compatible APIs' share of the server: its host, the admission checks, and
    what changes while it runs."""

    host: SessionHost
    gate: Gate
    uploads: int = 0  # files being received, decoded or transcribed now
    uploads_by_client: Counter[str] = field(default_factory=Counter)  # the same, per address
    created: int = field(default_factory=lambda: int(time.time()))  # for /v1/models

    def model_id(self) -> str:
        """The served model's name as an OpenAI model id (no spaces, no slashes)."""
        slug = re.sub(r"[^a-z0-9._-]+", "-", self.host.engine_name.lower())
        return slug.strip("-.") or "whisper"


def client_address(request: web.BaseRequest, state: CompatState) -> str:
    """The client's address: the peer's, or behind a trusted proxy the one it forwarded."""
    peer = request.remote or "?"
    trusted = state.host.settings.server.trusted_proxies
    if not trusted:
        return peer
    return forwarded_client(peer, Headers(list(request.headers.items())), trusted)


def admission_refusal(state: CompatState, request: web.BaseRequest) -> tuple[Refusal | None, str]:
    """Why a new live session cannot start now (counted), or None; and the client's address."""
    address = client_address(request, state)
    refusal = session_refusal(state.host, address)
    if refusal is not None:
        state.host.metrics.refused_sessions.labels(refusal.reason).inc()
    return refusal, address


def request_key(request: web.BaseRequest, schemes: tuple[str, ...] = ("bearer",)) -> str:
    return presented_key(request.headers.get("Authorization", ""), schemes)


def openai_error(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error as OpenAI's API answers one: `{"error": {message, type, param, code}}`."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class ApiError(Exception):
    """A request the API refuses; `response()` is the answer in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> web.Response:
        return openai_error(
            self.status,
            self.message,
            type=self.type,
            param=self.param,
            code=self.code,
            headers=self.headers,
        )

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class WebSocketQueue(QueuedOutlet[dict[str, Any]]):
    """The outbound half of an aiohttp WebSocket: JSON events in one bounded queue, then
    the close, in order (server/outlet.py)."""

    gone = (ConnectionError, RuntimeError)  # the connection is gone or closing

    def __init__(self, ws: web.WebSocketResponse, max_messages: int) -> None:
        super().__init__(max_messages)
        self.ws = ws

    async def _write(self, item: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(item, ensure_ascii=False))

    async def _write_close(self, code: int, reason: str) -> None:
        await self.ws.close(code=ws_close_code(code), message=reason.encode()[:120])


def ws_close_code(code: int) -> int:
    """The driver's close codes as sent; codes WebSockets reserves become 1011."""
    if code in (1005, 1006, 1015) or not 1000 <= code < 5000:
        return int(WSCloseCode.INTERNAL_ERROR)
    return code
