"""The WebSocket connection as served: websockets' `ServerConnection` with the guards it
lacks against a client that does not read, and against pipelined HTTP (issue 18).

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
3. **Pipelined HTTP.** The server protocol parses whatever follows the request head as
   WebSocket frames, before the request is answered: a second request there fails the
   connection and half-closes it, the answer to the first is never sent, and sending it
   trips an assertion in websockets that logs a traceback at ERROR. Here, bytes after the
   request head are held back until the handshake is answered: after a 101 they are
   handed on (a client that sent its first frame early), after any other answer they are
   dropped with the connection, so the first request gets its answer and a clean close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from websockets.asyncio.server import ServerConnection
from websockets.http11 import SERVER, Request, Response
from websockets.protocol import CONNECTING, OPEN

log = logging.getLogger(__name__)

# What a connection may have sent and not yet had taken by the client. The server's own
# messages wait at the write limit (32 KiB) and are small (a final is a few kB), so only
# output the library writes by itself, pongs, gets anywhere near this.
MAX_UNSENT_BYTES = 1 << 20
# Bytes after the request head held until the answer; past this, reading pauses.
MAX_HELD_BYTES = 64 * 1024

ProcessRequest = Callable[[ServerConnection, Request], Awaitable[Response | None] | Response | None]
ProcessResponse = Callable[
    [ServerConnection, Request, Response], Awaitable[Response | None] | Response | None
]


class GuardedConnection(ServerConnection):
    """`serve(create_connection=GuardedConnection)`; see the module's docstring."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._head_seen = False  # the request head's blank line went to the protocol
        self._tail = b""  # the last bytes before it, to find a blank line cut in two
        self._held = bytearray()
        self._reading_paused = False
        self._stalled: asyncio.TimerHandle | None = None

    # Pipelined HTTP ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.protocol.state is CONNECTING:
            data = self._until_request_head(data)
            if not data:
                return
        super().data_received(data)
        unsent = self.transport.get_write_buffer_size()
        if unsent > MAX_UNSENT_BYTES:
            self._drop(f"{unsent} bytes of output unsent")

    def _until_request_head(self, data: bytes) -> bytes:
        """What of `data` the protocol may parse before the handshake is answered."""
        if self._head_seen:
            self._hold(data)
            return b""
        window = self._tail + data
        end = window.find(b"\r\n\r\n")
        if end < 0:
            self._tail = window[-3:]
            return data
        self._head_seen = True
        cut = end + 4 - len(self._tail)
        self._hold(data[cut:])
        return data[:cut]

    def _hold(self, data: bytes) -> None:
        self._held += data
        if len(self._held) > MAX_HELD_BYTES and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    async def handshake(
        self,
        process_request: ProcessRequest | None = None,
        process_response: ProcessResponse | None = None,
        server_header: str | None = SERVER,
    ) -> None:
        await super().handshake(process_request, process_response, server_header)
        held, self._held = bytes(self._held), bytearray()
        if self.protocol.state is not OPEN:
            return  # refused: the held bytes go with the connection
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        if held:
            self.data_received(held)

    # A client that does not take its output ---------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.ping_timeout is not None:
            self._stalled = self.loop.call_later(
                self.ping_timeout,
                self._drop,
                f"output not taken for {self.ping_timeout:g} s (limits.keepalive_s)",
            )

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
        log.warning(
            "connection from %s dropped: %s; the client does not read",
            self.remote_address[0] if self.remote_address else "?",
            why,
        )
        self.transport.abort()
