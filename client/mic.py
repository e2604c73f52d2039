"""Streams the default microphone to a whisperstream server (needs PortAudio)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from client.stream import (
    RECONNECT,
    ClientError,
    Reconnect,
    Transcript,
    run_session,
    stream_url,
)

MIC_RATE_HZ = 16_000
BLOCK_S = 0.1


def open_sounddevice() -> Any:
    """The sounddevice module, or a ClientError that says what is missing."""
    try:
        import sounddevice
    except OSError as exc:  # raised at import when the PortAudio library is missing
        raise ClientError(
            "no PortAudio library found, so the microphone cannot be opened "
            f"({exc}); install it, e.g. `sudo apt-get install libportaudio2`"
        ) from None
    try:
        sounddevice.query_devices(kind="input")
    except (sounddevice.PortAudioError, ValueError) as exc:
        raise ClientError(
            f"no microphone (audio input device) found: {exc}; plug one in or check "
            "that this user may use it"
        ) from None
    return sounddevice


async def _mic_chunks(sd: Any, stop: asyncio.Event) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def callback(indata: Any, frames: int, time: Any, status: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, bytes(indata))

    with sd.RawInputStream(
        samplerate=MIC_RATE_HZ,
        channels=1,
        dtype="int16",
        blocksize=int(MIC_RATE_HZ * BLOCK_S),
        callback=callback,
    ):
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                yield await asyncio.wait_for(queue.get(), 0.5)


async def stream_mic(
    url: str,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    api_key: str | None = None,
    stop: asyncio.Event | None = None,
    cafile: Path | None = None,
    *,
    reconnect: Reconnect | None = RECONNECT,
    on_notice: Callable[[str], None] | None = None,
) -> Transcript:
    """Until `stop` is set; audio captured while a connection is down is kept and sent
    on the next (run_session's `reconnect`)."""
    sd = open_sounddevice()
    full_url = stream_url(url, sample_rate=MIC_RATE_HZ, encoding="pcm_s16le")
    return await run_session(
        full_url,
        _mic_chunks(sd, stop or asyncio.Event()),
        on_message,
        api_key,
        cafile,
        reconnect=reconnect,
        on_notice=on_notice,
    )
