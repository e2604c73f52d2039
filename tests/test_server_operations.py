"""Many streams on one machine: batching, admission, limits, metrics, graceful shutdown.

Admission, limits, metrics and shutdown run in the middle layer (the scripted engine);
batching and `whisperstream serve` run the real model."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import websockets
from fakes import ScriptedWhisper, free_port, scripted_words
from harness import TcpProxy, check_invariants, serve_command, serving, settings_with
from speech import Utterance, read_pcm, wer

from client.stream import (
    ClientError,
    Reconnect,
    Transcript,
    run_session,
    stream_file,
    stream_url,
)
from server.app import TranscriptionServer
from server.engines.deferred import DeferredEngine
from streaming.engine import Engine

KINDS = ("partial", "final")


def _get(url: str) -> tuple[int, str]:
    status, body, _ = _get_with_headers(url)
    return status, body


def _get_with_headers(url: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


async def _refusal(url: str) -> tuple[int, str, str | None]:
    """The HTTP status, body and Retry-After of a refused upgrade."""
    try:
        async with websockets.connect(url):
            pass
    except websockets.InvalidStatus as exc:
        response = exc.response
        return response.status_code, response.body.decode(), response.headers.get("Retry-After")
    raise AssertionError(f"{url} was not refused")


def _wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.model
def test_concurrent_sessions_are_batched_and_each_transcript_is_right(
    engine: object, three_sentences: Utterance, other_speech: Utterance
) -> None:
    with serving(engine) as live:  # type: ignore[arg-type]

        async def many() -> list[Transcript]:
            files = [three_sentences, other_speech] * 2
            return list(
                await asyncio.gather(
                    *(stream_file(u.path, f"{live.url}/v1/stream", speed=3.0) for u in files)
                )
            )

        transcripts = asyncio.run(many())
        sizes = [b.size for b in live.app.scheduler.batches]
        _, metrics = _get(f"{live.http_url}/metrics")
    for transcript, utterance in zip(transcripts, [three_sentences, other_speech] * 2, strict=True):
        check_invariants(transcript.messages)
        assert wer(utterance.text, transcript.text) <= 0.10, transcript.text
    assert max(sizes) > 1, f"four streams at once never shared a model call: {sizes}"
    assert "whisperstream_batch_size_bucket" in metrics


def test_sessions_past_the_maximum_are_refused_with_503(
    scripted: ScriptedWhisper, other_speech: Utterance
) -> None:
    with serving(scripted, settings_with(limits={"max_sessions": 1})) as live:

        async def run() -> tuple[Transcript, str, Transcript, list[str]]:
            first = asyncio.create_task(
                stream_file(other_speech.path, f"{live.url}/v1/stream", speed=2.0)
            )
            await asyncio.sleep(0.5)
            try:
                await stream_file(other_speech.path, f"{live.url}/v1/stream", reconnect=None)
            except ClientError as exc:
                refused = str(exc)
            else:
                refused = ""
            # The client's default: try again after Retry-After, until the first is done.
            notices: list[str] = []
            waited = await stream_file(
                other_speech.path, f"{live.url}/v1/stream", speed=0, on_notice=notices.append
            )
            return await first, refused, waited, notices

        transcript, refused, waited, notices = asyncio.run(run())
        _, metrics = _get(f"{live.http_url}/metrics")
    assert "HTTP 503" in refused and "limits.max_sessions" in refused, refused
    assert scripted_words(transcript.text)  # the admitted one is unharmed
    assert waited.complete and waited.text == transcript.text, waited.text
    # Retry-After (1 s) at least, then doubling.
    assert notices and all("HTTP 503" in n and "reconnecting in" in n for n in notices)
    assert "reconnecting in 1.0 s" in notices[0], notices
    refusals = [
        line
        for line in metrics.splitlines()
        if line.startswith('whisperstream_refused_sessions_total{reason="max_sessions"}')
    ]
    assert float(refusals[0].split()[-1]) == 1 + len(notices)


def test_readyz_is_503_with_the_reason_while_full_and_healthz_stays_200(
    scripted: ScriptedWhisper,
) -> None:
    """A balancer that checks /readyz takes a full replica out of rotation; the refusal
    of a session that gets there anyway says when to try again."""
    with serving(scripted, settings_with(limits={"max_sessions": 1})) as live:
        stream = f"{live.url}/v1/stream"

        async def run() -> tuple[
            tuple[int, str, dict[str, str]], tuple[int, str, str | None], tuple[int, str]
        ]:
            async with websockets.connect(stream) as ws:
                assert json.loads(await ws.recv())["type"] == "ready"
                full = await asyncio.to_thread(_get_with_headers, f"{live.http_url}/readyz")
                refused = await _refusal(stream)
                health = await asyncio.to_thread(_get, f"{live.http_url}/healthz")
            return full, refused, health

        before = _get(f"{live.http_url}/readyz")
        full, refused, health = asyncio.run(run())
        _wait_for(lambda: _get(f"{live.http_url}/readyz")[0] == 200)
        after = _get(f"{live.http_url}/readyz")
    assert before == (200, "ready: 0 of 1 sessions\n")
    status, body, headers = full
    assert status == 503 and body == "not ready: full: 1 of 1 sessions (limits.max_sessions)\n"
    assert headers["Retry-After"] == "1"
    assert refused[0] == 503 and "limits.max_sessions" in refused[1] and refused[2] == "1"
    assert health == (200, "ok\n")
    assert after == (200, "ready: 0 of 1 sessions\n")


def test_too_many_sessions_from_one_address_are_refused_with_429_and_retry_after(
    scripted: ScriptedWhisper,
) -> None:
    with serving(scripted, settings_with(limits={"max_sessions_per_client": 1})) as live:
        stream = f"{live.url}/v1/stream"

        async def run() -> tuple[int, str, str | None]:
            async with websockets.connect(stream) as ws:
                await ws.recv()
                return await _refusal(stream)

        status, body, retry_after = asyncio.run(run())
    assert status == 429 and "max_sessions_per_client" in body and retry_after == "1"


def test_readyz_is_503_until_the_model_is_loaded_while_healthz_answers(
    scripted: ScriptedWhisper,
) -> None:
    """`whisperstream serve` listens first and loads the model meanwhile (a hub model can
    take minutes to fetch): alive, not ready, and no session is admitted yet."""
    gate = threading.Event()

    def build() -> Engine:
        assert gate.wait(30)
        return scripted

    port = free_port()
    settings = settings_with(server={"port": port})
    base = f"http://127.0.0.1:{port}"
    served = threading.Event()
    stop: dict[str, Any] = {}

    async def main() -> None:
        server = TranscriptionServer(settings, DeferredEngine(build, "scripted"))
        stop["event"], stop["loop"] = asyncio.Event(), asyncio.get_running_loop()
        async with server.running():
            served.set()
            await stop["event"].wait()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    try:
        _wait_for(lambda: _listening(port), 30)
        loading = _get_with_headers(f"{base}/readyz")
        health = _get(f"{base}/healthz")
        refused = asyncio.run(_refusal(f"ws://127.0.0.1:{port}/v1/stream"))
        gate.set()
        assert served.wait(30)
        ready = _get(f"{base}/readyz")
    finally:
        gate.set()
        if "loop" in stop:
            stop["loop"].call_soon_threadsafe(stop["event"].set)
        thread.join(30)
    assert loading[0] == 503 and loading[1] == "not ready: loading the model\n"
    assert loading[2]["Retry-After"] == "1"
    assert health == (200, "ok\n")
    assert refused[0] == 503 and "loading the model" in refused[1] and refused[2] == "1"
    assert ready[0] == 200


def _listening(port: int) -> bool:
    try:
        _get_with_headers(f"http://127.0.0.1:{port}/healthz")
    except OSError:
        return False
    return True


def test_frame_size_idle_and_session_length_limits(
    scripted: ScriptedWhisper, other_speech: Utterance
) -> None:
    settings = settings_with(
        limits={"max_frame_bytes": 4096, "idle_timeout_s": 1.0, "max_session_s": 2.0}
    )
    pcm, rate = read_pcm(other_speech.path)
    with serving(scripted, settings) as live:

        async def oversized() -> list[dict[str, Any]]:
            async with websockets.connect(f"{live.url}/v1/stream") as ws:
                await ws.send(b"\x00" * 8192)
                await ws.send(json.dumps({"type": "stop"}))
                return [json.loads(m) async for m in ws]

        async def idle() -> tuple[list[dict[str, Any]], int | None]:
            async with websockets.connect(f"{live.url}/v1/stream") as ws:
                messages = []
                try:
                    async for m in ws:
                        messages.append(json.loads(m))
                except websockets.ConnectionClosedError:
                    pass
                return messages, ws.close_code

        async def too_long() -> Transcript:
            async def chunks() -> AsyncIterator[bytes]:
                for offset in range(0, len(pcm), 2048):
                    yield pcm[offset : offset + 2048].tobytes()

            return await run_session(  # the server ends it: no reconnection here
                stream_url(f"{live.url}/v1/stream", sample_rate=rate), chunks(), reconnect=None
            )

        messages = asyncio.run(oversized())
        idle_messages, idle_code = asyncio.run(idle())
        long_transcript = asyncio.run(too_long())
    limit = next(m for m in messages if m["type"] == "error")
    assert limit["code"] == "limit" and "max_frame_bytes" in limit["message"]
    assert messages[-1]["type"] == "done"
    assert idle_messages[-1]["code"] == "limit" and "idle_timeout_s" in idle_messages[-1]["message"]
    assert idle_code == 4408
    errors = long_transcript.of_type("error")
    assert errors and "max_session_s" in errors[0]["message"]
    done = long_transcript.of_type("done")[0]
    assert done["audio_seconds"] <= 2.2  # audio past the limit is not transcribed
    check_invariants(long_transcript.messages)


def test_metrics_report_sessions_audio_steps_and_errors(
    scripted_url: str, other_speech: Utterance
) -> None:
    async def run() -> None:
        await stream_file(other_speech.path, f"{scripted_url}/v1/stream", speed=0)
        async with websockets.connect(f"{scripted_url}/v1/stream") as ws:
            await ws.send("{broken")
            await ws.send(json.dumps({"type": "stop"}))
            async for _ in ws:
                pass

    asyncio.run(run())
    deadline = time.monotonic() + 5
    while True:  # the server frees a session just after its close handshake
        status, text = _get(scripted_url.replace("ws://", "http://") + "/metrics")
        if "whisperstream_active_sessions 0.0" in text or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["whisperstream_active_sessions"] == 0
    assert values["whisperstream_audio_seconds_total"] >= other_speech.duration_s - 0.1
    steps = [values.get(f'whisperstream_steps_total{{kind="{k}"}}', 0) for k in KINDS]
    assert sum(steps) >= 1 and values["whisperstream_finals_total"] >= 1
    assert values['whisperstream_errors_total{code="bad_request"}'] >= 1
    assert sum(
        values.get(f'whisperstream_step_latency_seconds_count{{kind="{k}"}}', 0) for k in KINDS
    ) == sum(steps)
    assert "whisperstream_lag_seconds_bucket" in text
    assert _get(scripted_url.replace("ws://", "http://") + "/readyz")[0] == 200


def test_shutdown_finishes_live_sessions_with_their_finals_and_done(
    scripted: ScriptedWhisper, three_sentences: Utterance
) -> None:
    """A session that never says `stop` is finished by the drain: 2 s - min(5, 2 / 2)."""
    pcm, rate = read_pcm(three_sentences.path)
    with serving(scripted, settings_with(limits={"shutdown_timeout_s": 2.0})) as live:

        async def run() -> Transcript:
            sent = asyncio.Event()

            async def chunks() -> AsyncIterator[bytes]:
                # All the audio but no stop: the server is told to shut down meanwhile.
                for offset in range(0, len(pcm), rate // 10):
                    yield pcm[offset : offset + rate // 10].tobytes()
                    await asyncio.sleep(0.02)
                sent.set()
                await asyncio.sleep(60)  # the client would go on; the server ends it

            task = asyncio.create_task(
                run_session(
                    stream_url(f"{live.url}/v1/stream", sample_rate=rate), chunks(), reconnect=None
                )
            )
            await sent.wait()
            live.stop()
            return await asyncio.wait_for(task, 30)

        transcript = asyncio.run(run())
    check_invariants(transcript.messages)
    assert transcript.of_type("done"), transcript.messages[-3:]
    assert transcript.close_code == 1000
    finals = transcript.of_type("final")
    assert scripted_words(transcript.text), transcript.text
    # The last words, heard just before the shutdown, reached a final.
    assert finals[-1]["end"] >= three_sentences.duration_s - 1.5, finals[-1]


@pytest.mark.model
def test_sigterm_stops_the_command_cleanly_after_finishing_sessions(
    other_speech: Utterance,
) -> None:
    """SIGTERM drains; a second one finishes the live sessions at once (with the default
    10 s timeout the session would have run on for 5 s)."""
    pcm, rate = read_pcm(other_speech.path)
    with serve_command() as server:

        async def run() -> tuple[Transcript, float]:
            signalled: list[float] = []

            async def chunks() -> AsyncIterator[bytes]:
                for offset in range(0, len(pcm), rate // 10):
                    yield pcm[offset : offset + rate // 10].tobytes()
                    await asyncio.sleep(0.01)
                server.process.send_signal(signal.SIGTERM)
                signalled.append(time.monotonic())
                await asyncio.sleep(0.5)
                server.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(60)

            transcript = await asyncio.wait_for(
                run_session(stream_url(server.url, sample_rate=rate), chunks(), reconnect=None), 60
            )
            return transcript, time.monotonic() - signalled[0]

        transcript, took_s = asyncio.run(run())
        assert server.process.wait(30) == 0
        output = server.output()
    assert transcript.of_type("done") and transcript.close_code == 1000
    assert wer(other_speech.text, transcript.text) <= 0.10
    assert took_s < 3.0, f"the second SIGTERM did not hurry the drain: {took_s:.1f} s"
    assert "second signal: finishing the live sessions now" in output
    assert "drained: every session has ended" in output


def test_a_drain_stops_readiness_at_once_admits_for_the_grace_then_refuses_while_live_sessions_run_on(  # noqa: E501
    scripted: ScriptedWhisper, other_speech: Utterance
) -> None:
    """SIGTERM as Kubernetes sends it (`live.stop()` is the server's SIGTERM handler):
    /readyz 503 at once, /healthz still 200; sessions admitted for `drain_grace_s`;
    then 503 with Retry-After; a live session streams on and ends as it likes, with its
    finals and `done`; one that never ends is finished near `shutdown_timeout_s`."""
    pcm, rate = read_pcm(other_speech.path)
    half = len(pcm) // 2 // (rate // 10) * (rate // 10)
    settings = settings_with(limits={"drain_grace_s": 1.0, "shutdown_timeout_s": 6.0})
    with serving(scripted, settings) as live:
        stream = stream_url(f"{live.url}/v1/stream", sample_rate=rate)
        readyz, healthz = f"{live.http_url}/readyz", f"{live.http_url}/healthz"

        def frames(audio: np.ndarray) -> list[bytes]:
            step = rate // 10
            return [audio[i : i + step].tobytes() for i in range(0, len(audio), step)]

        async def run() -> dict[str, Any]:
            loop = asyncio.get_running_loop()
            draining = asyncio.Event()
            got: dict[str, Any] = {}

            async def on_after_the_grace() -> AsyncIterator[bytes]:
                for frame in frames(pcm[:half]):
                    yield frame
                await draining.wait()
                await asyncio.sleep(2.0)  # past the grace: the drain refuses others now
                for frame in frames(pcm[half:]):
                    yield frame
                    await asyncio.sleep(0.01)
                got["live_stopped_at"] = loop.time()

            async def never_stops() -> AsyncIterator[bytes]:
                for frame in frames(pcm):
                    yield frame
                await asyncio.sleep(60)  # the drain finishes it

            async def whole() -> AsyncIterator[bytes]:
                for frame in frames(pcm):
                    yield frame

            running_on = asyncio.create_task(run_session(stream, on_after_the_grace()))
            endless = asyncio.create_task(run_session(stream, never_stops(), reconnect=None))
            _wait = asyncio.to_thread
            await _wait(_wait_for, lambda: live.app.active_sessions == 2)
            live.stop()
            began = loop.time()
            await _wait(_wait_for, lambda: _get(readyz)[0] == 503, 1.0)
            got["unready_after_s"] = loop.time() - began
            draining.set()
            got["readyz"], got["healthz"] = await _wait(_get, readyz), await _wait(_get, healthz)
            got["in_grace"] = await run_session(stream, whole())
            await asyncio.sleep(max(0.0, began + 1.3 - loop.time()))
            got["refused"] = await _refusal(stream)
            got["running_on"], got["endless"] = await asyncio.wait_for(
                asyncio.gather(running_on, endless), 15
            )
            got["endless_done_after_s"] = loop.time() - began
            return got

        got = asyncio.run(run())
    assert got["unready_after_s"] < 0.5
    assert got["readyz"][0] == 503 and got["readyz"][1].startswith("not ready: draining")
    assert got["healthz"] == (200, "ok\n")
    for name in ("in_grace", "running_on", "endless"):
        transcript = got[name]
        check_invariants(transcript.messages)
        assert transcript.of_type("done") and transcript.close_code == 1000, name
        assert scripted_words(transcript.text), (name, transcript.text)
    status, body, retry_after = got["refused"]
    assert status == 503 and "shutting down" in body and retry_after == "1"
    # The session that streamed on after the grace got the finals of that audio too.
    assert got["running_on"].of_type("done")[0]["audio_seconds"] >= other_speech.duration_s - 0.2
    assert got["running_on"].text == got["in_grace"].text
    # The endless one was finished near the end: 6 s - min(5, 6 / 2) after the grace.
    assert 3.5 <= got["endless_done_after_s"] <= 6.5, got["endless_done_after_s"]


def _continuous(transcript: Transcript) -> list[dict[str, Any]]:
    """The finals of every connection: numbered 0, 1, 2, ... and in time order."""
    finals = transcript.of_type("final")
    assert [f["segment"] for f in finals] == list(range(len(finals))), finals
    starts = [f["start"] for f in finals]
    assert starts == sorted(starts), starts
    for earlier, later in itertools.pairwise(finals):
        assert earlier["end"] <= later["start"] + 0.031, (earlier, later)
    return finals


def test_the_client_reconnects_after_a_drop_and_resends_the_audio_since_the_last_final(
    scripted: ScriptedWhisper, three_sentences: Utterance
) -> None:
    """The network drops the connection during the second sentence: the client connects
    again, sends the audio from the end of the first final again with offset_s and
    first_segment, and the finals of both connections are the whole transcript."""
    with serving(scripted) as live:

        async def run() -> tuple[Transcript, Transcript, list[str], int]:
            whole = await stream_file(three_sentences.path, f"{live.url}/v1/stream", speed=0)
            notices: list[str] = []
            async with TcpProxy(int(live.url.rsplit(":", 1)[1])) as proxy:
                loop = asyncio.get_running_loop()

                def on_message(message: dict[str, Any]) -> None:
                    if message["type"] == "final" and message["segment"] == 0:
                        loop.call_later(0.6, proxy.cut)  # in the second sentence

                cut = await stream_file(
                    three_sentences.path,
                    f"{proxy.url}/v1/stream",
                    speed=4.0,
                    on_message=on_message,
                    on_notice=notices.append,
                )
                return whole, cut, notices, proxy.connections

        whole, cut, notices, connections = asyncio.run(run())
    assert cut.complete and cut.connections == 2 == connections
    finals, once = _continuous(cut), _continuous(whole)
    assert len(finals) == len(once)
    for again, first in zip(finals, once, strict=True):
        assert again["start"] == pytest.approx(first["start"], abs=0.1)
        assert abs(len(again["text"].split()) - len(first["text"].split())) <= 1
    assert scripted_words(cut.text)
    ready = cut.of_type("ready")[1]
    assert ready["first_segment"] == 1
    assert ready["offset_s"] == pytest.approx(finals[0]["end"], abs=1e-3)
    (notice,) = notices
    assert "the connection closed (1006" in notice and "reconnecting" in notice
    assert f"again from {finals[0]['end']:.2f} s" in notice or "s of audio from" in notice


def test_a_session_the_server_finishes_early_goes_on_in_a_new_one(
    scripted: ScriptedWhisper, three_sentences: Utterance
) -> None:
    """Each session may take 2 s of audio (limits.max_session_s): the server finishes it
    (its finals, `done`) and the client goes on from `done`'s audio_seconds."""
    with serving(scripted, settings_with(limits={"max_session_s": 2.0})) as live:
        notices: list[str] = []
        transcript = asyncio.run(
            stream_file(
                three_sentences.path, f"{live.url}/v1/stream", speed=0, on_notice=notices.append
            )
        )
    assert transcript.complete
    assert transcript.connections >= three_sentences.duration_s / 2.0
    assert len(notices) == transcript.connections - 1
    assert all("the server ended the session before the end of the audio" in n for n in notices)
    _continuous(transcript)
    dones = transcript.of_type("done")
    assert len(dones) == transcript.connections
    for earlier, later in itertools.pairwise(dones):
        assert later["audio_seconds"] > earlier["audio_seconds"]
        assert later["segments"] >= earlier["segments"]
    assert dones[-1]["audio_seconds"] == pytest.approx(three_sentences.duration_s, abs=0.05)
    assert dones[-1]["segments"] == len(transcript.of_type("final"))
    assert not [e for e in transcript.of_type("error") if e["code"] != "limit"]
    assert scripted_words(transcript.text)


def test_the_client_backs_off_and_gives_up_when_the_server_stays_away(
    scripted: ScriptedWhisper, three_sentences: Utterance
) -> None:
    """After the session started, the server's address refuses connections: the client
    tries again after first_delay_s, doubling up to max_delay_s, and gives up with a
    ClientError after give_up_after_s; the finals it had are in what it printed."""
    policy = Reconnect(first_delay_s=0.1, max_delay_s=0.4, give_up_after_s=1.5)
    with serving(scripted) as live:

        async def run() -> tuple[str, list[str], list[dict[str, Any]], float]:
            notices: list[str] = []
            finals: list[dict[str, Any]] = []
            async with TcpProxy(int(live.url.rsplit(":", 1)[1])) as proxy:

                def on_message(message: dict[str, Any]) -> None:
                    if message["type"] == "final":
                        finals.append(message)
                        proxy.go_away()

                began = time.monotonic()
                try:
                    await stream_file(
                        three_sentences.path,
                        f"{proxy.url}/v1/stream",
                        speed=4.0,
                        on_message=on_message,
                        on_notice=notices.append,
                        reconnect=policy,
                    )
                except ClientError as exc:
                    return str(exc), notices, finals, time.monotonic() - began
            raise AssertionError("the client did not give up")

        error, notices, finals, took_s = asyncio.run(run())
    assert "cannot connect" in error and "gave up after" in error, error
    assert len(finals) == 1
    waits = [float(m.group(1)) for n in notices if (m := re.search(r"in ([\d.]+) s", n))]
    assert waits[:4] == [0.1, 0.2, 0.4, 0.4], notices
    assert took_s < 10, took_s
