"""Hostile clients (issue 18): one client must never take the server from everyone else.

The middle layer: a real server on a free loopback port with the scripted engine, attacked
over real sockets, each attack bounded in count and time. What is asserted is what a user
would check: the attacker gets the documented answer (status, close code, message), the
server keeps answering `/healthz` within a second, a good session beside the attack gets
its transcript, new sessions are still admitted, and memory stays bounded."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psutil
import pytest
import websockets
from fakes import ScriptedWhisper, scripted_words
from harness import LiveServer, serving, settings_with
from speech import Utterance

from client.stream import Transcript, stream_file
from server.websocket import WebSocketOutlet

T = TypeVar("T")
KEY = "hostile-test-key"
PING, BINARY, CLOSE = 0x9, 0x2, 0x8


# Raw WebSocket and HTTP from a plain socket ------------------------------------------


def _port(live: LiveServer) -> int:
    return int(live.url.rsplit(":", 1)[1])


def _frame(opcode: int, payload: bytes, *, rsv1: bool = False) -> bytes:
    """One masked client frame (FIN set)."""
    mask = os.urandom(4)
    head = bytes([0x80 | (0x40 if rsv1 else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (unmasked) frames the server sent, as (opcode, payload); a cut-off tail is left."""
    frames, i = [], 0
    while i + 2 <= len(data):
        opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = struct.unpack("!H", data[i : i + 2])[0], i + 2
        elif n == 127:
            n, i = struct.unpack("!Q", data[i : i + 8])[0], i + 8
        if i + n > len(data):
            break
        frames.append((opcode, data[i : i + n]))
        i += n
    return frames


def _close_of(frames: list[tuple[int, bytes]]) -> tuple[int, str] | None:
    for opcode, payload in frames:
        if opcode == CLOSE and len(payload) >= 2:
            return struct.unpack("!H", payload[:2])[0], payload[2:].decode()
    return None


def _read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _upgrade(
    port: int, *, host: str | None = None, headers: tuple[str, ...] = (), rcvbuf: int | None = None
) -> tuple[socket.socket, bytes, bytes]:
    """A WebSocket handshake by hand: (socket, the response head, bytes already after it)."""
    sock = socket.socket()
    if rcvbuf is not None:  # fixed and small: no autotuning, the client's window stays shut
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /v1/stream HTTP/1.1",
        f"Host: {host or f'127.0.0.1:{port}'}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed during the handshake: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return sock, head, rest


def _http(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes as a request; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return _read_until_closed(sock, timeout)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _body(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


def _get(
    port: int, path: str, *headers: str, method: str = "GET", host: str | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", *headers]
    return _http(port, ("\r\n".join(lines) + "\r\n\r\n").encode())


async def _handshake_status(url: str, **kwargs: Any) -> tuple[int, str]:
    """(101, "") for an admitted session, else the refusal's (status, body)."""
    try:
        async with websockets.connect(url, **kwargs):
            return 101, ""
    except websockets.InvalidStatus as exc:
        return exc.response.status_code, exc.response.body.decode()


def _admitted(live: LiveServer) -> bool:
    return asyncio.run(_handshake_status(f"{live.url}/v1/stream"))[0] == 101


def _wait_for(condition: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until `condition` held, or None if it did not within `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    return None


# Watching the server while it is attacked --------------------------------------------


@dataclass
class Watch:
    """`/healthz` latency every 0.1 s and the process's RSS (the server runs in this
    process, in the harness's thread), from before the attack to its end."""

    http_url: str
    latencies: list[float] = field(default_factory=list)
    rss_start: int = 0
    rss_max: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def worst_s(self) -> float:
        return max(self.latencies)

    @property
    def rss_growth_mb(self) -> float:
        return (self.rss_max - self.rss_start) / 1e6

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(f"{self.http_url}/healthz", timeout=5) as r:
                    ok = r.status == 200
            except OSError:
                ok = False
            self.latencies.append(time.monotonic() - started if ok else float("inf"))
            self.rss_max = max(self.rss_max, process.memory_info().rss)
            self._stop.wait(0.1)

    @contextlib.contextmanager
    def running(self) -> Iterator[Watch]:
        self.rss_start = self.rss_max = psutil.Process().memory_info().rss
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(10)


def _beside(
    live: LiveServer, attack: Callable[[], T], speech: Utterance, speed: float = 2.0
) -> tuple[T, Watch, Transcript]:
    """Run `attack` while a good session streams `speech`, watching the server."""
    url = f"{live.url}/v1/stream"
    with Watch(live.http_url).running() as watch, ThreadPoolExecutor(2) as pool:
        good = pool.submit(lambda: asyncio.run(stream_file(speech.path, url, speed=speed)))
        time.sleep(0.3)  # the good session is under way when the attack starts
        result = pool.submit(attack).result(timeout=120)
        transcript = good.result(timeout=120)
    return result, watch, transcript


def _good(transcript: Transcript) -> bool:
    return (
        transcript.close_code == 1000
        and transcript.messages[-1]["type"] == "done"
        and scripted_words(transcript.text)
    )


# Finding 2: compression ----------------------------------------------------------------


def test_a_client_offering_deflate_gets_no_compression(scripted: ScriptedWhisper) -> None:
    with serving(scripted) as live:

        async def offer() -> tuple[str | None, list[Any]]:
            async with websockets.connect(f"{live.url}/v1/stream", compression="deflate") as ws:
                assert ws.response is not None
                return ws.response.headers.get("Sec-WebSocket-Extensions"), ws.protocol.extensions

        header, extensions = asyncio.run(offer())
    assert header is None and extensions == []


def _deflated_zeros(size: int) -> bytes:
    """A permessage-deflate payload that inflates to `size` zero bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = compressor.compress(bytes(size)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]  # RFC 7692: the 00 00 ff ff tail is left off


def test_a_deflate_bomb_is_refused_and_the_server_stays_responsive(
    scripted: ScriptedWhisper, other_speech: Utterance
) -> None:
    """200 compressed frames of 1 MiB of zeros (about 1 KB each on the wire), sent at once:
    issue 18 saw /healthz take 8-14 s and a good session beside lose its transcript."""
    bomb = _frame(BINARY, _deflated_zeros(1 << 20), rsv1=True)
    with serving(scripted) as live:

        def attack() -> tuple[bytes, tuple[int, str] | None]:
            sock, head, rest = _upgrade(
                _port(live),
                headers=("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",),
            )
            with sock:
                with contextlib.suppress(OSError):  # the server may close before the end
                    sock.sendall(bomb * 200)
                return head, _close_of(_server_frames(rest + _read_until_closed(sock)))

        (head, close), watch, good = _beside(live, attack, other_speech)
        admitted = _admitted(live)
    assert len(bomb) < 2000
    assert b" 101 " in head and b"permessage-deflate" not in head.lower()
    assert close == (1002, "reserved bits must be 0")
    assert watch.worst_s < 1.0, f"/healthz took {watch.worst_s:.2f} s during the attack"
    assert _good(good), good.messages[-3:]
    assert admitted


# Finding 3: a client that does not read --------------------------------------------


def _ping_flood(port: int, seconds: float) -> tuple[int, int]:
    """For `seconds`, open sessions that send pings as fast as they can and never read;
    reconnect whenever the server drops one. Returns (connections, dropped by the server)."""
    batch = _frame(PING, b"p" * 125) * 2000  # 262 KB of pings, as many pongs
    deadline = time.monotonic() + seconds
    connections = dropped = 0
    while time.monotonic() < deadline:
        sock, _, _ = _upgrade(port, rcvbuf=4096)
        connections += 1
        sock.settimeout(5)
        try:
            while time.monotonic() < deadline:
                sock.sendall(batch)
        except TimeoutError:
            pass  # the server stopped reading: not dropped (yet)
        except OSError:
            dropped += 1
        finally:
            sock.close()
    return connections, dropped


def test_a_client_that_pings_and_never_reads_is_dropped_and_memory_stays_bounded(
    other_speech: Utterance,
) -> None:
    """Issue 18: pongs piled up without flow control, RSS 291 -> 1,141 MB in 70 s."""
    with serving(ScriptedWhisper()) as live:
        (connections, dropped), watch, good = _beside(
            live, lambda: _ping_flood(_port(live), 10.0), other_speech, speed=1.0
        )
        freed = _wait_for(lambda: live.app.active_sessions == 0, 10)
        admitted = _admitted(live)
    assert dropped >= 1 and dropped >= connections - 1, (connections, dropped)
    assert watch.rss_growth_mb < 100, f"RSS grew {watch.rss_growth_mb:.0f} MB"
    assert watch.worst_s < 1.0, f"/healthz took {watch.worst_s:.2f} s during the attack"
    assert _good(good), good.messages[-3:]
    assert freed is not None and admitted


def test_keepalive_that_cannot_be_answered_closes_the_connection(
    scripted: ScriptedWhisper,
) -> None:
    """A client that opens a session, then neither reads nor sends: the server's ping is
    never answered, and the connection is closed (1011) long before the idle timeout."""
    settings = settings_with(limits={"keepalive_s": 1.0, "idle_timeout_s": 60.0})
    with serving(scripted, settings) as live:
        sock, _, rest = _upgrade(_port(live), rcvbuf=4096)
        with sock:
            freed = _wait_for(lambda: live.app.active_sessions == 0, 15)
            close = _close_of(_server_frames(rest + _read_until_closed(sock)))
        admitted = _admitted(live)
    assert freed is not None and freed < 6, freed
    assert close == (1011, "keepalive ping timeout")
    assert admitted


def test_a_client_whose_unread_output_stays_above_the_write_limit_is_dropped(
    scripted: ScriptedWhisper, caplog: pytest.LogCaptureFixture
) -> None:
    """Pings until the server's pongs no longer fit in the socket buffers and its own
    buffer holds more than the write limit, then nothing, never reading: websockets'
    keepalive ping would wait behind the unsent pongs forever (issue 18); the connection
    is dropped after the keepalive time instead."""
    caplog.set_level(logging.INFO)
    settings = settings_with(limits={"keepalive_s": 1.0, "idle_timeout_s": 60.0})
    burst = _frame(PING, b"p" * 125) * 100  # 13 KB of pings
    with serving(scripted, settings) as live:
        sock, _, _ = _upgrade(_port(live), rcvbuf=4096)
        with sock:
            _wait_for(lambda: bool(live.app.host.drivers), 5)
            outlet = live.app.host.drivers[0].outlet
            assert isinstance(outlet, WebSocketOutlet)
            server_side = outlet.ws.transport
            sent = 0
            # 64 KiB unsent: above the write limit (32 KiB), far below the cap (1 MiB)
            while server_side.get_write_buffer_size() < 65536 and sent < 64_000_000:
                sock.sendall(burst)
                sent += len(burst)
                time.sleep(0.001)
            freed = _wait_for(lambda: live.app.active_sessions == 0, 15)
        admitted = _admitted(live)
    assert sent < 64_000_000
    assert freed is not None and freed < 4, freed
    assert any("output not taken for 1 s" in r.getMessage() for r in caplog.records)
    assert admitted


# Finding 5: forwarded client addresses --------------------------------------------


def _through_proxy(live: LiveServer, *headers: str) -> tuple[socket.socket, int, bytes]:
    """(socket, status, the refusal's body or b"")"""
    sock, head, rest = _upgrade(_port(live), headers=headers)
    status = _status(head)
    return sock, status, b"" if status == 101 else rest + _read_until_closed(sock, 2)


def test_a_trusted_proxy_forwards_each_clients_address_for_the_limits(
    scripted: ScriptedWhisper, caplog: pytest.LogCaptureFixture
) -> None:
    """The test is the proxy: it connects from 127.0.0.1, which is trusted."""
    caplog.set_level(logging.INFO)
    settings = settings_with(
        server={"trusted_proxies": ["127.0.0.0/8", "10.1.0.0/16"]},
        limits={"max_sessions_per_client": 1},
    )
    with serving(scripted, settings) as live:
        attempts = [
            ("X-Forwarded-For: 203.0.113.7",),
            ("X-Forwarded-For: 203.0.113.8",),
            # a forged left-most entry, then the address a trusted proxy in front added
            ("X-Forwarded-For: 198.51.100.1, 203.0.113.7, 10.1.2.3",),
            ('Forwarded: for="[2001:db8::17]:4711";proto=https',),
            ("Forwarded: for=198.51.100.9, for=203.0.113.8",),
        ]
        opened = [_through_proxy(live, *headers) for headers in attempts]
        statuses = [status for _, status, _ in opened]
        refusals = [body for _, status, body in opened if status != 101]
        for sock, _, _ in opened:
            sock.close()
    assert statuses == [101, 101, 429, 101, 429]
    assert b"too many sessions from 203.0.113.7 " in refusals[0]
    assert b"too many sessions from 203.0.113.8 " in refusals[1]
    opened_from = [r.getMessage() for r in caplog.records if ": opened from " in r.getMessage()]
    assert [line.split(" from ")[1].split(" ")[0] for line in opened_from] == [
        "203.0.113.7",
        "203.0.113.8",
        "2001:db8::17",
    ]


def test_an_untrusted_peer_cannot_choose_its_address(scripted: ScriptedWhisper) -> None:
    settings = settings_with(
        server={"trusted_proxies": ["10.0.0.0/8"]}, limits={"max_sessions_per_client": 1}
    )
    with serving(scripted, settings) as live:
        first, status1, _ = _through_proxy(live, "X-Forwarded-For: 203.0.113.7")
        second, status2, refusal = _through_proxy(
            live, "X-Forwarded-For: 203.0.113.8", "Forwarded: for=203.0.113.9"
        )
        first.close()
        second.close()
    assert (status1, status2) == (101, 429)
    assert b"too many sessions from 127.0.0.1 " in refusal


# Finding 6: DNS rebinding --------------------------------------------------------


async def _as_host(port: int, host: str, **kwargs: Any) -> tuple[int, str]:
    """A handshake to the server on 127.0.0.1 whose Host header names `host`, as a browser
    sends it after a DNS name was rebound to 127.0.0.1."""
    sock = socket.create_connection(("127.0.0.1", port))
    return await _handshake_status(f"ws://{host}/v1/stream", sock=sock, **kwargs)


def test_host_names_other_than_loopback_are_refused_without_keys(
    scripted: ScriptedWhisper,
) -> None:
    settings = settings_with(server={"allowed_hosts": ["captions.lan"]})
    with serving(scripted, settings) as live:
        port = _port(live)

        async def handshakes() -> list[tuple[int, str]]:
            return list(
                await asyncio.gather(
                    _as_host(port, f"evil.example:{port}", origin=f"http://evil.example:{port}"),
                    _as_host(port, f"evil.example:{port}"),
                    _as_host(port, f"localhost:{port}"),
                    _as_host(port, f"[::1]:{port}"),
                    _as_host(port, f"127.0.0.2:{port}"),
                    _as_host(port, f"captions.lan:{port}", origin=f"http://captions.lan:{port}"),
                    _as_host(port, f"127.0.0.1:{port}", origin=f"http://evil.example:{port}"),
                )
            )

        results = asyncio.run(handshakes())
        page = _get(port, "/", host=f"evil.example:{port}")
        metrics = _get(port, "/metrics", host=f"evil.example:{port}")
        health = _get(port, "/healthz", host=f"evil.example:{port}")
        own_page = _get(port, "/")
    assert [status for status, _ in results] == [421, 421, 101, 101, 101, 101, 403]
    assert results[0][1] == (
        "this server does not answer to the host name evil.example (server.allowed_hosts)\n"
    )
    assert (_status(page), _status(metrics), _status(health), _status(own_page)) == (
        421,
        421,
        200,
        200,
    )


def test_with_keys_any_host_name_may_connect_with_the_key(scripted: ScriptedWhisper) -> None:
    with serving(scripted, settings_with(auth={"api_keys": [KEY]})) as live:
        port = _port(live)
        statuses = asyncio.run(
            _as_host(
                port,
                f"captions.example.org:{port}",
                additional_headers={"Authorization": f"Bearer {KEY}"},
            )
        )
    assert statuses == (101, "")


# Finding 7: HTTP requests that are not ours to answer ----------------------------


@pytest.mark.parametrize(
    ("request_head", "reason"),
    [
        (b"GET /he\x00althz HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"control character"),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"2048 characters"),
        (
            b"GET /v1/stream?" + b"a" * 3000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n",
            b"2048 characters",
        ),
        (b"GET //[ HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"malformed"),
        (
            b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer a\r\n"
            b"Authorization: Bearer b\r\n",
            b"more than one Authorization header",
        ),
        (
            b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil\r\nOrigin: http://evil\r\n",
            b"more than one Host header",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://a\r\nOrigin: http://b\r\n",
            b"more than one Origin header",
        ),
    ],
    ids=[
        "nul",
        "long-path",
        "long-query",
        "malformed",
        "two-authorization",
        "two-host",
        "two-origin",
    ],
)
def test_bad_requests_get_400_with_a_reason_and_no_traceback(
    scripted_url: str, caplog: pytest.LogCaptureFixture, request_head: bytes, reason: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    port = int(scripted_url.rsplit(":", 1)[1])
    answer = _http(
        port,
        request_head + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
    )
    assert _status(answer) == 400 and reason in _body(answer), answer
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


def test_wrong_methods_get_405_and_head_no_body(
    scripted_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = int(scripted_url.rsplit(":", 1)[1])
    post = _get(port, "/healthz", "Content-Length: 0", method="POST")
    delete = _get(port, "/v1/stream", method="DELETE")
    head = _get(port, "/healthz", method="HEAD")
    head_page = _get(port, "/", method="HEAD")
    head_stream = _get(port, "/v1/stream", method="HEAD")
    assert (_status(post), _status(delete)) == (405, 405)
    assert b"\r\nAllow: GET, HEAD\r\n" in post and b"POST" in _body(post)
    assert _status(head) == 200 and _body(head) == b"" and b"Content-Length: 3\r\n" in head
    assert _status(head_page) == 200 and _body(head_page) == b""
    assert _status(head_stream) == 405 and b"\r\nAllow: GET\r\n" in head_stream
    assert _body(head_stream) == b""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


def test_pipelined_requests_get_one_answer_and_a_clean_close(
    scripted_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = int(scripted_url.rsplit(":", 1)[1])
    answers = [
        _http(
            port,
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        for _ in range(20)
    ]
    assert all(
        a.count(b"HTTP/1.1 ") == 1 and _status(a) == 200 and _body(a) == b"ok\n" for a in answers
    ), answers
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


# Finding 8: metrics and secrets in logs ------------------------------------------


def test_metrics_need_the_key_when_keys_are_configured(scripted: ScriptedWhisper) -> None:
    with serving(scripted, settings_with(auth={"api_keys": [KEY]})) as live:
        port = _port(live)
        anonymous = _get(port, "/metrics")
        wrong = _get(port, "/metrics", "Authorization: Bearer nope")
        prometheus = _get(port, "/metrics", f"Authorization: Bearer {KEY}")
    public = settings_with(auth={"api_keys": [KEY]}, server={"metrics_public": True})
    with serving(ScriptedWhisper(), public) as live:
        open_metrics = _get(_port(live), "/metrics")
    assert (_status(anonymous), _status(wrong)) == (401, 401)
    assert b"WWW-Authenticate: Bearer" in anonymous and b"server.metrics_public" in anonymous
    assert b"whisperstream_active_sessions" not in anonymous
    assert _status(prometheus) == 200 and b"whisperstream_active_sessions" in prometheus
    assert _status(open_metrics) == 200 and b"whisperstream_active_sessions" in open_metrics


def test_keys_in_encoded_query_names_and_other_auth_headers_are_never_logged(
    scripted: ScriptedWhisper, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with serving(scripted, settings_with(auth={"api_keys": [KEY]})) as live:
        url = f"{live.url}/v1/stream"
        statuses = [
            asyncio.run(_handshake_status(f"{url}?tok%65n={KEY}"))[0],
            asyncio.run(_handshake_status(f"{url}?%74oken={KEY}&x=1"))[0],
            asyncio.run(
                _handshake_status(
                    url,
                    additional_headers={
                        "X-Api-Key": KEY,
                        "Cookie": f"key={KEY}",
                        "Proxy-Authorization": KEY,
                        "Authorization": f"Basic {KEY}",
                    },
                )
            )[0],
        ]
    assert statuses == [101, 101, 401]
    server_records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    assert any("tok%65n=[redacted]" in r.getMessage() for r in server_records)
    assert server_records and not [r for r in server_records if KEY in r.getMessage()]


# Finding 9: the 404 page ---------------------------------------------------------


def test_the_404_page_does_not_echo_the_path(scripted_url: str) -> None:
    port = int(scripted_url.rsplit(":", 1)[1])
    answer = _get(port, "/%3Cscript%3Ealert(1)%3C/script%3E<b>")
    assert _status(answer) == 404 and _body(answer) == b"no such page\n"
