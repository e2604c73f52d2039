"""Wyoming: whisperstream as a streaming speech-to-text service of Home Assistant's Assist
pipeline and of Wyoming satellites, over TCP (port 10300 by default), on the PyPI package
`wyoming`: its event classes, its framing, its AsyncTcpServer and AsyncEventHandler.

One voice command, as Home Assistant's Wyoming integration sends it:

    -> describe                      <- info: one ASR program, with
                                        supports_transcript_streaming
    -> transcribe (language, name)
    -> audio-start (8-48 kHz,        <- transcript-start
       width 2, 1 or 2 channels)
    -> audio-chunk ...               <- transcript-chunk ...: only text that will not change
                                        (the words the session promised, then each final),
                                        in pieces that add up to the transcript
    -> audio-stop                    <- transcript (the whole text), transcript-stop

Each command is one session on the host's `SessionDriver`, sharing the VAD, the policy and
the inference scheduler with every other session; stereo is mixed down here, and the
session resamples any rate. With `wyoming.stop_on_silence` the first pause the VAD hears
ends the command: the transcript goes out at once and the rest of that command's audio,
up to its audio-stop, is read and dropped. Clients that do not know the streaming events
ignore them and still get the plain `transcript`.

What cannot be served gets an `error` event (`text`, `code`), then the connection is
closed: a line that is not an event, an event larger than limits.max_frame_bytes, audio
that is not 16-bit PCM in one or two channels at 8-48 kHz, a language the model does not
know, a server at limits.max_sessions. A client that vanishes frees its session at once;
audio without speech gets an empty transcript. Sessions of Wyoming are not published to
the MQTT sinks: a voice command is the assistant's.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error as ErrorEvent
from wyoming.event import Event, async_read_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.server import AsyncEventHandler, AsyncTcpServer

from server.discovery import announced
from server.driver import CLOSE_BAD_REQUEST, CLOSE_DONE, OutletFull, SessionDriver
from server.host import Host, driver_limits
from streaming.audio import MAX_SAMPLE_RATE_HZ, MIN_SAMPLE_RATE_HZ, AudioFormatError
from streaming.protocol import (
    Done,
    Error,
    Final,
    Partial,
    ProtocolError,
    ServerMessage,
    SpeechEnd,
    StreamParams,
)

log = logging.getLogger(__name__)

HEADER_LIMIT = 64 * 1024  # asyncio's line limit, which the package's server keeps
SAMPLE_WIDTH = 2  # bytes: 16-bit PCM, what every Wyoming microphone sends
LINGER_S = 2.0  # after an error event, how long the client's remaining audio is read


class BadEvent(Exception):
    """What the client sent is not a Wyoming event; the message says what it was."""


def _language(code: Any) -> str | None:
    """Wyoming's `language` ("en", "en-US", "en_US") as a Whisper language code."""
    if not isinstance(code, str) or not code.strip():
        return None
    return re.split(r"[-_]", code.strip())[0].lower()


def mix_down(pcm: bytes, channels: int) -> bytes:
    """Interleaved 16-bit PCM of `channels` channels as mono, the mean of the channels."""
    if channels == 1:
        return pcm
    frames = np.frombuffer(pcm, "<i2").reshape(-1, channels).astype(np.int32)
    mono: bytes = (frames.sum(axis=1) // channels).astype("<i2").tobytes()
    return mono


def audio_format(event: Event) -> tuple[int, int]:
    """The rate and channels of an audio-start or audio-chunk; ProtocolError if the
    session cannot take them."""
    data = event.data
    rate, width, channels = data.get("rate"), data.get("width"), data.get("channels")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (rate, width, channels)):
        raise ProtocolError(
            "bad_audio",
            f"{event.type} needs whole numbers rate, width and "
            f"channels, not {rate!r}, {width!r} and {channels!r}",
        )
    assert isinstance(rate, int) and isinstance(channels, int)
    if width != SAMPLE_WIDTH:
        raise ProtocolError("bad_audio", f"audio of width {width}: send 16-bit PCM (width 2)")
    if channels not in (1, 2):
        raise ProtocolError("bad_audio", f"audio of {channels} channels: send 1 or 2")
    if not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ:
        raise ProtocolError(
            "bad_audio", f"audio at {rate} Hz: send {MIN_SAMPLE_RATE_HZ} to {MAX_SAMPLE_RATE_HZ} Hz"
        )
    return rate, channels


def build_info(host: Host, stop_on_silence: bool) -> Info:
    """The answer to `describe`: one ASR program, this server, with its one model."""
    from server.engines import whisper_languages

    languages = host.capabilities.languages
    try:
        version: str | None = importlib.metadata.version("whisperstream")
    except importlib.metadata.PackageNotFoundError:
        version = None
    ending = (
        "the first pause it hears ends a voice command (server-side endpointing)"
        if stop_on_silence
        else "a voice command ends at audio-stop"
    )
    return Info(
        asr=[
            AsrProgram(
                name="whisperstream",
                description=f"whisperstream: streaming Whisper speech to text; {ending}",
                attribution=Attribution(name="whisperstream", url=""),
                installed=True,
                version=version,
                supports_transcript_streaming=True,
                requires_external_vad=not stop_on_silence,
                models=[
                    AsrModel(
                        name=host.engine_name,
                        description=f"{host.engine_name}, on CTranslate2",
                        attribution=Attribution(
                            name="OpenAI", url="https://github.com/openai/whisper"
                        ),
                        installed=True,
                        version=None,
                        languages=sorted(languages)
                        if languages is not None
                        else whisper_languages(),
                    )
                ],
            )
        ]
    )


class _EventReader:
    """The connection's events, read by the package's `async_read_event` through bounds:
    a header line over asyncio's limit, or data or a payload announced larger than
    `max_bytes`, is refused instead of buffered, and `refused` says why."""

    def __init__(self, reader: asyncio.StreamReader, max_bytes: int) -> None:
        self._reader = reader
        self.max_bytes = max_bytes
        self.refused: str | None = None
        self._line = b""

    async def readline(self) -> bytes:
        try:
            self._line = await self._reader.readline()
        except ValueError:  # longer than the stream's limit
            self.refused = f"an event header line longer than {HEADER_LIMIT} bytes"
            raise
        return self._line

    async def readexactly(self, n: Any) -> bytes:
        if not isinstance(n, int) or n > self.max_bytes:
            self.refused = (
                f"an event of {n!r} bytes of data or payload, more than "
                f"limits.max_frame_bytes ({self.max_bytes})"
            )
            raise ValueError(self.refused)
        return await self._reader.readexactly(n)

    async def next(self) -> Event | None:
        """The next event; None once the client has gone. BadEvent for what is not one."""
        self._line = b""
        try:
            event = await async_read_event(self)  # type: ignore[arg-type]
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        except Exception as exc:  # JSON, but not an event header: no type, data not an object
            raise BadEvent(
                f"an event header that is not a Wyoming event ({type(exc).__name__}: {exc})"
            ) from None
        if event is None:
            if self.refused:
                raise BadEvent(self.refused)
            if self._line:
                raise BadEvent(f"a line that is not a JSON event header: {self._line[:80]!r}")
            return None
        if not isinstance(event.type, str) or not isinstance(event.data, dict):
            raise BadEvent("an event whose type is not a string or whose data is not an object")
        return event


@dataclass
class _Command:
    """One voice command: audio-start to its transcript."""

    driver: SessionDriver
    outlet: _Outlet
    rate: int
    channels: int
    remainder: bytes = b""  # the part of a frame that the last chunk ended in
    audio_stopped: bool = False  # its audio-stop was read
    client_gone: bool = False
    failed: bool = False


class _Outlet:
    """A command's messages as Wyoming events, in order, through one bounded queue that
    the send loop drains; when the session failed, an `error` event comes last."""

    def __init__(
        self, handler: WyomingHandler, language: str, size: int, stop_on_silence: bool
    ) -> None:
        self.handler = handler
        self.language = language
        self.stop_on_silence = stop_on_silence
        self.driver: SessionDriver | None = None
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(size)
        self._closed = asyncio.Event()
        self.finals: dict[int, str] = {}
        self.stable: dict[int, str] = {}  # the promised text of segments with no final yet
        self.chunked = ""  # the text of the transcript-chunks sent so far
        self.diverged = False  # settled text that does not extend `chunked`: no more chunks
        self.error: Error | None = None
        self.answered = False  # the transcript is out
        self.gone = False  # writing failed: the client has left

    def send(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            raise OutletFull from None

    def transcript(self) -> str:
        return " ".join(t for _, t in sorted(self.finals.items()) if t)

    def settled(self) -> str:
        """Text that will not change: the finals of segments 0..k-1, then what segment k
        has promised (its partials' `stable`)."""
        parts, k = [], 0
        while k in self.finals:
            parts.append(self.finals[k])
            k += 1
        parts.append(self.stable.get(k, ""))
        return " ".join(p for p in parts if p)

    def _chunk(self) -> None:
        settled = self.settled()
        if self.diverged or len(settled) <= len(self.chunked):
            return
        if not settled.startswith(self.chunked):  # a promise broken: the session's bug
            self.diverged = True
            log.warning(
                "wyoming: settled text %r does not extend the chunks sent (%r); no "
                "more transcript-chunk events for this command",
                settled,
                self.chunked,
            )
            return
        self.send(TranscriptChunk(settled[len(self.chunked) :]).event())
        self.chunked = settled

    def deliver(self, message: ServerMessage) -> None:
        driver = self.driver
        if isinstance(message, Partial):
            if message.stable:
                self.stable[message.segment] = message.stable
            self._chunk()
        elif isinstance(message, Final):
            self.finals[message.segment] = message.text
            self.stable.pop(message.segment, None)
            self._chunk()
        elif isinstance(message, SpeechEnd):
            if self.stop_on_silence and driver is not None and not driver.session.stopping:
                log.info("session %s: silence after speech; ending the voice command", driver.id)
                driver.stop()
        elif isinstance(message, Done):
            text = self.transcript()
            self.send(Transcript(text=text, language=self.language).event())
            self.send(TranscriptStop().event())
            self.answered = True
            log.info("session %s: transcript %r", driver.id if driver else "?", text)
        elif isinstance(message, Error):
            self.error = message
            level = logging.INFO if message.code == "limit" else logging.WARNING
            log.log(
                level,
                "session %s: %s: %s",
                driver.id if driver else "?",
                message.code,
                message.message,
            )

    def close(self, code: int, reason: str) -> None:
        if code != CLOSE_DONE or not self.answered:
            error = self.error
            event = ErrorEvent(
                text=error.message if error else f"the session ended: {reason}",
                code=error.code if error else reason,
            ).event()
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(event)
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:  # the client does not read: nothing queued will go out
            self._closed.set()

    async def flushed(self) -> None:
        await self._closed.wait()

    async def send_loop(self) -> None:
        try:
            while (event := await self._queue.get()) is not None:
                await self.handler.write_event(event)
        except (ConnectionError, OSError):
            self.gone = True
            if self.driver is not None:
                log.info("session %s: the client left before its transcript", self.driver.id)
                self.driver.client_gone()
        finally:
            self._closed.set()


class WyomingHandler(AsyncEventHandler):
    """One connection: describe, and any number of voice commands one after another."""

    def __init__(
        self, service: WyomingService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        super().__init__(reader, writer)
        self.service = service
        self.events = _EventReader(reader, service.settings.limits.max_frame_bytes)
        peer = writer.get_extra_info("peername")
        self.address = str(peer[0]) if peer else "?"
        self.transcribe: Transcribe | None = None
        self.dropping = False  # an answered command's audio is read and dropped until its stop
        self.errored = False  # an error event went out: the connection is closed gracefully
        self._pending: asyncio.Future[Event | None] | None = None

    async def _read(self) -> Event | None:
        """The next event. A read survives the cancellation of its reader (a command that
        ended while its audio loop waited): the next call goes on with it, so that an
        event is never read in part."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.events.next())
        pending = self._pending
        try:
            return await asyncio.shield(pending)
        finally:
            if pending.done():
                self._pending = None

    async def run(self) -> None:
        """Events until the client leaves or an `error` event has been sent."""
        self._is_running = True
        task = asyncio.current_task()
        if task is not None:
            self.service.connections.add(task)
        try:
            while self._is_running:
                try:
                    event = await self._read()
                except BadEvent as exc:
                    await self._refuse("bad_request", f"{exc}; closing the connection")
                    break
                if event is None or not await self.handle_event(event):
                    break
        except (ConnectionError, OSError):
            pass  # writing to a client that has left
        except Exception:
            log.exception("wyoming %s: the connection failed; closing it", self.address)
        finally:
            if self._pending is not None:
                self._pending.cancel()
            if self.errored:
                await self._linger()
            if task is not None:
                self.service.connections.discard(task)
            await self.disconnect()
            self.writer.close()

    async def _linger(self) -> None:
        """Close after an error event so that the client reads it: a socket closed with
        unread audio in it is reset, and a reset drops what the client had not read yet.
        So: end our side, then read and drop what the client still sends, for a while."""
        with contextlib.suppress(ConnectionError, OSError, RuntimeError, TimeoutError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(LINGER_S):
                while await self.reader.read(65536):
                    pass

    async def _refuse(self, code: str, text: str) -> None:
        self.errored = True
        log.warning("wyoming %s: %s", self.address, text)
        self.service.host.metrics.errors.labels(code).inc()
        with contextlib.suppress(ConnectionError, OSError):
            await self.write_event(ErrorEvent(text=text, code=code).event())

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(await self.service.ready())
        elif Transcribe.is_type(event.type):
            self.transcribe = Transcribe.from_event(event)
            self.dropping = False
        elif AudioStart.is_type(event.type):
            self.dropping = False
            return await self._command(event)
        elif AudioChunk.is_type(event.type):
            if not self.dropping:  # audio with no audio-start: its own format starts one
                return await self._command(event)
        elif AudioStop.is_type(event.type):
            if not self.dropping:  # a command with no audio: nothing was said
                for answer in (TranscriptStart(), Transcript(text=""), TranscriptStop()):
                    await self.write_event(answer.event())
            self.dropping = False
        else:
            log.debug("wyoming %s: %s ignored", self.address, event.type)
        return True

    async def _command(self, first: Event) -> bool:
        """Serve one voice command from its first event to its transcript; False when
        the connection is to be closed."""
        service, host = self.service, self.service.host
        limits = service.settings.limits
        transcribe, self.transcribe = self.transcribe, None
        try:
            rate, channels = audio_format(first)
            await service.ready()  # a command that comes while the model loads waits for it
            if service.draining or not host.accepting:
                raise ProtocolError("shutting_down", "the server is shutting down")
            if host.active_sessions >= limits.max_sessions:
                raise ProtocolError(
                    "busy",
                    f"busy: {host.active_sessions} sessions, the "
                    "configured maximum (limits.max_sessions)",
                )
            config = host.session_config(
                StreamParams(
                    sample_rate=rate,
                    encoding="pcm_s16le",
                    language=_language(transcribe.language if transcribe else None),
                    interim=True,
                )
            )
        except ProtocolError as exc:
            await self._refuse(exc.code, f"{exc.message}; closing the connection")
            return False
        outlet = _Outlet(
            self, config.language, limits.max_outbound_messages, service.cfg.stop_on_silence
        )
        driver = host.open_session(
            f"wyoming-{uuid.uuid4().hex[:12]}",
            config,
            outlet,
            limits=service.limits,
            client_address=self.address,
            publish=False,
        )
        outlet.driver = driver
        command = _Command(driver, outlet, rate, channels)
        log.info(
            "session %s: voice command from %s (%d Hz, %s, %s)",
            driver.id,
            self.address,
            rate,
            "mono" if channels == 1 else "stereo",
            config.language,
        )
        outlet.send(TranscriptStart(language=config.language).event())
        if AudioChunk.is_type(first.type):
            self._feed(command, first)
        with service.serving(driver):
            await host.serve(driver, outlet.send_loop(), self._audio_loop(command))
        if command.client_gone or outlet.gone:
            return False
        if command.failed or driver.close_code != CLOSE_DONE:
            self.errored = True  # the error event went out last
            return False
        self.dropping = not command.audio_stopped
        return True

    async def _audio_loop(self, command: _Command) -> None:
        """Audio of the command until its audio-stop (or until the session stops)."""
        driver = command.driver
        while driver.live and not driver.session.stopping:
            await driver.wait_for_room()  # backpressure: read no more than it can take
            if not driver.live or driver.session.stopping:
                return
            try:
                event = await self._read()
            except BadEvent as exc:
                command.failed = True
                driver.fail(CLOSE_BAD_REQUEST, "bad_request", f"{exc}; closing the connection")
                return
            if event is None:
                command.client_gone = True
                log.info("session %s: the client left during its voice command", driver.id)
                driver.client_gone()
                return
            if AudioChunk.is_type(event.type):
                self._feed(command, event)
            elif AudioStop.is_type(event.type):
                command.audio_stopped = True
                driver.stop()
            elif Describe.is_type(event.type):
                command.outlet.send(await self.service.ready())
            else:
                log.debug("session %s: %s during a voice command ignored", driver.id, event.type)

    def _feed(self, command: _Command, event: Event) -> None:
        driver = command.driver
        try:
            fmt = audio_format(event)
        except ProtocolError as exc:
            command.failed = True
            driver.fail(CLOSE_BAD_REQUEST, exc.code, f"{exc.message}; closing the connection")
            return
        if fmt != (command.rate, command.channels):
            command.failed = True
            driver.fail(
                CLOSE_BAD_REQUEST,
                "bad_audio",
                f"an audio-chunk at {fmt[0]} Hz in {fmt[1]} channels in a stream at "
                f"{command.rate} Hz in {command.channels}; closing the connection",
            )
            return
        if not driver.live or driver.session.stopping:
            return  # answered already (stop_on_silence, a limit): dropped
        data = command.remainder + (event.payload or b"")
        whole = len(data) - len(data) % (SAMPLE_WIDTH * command.channels)
        command.remainder = data[whole:]
        if not whole:
            return
        try:
            driver.receive_audio(mix_down(data[:whole], command.channels))
        except (AudioFormatError, ProtocolError) as exc:
            log.warning("session %s: audio dropped: %s", driver.id, exc)


class WyomingService:
    """The Wyoming server of `wyoming` in the config, for as long as `running` runs."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.settings = host.settings
        self.cfg = host.settings.wyoming
        limits = self.settings.limits
        self.limits = replace(
            driver_limits(limits),
            idle_finishes=True,  # a client that goes quiet gets the transcript of what it said
            max_audio_s=self.cfg.max_command_s,
            max_audio_key="wyoming.max_command_s",
        )
        self._info_event: Event | None = None  # built once the model has loaded
        self.draining = False
        self.connections: set[asyncio.Task[Any]] = set()
        self._drivers: set[SessionDriver] = set()
        self._idle = asyncio.Event()  # set while no voice command is being served
        self._idle.set()

    async def ready(self) -> Event:
        """The `info` event, once the model has loaded: the port opens with the server's,
        before the model (whose languages `info` lists) has loaded, as /readyz says."""
        await self.host.model_ready.wait()
        if self._info_event is None:
            self._info_event = build_info(self.host, self.cfg.stop_on_silence).event()
        return self._info_event

    @contextlib.contextmanager
    def serving(self, driver: SessionDriver) -> Iterator[None]:
        """While a voice command is served: counted, and stopped at shutdown."""
        self._drivers.add(driver)
        self._idle.clear()
        try:
            yield
        finally:
            self._drivers.discard(driver)
            if not self._drivers:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        cfg = self.cfg
        server = AsyncTcpServer(cfg.host, cfg.port)
        await server.start(partial(WyomingHandler, self))
        log.info(
            "wyoming: speech to text on tcp://%s:%d (model %s%s)",
            cfg.host,
            cfg.port,
            self.host.engine_name,
            ", stop on silence" if cfg.stop_on_silence else "",
        )
        try:
            async with contextlib.AsyncExitStack() as stack:
                if cfg.zeroconf:
                    await stack.enter_async_context(
                        announced(cfg.zeroconf_name, cfg.host, cfg.port)
                    )
                yield
        finally:
            await self._shutdown(server)

    async def _shutdown(self, server: AsyncTcpServer) -> None:
        """Refuse new commands, finish the live ones (transcripts go out), then close."""
        self.draining = True
        for driver in list(self._drivers):
            driver.stop(by_server=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.limits.shutdown_timeout_s):
                await self._idle.wait()
        await server.stop()  # stops listening and ends every connection
        tasks = list(self.connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
