"""The session host: what every front door shares, and the one way to run a session.

A front door (server/websocket.py, server/hermes.py) asks the host for a session's
config, opens a driven session, and serves it; the host holds the engine's inference
scheduler, the metrics, the sinks and the registry of live sessions (for the limits
and for shutdown, which finishes every one of them). Integrations depend on the small
`Host` interface below, not on the server that composes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Mapping
from dataclasses import replace
from typing import Any, Protocol

from server.config import LimitsSection, Settings
from server.driver import DriverLimits, Outlet, SessionDriver, SessionSink
from server.metrics import Metrics
from server.scheduler import InferenceScheduler
from streaming.audio import AudioFormat, AudioFormatError
from streaming.engine import Engine, EngineCapabilities
from streaming.protocol import ProtocolError, StreamParams
from streaming.session import Session, SessionConfig
from streaming.vad import FrameClassifier, VadOptions, WebRtcClassifier

log = logging.getLogger(__name__)


def frame_classifier(options: VadOptions) -> FrameClassifier:
    """The speech detector a session's VAD asks, frame by frame (`vad.detector`)."""
    if options.detector == "silero":
        from server.vad_silero import SileroClassifier

        return SileroClassifier(options.silero_threshold)
    return WebRtcClassifier(options.aggressiveness)


def configured_session(settings: Settings) -> SessionConfig:
    """A session's settings as the config gives them, before a client's parameters; the
    audio format is the stream's own (`session_config`), 16 kHz pcm_s16le here."""
    s = settings.streaming
    return SessionConfig(
        language=s.language,
        interim=s.interim,
        vad=settings.vad.options(),
        policy=s.policy_options(),
    )


def driver_limits(limits: LimitsSection) -> DriverLimits:
    """What `limits` in the config asks of every driven session; a front door changes
    only what is its own (a voice command's length, idle time finishing it)."""
    return DriverLimits(
        idle_timeout_s=limits.idle_timeout_s,
        min_audio_ratio=limits.min_audio_ratio,
        max_audio_s=limits.max_session_s,
        max_lag_s=limits.max_lag_s,
        flush_timeout_s=limits.shutdown_timeout_s,
    )


class Host(Protocol):
    """What a front door or an integration may use of the server."""

    settings: Settings
    metrics: Metrics
    sinks: list[SessionSink]
    accepting: bool  # False once a drain's grace has ended: refuse new sessions
    model_ready: asyncio.Event  # set once the engine can transcribe

    @property
    def engine_name(self) -> str: ...

    @property
    def capabilities(self) -> EngineCapabilities: ...

    @property
    def active_sessions(self) -> int: ...

    def session_config(self, params: StreamParams) -> SessionConfig: ...

    def open_session(
        self,
        session_id: str,
        config: SessionConfig,
        outlet: Outlet,
        *,
        limits: DriverLimits | None = None,
        labels: Mapping[str, str] | None = None,
        client_address: str = "",
        publish: bool = True,
    ) -> SessionDriver: ...

    async def serve(self, driver: SessionDriver, *io: Coroutine[Any, Any, None]) -> None: ...


class SessionHost:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = Metrics()
        self.scheduler = InferenceScheduler(
            engine,
            settings.model.max_batch_size,
            on_batch=self.metrics.observe_batch,
            workers=settings.model.worker_count,
            release_memory_every_s=settings.model.release_memory_s,
        )
        self.sinks: list[SessionSink] = []
        # False once a drain's grace has ended: every front door refuses new sessions.
        self.accepting = True
        # Set once the engine can transcribe (a deferred model has loaded): what a front
        # door that starts before the model (Wyoming, Hermes) waits for.
        self.model_ready = asyncio.Event()
        self._drivers: set[SessionDriver] = set()
        if settings.vad.detector == "silero":  # load the model once, before any session
            from server.vad_silero import check_available

            check_available()
        self._freed = asyncio.Event()  # set whenever a session is freed

    @property
    def engine_name(self) -> str:
        return self.engine.name

    @property
    def capabilities(self) -> EngineCapabilities:
        return self.engine.capabilities

    @property
    def drivers(self) -> list[SessionDriver]:
        return list(self._drivers)

    @property
    def active_sessions(self) -> int:
        # A session whose last message is out no longer counts, though its close
        # handshake may still run: a client that reconnects at once is not refused.
        return sum(1 for d in self._drivers if d.live)

    def sessions_from(self, address: str) -> int:
        return sum(1 for d in self._drivers if d.live and d.client_address == address)

    def default_limits(self) -> DriverLimits:
        return driver_limits(self.settings.limits)

    def session_config(self, params: StreamParams) -> SessionConfig:
        """The session's settings: the client's parameters over the configured defaults."""
        s = self.settings.streaming
        try:
            audio = AudioFormat(
                params.sample_rate if params.sample_rate is not None else s.sample_rate,
                params.encoding if params.encoding is not None else s.encoding,  # type: ignore[arg-type]
            )
        except AudioFormatError as exc:
            raise ProtocolError("bad_request", str(exc), fatal=True) from None
        language = params.language or s.language
        if not self.engine.capabilities.supports_language(language):
            raise ProtocolError(
                "bad_request",
                f"language {language!r} is not supported by model {self.engine.name}; "
                "this model transcribes English only (language=en)",
                fatal=True,
            )
        return replace(
            configured_session(self.settings),
            audio=audio,
            language=language,
            interim=s.interim if params.interim is None else params.interim,
            offset_s=params.offset_s or 0.0,
            first_segment=params.first_segment or 0,
        )

    def open_session(
        self,
        session_id: str,
        config: SessionConfig,
        outlet: Outlet,
        *,
        limits: DriverLimits | None = None,
        labels: Mapping[str, str] | None = None,
        client_address: str = "",
        publish: bool = True,
    ) -> SessionDriver:
        """A new session, driven and counted from now on; `serve` runs it. With
        `publish`, the sinks (MQTT) get its messages too."""
        session = Session(session_id, config, frame_classifier(config.vad))
        driver = SessionDriver(
            session,
            outlet,
            scheduler=self.scheduler,
            metrics=self.metrics,
            sinks=self.sinks if publish else (),
            limits=limits or self.default_limits(),
            labels=labels,
            client_address=client_address,
        )
        self._drivers.add(driver)
        self.metrics.sessions.inc()
        self.metrics.active_sessions.inc()
        return driver

    async def serve(self, driver: SessionDriver, *io: Coroutine[Any, Any, None]) -> None:
        """Run a session opened here until it has ended, then free it."""
        try:
            await driver.run(*io)
        finally:
            if driver in self._drivers:
                self._drivers.remove(driver)
                self.metrics.active_sessions.dec()
                self._freed.set()
            log.info(
                "session %s: closed after %.1f s of audio",
                driver.id,
                driver.session.received_seconds,
            )

    async def until_idle(self, deadline: float, hurry: asyncio.Event | None = None) -> None:
        """Return once no session is live, at the loop time `deadline`, or on `hurry`."""
        loop = asyncio.get_running_loop()
        while self.active_sessions and (hurry is None or not hurry.is_set()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._freed.clear()
            # A session stops counting a moment before it is freed: look again soon.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), min(remaining, 0.25))

    def finish_all(self) -> int:
        """Shutdown: every live session transcribes what it has, sends its finals, ends."""
        live = [d for d in self._drivers if d.live]
        for driver in live:
            driver.stop(by_server=True)
        return len(live)
