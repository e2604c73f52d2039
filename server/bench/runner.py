"""Runs: `whisperstream serve` started on a free loopback port, the files of a manifest
streamed through it at real-time pace, and every message logged with its arrival time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.bench.errors import BenchError
from server.bench.manifest import Item, read_pcm, stream_duration
from server.bench.monitor import ProcessMonitor, model_counters, stop_process
from server.bench.records import StreamRecord
from server.bench.variants import Variant

SERVER_START_TIMEOUT_S = 120.0

__all__ = ["RunResult", "StreamRecord", "stream_all", "stream_one", "stream_runs"]


async def stream_one(
    item: Item,
    url: str,
    speed: float,
    api_key: str | None,
    on_audio: Callable[[float], None],
) -> StreamRecord:
    from client.stream import ClientError, PaceClock, paced_frames, run_session, stream_url

    pcm, rate = read_pcm(item.wav)
    duration = len(pcm) / 2 / rate
    clock = PaceClock()
    full_url = stream_url(url, sample_rate=rate, encoding="pcm_s16le")
    try:
        transcript = await run_session(
            full_url,
            paced_frames(pcm, rate, speed, clock, on_audio),
            api_key=api_key,
            reconnect=None,  # measured as one session: a reconnection would hide a failure
        )
    except ClientError as exc:
        return StreamRecord(item, duration, [], None, str(exc))
    origin = clock.origin
    if origin is None:
        origin = transcript.arrivals[0] if transcript.arrivals else 0.0
    messages = [
        (round(t - origin, 4), m)
        for t, m in zip(transcript.arrivals, transcript.messages, strict=True)
    ]
    error = None
    if transcript.close_code != 1000 or not transcript.of_type("done"):
        error = f"session ended with close code {transcript.close_code} and no 'done'"
    return StreamRecord(item, duration, messages, transcript.close_code, error)


async def stream_all(
    items: list[Item],
    url: str,
    concurrency: int,
    speed: float,
    api_key: str | None,
    on_audio: Callable[[float], None],
    on_done: Callable[[StreamRecord], None],
    stream: Callable[..., Awaitable[StreamRecord]] = stream_one,
) -> list[StreamRecord]:
    """A pool of `concurrency` workers over the files; records in manifest order."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(items)):
        queue.put_nowait(i)
    records: dict[int, StreamRecord] = {}

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            records[i] = await stream(items[i], url, speed, api_key, on_audio)
            on_done(records[i])

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return [records[i] for i in range(len(items))]


ModelKey = tuple[str, str, int, str]  # see model_key_of


@dataclass
class RunResult:
    variant: Variant
    concurrency: int
    records: list[StreamRecord]
    server: dict[str, Any]
    model_key: ModelKey
    model_name: str = ""
    wall_s: float = 0.0


def model_key_of(settings: Any) -> ModelKey:
    """The offline model a run is compared with: the model, its compute type and beam,
    and the engine (each engine's streaming is compared with its own offline text)."""
    return (
        settings.model.name,
        settings.model.compute_type,
        settings.model.beam_size,
        settings.model.engine,
    )


def items_for_level(items: list[Item], level: int) -> list[Item]:
    """The files for `level` streams: with fewer files than streams, files are streamed
    again (from the first) so that `level` streams run at once; WER counts each stream."""
    if level <= len(items):
        return items
    return [items[i % len(items)] for i in range(level)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def started_server(
    env_overrides: dict[str, str], config: Path | None, log_dir: Path
) -> Iterator[tuple[str, int]]:
    """`whisperstream serve` as a subprocess on a free loopback port; yields (url, pid).
    With WHISPERSTREAM_COMPAT__ENABLED in `env_overrides`, the compatible APIs listen on
    WHISPERSTREAM_COMPAT__PORT as well."""
    port = free_port()
    env = {**os.environ, **env_overrides}
    command = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if config is not None:
        command += ["--config", str(config)]
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise BenchError(f"the server exited with code {process.returncode}:\n{tail}")
            # /readyz, not /healthz: the port opens (and /healthz answers) while the
            # model still loads.
            ready = f"http://127.0.0.1:{port}/readyz"
            with contextlib.suppress(OSError), urllib.request.urlopen(ready, timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the server was not ready (/readyz) within "
                    f"{SERVER_START_TIMEOUT_S:g} s; its log: {log_path}"
                )
            time.sleep(0.2)
        yield f"ws://127.0.0.1:{port}/v1/stream", process.pid
    finally:
        stop_process(process)


def stream_runs(
    items: list[Item],
    variants: list[Variant],
    levels: list[int],
    settings: dict[str, Any],
    speed: float,
    progress: Any,
    log_dir: Path,
    *,
    url: str | None = None,
    server_pid: int | None = None,
    api_key: str | None = None,
    config: Path | None = None,
    api: str = "native",
) -> list[RunResult]:
    """Each variant at each concurrency, one after another, each on a fresh server (or
    all on the server at `url`, with `api_key`, its process `server_pid` measured)."""
    durations = {item.id: stream_duration(item) for item in items}
    quiet_terminal = not progress.console.is_terminal
    runs: list[RunResult] = []
    for variant in variants:
        s = settings[variant.name]
        model_key = model_key_of(s)
        for level in levels:
            label = f"{variant.name} ×{level}"
            level_items = items_for_level(items, level)
            total_audio = sum(durations[item.id] for item in level_items)
            task = progress.add_task(f"streaming {label}", total=len(level_items), audio="")
            sent = [0.0]

            def on_audio(
                seconds: float,
                task: Any = task,
                sent: list[float] = sent,
                total: float = total_audio,
            ) -> None:
                sent[0] += seconds
                progress.update(task, audio=f"{sent[0] / 60:.1f}/{total / 60:.1f} min audio")

            def on_done(record: StreamRecord, task: Any = task, label: str = label) -> None:
                progress.advance(task)
                if quiet_terminal or record.error:
                    progress.console.log(
                        f"{label}: {record.item.id}" + (f": {record.error}" if record.error else "")
                    )

            with contextlib.ExitStack() as stack:
                stream: Callable[..., Awaitable[StreamRecord]] = stream_one
                if url:
                    target, pid = url, server_pid
                    streamed_at = url
                else:
                    env = dict(variant.env)
                    if api == "openai-realtime":
                        compat_port = free_port()
                        env["WHISPERSTREAM_COMPAT__ENABLED"] = "true"
                        env["WHISPERSTREAM_COMPAT__PORT"] = str(compat_port)
                    # The bench's own server listens on loopback only: no keys needed.
                    env["WHISPERSTREAM_AUTH__API_KEYS"] = "[]"
                    if level > s.limits.max_sessions:
                        env["WHISPERSTREAM_LIMITS__MAX_SESSIONS"] = str(level)
                    if level > s.limits.max_sessions_per_client:  # all from one address
                        env["WHISPERSTREAM_LIMITS__MAX_SESSIONS_PER_CLIENT"] = str(level)
                    target, pid = stack.enter_context(started_server(env, config, log_dir))
                    streamed_at = (
                        f"ws://127.0.0.1:{compat_port}/v1" if api == "openai-realtime" else target
                    )
                if api == "openai-realtime":
                    from server.bench.realtime import stream_one_realtime

                    stream = stream_one_realtime
                monitor = ProcessMonitor(pid) if pid is not None else None
                if monitor is not None:
                    monitor.start()
                key = api_key if url else None
                counted = model_counters(target, key)
                began = time.monotonic()
                records = asyncio.run(
                    stream_all(
                        level_items, streamed_at, level, speed, key, on_audio, on_done, stream
                    )
                )
                wall = time.monotonic() - began
                server = monitor.stop() if monitor is not None else {}
                now = model_counters(target, key)
                if counted is not None and now is not None:
                    server["model"] = {k: v - counted.get(k, 0.0) for k, v in now.items()}
            names = {
                m.get("model")
                for r in records
                for _, m in r.messages[:1]
                if m.get("type") == "ready"
            }
            runs.append(
                RunResult(
                    variant,
                    level,
                    records,
                    server,
                    model_key,
                    ", ".join(sorted(n for n in names if n)),
                    wall,
                )
            )
    return runs
