"""The outlet of a front door that writes to a socket: the session's messages in one
bounded queue, then the close, sent in order by one send loop (the `Outlet` contract of
server/driver.py). The native WebSocket endpoint and the compatible APIs' WebSockets
differ only in how an item and the close are written."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Generic, TypeVar

from server.driver import OutletFull

Item = TypeVar("Item")


@dataclass(frozen=True)
class _Close:
    code: int
    reason: str


class QueuedOutlet(Generic[Item]):
    # What the writes raise once the client is gone; the send loop then stops quietly.
    gone: tuple[type[BaseException], ...] = (ConnectionError,)

    def __init__(self, max_messages: int) -> None:
        self._queue: asyncio.Queue[Item | _Close] = asyncio.Queue(max_messages)
        self._closed = asyncio.Event()  # the close went out, or the connection is gone

    def put(self, item: Item) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise OutletFull from None

    def close(self, code: int, reason: str) -> None:
        try:
            self._queue.put_nowait(_Close(code, reason))
        except asyncio.QueueFull:  # the client does not read: nothing queued will go out
            self._closed.set()

    async def flushed(self) -> None:
        await self._closed.wait()

    async def send_loop(self) -> None:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _Close):
                    await self._write_close(item.code, item.reason)
                    return
                await self._write(item)
        except self.gone:
            pass
        finally:
            self._closed.set()

    async def _write(self, item: Item) -> None:
        raise NotImplementedError

    async def _write_close(self, code: int, reason: str) -> None:
        raise NotImplementedError
