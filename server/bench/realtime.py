"""`whisperstream bench --api openai-realtime`: a file streamed through OpenAI's Realtime
transcription API (server/compat/openai_realtime.py) as an OpenAI client streams it
(24 kHz pcm16 in base64 appends, server VAD, a commit at the end), its events logged
as the native protocol's messages so that the same scoring measures both:

- each item is a segment; a `...transcription.delta` is a `partial` whose `text` and
  `stable` are the item's text so far (deltas are promised words: they never change);
- `...transcription.completed` is that segment's `final`; once every committed item
  has completed after the last audio, a `done` closes the log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from server.bench.manifest import Item, read_pcm
from server.bench.records import StreamRecord

RATE_HZ = 24_000
FINISH_TIMEOUT_S = 60.0  # after the last audio, for the last items to complete
MARKER = "bench-end"
SESSION = {
    "type": "transcription",
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": RATE_HZ},
            "transcription": {"model": "whisper-1", "language": "en"},
            "turn_detection": {"type": "server_vad"},
        }
    },
}


def realtime_url(url: str) -> str:
    """A compat listener's ws:// base, or a full /v1/realtime URL, as the bench's target."""
    if "/v1/realtime" in url:
        return url
    return url.rstrip("/").removesuffix("/v1") + "/v1/realtime?intent=transcription"


def as_native(events: list[tuple[float, dict[str, Any]]]) -> list[tuple[float, dict[str, Any]]]:
    """Realtime events as the native protocol's `partial`, `final` and `error` messages."""
    segment: dict[str, int] = {}
    text: dict[str, str] = {}
    out: list[tuple[float, dict[str, Any]]] = []
    for t, event in events:
        kind = event.get("type", "")
        item = str(event.get("item_id", ""))
        if kind == "input_audio_buffer.speech_started" or (
            item and item not in segment and kind.startswith("conversation.item")
        ):
            segment.setdefault(item, len(segment))
        if kind == "conversation.item.input_audio_transcription.delta":
            text[item] = text.get(item, "") + str(event.get("delta", ""))
            out.append(
                (
                    t,
                    {
                        "type": "partial",
                        "segment": segment[item],
                        "text": text[item],
                        "stable": text[item],
                    },
                )
            )
        elif kind == "conversation.item.input_audio_transcription.completed":
            out.append(
                (
                    t,
                    {
                        "type": "final",
                        "segment": segment[item],
                        "text": str(event.get("transcript", "")),
                    },
                )
            )
        elif kind == "error":
            error = event.get("error") or {}
            out.append(
                (t, {"type": "error", "code": error.get("code"), "message": error.get("message")})
            )
        elif kind == "done":
            out.append((t, event))
    return out


async def stream_one_realtime(
    item: Item,
    url: str,
    speed: float,
    api_key: str | None,
    on_audio: Callable[[float], None],
) -> StreamRecord:
    import soxr
    import websockets

    from client.stream import PaceClock, paced_frames

    pcm, rate = read_pcm(item.wav)
    duration = len(pcm) / 2 / rate
    clock = PaceClock()
    events: list[tuple[float, dict[str, Any]]] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resampler = soxr.ResampleStream(rate, RATE_HZ, 1, "float32")
    finished = asyncio.Event()

    def append(frame: bytes, last: bool = False) -> str:
        samples = np.frombuffer(frame, "<i2").astype(np.float32) / 32768.0
        out = resampler.resample_chunk(samples, last=last)
        audio = np.clip(out * 32767, -32768, 32767).astype("<i2").tobytes()
        return json.dumps(
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(audio).decode()}
        )

    async def receive(ws: Any) -> None:
        committed: set[str] = set()
        completed: set[str] = set()
        marked = False  # the answer to the marker commit: all before it has arrived
        async for raw in ws:
            event = json.loads(raw)
            kind = event.get("type")
            if kind == "error" and (event.get("error") or {}).get("event_id") == MARKER:
                marked = True
            else:
                events.append((time.monotonic(), event))
            if kind == "input_audio_buffer.committed":
                committed.add(event["item_id"])
            elif kind == "conversation.item.input_audio_transcription.completed":
                completed.add(event["item_id"])
            if marked and committed <= completed:
                finished.set()
                return

    try:
        async with websockets.connect(
            realtime_url(url), additional_headers=headers, max_size=None, compression=None
        ) as ws:
            receiver = asyncio.create_task(receive(ws))
            await ws.send(json.dumps({"type": "session.update", "session": SESSION}))
            async for frame in paced_frames(pcm, rate, speed, clock, on_audio):
                await ws.send(append(frame))
            await ws.send(append(b"", last=True))
            # The last item ends at a commit; a second one, right after, is refused as
            # empty, and its error (with our event_id) comes after all the first made.
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": MARKER}))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), FINISH_TIMEOUT_S)
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
    except (OSError, websockets.WebSocketException) as exc:
        return StreamRecord(item, duration, [], None, f"realtime session failed: {exc}")
    close_code = 1000 if finished.is_set() else None
    origin = clock.origin if clock.origin is not None else (events[0][0] if events else 0.0)
    logged = [(round(t - origin, 4), e) for t, e in events]
    if finished.is_set():
        logged.append((logged[-1][0] if logged else 0.0, {"type": "done"}))
    error = (
        None
        if finished.is_set()
        else (f"the last items did not complete within {FINISH_TIMEOUT_S:g} s of the last audio")
    )
    return StreamRecord(item, duration, as_native(logged), close_code, error)
