"""Issue 18, findings 3 and 4, against a real server with the scripted engine: a client
that sends faster than the engine decodes is slowed down (TCP pushes back) and loses
nothing; a trickle of tiny frames cannot hold a session forever."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import numpy as np
import websockets
from fakes import ScriptedWhisper, scripted_words
from harness import check_invariants, serving, settings_with

from streaming.audio import to_pcm_s16le

SR = 16_000
BURST_S, PAUSE_S = 1.5, 1.0  # speech-like bursts; each pause closes a segment


def _bursts(count: int) -> bytes:
    """`count` bursts of a buzzing tone (webrtcvad hears it as speech), each followed
    by a pause long enough to close its segment."""
    t = np.arange(int(BURST_S * SR)) / SR
    burst = (0.3 * np.sign(np.sin(2 * np.pi * 200 * t))).astype(np.float32)
    pause = np.zeros(int(PAUSE_S * SR), np.float32)
    return to_pcm_s16le(np.concatenate([np.concatenate([burst, pause])] * count))


def test_audio_sent_faster_than_it_is_decoded_is_held_back_and_none_is_lost() -> None:
    engine = ScriptedWhisper()
    engine.gate.clear()  # the engine is stuck until the test lets it go
    pcm = _bursts(24)  # 60 s of audio, 24 segments
    settings = settings_with(limits={"max_lag_s": 3.0}, streaming={"interim": False})
    with serving(engine, settings) as live:

        async def run() -> tuple[float, float, list[dict[str, Any]]]:
            messages: list[dict[str, Any]] = []
            async with websockets.connect(f"{live.url}/v1/stream", max_size=None) as ws:

                async def send_all() -> None:
                    for offset in range(0, len(pcm), 3200):  # as fast as TCP takes it
                        await ws.send(pcm[offset : offset + 3200])
                    await ws.send(json.dumps({"type": "stop"}))

                async def receive() -> None:
                    async for raw in ws:
                        messages.append(json.loads(raw))

                sender = asyncio.create_task(send_all())
                receiver = asyncio.create_task(receive())
                await asyncio.sleep(3.0)
                (driver,) = live.app.host.drivers
                taken_s, pending_s = driver.session.received_seconds, driver.session.pending_seconds
                engine.gate.set()
                await asyncio.wait_for(asyncio.gather(sender, receiver), 60)
            return taken_s, pending_s, messages

        taken_s, pending_s, messages = asyncio.run(run())
    # While the engine was stuck the server stopped reading: the session took a bounded
    # part of the 60 s (what waits for finals, the live segment, websockets' read queue of
    # 16 frames of 0.1 s), and the rest stayed in TCP's buffers and the client.
    assert pending_s <= 3.0 + BURST_S + PAUSE_S, pending_s
    assert taken_s <= 3.0 + 2 * (BURST_S + PAUSE_S) + 1.6, taken_s
    check_invariants(messages)
    finals = [m for m in messages if m["type"] == "final"]
    assert len(finals) == 24 and messages[-1]["type"] == "done"
    assert all(scripted_words(f["text"], at_least=2) for f in finals), finals
    assert not [m for m in messages if m["type"] == "error"]


def test_a_trickle_of_tiny_frames_does_not_hold_a_session() -> None:
    settings = settings_with(limits={"idle_timeout_s": 1.0})
    with serving(ScriptedWhisper(), settings) as live:

        async def trickle() -> tuple[list[dict[str, Any]], int | None, float]:
            messages: list[dict[str, Any]] = []
            started = time.monotonic()
            async with websockets.connect(f"{live.url}/v1/stream") as ws:
                with contextlib.suppress(websockets.ConnectionClosed):
                    for _ in range(100):  # 2 bytes and a flush every 0.1 s, for up to 10 s
                        await ws.send(b"\x00\x00")
                        await ws.send(json.dumps({"type": "flush"}))
                        await asyncio.sleep(0.1)
                with contextlib.suppress(websockets.ConnectionClosedError):
                    async for raw in ws:
                        messages.append(json.loads(raw))
                return messages, ws.close_code, time.monotonic() - started

        messages, code, took_s = asyncio.run(trickle())
        active = live.app.active_sessions
    assert code == 4408 and took_s < 5, (code, took_s)
    error = [m for m in messages if m["type"] == "error"][-1]
    assert "limits.min_audio_ratio" in error["message"], error
    assert active == 0
