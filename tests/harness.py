"""A real server on a free port in a background thread, and a checker of protocol.md's
invariants over a recorded session."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fakes import free_port

from server.app import TranscriptionServer
from server.config import Settings
from streaming.engine import Engine


def settings_with(**sections: dict[str, Any]) -> Settings:
    """The default settings with some keys of some sections changed."""
    base = Settings()
    return Settings.model_validate(
        {
            **base.model_dump(),
            **{
                name: {**getattr(base, name).model_dump(), **values}
                for name, values in sections.items()
            },
        }
    )


@dataclass
class LiveServer:
    url: str  # ws://127.0.0.1:PORT
    app: TranscriptionServer
    stop: Callable[[], None]  # graceful shutdown, as on SIGTERM

    @property
    def http_url(self) -> str:
        return self.url.replace("ws://", "http://")

    @property
    def compat_url(self) -> str:
        """http://127.0.0.1:PORT of the compatible APIs (with `compat.enabled`)."""
        assert self.app.compat is not None and self.app.compat.port, "compat is not enabled"
        return f"http://127.0.0.1:{self.app.compat.port}"


@contextmanager
def serving(engine: Engine, settings: Settings | None = None) -> Iterator[LiveServer]:
    """A real server on a free port in its own thread and event loop."""
    settings = settings or Settings()
    settings = settings.model_copy(
        update={
            "server": settings.server.model_copy(update={"port": 0}),
            "compat": settings.compat.model_copy(update={"port": 0}),
        }
    )
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        server = TranscriptionServer(settings, engine)
        state["stop"] = asyncio.Event()
        state["loop"] = asyncio.get_running_loop()
        state["app"] = server
        async with server.running() as ws_server:
            state["port"] = next(iter(ws_server.sockets)).getsockname()[1]
            started.set()
            await state["stop"].wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the test below
            state["error"] = exc
            started.set()

    thread = threading.Thread(target=run, name="test-server", daemon=True)
    thread.start()
    assert started.wait(30), "server did not start"
    if "error" in state:
        raise state["error"]

    def stop() -> None:
        if not state["loop"].is_closed():
            state["loop"].call_soon_threadsafe(state["stop"].set)

    try:
        yield LiveServer(f"ws://127.0.0.1:{state['port']}", state["app"], stop)
    finally:
        stop()
        thread.join(60)


@contextmanager
def running_server(engine: Engine, settings: Settings | None = None) -> Iterator[str]:
    """Yield the ws:// base URL of a real server; it stops when the block ends."""
    with serving(engine, settings) as live:
        yield live.url


class TcpProxy:
    """A TCP forwarder on a free loopback port, in the caller's event loop; `cut()` drops
    every connection through it at once, as a network failure or a dead replica would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._transports: list[asyncio.Transport] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()

    def go_away(self) -> None:
        """Drop every connection and refuse new ones, as a machine that went down."""
        assert self._server is not None
        self._server.close()
        self.cut()

    def cut(self) -> None:
        for transport in self._transports:
            transport.abort()
        self._transports.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for w in (writer, up_writer):
            self._transports.append(w.transport)  # type: ignore[arg-type]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServeCommand:
    port: int
    process: subprocess.Popen[str]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def output(self) -> str:
        """Stop the server if it still runs, and return what it printed."""
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.communicate(timeout=30)[0]


@contextmanager
def serve_command(env: dict[str, str] | None = None) -> Iterator[ServeCommand]:
    """`whisperstream serve` as a user starts it, on a free port, once /readyz answers."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                    break
            except OSError:
                assert process.poll() is None, process.communicate()[0]
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        yield ServeCommand(port, process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def check_invariants(messages: list[dict[str, Any]]) -> None:
    """Assert protocol.md's invariants 1, 3 and 4, and that `stable` is never retracted."""
    assert messages, "no messages"
    assert messages[0]["type"] == "ready", messages[0]
    assert sum(m["type"] == "ready" for m in messages) == 1
    kinds = [m["type"] for m in messages]
    if "done" in kinds:
        assert kinds.index("done") == len(kinds) - 1, "something followed done"
    finals: dict[int, dict[str, Any]] = {}
    stable: dict[int, str] = {}
    last_segment = -1
    for m in messages:
        if m["type"] not in ("partial", "final"):
            continue
        k = m["segment"]
        assert k not in finals, f"message about segment {k} after its final: {m}"
        assert k >= last_segment, f"segment numbers went back: {k} after {last_segment}"
        last_segment = k
        assert m["start"] <= m["end"], m
        promised = stable.get(k, "")
        assert m["text"].startswith(promised), f"stable {promised!r} retracted by {m['text']!r}"
        if m["type"] == "partial":
            assert m["text"].startswith(m.get("stable", "")), m
            stable[k] = m.get("stable", "") or promised
        else:
            finals[k] = m
            for w in m["words"]:
                assert m["start"] <= w["start"] <= w["end"] <= m["end"], (w, m)
                assert 0.0 <= w["probability"] <= 1.0
    assert sorted(finals) == list(range(len(finals))), f"segments not 0..N-1: {sorted(finals)}"
    if "done" in kinds:
        assert messages[-1]["segments"] == len(finals)
