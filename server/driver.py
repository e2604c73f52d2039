"""The session driver: one loop that runs a sans-I/O `Session` for every front door.

A front door (the WebSocket endpoint, Hermes over MQTT, the ones to come) supplies only
its I/O: it hands the driver audio and control messages as they arrive, and an `Outlet`
through which the driver hands back every message the session makes, in order. The
driver does the rest, the same way for all of them:

- runs the session's inference steps through the shared `InferenceScheduler`, one at a
  time, completing or abandoning each;
- enforces the limits: idle time, length of audio, lag behind the audio (`overloaded`),
  a client that does not read (its outlet is full);
- counts what the metrics count, and copies every message to the sinks (MQTT);
- owns every task of the session, the front door's included: when any of them fails,
  the session ends with an error and is freed, so no dead task can hold a slot.

Closing goes through the outlet, after the messages before it, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from server.metrics import Metrics
from server.scheduler import InferenceScheduler
from streaming.audio import MODEL_SAMPLE_RATE_HZ
from streaming.protocol import ClientMessage, Error, Final, ServerMessage, Stop
from streaming.session import Session

log = logging.getLogger(__name__)

# Why a session ended, as WebSocket close codes; other front doors map them to their own.
CLOSE_DONE = 1000  # the transcript is complete
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL = 1011  # the server failed on this session
CLOSE_BAD_REQUEST = 4400  # the session cannot start or go on with what the client sent
CLOSE_LIMIT = 4408  # a configured limit ended the session
CLOSE_TOO_SLOW = 4429  # the client did not read its messages


class State(enum.Enum):
    OPEN = "open"  # taking audio and control messages
    FINISHING = "finishing"  # stopped: the remaining steps run and the finals follow
    CLOSING = "closing"  # the driver's last word is said; the front door closes
    CLOSED = "closed"  # every task has ended


class OutletFull(Exception):
    """The client does not take its messages as fast as the session makes them."""


class Outlet(Protocol):
    """How a front door takes the session's messages; called on the event loop."""

    def deliver(self, message: ServerMessage) -> None:
        """Pass one message on without waiting; raise `OutletFull` when it cannot."""
        ...

    def close(self, code: int, reason: str) -> None:
        """The session is over: close after the messages delivered before this."""
        ...

    async def flushed(self) -> None:
        """Return once what was delivered, and the close, have left (or cannot)."""
        ...


class SessionSink(Protocol):
    """Somewhere else every session's messages go (MQTT); called on the event loop."""

    def publish(
        self, session_id: str, labels: Mapping[str, str], message: ServerMessage
    ) -> None: ...


@dataclass(frozen=True)
class DriverLimits:
    # Less than `min_audio_ratio * idle_timeout_s` seconds of audio within a window of
    # `idle_timeout_s` ends the session (0: any audio will do). Control messages do not
    # count, so neither a trickle of tiny frames nor of messages holds a slot forever.
    idle_timeout_s: float = 60.0
    min_audio_ratio: float = 0.1
    idle_finishes: bool = False  # True: idle time finishes the transcript; False: an error
    max_audio_s: float = 4 * 3600.0  # more audio than this finishes the session
    max_audio_key: str = "limits.max_session_s"  # the setting, named in the message
    # Results this far behind the audio: `overloaded`; closed segments holding this much
    # audio unfinalized: the front door stops reading (`wait_for_room`) until half is done.
    max_lag_s: float = 10.0
    flush_timeout_s: float = 10.0  # longest wait for the last messages to leave


class SessionDriver:
    def __init__(
        self,
        session: Session,
        outlet: Outlet,
        *,
        scheduler: InferenceScheduler,
        metrics: Metrics,
        sinks: Sequence[SessionSink] = (),
        limits: DriverLimits = DriverLimits(),
        labels: Mapping[str, str] | None = None,
        client_address: str = "",
    ) -> None:
        self.session = session
        self.outlet = outlet
        self.scheduler = scheduler
        self.metrics = metrics
        self.sinks = sinks
        self.limits = limits
        self.labels = dict(labels or {})
        self.client_address = client_address
        self.state = State.OPEN
        self.connected = True  # the outlet still reaches the client
        self.stopped_by_server = False  # the server's stop (shutdown, a limit), not the client's
        self.step_seconds = 0.0  # wall time of this session's steps, queue included
        self.close_code: int | None = None
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()
        self._room = asyncio.Event()  # set while the session may take more audio
        self._room.set()
        self._held_back = False  # the front door waited for room in this idle window
        self._overloaded = False
        self._flushing = False

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def live(self) -> bool:
        """Still counted against the limits: its last message is not out yet."""
        return self.state in (State.OPEN, State.FINISHING)

    # Lifecycle -------------------------------------------------------------------

    async def run(self, *io: Coroutine[Any, Any, None]) -> None:
        """Drive the session, with the front door's I/O tasks, until it has ended."""
        tasks = [
            asyncio.create_task(self._job_loop(), name=f"{self.id}-jobs"),
            asyncio.create_task(self._watch_idle(), name=f"{self.id}-idle"),
        ]
        tasks += [asyncio.create_task(c, name=f"{self.id}-io") for c in io]
        for task in tasks:
            task.add_done_callback(self._task_ended)
        try:
            await self._ended.wait()
            if self.connected:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.limits.flush_timeout_s):
                        await self.outlet.flushed()
        finally:
            self.state = State.CLOSED
            for task in tasks:
                task.remove_done_callback(self._task_ended)
                task.cancel()
            # A task that failed was logged (and ended the session) by _task_ended.
            await asyncio.gather(*tasks, return_exceptions=True)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        """Any task that fails ends the session: none may die and leave it open."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error(
            "session %s: %s failed; closing the session", self.id, task.get_name(), exc_info=exc
        )
        self.fail(
            CLOSE_INTERNAL,
            "internal",
            "the server failed on this session; it was closed, please reconnect",
        )

    def end(self, code: int, reason: str) -> None:
        """The driver's last word: the front door closes with `code` after what it has."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        self.state = State.CLOSING
        self.close_code = code
        if self.connected:
            self.outlet.close(code, reason)
        self._ended.set()
        self._wake.set()
        self._room.set()

    def fail(self, code: int, error: str, message: str) -> None:
        """Tell the client what went wrong, then end the session."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        self.send_error(error, message)
        self.end(code, error)

    def stop(self, *, by_server: bool = False) -> None:
        """Finish the transcript of what was received: finals, then `done`."""
        if self.session.stopping or not self.live:
            return
        self.stopped_by_server = by_server
        self.state = State.FINISHING
        self.session.receive_message(Stop())
        self.flush()
        self._wake.set()

    def client_gone(self) -> None:
        """The client left. With sinks, its remaining finals are still made for them."""
        if not self.connected:
            return
        self.connected = False
        if self.session.done or not self.sinks or not self.live:
            self.end(CLOSE_GOING_AWAY, "client left")
            return
        log.info("session %s: client left; finishing its finals for publishing", self.id)
        self.stop()

    # Input -----------------------------------------------------------------------

    async def wait_for_room(self) -> None:
        """Backpressure: return once the session may take more audio. A front door that
        can stop reading (TCP) awaits this before each read, so a client that sends
        faster than the engine decodes is slowed down instead of buffered in memory."""
        if self.session.pending_seconds > self.limits.max_lag_s and self.live:
            self._room.clear()
            self._held_back = True
            log.info(
                "session %s: %.1f s of audio wait for their finals; not reading until "
                "the engine catches up",
                self.id,
                self.session.pending_seconds,
            )
        await self._room.wait()

    def _update_room(self) -> None:
        if not self.live or self.session.pending_seconds <= self.limits.max_lag_s / 2:
            self._room.set()

    def receive_audio(self, data: bytes) -> None:
        """One frame of audio; raises the session's AudioFormatError or ProtocolError."""
        session = self.session
        before = session.received_seconds
        session.receive_audio(data)
        self.metrics.audio_seconds.inc(session.received_seconds - before)
        if session.received_seconds > self.limits.max_audio_s and not session.stopping:
            self.send_error(
                "limit",
                f"the session reached its maximum length of "
                f"{self.limits.max_audio_s:g} s of audio "
                f"({self.limits.max_audio_key}); finishing it",
            )
            self.stop(by_server=True)  # audio already on its way is no fault of the client
        self.flush()
        self._wake.set()

    def receive_message(self, message: ClientMessage) -> None:
        """A control message; raises the session's ProtocolError."""
        if isinstance(message, Stop):
            self.stop()
            return
        self.session.receive_message(message)
        self.flush()
        self._wake.set()

    # Output ----------------------------------------------------------------------

    def send_error(self, code: str, message: str) -> None:
        self._hand_out([Error(code, message)])

    def send(self, message: ServerMessage) -> None:
        """A message of the front door's own (`ready`, `started`), in order with the rest."""
        self._hand_out([message])

    def flush(self) -> None:
        """Hand out what the session made; end the session once its `done` is out."""
        if self._flushing:  # a message's handler fed the session; the loop below sees it
            return
        self._flushing = True
        try:
            while messages := self.session.take_messages():
                self._hand_out(messages)
        finally:
            self._flushing = False
        if self.session.done and self.live:
            self.end(CLOSE_DONE, "done")

    def _hand_out(self, messages: list[ServerMessage]) -> None:
        for message in messages:
            if isinstance(message, Error):
                self.metrics.errors.labels(message.code).inc()
            elif isinstance(message, Final):
                self.metrics.finals.inc()
            for sink in self.sinks:
                try:
                    sink.publish(self.id, self.labels, message)
                except Exception:
                    log.exception("session %s: publishing failed", self.id)
            if not self.connected:
                continue
            try:
                self.outlet.deliver(message)
            except OutletFull:
                log.warning("session %s: client does not read; closing", self.id)
                self.end(CLOSE_TOO_SLOW, "client too slow")
                self.connected = False

    # Inference -------------------------------------------------------------------

    async def _job_loop(self) -> None:
        session = self.session
        while self.live:
            job = session.next_job()
            if job is None:
                await self._wake.wait()
                self._wake.clear()
                continue
            queued = time.monotonic()
            try:
                hypothesis = await self.scheduler.transcribe(job.request)
            except asyncio.CancelledError:
                session.abandon_job(job)
                raise
            except Exception:
                log.exception("session %s: engine failed on segment %d", self.id, job.segment)
                session.abandon_job(job)
                self.fail(
                    CLOSE_INTERNAL,
                    "internal",
                    "transcription failed on the server; the session was closed, please reconnect",
                )
                return
            seconds = time.monotonic() - queued
            self.step_seconds += seconds
            kind = "final" if job.final else "partial"
            self.metrics.steps.labels(kind).inc()
            self.metrics.step_latency.labels(kind).observe(seconds)
            session.complete_job(job, hypothesis)
            self._check_lag(job.start_sample + len(job.request.audio))
            self.flush()
            self._update_room()

    def _check_lag(self, decoded_until_sample: int) -> None:
        lag_s = self.session.received_seconds - decoded_until_sample / MODEL_SAMPLE_RATE_HZ
        self.metrics.lag.observe(max(lag_s, 0.0))
        if lag_s > self.limits.max_lag_s and not self._overloaded:
            self._overloaded = True
            self.send_error(
                "overloaded",
                f"the server is {lag_s:.1f} s behind this stream; "
                "partials are skipped until it catches up, finals still follow",
            )
        elif lag_s < self.limits.max_lag_s / 2:
            self._overloaded = False

    async def _watch_idle(self) -> None:
        limits = self.limits
        idle_s, least_s = limits.idle_timeout_s, limits.min_audio_ratio * limits.idle_timeout_s
        while self.state is State.OPEN:
            heard_before = self.session.received_seconds
            self._held_back = False
            await asyncio.sleep(idle_s)
            heard_s = self.session.received_seconds - heard_before
            if self.state is not State.OPEN or self._held_back or not self._room.is_set():
                continue  # not reading was the server's doing, not the client's
            if heard_s > least_s or (heard_s > 0 and least_s == 0):
                continue
            if limits.idle_finishes:
                log.info(
                    "session %s: %.1f s of audio in %g s (limits.idle_timeout_s); finishing it",
                    self.id,
                    heard_s,
                    idle_s,
                )
                self.stop()
            else:
                self.fail(
                    CLOSE_LIMIT,
                    "limit",
                    f"{heard_s:.1f} s of audio in the last "
                    f"{idle_s:g} s, less than {least_s:g} s (limits.idle_timeout_s, "
                    "limits.min_audio_ratio); the session was closed",
                )
            return
