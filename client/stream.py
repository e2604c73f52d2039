"""Streams a WAV file, or any source of PCM frames, to a whisperstream server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import connect
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    InvalidHandshake,
    InvalidStatus,
)

DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream"
FRAME_S = 0.1  # audio per binary frame


class ClientError(RuntimeError):
    pass


@dataclass
class Transcript:
    """Everything a session sent, in order, with arrival times (monotonic seconds)."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # of every connection
    arrivals: list[float] = field(default_factory=list)
    close_code: int | None = None  # of the last connection
    connections: int = 0
    complete: bool = False  # the server answered this client's `stop` with `done`

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    @property
    def text(self) -> str:
        return " ".join(m["text"] for m in self.of_type("final") if m["text"]).strip()


def read_pcm(path: Path) -> tuple[bytes, int]:
    """A WAV file as 16-bit PCM mono (channels mixed down) and its sample rate; 8-, 16- and
    32-bit PCM files are read (streaming.audio.read_wav)."""
    from streaming.audio import AudioFormatError, read_wav, to_pcm_s16le

    try:
        samples, rate = read_wav(Path(path).read_bytes(), str(path))
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror or exc}") from None
    except AudioFormatError as exc:
        raise ClientError(str(exc)) from None
    return to_pcm_s16le(samples), rate


def stream_url(url: str, **params: Any) -> str:
    query = urlencode(
        {
            k: str(v).lower() if isinstance(v, bool) else v
            for k, v in params.items()
            if v is not None
        }
    )
    return f"{url}{'&' if '?' in url else '?'}{query}" if query else url


@dataclass
class PaceClock:
    """When paced audio began: audio time t counts as sent at `origin` + t / speed."""

    origin: float | None = None  # time.monotonic() when the first frame was asked for


async def paced_frames(
    pcm: bytes,
    rate: int,
    speed: float = 1.0,
    clock: PaceClock | None = None,
    on_audio: Callable[[float], None] | None = None,
) -> AsyncIterator[bytes]:
    """16-bit PCM in frames of FRAME_S, each leaving once it was heard, as a microphone
    delivers it: the frame that ends at audio time t is yielded t / speed seconds after
    the first was asked for (speed 0: as fast as possible).

    `clock.origin` is set when the first frame is asked for; `on_audio(seconds)` is called
    with each frame's duration once the consumer has taken it and asks for the next.
    """
    step = max(1, int(rate * FRAME_S)) * 2
    origin = time.monotonic()
    if clock is not None:
        clock.origin = origin
    for offset in range(0, len(pcm), step):
        chunk = pcm[offset : offset + step]
        if speed > 0:
            sent_until = (offset + len(chunk)) / 2 / rate
            await asyncio.sleep(max(0.0, origin + sent_until / speed - time.monotonic()))
        yield chunk
        if on_audio is not None:
            on_audio(len(chunk) / 2 / rate)


@dataclass(frozen=True)
class Reconnect:
    """How a session goes on over a new connection when one ends before its `done`
    (docs/protocol.md, "Resuming a stream"): after a drop or a close that says "try
    again" (1001 going away, 1011, 1012, 1013, 4429) or an HTTP 429, 502, 503 or 504,
    wait `first_delay_s`, doubling up to `max_delay_s` (at least the server's
    Retry-After), and give up after `give_up_after_s` of failed tries in a row.
    The audio sent since the last final is kept, `keep_s` of it at most."""

    first_delay_s: float = 0.5
    max_delay_s: float = 10.0
    give_up_after_s: float = 60.0
    keep_s: float = 60.0


RECONNECT = Reconnect()  # the default: reconnect

# Close codes after which the same audio, sent again, can go on: the connection dropped
# (1006, or no code), the server went away or failed (1001, 1011, 1012 restart, 1013 try
# again later, 1014 bad gateway), or it dropped a client it thought too slow (4429).
# Not: 4400 (what the client sent is wrong), 4408 (idle), 1008 (policy).
RETRY_CLOSE_CODES = frozenset({1000, 1001, 1005, 1006, 1011, 1012, 1013, 1014, 4429})
RETRY_HTTP_STATUS = frozenset({429, 502, 503, 504})
_BYTES_PER_SAMPLE = {"pcm_s16le": 2, "f32le": 4}


class _Retry(Exception):
    """This connection cannot go on; another may, after `delay_s` or later."""

    def __init__(self, why: str, delay_s: float = 0.0, progress: bool = True) -> None:
        super().__init__(why)
        self.why = why
        self.delay_s = delay_s
        self.progress = progress  # the transcript moved on: restart the backoff


class _KeptAudio:
    """The stream's audio as bytes from its first sample: what was sent and is not yet
    covered by a final (to send again on a new connection), and what waits to be sent.

    One task reads the source (`fill`), from the first connection on. While a connection
    takes the audio, it reads the next chunk only once the last one has been sent, so a
    server that does not read slows the source down as before; between connections it
    reads freely, so a microphone's audio (or a paced file's) is kept, not delayed.
    A text chunk (a JSON control message, e.g. `start`) takes no stream time; it is sent
    again only with the audio after it.
    """

    def __init__(self) -> None:
        # (sequence number, stream byte where it starts, data)
        self.chunks: deque[tuple[int, int, bytes | str]] = deque()
        self.base = 0  # stream byte of the first chunk kept
        self.end = 0  # stream bytes read from the source
        self.sent = 0  # of which the current connection has sent these
        self.covered = 0  # stream bytes the finals so far cover
        self.keep_bytes: int | None = None  # most sent audio kept beyond them (None: all)
        self.finished = False  # the source is exhausted
        self.connected = False
        self.changed = asyncio.Event()  # a chunk was read, or the source ended
        self._wanted = asyncio.Event()  # the current connection has sent everything
        self._started = asyncio.Event()
        self._count = 0

    async def fill(self, source: AsyncIterator[bytes | str]) -> None:
        try:
            await self._started.wait()
            async for chunk in source:
                self.chunks.append((self._count, self.end, chunk))
                self._count += 1
                if isinstance(chunk, bytes):
                    self.end += len(chunk)
                self.changed.set()
                while self.connected and self.sent < self.end:
                    self._wanted.clear()
                    await self._wanted.wait()
        finally:
            self.finished = True
            self.changed.set()

    def connect(self, start: int) -> None:
        self.connected, self.sent = True, start
        self._started.set()
        self._wanted.set()

    def disconnect(self) -> None:
        self.connected = False
        self._wanted.set()

    def mark_sent(self, upto: int) -> None:
        self.sent = upto
        if upto >= self.end:
            self._wanted.set()
        self._forget()

    def cover(self, upto: int, keep_bytes: int) -> None:
        """A final covers the stream up to byte `upto`: what was sent before is not needed."""
        self.covered, self.keep_bytes = max(self.covered, upto), keep_bytes
        self._forget()

    def pending(self, start: int, after: int | None) -> list[tuple[int, bytes | str, int]]:
        """(sequence number, data, stream byte after it) to send: the chunks after the
        one numbered `after`, or with `after` None, the kept ones from byte `start` on."""
        out: list[tuple[int, bytes | str, int]] = []
        for number, position, data in self.chunks:
            if after is not None:
                if number > after:
                    out.append((number, data, position + _length(data)))
            elif isinstance(data, str):
                if position >= start:
                    out.append((number, data, position))
            elif position + len(data) > start:
                out.append((number, data[max(0, start - position) :], position + len(data)))
        return out

    def _forget(self) -> None:
        """Drop sent chunks the finals cover, and sent ones older than `keep_bytes`."""
        while self.chunks:
            _, position, data = self.chunks[0]
            chunk_end = position + _length(data)
            too_old = self.keep_bytes is not None and self.sent - chunk_end > self.keep_bytes
            if chunk_end > self.sent or (chunk_end > self.covered and not too_old):
                break
            self.chunks.popleft()
            self.base = chunk_end


def _length(data: bytes | str) -> int:
    """Stream bytes a chunk takes: a text chunk is a control message, not audio."""
    return len(data) if isinstance(data, bytes) else 0


async def run_session(
    url: str,
    chunks: AsyncIterator[bytes],
    on_message: Callable[[dict[str, Any]], None] | None = None,
    api_key: str | None = None,
    cafile: Path | None = None,
    *,
    reconnect: Reconnect | None = RECONNECT,
    on_notice: Callable[[str], None] | None = None,
) -> Transcript:
    """Send audio chunks, then `stop`; collect every message until the session is done.

    With `reconnect` (the default), a connection that ends before `done` is followed by
    another that resends the audio since the last final and asks the server to go on
    with the stream's times and segment numbers (`offset_s`, `first_segment`), so the
    finals of all connections, joined, are the transcript (docs/protocol.md, "Resuming
    a stream"); `on_notice` hears of each reconnection. Without it, one connection, and
    whatever close ended it is in `Transcript.close_code`.
    """
    transcript = Transcript()
    tls = ssl.create_default_context(cafile=cafile) if url.startswith("wss:") else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    audio = _KeptAudio()
    filling = asyncio.create_task(audio.fill(chunks))
    stream = _Resume()
    policy = reconnect or Reconnect()
    failing_since: float | None = None
    delay = 0.0
    try:
        while True:
            try:
                await _connection(
                    url,
                    stream,
                    audio,
                    transcript,
                    on_message,
                    headers,
                    tls,
                    policy,
                    retry=reconnect is not None,
                )
                return transcript
            except _Retry as retry:
                if reconnect is None:
                    raise ClientError(retry.why) from None
                now = time.monotonic()
                if retry.progress:  # the stream moved on: go on at once
                    failing_since, delay = None, 0.0
                else:
                    if failing_since is None:
                        failing_since = now
                    elif now - failing_since > reconnect.give_up_after_s:
                        raise ClientError(
                            f"{retry.why}; gave up after "
                            f"{now - failing_since:.0f} s of trying to "
                            "reconnect"
                        ) from None
                    delay = min(reconnect.max_delay_s, max(reconnect.first_delay_s, 2 * delay))
                wait = max(delay, retry.delay_s)
                if on_notice is not None:
                    again = (
                        f"{stream.resend_seconds(audio):.1f} s of audio from "
                        f"{stream.resume_s:.2f} s"
                        if stream.bytes_per_second
                        else "the audio"
                    )
                    on_notice(
                        f"{retry.why}; reconnecting{f' in {wait:.1f} s' if wait else ''}"
                        f", sending {again} again"
                    )
                await asyncio.sleep(wait)
    finally:
        filling.cancel()
        await asyncio.gather(filling, return_exceptions=True)


@dataclass
class _Resume:
    """Where the next connection takes the stream up."""

    resume_s: float = 0.0  # stream time the resent audio starts from
    next_segment: int = 0
    bytes_per_second: int = 0  # of the stream's audio, from `ready`
    sample_bytes: int = 2
    connections: int = 0
    started: bool = False  # a connection got `ready`: the server is there

    def start_byte(self, audio: _KeptAudio) -> int:
        wanted = (
            round(self.resume_s * self.bytes_per_second / self.sample_bytes) * self.sample_bytes
        )
        return max(audio.base, min(wanted, audio.end))

    def resend_seconds(self, audio: _KeptAudio) -> float:
        if not self.bytes_per_second:
            return 0.0
        return max(0, audio.end - self.start_byte(audio)) / self.bytes_per_second


async def _connection(
    url: str,
    stream: _Resume,
    audio: _KeptAudio,
    transcript: Transcript,
    on_message: Callable[[dict[str, Any]], None] | None,
    headers: dict[str, str] | None,
    tls: ssl.SSLContext | None,
    policy: Reconnect,
    retry: bool,
) -> None:
    """One connection of the session. Returns once the session is done (or, without
    `retry`, over); raises _Retry when another connection should go on."""
    start = stream.start_byte(audio) if stream.bytes_per_second else 0
    offset_s = start / stream.bytes_per_second if stream.bytes_per_second else 0.0
    resuming = stream.connections > 0 and (start > 0 or stream.next_segment > 0)
    full_url = (
        stream_url(url, offset_s=round(offset_s, 6), first_segment=stream.next_segment)
        if resuming
        else url
    )
    stop_sent = False
    before = (stream.resume_s, stream.next_segment)
    try:
        ws = await connect(full_url, additional_headers=headers, max_size=None, ssl=tls)
    except InvalidStatus as exc:
        status = exc.response.status_code
        body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
        why = f"the server refused the session: HTTP {status} {body}".strip()
        if not retry or status not in RETRY_HTTP_STATUS:
            raise ClientError(why) from None
        raise _Retry(
            why, _retry_after(exc.response.headers.get("Retry-After")), progress=False
        ) from None
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        why = f"cannot connect to {url}: {getattr(exc, 'strerror', None) or exc}"
        if not retry or not stream.started:
            raise ClientError(why) from None  # a server that is not there at all: say so
        raise _Retry(why, progress=False) from None
    stream.connections += 1
    transcript.connections = stream.connections
    done: dict[str, Any] | None = None

    async def send() -> None:
        nonlocal stop_sent
        with contextlib.suppress(ConnectionClosed):  # the receiver sees why
            last: int | None = None  # the last chunk sent on this connection
            while True:
                audio.changed.clear()
                pending = audio.pending(start, last)
                for number, piece, upto in pending:
                    await ws.send(piece)
                    last = number
                    audio.mark_sent(upto)
                if pending:
                    continue
                if audio.finished:
                    await ws.send(json.dumps({"type": "stop"}))
                    stop_sent = True
                    return
                await audio.changed.wait()

    def receive(message: dict[str, Any]) -> None:
        nonlocal done
        kind = message.get("type")
        if kind == "ready":
            _check_resumed(message, resuming, url)
            stream.started = True
        if kind in ("ready", "started"):  # the audio format in force (a `start` can set it)
            sample_bytes = _BYTES_PER_SAMPLE.get(str(message.get("encoding")), 2)
            stream.sample_bytes = sample_bytes
            stream.bytes_per_second = int(message.get("sample_rate", 16000)) * sample_bytes
        elif kind == "final":
            stream.resume_s = float(message["end"])
            stream.next_segment = int(message["segment"]) + 1
            if stream.bytes_per_second:
                audio.cover(
                    int(stream.resume_s * stream.bytes_per_second),
                    int(policy.keep_s * stream.bytes_per_second),
                )
        elif kind == "done":
            done = message
            stream.resume_s = float(message["audio_seconds"])
            stream.next_segment = int(message["segments"])

    audio.connect(start)
    sender = asyncio.create_task(send())
    try:
        with contextlib.suppress(ConnectionClosedError):  # the close code tells what happened
            async for raw in ws:
                message = json.loads(raw)
                transcript.messages.append(message)
                transcript.arrivals.append(time.monotonic())
                receive(message)
                if on_message is not None:
                    on_message(message)
    finally:
        audio.disconnect()
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await ws.close()
    code = ws.close_code
    transcript.close_code = code
    if done is not None and stop_sent and _covers_all(done, audio, stream):
        transcript.complete = True
        return
    if not retry:
        return
    progress = (stream.resume_s, stream.next_segment) != before
    if done is not None:  # the server finished the session early (a drain, a limit)
        raise _Retry("the server ended the session before the end of the audio", progress=progress)
    if code in RETRY_CLOSE_CODES or code is None:
        reason = f" {ws.close_reason}" if ws.close_reason else ""
        raise _Retry(
            f"the connection closed ({code}{reason}) before the session was done", progress=progress
        )
    # Any other close: the server will not take this audio (4400, 4408, 1008): stop here.


def _covers_all(done: dict[str, Any], audio: _KeptAudio, stream: _Resume) -> bool:
    """Whether `done` answers this client's stop: the server heard all the audio, up to a
    few samples of resampling (a server that ended the session itself, at a limit, may
    see the client's stop only after it ignored some audio)."""
    if not stream.bytes_per_second:
        return True
    return float(done["audio_seconds"]) >= audio.end / stream.bytes_per_second - 0.02


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def _check_resumed(ready: dict[str, Any], resuming: bool, url: str) -> None:
    if resuming and "offset_s" not in ready:
        raise ClientError(
            f"the server at {url} cannot resume a stream (its `ready` does not "
            "confirm offset_s): it is older than this client"
        )


async def stream_file(
    path: Path,
    url: str = DEFAULT_URL,
    speed: float = 1.0,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    api_key: str | None = None,
    interim: bool | None = None,
    cafile: Path | None = None,
    *,
    reconnect: Reconnect | None = RECONNECT,
    on_notice: Callable[[str], None] | None = None,
) -> Transcript:
    pcm, rate = read_pcm(path)
    full_url = stream_url(url, sample_rate=rate, encoding="pcm_s16le", interim=interim)
    return await run_session(
        full_url,
        paced_frames(pcm, rate, speed),
        on_message,
        api_key,
        cafile,
        reconnect=reconnect,
        on_notice=on_notice,
    )
