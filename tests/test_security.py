"""Trust: keys, origins, TLS, hostile input and faults, against a real server.

The middle layer: the real server on a free port with the scripted engine, except the
last test, which runs `whisperstream serve` on the real model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from fakes import ScriptedWhisper, scripted_words
from harness import check_invariants, serve_command, serving, settings_with
from speech import Utterance, read_pcm, wer

from client.stream import ClientError, Transcript, run_session, stream_file, stream_url
from streaming.engine import DecodeRequest

KEY = "s3cret-key-for-tests"


async def _statuses(*attempts: tuple[str, dict[str, Any]]) -> list[int]:
    return list(await asyncio.gather(*(_handshake_status(url, **kw) for url, kw in attempts)))


async def _handshake_status(url: str, **kwargs: Any) -> int:
    try:
        async with websockets.connect(url, **kwargs):
            return 101
    except websockets.InvalidStatus as exc:
        return int(exc.response.status_code)


def test_keys_are_required_checked_and_never_logged(
    scripted: ScriptedWhisper, other_speech: Utterance, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with serving(scripted, settings_with(auth={"api_keys": [KEY, "other"]})) as live:
        url = f"{live.url}/v1/stream"
        statuses = asyncio.run(
            _statuses(
                (url, {}),
                (url + "?token=wrong", {}),
                (url, {"additional_headers": {"Authorization": "Bearer wrong"}}),
                (url + f"?token={KEY}", {}),
            )
        )
        with_header = asyncio.run(stream_file(other_speech.path, url, speed=0, api_key=KEY))
    assert statuses == [401, 401, 401, 101]
    assert scripted_words(with_header.text)
    server_records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    assert server_records and not [r for r in server_records if KEY in r.getMessage()]


def test_foreign_browser_origins_are_refused_and_the_own_page_allowed(
    scripted: ScriptedWhisper,
) -> None:
    settings = settings_with(auth={"allowed_origins": ["https://captions.example.org"]})
    with serving(scripted, settings) as live:
        url = f"{live.url}/v1/stream"
        own = live.http_url
        statuses = asyncio.run(
            _statuses(
                (url, {"origin": "https://evil.example.com"}),
                (url, {"origin": own}),
                (url, {"origin": "https://captions.example.org"}),
                (url, {}),
            )
        )
    assert statuses == [403, 101, 101, 101]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_serves_wss_and_https(
    scripted: ScriptedWhisper, other_speech: Utterance, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    with serving(scripted, settings_with(server={"tls_cert": cert, "tls_key": key})) as live:
        wss = live.url.replace("ws://", "wss://")
        transcript = asyncio.run(
            stream_file(other_speech.path, f"{wss}/v1/stream", speed=0, cafile=cert)
        )
        context = ssl.create_default_context(cafile=cert)
        https = live.http_url.replace("http://", "https://")
        with urllib.request.urlopen(f"{https}/healthz", context=context, timeout=5) as r:
            status = r.status
        with pytest.raises(ClientError):  # a client that does not trust the certificate
            asyncio.run(stream_file(other_speech.path, f"{wss}/v1/stream", speed=0))
    assert status == 200
    assert scripted_words(transcript.text)


def test_text_floods_and_oversized_text_end_the_session(scripted: ScriptedWhisper) -> None:
    settings = settings_with(limits={"max_bad_messages": 20, "max_text_bytes": 1024})
    with serving(scripted, settings) as live:

        async def flood() -> tuple[list[dict[str, Any]], int | None]:
            messages = []
            async with websockets.connect(f"{live.url}/v1/stream") as ws:
                await ws.send(json.dumps({"type": "flush", "pad": "x" * 4096}))
                with contextlib.suppress(websockets.ConnectionClosed):
                    for _ in range(200):
                        await ws.send("{nope")
                with contextlib.suppress(websockets.ConnectionClosedError):
                    async for raw in ws:
                        messages.append(json.loads(raw))
                return messages, ws.close_code

        messages, code = asyncio.run(flood())
        still_serving = asyncio.run(_handshake_status(f"{live.url}/v1/stream"))
    errors = [m for m in messages if m["type"] == "error"]
    assert errors[0]["code"] == "limit" and "max_text_bytes" in errors[0]["message"]
    assert "max_bad_messages" in errors[-1]["message"]
    assert code == 4400
    assert still_serving == 101


def test_non_finite_floats_and_absurd_rates_get_clear_errors(scripted_url: str) -> None:
    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        url = stream_url(f"{scripted_url}/v1/stream", encoding="f32le")
        frames = [
            np.array([0.1, np.nan, 0.2], "<f4").tobytes(),
            np.array([np.inf] * 4, "<f4").tobytes(),
            np.array([5.0, -7.0] * 800, "<f4").tobytes(),
        ]

        async def chunks() -> AsyncIterator[bytes]:
            for frame in frames:
                yield frame

        floats = await run_session(url, chunks())
        absurd = await run_session(
            stream_url(f"{scripted_url}/v1/stream", sample_rate=10**12), _nothing()
        )
        return floats.messages, absurd.messages

    floats, absurd = asyncio.run(run())
    errors = [m for m in floats if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["bad_audio", "bad_audio"]
    assert "NaN or infinite" in errors[0]["message"]
    assert floats[-1]["type"] == "done"  # the clipped, finite frame was taken
    assert absurd[0]["code"] == "bad_request" and "8000 to 48000" in absurd[0]["message"]


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


def test_a_client_that_never_reads_is_closed_and_freed(scripted: ScriptedWhisper) -> None:
    settings = settings_with(limits={"max_outbound_messages": 16, "max_bad_messages": 10**6})
    with serving(scripted, settings) as live:

        async def never_read() -> bool:
            port = int(live.url.rsplit(":", 1)[1])
            sock = socket.socket()
            # A small fixed receive buffer (no autotuning) and max_queue=1: the client
            # stops reading at once, so the server's socket buffer fills quickly.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            async with websockets.connect(f"{live.url}/v1/stream", sock=sock, max_queue=1) as ws:
                deadline = time.monotonic() + 60
                with contextlib.suppress(websockets.ConnectionClosed):
                    # Each bad message is answered with an error that nobody reads.
                    while live.app.active_sessions and time.monotonic() < deadline:
                        for _ in range(1000):
                            await ws.send("{")
                        await asyncio.sleep(0.05)
                return live.app.active_sessions == 0

        freed = asyncio.run(never_read())
    assert freed, "the session of a client that never reads was not closed"


def test_a_handshake_that_never_completes_is_dropped(scripted: ScriptedWhisper) -> None:
    with serving(scripted, settings_with(limits={"handshake_timeout_s": 1.0})) as live:
        port = int(live.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            started = time.monotonic()
            closed = sock.recv(1024)
            waited = time.monotonic() - started
    assert waited < 5
    assert closed == b"" or b"HTTP/1.1" in closed


def test_many_sessions_from_one_address_are_refused_with_429(scripted: ScriptedWhisper) -> None:
    with serving(scripted, settings_with(limits={"max_sessions_per_client": 2})) as live:

        async def run() -> int:
            url = f"{live.url}/v1/stream"
            async with websockets.connect(url), websockets.connect(url):
                return await _handshake_status(url)

        assert asyncio.run(run()) == 429


def test_a_client_that_vanishes_mid_utterance_is_freed(
    scripted: ScriptedWhisper, three_sentences: Utterance
) -> None:
    pcm, rate = read_pcm(three_sentences.path)
    with serving(scripted) as live:

        async def vanish() -> None:
            ws = await websockets.connect(stream_url(f"{live.url}/v1/stream", sample_rate=rate))
            for offset in range(0, rate * 3, rate // 10):
                await ws.send(pcm[offset : offset + rate // 10].tobytes())
            ws.transport.abort()  # no close handshake, no stop: gone

        asyncio.run(vanish())
        deadline = time.monotonic() + 10
        while live.app.active_sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        assert live.app.active_sessions == 0


def _loud(request: DecodeRequest) -> bool:
    """Windows of heavily clipped audio make the scripted engine fail."""
    return float(np.sqrt(np.mean(np.square(request.audio)))) > 0.4


def test_an_engine_error_ends_only_its_own_session(other_speech: Utterance) -> None:
    pcm, rate = read_pcm(other_speech.path)
    loud = np.clip(pcm.astype(np.int32) * 40, -32768, 32767).astype("<i2")
    with serving(ScriptedWhisper(fail_if=_loud)) as live:

        async def both() -> tuple[Transcript, Transcript]:
            async def chunks(audio: np.ndarray) -> AsyncIterator[bytes]:
                for offset in range(0, len(audio), rate // 10):
                    yield audio[offset : offset + rate // 10].tobytes()
                    await asyncio.sleep(0.02)

            url = stream_url(f"{live.url}/v1/stream", sample_rate=rate)
            bad, good = await asyncio.gather(
                run_session(url, chunks(loud), reconnect=None), run_session(url, chunks(pcm))
            )
            return bad, good

        bad, good = asyncio.run(both())
    assert bad.of_type("error")[0]["code"] == "internal"
    assert bad.close_code == 1011
    check_invariants(good.messages)
    assert not good.of_type("error")
    assert scripted_words(good.text)


@pytest.mark.model
def test_an_unwritable_log_file_does_not_stop_the_server(other_speech: Utterance) -> None:
    with serve_command({"WHISPERSTREAM_SERVER__LOG_FILE": "/nonexistent/dir/x.log"}) as server:
        transcript = asyncio.run(stream_file(other_speech.path, server.url, speed=0))
        output = server.output()
    assert wer(other_speech.text, transcript.text) <= 0.10
    assert "cannot write log file" in output
