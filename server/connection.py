"""The WebSocket connection as served: websockets' `ServerConnection` with the guards it
lacks against a client that does not read (issue 18).

Read in websockets 17 (asyncio/connection.py, protocol.py) before writing this:

1. **Pongs have no flow control.** A ping is answered in `data_received`: the protocol
   queues the pong and `send_data()` writes it to the transport at once, with no
   `drain()`; only the application's own `send()` waits for the write buffer. A client
   that sends pings and never reads makes the server buffer every pong (issue 18: RSS
   291 -> 1,141 MB in 70 s). `write_limit` only sets when `send()` waits, so no setting
   bounds this. Here, a connection whose unsent output passes `MAX_UNSENT_BYTES` after
   what it sent was handled is dropped.
2. **Keepalive waits behind a full buffer.** `keepalive()` sends its ping through
   `send_context()`, which awaits `drain()` before `ping_timeout` starts counting: while
   the client does not read, the ping never leaves and never times out. Here, a
   connection whose output stays above the write limit (writing paused) for the
   keepalive time (`ping_timeout`) is dropped, as the keepalive would have dropped it.
   Both drop the TCP connection without a close frame: one would wait behind the output
   the client does not take. A keepalive ping that goes out and is not answered is
   websockets' own: close 1011 "keepalive ping timeout".
"""

from __future__ import annotations

import asyncio
import logging

from websockets.asyncio.server import ServerConnection

log = logging.getLogger(__name__)

# What a connection may have sent and not yet had taken by the client. The server's own
# messages wait at the write limit (32 KiB) and are small (a final is a few kB), so only
# output the library writes by itself, pongs, gets anywhere near this.
MAX_UNSENT_BYTES = 1 << 20


class GuardedConnection(ServerConnection):
    """`serve(create_connection=GuardedConnection)`; see the module's docstring."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._stalled: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        unsent = self.transport.get_write_buffer_size()
        if unsent > MAX_UNSENT_BYTES:
            self._drop(f"{unsent} bytes of output unsent")

    # A client that does not take its output ---------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.ping_timeout is not None:
            self._stalled = self.loop.call_later(
                self.ping_timeout, self._drop,
                f"output not taken for {self.ping_timeout:g} s (limits.keepalive_s)")

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_stall()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_stall()
        super().connection_lost(exc)

    def _cancel_stall(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _drop(self, why: str) -> None:
        if self.transport.is_closing():
            return
        log.warning("connection from %s dropped: %s; the client does not read",
                    self.remote_address[0] if self.remote_address else "?", why)
        self.transport.abort()
