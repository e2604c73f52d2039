"""The session driver, on the host, with the scripted engine and a recording outlet:
every way a session ends frees it, a failure in any of its tasks included."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest
from fakes import ScriptedWhisper

from server.config import Settings
from server.driver import CLOSE_DONE, CLOSE_INTERNAL, CLOSE_LIMIT, OutletFull, SessionDriver
from server.host import SessionHost
from streaming.audio import to_pcm_s16le
from streaming.protocol import Done, Error, Final, ServerMessage, StreamParams

SR = 16_000


class RecordingOutlet:
    def __init__(self, capacity: int = 10_000) -> None:
        self.messages: list[ServerMessage] = []
        self.closed: tuple[int, str] | None = None
        self.capacity = capacity

    def deliver(self, message: ServerMessage) -> None:
        if len(self.messages) >= self.capacity:
            raise OutletFull
        self.messages.append(message)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    async def flushed(self) -> None:
        return


def _speech(seconds: float) -> bytes:
    """A loud tone with pauses: the scripted engine hears words in it, and so does the
    energy of webrtcvad's frames (a 200 Hz tone with harmonics)."""
    t = np.arange(int(seconds * SR)) / SR
    tone = 0.3 * np.sign(np.sin(2 * np.pi * 200 * t)) * (np.sin(2 * np.pi * 0.5 * t) > -0.2)
    return to_pcm_s16le(tone.astype(np.float32))


def _host(**limits: Any) -> SessionHost:
    settings = Settings.model_validate({"limits": limits}) if limits else Settings()
    return SessionHost(settings, ScriptedWhisper())


def _open(host: SessionHost, outlet: RecordingOutlet) -> SessionDriver:
    config = host.session_config(StreamParams())
    return host.open_session("s1", config, outlet)


async def _serve(
    host: SessionHost, driver: SessionDriver, *io: Any, timeout_s: float = 10.0
) -> None:
    host.scheduler.start()
    try:
        async with asyncio.timeout(timeout_s):
            await host.serve(driver, *io)
    finally:
        await host.scheduler.close()


async def test_a_stopped_session_sends_its_finals_and_done_then_closes_and_is_freed() -> None:
    host, outlet = _host(), RecordingOutlet()
    driver = _open(host, outlet)

    async def client() -> None:
        pcm = _speech(3.0)
        for offset in range(0, len(pcm), 3200):
            driver.receive_audio(pcm[offset : offset + 3200])
            await asyncio.sleep(0)
        driver.stop()

    await _serve(host, driver, client())
    assert isinstance(outlet.messages[-1], Done)
    assert any(isinstance(m, Final) and m.text for m in outlet.messages)
    assert outlet.closed == (CLOSE_DONE, "done")
    assert host.active_sessions == 0 and not host.drivers


async def _wait() -> None:
    await asyncio.sleep(30)


def _raise_in_io(driver: SessionDriver) -> Coroutine[Any, Any, None]:
    async def io() -> None:
        await asyncio.sleep(0.01)
        raise RecursionError("a parser blew its stack")

    return io()


def _raise_in_job_loop(driver: SessionDriver) -> Coroutine[Any, Any, None]:
    def broken(job: object, hypothesis: object) -> None:
        raise ValueError("a bug in the policy")

    setattr(driver.session, "complete_job", broken)  # noqa: B010 (the test patches it)
    driver.receive_audio(_speech(1.0))
    return _wait()


def _raise_in_idle_watch(driver: SessionDriver) -> Coroutine[Any, Any, None]:
    async def broken() -> None:
        raise RuntimeError("a bug in the idle watch")

    setattr(driver, "_watch_idle", broken)  # noqa: B010 (the test patches it)
    return _wait()


@pytest.mark.parametrize(
    "inject",
    [_raise_in_io, _raise_in_job_loop, _raise_in_idle_watch],
    ids=["io task", "job loop", "idle watch"],
)
async def test_a_failure_in_any_task_ends_the_session_with_an_error_and_frees_it(
    inject: Callable[[SessionDriver], Coroutine[Any, Any, None]],
) -> None:
    """Each injector breaks one task before the driver starts it."""
    host, outlet = _host(), RecordingOutlet()
    driver = _open(host, outlet)
    await _serve(host, driver, inject(driver))
    errors = [m for m in outlet.messages if isinstance(m, Error)]
    assert errors and errors[-1].code == "internal", outlet.messages
    assert outlet.closed is not None and outlet.closed[0] == CLOSE_INTERNAL
    assert host.active_sessions == 0 and not host.drivers


async def test_a_session_with_no_input_ends_at_the_idle_timeout() -> None:
    host, outlet = _host(idle_timeout_s=0.2), RecordingOutlet()
    driver = _open(host, outlet)
    await _serve(host, driver, _wait())
    assert outlet.closed is not None and outlet.closed[0] == CLOSE_LIMIT
    last = outlet.messages[-1]
    assert isinstance(last, Error) and "idle_timeout_s" in last.message
    assert host.active_sessions == 0


async def test_a_client_that_leaves_without_sinks_is_freed_at_once() -> None:
    host, outlet = _host(), RecordingOutlet()
    driver = _open(host, outlet)

    async def leave() -> None:
        driver.receive_audio(_speech(1.0))
        driver.client_gone()

    await _serve(host, driver, leave())
    assert outlet.closed is None  # nobody to tell
    assert host.active_sessions == 0
