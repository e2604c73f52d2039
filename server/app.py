"""The server: the session host with its front doors and integrations, composed.

- `SessionHost` (server/host.py): the engine's scheduler, metrics, sinks, the registry of
  live sessions; every session runs on a `SessionDriver` (server/driver.py).
- Front doors: the WebSocket endpoint (server/websocket.py) and HTTP routes
  (server/routes.py) on one port; Hermes over MQTT (server/hermes.py) and Wyoming over
  TCP (server/wyoming.py) when enabled; the OpenAI and Deepgram APIs on a port of their
  own (server/compat/) when enabled.
- Sinks: the MQTT session publisher (server/mqtt.py) when enabled.

`running()` is the lifecycle: listen, load the model (a `DeferredEngine`: `/readyz`
says so meanwhile), serve, and on exit a graceful shutdown that stops accepting,
finishes every live session (finals, `done`) within a timeout, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from functools import partial

from websockets.asyncio.server import Server, serve

from server.compat.app import CompatServer
from server.config import Settings
from server.connection import GuardedConnection
from server.driver import SessionSink
from server.engines.deferred import DeferredEngine
from server.hermes import HermesAsr
from server.host import SessionHost
from server.metrics import Metrics
from server.mqtt import SessionPublisher
from server.routes import HttpRoutes
from server.scheduler import InferenceScheduler
from server.websocket import handle_stream
from server.wyoming import WyomingService
from streaming.engine import Engine

log = logging.getLogger(__name__)

# The last seconds of limits.shutdown_timeout_s, in which a drain finishes the sessions
# still open (their last decodes, finals and `done`); half the timeout, if it is shorter.
FINISH_WINDOW_S = 5.0


class TranscriptionServer:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.host = SessionHost(settings, engine)
        self.routes = HttpRoutes(self.host)
        self.compat = CompatServer(self.host) if settings.compat.enabled else None
        self._hurry = asyncio.Event()

    @property
    def metrics(self) -> Metrics:
        return self.host.metrics

    @property
    def scheduler(self) -> InferenceScheduler:
        return self.host.scheduler

    @property
    def sinks(self) -> list[SessionSink]:
        return self.host.sinks

    @property
    def active_sessions(self) -> int:
        return self.host.active_sessions

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Server]:
        """Serve until the context exits, then shut down gracefully."""
        cfg, limits = self.settings.server, self.settings.limits
        # websockets refuses frames over max_size with close 1009 and no word of why; let
        # frames up to 4x the limit in, so that the limit is answered with an `error`.
        # No permessage-deflate: audio hardly compresses, and inflating a client's frames
        # ran on the event loop (200 frames of 1 KB that inflate to 1 MiB each: /healthz
        # waited 5 s and more; issue 18). Keepalive: a ping every keepalive_s, and a
        # pong (or, in GuardedConnection, the output the client leaves unread) at most
        # that late, else the connection is dropped.
        # The integrations (MQTT sinks, Hermes, Wyoming) start first and stop last, after
        # shutdown has finished every session: sessions finish into the MQTT sinks.
        async with (
            integrations(self.host),
            serve(
                partial(handle_stream, self.host),
                cfg.host,
                cfg.port,
                process_request=self.routes,
                compression=None,
                create_connection=GuardedConnection,
                max_size=4 * limits.max_frame_bytes,
                max_queue=16,  # frames read ahead of the session: at most 16 x max_size bytes
                open_timeout=limits.handshake_timeout_s,
                ping_interval=limits.keepalive_s,
                ping_timeout=limits.keepalive_s,
                close_timeout=min(10.0, limits.keepalive_s),
                ssl=self._tls_context(),
            ) as server,
        ):
            engine = self.host.engine
            if isinstance(engine, DeferredEngine) and not engine.loaded:
                self.routes.starting = "loading the model"
                log.info("listening; loading model %r ...", self.settings.model.name)
                await engine.load()
            self.host.model_ready.set()
            self.host.scheduler.start()
            try:
                if self.compat is not None:
                    await self.compat.start(self._tls_context())
                self.routes.starting = None
                yield server
            finally:
                await self.shutdown(server)
        await self.host.scheduler.close()

    def _tls_context(self) -> ssl.SSLContext | None:
        cfg = self.settings.server
        if cfg.tls_cert is None or cfg.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        return context

    def hurry(self) -> None:
        """Cut a drain short (a second SIGTERM or Ctrl-C): finish the live sessions now."""
        self._hurry.set()

    async def shutdown(self, server: Server) -> None:
        """Drain, as a load balancer and Kubernetes expect (docs/scaling.md):

        1. `/readyz` answers 503 at once, so the balancers take this replica out of
           rotation; for `limits.drain_grace_s` new sessions are still admitted, while
           they notice.
        2. Then new sessions are refused with 503 and Retry-After (the compatible APIs'
           listener too), and live sessions may run on to their end, for at most
           `limits.shutdown_timeout_s`.
        3. Those still open `FINISH_WINDOW_S` before that (or half of it, if that is
           shorter) are finished: their finals, then `done`. Whatever is open at the
           end is closed (1001).
        """
        routes, limits = self.routes, self.settings.limits
        loop = asyncio.get_running_loop()
        routes.draining = True
        log.info(
            "draining: /readyz answers 503; live sessions: %d; new sessions admitted "
            "for %g s more (limits.drain_grace_s)",
            self.host.active_sessions,
            limits.drain_grace_s,
        )
        if limits.drain_grace_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), limits.drain_grace_s)
        self.host.accepting = False  # every front door refuses new sessions from now on
        timeout = limits.shutdown_timeout_s
        deadline = loop.time() + timeout
        finish_at = deadline - min(FINISH_WINDOW_S, timeout / 2)
        if self.host.active_sessions:
            log.info(
                "draining: new sessions refused; live sessions: %d, they may run on "
                "for %.1f s, then they are finished (limits.shutdown_timeout_s)",
                self.host.active_sessions,
                finish_at - loop.time(),
            )
            await self.host.until_idle(finish_at, self._hurry)
        live = self.host.finish_all()
        if live:
            log.info("draining: finishing the live sessions (%d): their finals, then done", live)
        server.close(close_connections=False)

        async def native() -> None:
            try:
                await asyncio.wait_for(server.wait_closed(), max(deadline - loop.time(), 1.0))
            except TimeoutError:
                log.warning("shutdown: sessions still open after %.0f s; closing them", timeout)
                server.close(close_connections=True)
                await server.wait_closed()

        # The compatible APIs' listener waits as long, at the same time.
        await asyncio.gather(native(), *([self.compat.close()] if self.compat else []))
        log.info("drained: every session has ended")


@contextlib.asynccontextmanager
async def integrations(host: SessionHost) -> AsyncIterator[None]:
    """What `mqtt`, `hermes` and `wyoming` in the config ask for, for as long as the
    server runs: the session publisher (one of the host's sinks), the Hermes ASR service
    and the Wyoming speech-to-text service. They stop in the reverse order."""
    settings = host.settings
    async with contextlib.AsyncExitStack() as stack:
        if settings.mqtt.enabled:
            publisher = SessionPublisher(settings.mqtt, host.metrics.registry)
            await stack.enter_async_context(publisher.running())
            host.sinks.append(publisher)
            stack.callback(host.sinks.remove, publisher)
            log.info(
                "mqtt: publishing sessions under %s/ on %s:%d",
                publisher.prefix,
                settings.mqtt.host,
                settings.mqtt.port,
            )
        if settings.hermes.enabled:
            await stack.enter_async_context(HermesAsr(host).running())
        if settings.wyoming.enabled:
            await stack.enter_async_context(WyomingService(host).running())
        yield
