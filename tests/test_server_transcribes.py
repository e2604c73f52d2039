"""End to end: real server, real WebSocket, real bundled Whisper model, synthesized speech."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from harness import check_invariants
from speech import Utterance, read_pcm, wer

from client.stream import Transcript, run_session, stream_file, stream_url

pytestmark = pytest.mark.model


def test_streamed_file_gives_accurate_finals_and_partials_first(
    server_url: str, three_sentences: Utterance
) -> None:
    # Real-time pace: partials before each final are promised when the server keeps up;
    # faster than real time, a slow CPU rightly skips a short segment's partial steps.
    transcript = asyncio.run(
        stream_file(three_sentences.path, f"{server_url}/v1/stream", speed=1.0)
    )
    check_invariants(transcript.messages)
    assert transcript.close_code == 1000
    assert wer(three_sentences.text, transcript.text) <= 0.10, transcript.text
    finals = transcript.of_type("final")
    assert len(finals) == len(three_sentences.sentences), [f["text"] for f in finals]
    # Every segment shows provisional text before its final.
    for final in finals:
        kinds = [m["type"] for m in transcript.messages if m.get("segment") == final["segment"]]
        assert kinds[0] == "partial" and kinds[-1] == "final", kinds
    assert any(p.get("stable") for p in transcript.of_type("partial")), "nothing ever promised"
    done = transcript.of_type("done")[0]
    assert done["segments"] == 3
    assert abs(done["audio_seconds"] - three_sentences.duration_s) < 0.1
    starts, ends = transcript.of_type("speech_start"), transcript.of_type("speech_end")
    assert len(starts) == len(ends) == 3
    for final, start, end in zip(finals, starts, ends, strict=True):
        assert final["start"] <= start["t"] <= end["t"] <= final["end"] + 0.05


def test_two_sessions_at_once_each_get_their_own_transcript(
    server_url: str, three_sentences: Utterance, other_speech: Utterance
) -> None:
    async def both() -> list[Transcript]:
        return list(
            await asyncio.gather(
                stream_file(three_sentences.path, f"{server_url}/v1/stream", speed=2.0),
                stream_file(other_speech.path, f"{server_url}/v1/stream", speed=2.0),
            )
        )

    first, second = asyncio.run(both())
    for transcript, utterance in ((first, three_sentences), (second, other_speech)):
        check_invariants(transcript.messages)
        assert wer(utterance.text, transcript.text) <= 0.10, transcript.text
    assert first.messages[0]["session"] != second.messages[0]["session"]


def test_f32le_at_48khz_is_resampled_and_transcribed(
    server_url: str, other_speech: Utterance
) -> None:
    import soxr

    pcm, rate = read_pcm(other_speech.path)
    audio = soxr.resample(pcm.astype(np.float32) / 32768.0, rate, 48_000).astype("<f4")
    frame = 48_000 * 37 // 1000  # odd frame lengths are fine: any whole number of samples

    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(audio), frame):
            yield audio[offset : offset + frame].tobytes()
            await asyncio.sleep(0.005)

    url = stream_url(f"{server_url}/v1/stream", sample_rate=48_000, encoding="f32le")
    transcript = asyncio.run(run_session(url, chunks()))
    check_invariants(transcript.messages)
    ready = transcript.messages[0]
    assert (ready["sample_rate"], ready["encoding"]) == (48_000, "f32le")
    assert wer(other_speech.text, transcript.text) <= 0.10, transcript.text


def test_start_message_sets_the_format_and_interim_false_sends_no_partials(
    server_url: str, other_speech: Utterance
) -> None:
    pcm, rate = read_pcm(other_speech.path)

    async def run() -> Transcript:
        import websockets

        transcript = Transcript()
        async with websockets.connect(f"{server_url}/v1/stream") as ws:
            await ws.send(
                json.dumps(
                    {
                        "type": "start",
                        "sample_rate": rate,
                        "encoding": "pcm_s16le",
                        "interim": False,
                    }
                )
            )
            for offset in range(0, len(pcm), rate // 5):
                await ws.send(pcm[offset : offset + rate // 5].tobytes())
            await ws.send(json.dumps({"type": "stop"}))
            async for raw in ws:
                transcript.messages.append(json.loads(raw))
            transcript.close_code = ws.close_code
        return transcript

    transcript = asyncio.run(run())
    check_invariants(transcript.messages)
    assert transcript.of_type("started")[0]["sample_rate"] == rate
    assert not transcript.of_type("partial")
    assert wer(other_speech.text, transcript.text) <= 0.10
    assert transcript.close_code == 1000


def test_flush_finalizes_the_current_segment_mid_speech(
    server_url: str, other_speech: Utterance
) -> None:
    pcm, rate = read_pcm(other_speech.path)
    half = len(pcm) // 2

    async def run() -> list[dict[str, Any]]:
        import websockets

        messages: list[dict[str, Any]] = []
        url = stream_url(f"{server_url}/v1/stream", sample_rate=rate)
        async with websockets.connect(url) as ws:
            await ws.send(pcm[:half].tobytes())
            await ws.send(json.dumps({"type": "flush"}))
            while True:  # the flushed segment's final arrives before any more audio
                message = json.loads(await ws.recv())
                messages.append(message)
                if message["type"] == "final":
                    break
            await ws.send(pcm[half:].tobytes())
            await ws.send(json.dumps({"type": "stop"}))
            async for raw in ws:
                messages.append(json.loads(raw))
        return messages

    messages = asyncio.run(run())
    check_invariants(messages)
    finals = [m for m in messages if m["type"] == "final"]
    assert len(finals) == 2, finals
    assert finals[0]["end"] <= half / rate + 0.05
    assert wer(other_speech.text, " ".join(str(f["text"]) for f in finals)) <= 0.2


def test_silence_and_noise_give_no_invented_text(server_url: str) -> None:
    rng = np.random.default_rng(0)
    audio = np.concatenate([np.zeros(16_000 * 3), rng.normal(0, 0.003, 16_000 * 3)])
    pcm = (audio * 32767).astype("<i2").tobytes()

    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(pcm), 6400):
            yield pcm[offset : offset + 6400]

    transcript = asyncio.run(run_session(f"{server_url}/v1/stream", chunks()))
    check_invariants(transcript.messages)
    assert transcript.text == ""


def test_healthz_answers_while_serving(server_url: str) -> None:
    http_url = server_url.replace("ws://", "http://") + "/healthz"
    with urllib.request.urlopen(http_url, timeout=5) as response:
        assert response.status == 200
