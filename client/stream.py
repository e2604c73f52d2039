"""Streams a WAV file, or any source of PCM frames, to a whisperstream server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream"
FRAME_S = 0.1  # audio per binary frame


class ClientError(RuntimeError):
    pass


@dataclass
class Transcript:
    """Everything a session sent, in order, with arrival times (monotonic seconds)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    close_code: int | None = None

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
    query = urlencode({k: str(v).lower() if isinstance(v, bool) else v
                       for k, v in params.items() if v is not None})
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


async def run_session(
    url: str,
    chunks: AsyncIterator[bytes],
    on_message: Callable[[dict[str, Any]], None] | None = None,
    api_key: str | None = None,
    cafile: Path | None = None,
) -> Transcript:
    """Send audio chunks, then `stop`; collect every message until the server closes."""
    transcript = Transcript()
    tls = ssl.create_default_context(cafile=cafile) if url.startswith("wss:") else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None

    async def receive(ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosedError):  # the close code tells what happened
            async for raw in ws:
                message = json.loads(raw)
                transcript.messages.append(message)
                transcript.arrivals.append(time.monotonic())
                if on_message is not None:
                    on_message(message)

    async def send(ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):  # the receiver sees why
            async for chunk in chunks:
                await ws.send(chunk)
            await ws.send(json.dumps({"type": "stop"}))

    try:
        async with connect(url, additional_headers=headers, max_size=None, ssl=tls) as ws:
            sender = asyncio.create_task(send(ws))
            try:
                # The server decides when the session ends (done, an error, shutdown).
                await receive(ws)
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            transcript.close_code = ws.close_code
    except InvalidStatus as exc:
        body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
        raise ClientError(
            f"the server refused the session: HTTP {exc.response.status_code} {body}"
        ) from None
    except OSError as exc:
        raise ClientError(f"cannot connect to {url}: {exc.strerror or exc}") from None
    return transcript


async def stream_file(
    path: Path,
    url: str = DEFAULT_URL,
    speed: float = 1.0,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    api_key: str | None = None,
    interim: bool | None = None,
    cafile: Path | None = None,
) -> Transcript:
    pcm, rate = read_pcm(path)
    full_url = stream_url(url, sample_rate=rate, encoding="pcm_s16le", interim=interim)
    return await run_session(full_url, paced_frames(pcm, rate, speed), on_message, api_key,
                             cafile)
