"""What every front door checks before it serves anyone: the API key, the Host name
(DNS rebinding), a browser's Origin, and the session limits. One rule each, so the
native port (server/routes.py) and the compatible APIs (server/compat/) refuse alike.
"""

from __future__ import annotations

import hmac
import http
from dataclasses import dataclass
from urllib.parse import urlsplit

from server.config import Settings
from server.forwarding import host_name, is_loopback_name
from server.host import SessionHost


def presented_key(authorization: str, schemes: tuple[str, ...] = ("bearer",)) -> str:
    """The key in an `Authorization: SCHEME KEY` header, for any of `schemes` (lower
    case: `bearer`, Deepgram's `token`); "" when there is none."""
    scheme, _, key = authorization.strip().partition(" ")
    return key.strip() if scheme.lower() in schemes else ""


class Gate:
    def __init__(self, settings: Settings) -> None:
        self._keys = [k.get_secret_value().encode() for k in settings.auth.api_keys]
        self._allowed_hosts = frozenset(settings.server.allowed_hosts)
        self._allowed_origins = frozenset(settings.auth.allowed_origins)

    @property
    def keys_required(self) -> bool:
        return bool(self._keys)

    def key_ok(self, presented: str) -> bool:
        """With no keys configured, anyone; else a key compared against every configured
        one in constant time, so timing tells nothing."""
        if not self._keys:
            return True
        candidate = presented.encode()
        return any([hmac.compare_digest(candidate, key) for key in self._keys])

    def host_ok(self, host_header: str) -> bool:
        """With API keys, any Host; without, only names of this machine's loopback
        addresses and `server.allowed_hosts`: a web page whose own name was rebound to
        127.0.0.1 names itself in Host, and so does not get in."""
        if self._keys:
            return True
        name = host_name(host_header)
        return name is not None and (is_loopback_name(name) or name in self._allowed_hosts)

    def origin_ok(self, origin: str | None, host_header: str) -> bool:
        """Browsers send Origin; other clients do not. Besides `auth.allowed_origins`, the
        server's own pages are allowed: the origin of the Host asked for, if that host is
        allowed."""
        if origin is None:
            return True
        if "*" in self._allowed_origins or origin in self._allowed_origins:
            return True
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:
            return False
        return bool(netloc) and netloc.lower() == host_header.lower() and self.host_ok(host_header)


@dataclass(frozen=True)
class Refusal:
    status: http.HTTPStatus
    reason: str  # the label of whisperstream_refused_sessions_total
    text: str


def session_refusal(host: SessionHost, address: str) -> Refusal | None:
    """Why a new live session from `address` cannot start now, or None."""
    limits = host.settings.limits
    if not host.accepting:
        return Refusal(
            http.HTTPStatus.SERVICE_UNAVAILABLE, "shutdown", "server shutting down; try again later"
        )
    if host.sessions_from(address) >= limits.max_sessions_per_client:
        return Refusal(
            http.HTTPStatus.TOO_MANY_REQUESTS,
            "per_client",
            f"too many sessions from {address} (limits.max_sessions_per_client); close one first",
        )
    active = host.active_sessions
    if active >= limits.max_sessions:
        return Refusal(
            http.HTTPStatus.SERVICE_UNAVAILABLE,
            "max_sessions",
            f"server busy: {active} sessions, the configured maximum "
            "(limits.max_sessions); try again later",
        )
    return None
