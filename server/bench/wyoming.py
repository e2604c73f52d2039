"""`whisperstream bench --wyoming`: whisperstream against other Wyoming speech-to-text
services, each used as Home Assistant uses it.

Each file of the manifest is one voice command on a connection of its own, sent as a
satellite sends it: `transcribe` (language en), `audio-start`, 16 kHz 16-bit mono
`audio-chunk`s of CHUNK_SAMPLES at real-time pace (the chunk that ends at audio time t is
written at wall time t / speed), `audio-stop`. The audio-stop comes where a satellite's
voice activity detection would send it: `--stop-silence-s` (0.7 s, Home Assistant's
default) after the last 30 ms frame webrtcvad (mode 2) calls speech, the file cut there or
padded with silence (0: the whole file, as it is). Every event back is logged with its
arrival time; a command ends at its `transcript`, and the client then disconnects, as
Home Assistant does.

The servers are measured one after another, each alone: whisperstream (`whisperstream
serve` with `wyoming.enabled`, on a free loopback port, with the current config or
`--config`; or a running Wyoming server at `--url tcp://HOST:PORT`, with `--server-pid`
for its CPU), then each `--peer NAME=COMMAND`, started from COMMAND with `{port}`
replaced by a free port, once it answers `describe`. The first file is sent once before
the measured run, as a warm-up.

Figures per server:
- WER: word errors (substitutions, deletions, insertions) over reference words, pooled
  over the files, after Whisper's English text normalizer, as the rest of the bench
  scores; a failed command counts its reference words as deleted;
- stop to transcript: wall seconds from the end of writing `audio-stop` to the arrival of
  `transcript` (what the user waits for): p50, p90 and max;
- chunks before stop: `transcript-chunk` events that arrived before `audio-stop` was
  written, per file;
- CPU: the server process's CPU seconds (all threads, and children) during the measured
  files, per second of audio sent; peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from server.bench.errors import BenchError
from server.bench.machine import machine_line, machine_record
from server.bench.manifest import Item, load_manifests, read_audio_16k
from server.bench.monitor import ProcessMonitor, stop_process
from server.bench.report import code_version, print_rows, rounded, write_json
from server.bench.runner import free_port, started_server
from server.bench.scoring import normalize, percentile, word_errors

SR = 16_000
CHUNK_SAMPLES = 1024  # per audio-chunk, as Wyoming satellites send them
STOP_SILENCE_S = 0.7  # Home Assistant's default silence before it ends a voice command
VAD_FRAME = 480  # 30 ms at 16 kHz
READY_TIMEOUT_S = 300.0  # a peer loading its model
COMMAND_TIMEOUT_S = 120.0  # longest wait for one event


def satellite_audio(item: Item, stop_silence_s: float) -> bytes:
    """The file as a satellite streams it: 16 kHz 16-bit mono, ending `stop_silence_s`
    after its last speech (the whole file when that is 0 or no speech is heard)."""
    import webrtcvad

    from streaming.audio import to_pcm_s16le

    pcm = to_pcm_s16le(read_audio_16k(item.wav))
    if stop_silence_s <= 0:
        return pcm
    vad, last = webrtcvad.Vad(2), 0
    for start in range(0, len(pcm) // 2 - VAD_FRAME + 1, VAD_FRAME):
        if vad.is_speech(pcm[2 * start : 2 * (start + VAD_FRAME)], SR):
            last = start + VAD_FRAME
    if last == 0:
        return pcm
    end = last + round(stop_silence_s * SR)
    return (pcm + bytes(max(0, 2 * end - len(pcm))))[: 2 * end]


@dataclass
class CommandRecord:
    id: str
    reference: str
    audio_s: float
    transcript: str | None = None
    stop_at: float | None = None  # seconds from audio-start: audio-stop written
    transcript_at: float | None = None  # seconds from audio-start: transcript arrived
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    error: str | None = None

    @property
    def stop_to_transcript(self) -> float | None:
        if self.stop_at is None or self.transcript_at is None:
            return None
        return self.transcript_at - self.stop_at

    @property
    def chunks_before_stop(self) -> int:
        stop = self.stop_at if self.stop_at is not None else float("inf")
        return sum(1 for t, kind, _ in self.events if kind == "transcript-chunk" and t < stop)


async def describe(host: str, port: int, timeout_s: float) -> dict[str, Any]:
    """The server's answer to `describe` (raises OSError or TimeoutError)."""
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info

    async with asyncio.timeout(timeout_s):
        async with AsyncTcpClient(host, port) as client:
            await client.write_event(Describe().event())
            while (event := await client.read_event()) is not None:
                if Info.is_type(event.type):
                    return dict(event.data)
    raise OSError("the connection closed before info")


async def voice_command(
    host: str, port: int, item: Item, pcm: bytes, speed: float
) -> CommandRecord:
    """One file as one voice command, timed; failures are recorded, not raised."""
    from wyoming.asr import Transcribe, Transcript
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient

    record = CommandRecord(item.id, item.text, len(pcm) / 2 / SR)
    client = AsyncTcpClient(host, port, connect_timeout=10.0, read_timeout=COMMAND_TIMEOUT_S)
    origin = time.monotonic()

    async def read() -> None:
        while (event := await client.read_event()) is not None:
            at = time.monotonic() - origin
            record.events.append((round(at, 4), event.type, dict(event.data)))
            if event.type == "error":
                record.error = f"error event: {event.data.get('text')}"
                return
            if Transcript.is_type(event.type):
                record.transcript = Transcript.from_event(event).text
                record.transcript_at = at
                return
        record.error = "the connection closed before transcript"

    try:
        await client.connect()
        reader = asyncio.create_task(read())
        try:
            await client.write_event(Transcribe(language="en").event())
            await client.write_event(AudioStart(rate=SR, width=2, channels=1).event())
            origin = time.monotonic()
            step = 2 * CHUNK_SAMPLES
            for offset in range(0, len(pcm), step):
                chunk = pcm[offset : offset + step]
                due = origin + (offset + len(chunk)) / 2 / SR / speed
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if reader.done():
                    break  # answered early (server-side endpointing) or refused
                await client.write_event(
                    AudioChunk(rate=SR, width=2, channels=1, audio=chunk, timestamp=None).event()
                )
            if not reader.done():
                await client.write_event(AudioStop().event())
                record.stop_at = time.monotonic() - origin
            await reader
        finally:
            reader.cancel()
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        record.error = record.error or f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            await client.disconnect()
    if record.error is None and record.stop_at is None and record.transcript is not None:
        record.stop_at = record.transcript_at  # answered before its audio-stop
    return record


@dataclass
class ServerRun:
    name: str
    info: dict[str, Any]
    records: list[CommandRecord]
    server: dict[str, Any]  # cpu_s, peak_rss_bytes (empty when not measured)
    wall_s: float


def figures(run: ServerRun) -> dict[str, Any]:
    errors = ref_words = 0
    for record in run.records:
        ref = normalize(record.reference)
        errors += word_errors(ref, normalize(record.transcript or ""))
        ref_words += len(ref)
    waits = [w for r in run.records if (w := r.stop_to_transcript) is not None]
    audio_s = sum(r.audio_s for r in run.records)
    cpu_s = run.server.get("cpu_s")
    peak = run.server.get("peak_rss_bytes")
    asr = (run.info.get("asr") or [{}])[0]
    return {
        "server": run.name,
        "program": f"{asr.get('name')} {asr.get('version') or ''}".strip(),
        "streaming": bool(asr.get("supports_transcript_streaming")),
        "files": len(run.records),
        "failed": sum(r.error is not None for r in run.records),
        "wer": rounded(errors / ref_words, 4) if ref_words else None,
        "stop_to_transcript_p50_s": rounded(percentile(waits, 50)),
        "stop_to_transcript_p90_s": rounded(percentile(waits, 90)),
        "stop_to_transcript_max_s": rounded(max(waits)) if waits else None,
        "chunks_before_stop_per_file": rounded(
            sum(r.chunks_before_stop for r in run.records) / len(run.records), 2
        )
        if run.records
        else None,
        "audio_s": rounded(audio_s),
        "cpu_s_per_audio_s": rounded(cpu_s / audio_s) if cpu_s is not None and audio_s else None,
        "peak_rss_mb": rounded(peak / 2**20, 1) if peak else None,
        "wall_s": rounded(run.wall_s, 1),
    }


ROWS = [
    ("program", "program", "{}"),
    ("transcript streaming", "streaming", "{}"),
    ("files (failed)", None, ""),
    ("WER", "wer", "pct"),
    ("audio-stop → transcript p50", "stop_to_transcript_p50_s", "{:.3f} s"),
    ("audio-stop → transcript p90", "stop_to_transcript_p90_s", "{:.3f} s"),
    ("audio-stop → transcript max", "stop_to_transcript_max_s", "{:.3f} s"),
    ("transcript-chunks before audio-stop, per file", "chunks_before_stop_per_file", "{:.1f}"),
    ("CPU s per audio s", "cpu_s_per_audio_s", "{:.3f}"),
    ("peak RSS", "peak_rss_mb", "{:.0f} MB"),
]


def table(figures_list: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    rows = []
    for label, key, fmt in ROWS:
        values = []
        for f in figures_list:
            if key is None:
                values.append(f"{f['files']} ({f['failed']})")
                continue
            value = f.get(key)
            if value is None:
                values.append("n/a")
            elif fmt == "pct":
                values.append(f"{100 * value:.1f} %")
            else:
                values.append(fmt.format(value))
        rows.append((label, values))
    return rows


def markdown(figures_list: list[dict[str, Any]]) -> str:
    lines = [
        "| | " + " | ".join(f["server"] for f in figures_list) + " |",
        "|---|" + "---|" * len(figures_list),
    ]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in table(figures_list)]
    return "\n".join(lines)


def _parse_peer(spec: str) -> tuple[str, str]:
    name, sep, command = spec.partition("=")
    if not sep or not name.strip() or "{port}" not in command:
        raise BenchError(
            f"--peer {spec!r}: give NAME=COMMAND, with {{port}} in COMMAND "
            "where the peer's port goes"
        )
    return name.strip(), command.strip()


def _wait_ready(
    port: int, process: subprocess.Popen[bytes] | None, log_path: Path | None, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process is not None and process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path else ""
            raise BenchError(f"{what} exited with code {process.returncode}:\n{tail}")
        try:
            return asyncio.run(describe("127.0.0.1", port, 5.0))
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{what} did not answer describe on port {port} within "
                    f"{READY_TIMEOUT_S:g} s; its log: {log_path}"
                ) from None
            time.sleep(0.5)


@contextlib.contextmanager
def started_peer(name: str, template: str, log_dir: Path) -> Iterator[tuple[int, int]]:
    """The peer's command on a free loopback port, once it answers describe; yields
    (port, pid)."""
    port = free_port()
    argv = shlex.split(template.replace("{port}", str(port)))
    log_path = log_dir / f"{name}-{port}.log"
    try:
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
    except OSError as exc:
        raise BenchError(f"--peer {name}: cannot start {argv[0]}: {exc}") from None
    try:
        _wait_ready(port, process, log_path, f"--peer {name}")
        yield port, process.pid
    finally:
        stop_process(process)


def measure(
    name: str,
    host: str,
    port: int,
    pid: int | None,
    commands: list[tuple[Item, bytes]],
    speed: float,
    progress: Any,
) -> ServerRun:
    info = asyncio.run(describe(host, port, 30.0))
    task = progress.add_task(f"wyoming {name}", total=len(commands), audio="")
    warm = asyncio.run(voice_command(host, port, *commands[0], speed=speed))
    if warm.error:
        progress.console.log(f"{name}: warm-up {warm.id}: {warm.error}")
    monitor = ProcessMonitor(pid) if pid is not None else None
    if monitor is not None:
        monitor.start()
    began, records, sent = time.monotonic(), [], 0.0

    async def run_all() -> None:
        nonlocal sent
        for item, pcm in commands:
            record = await voice_command(host, port, item, pcm, speed)
            records.append(record)
            sent += record.audio_s
            progress.update(task, advance=1, audio=f"{sent / 60:.1f} min audio")
            if record.error or not progress.console.is_terminal:
                wait = record.stop_to_transcript
                said = record.error or (
                    f"{wait:.3f} s to transcript" if wait is not None else "no transcript"
                )
                progress.console.log(f"{name}: {record.id}: {said}")

    asyncio.run(run_all())
    wall = time.monotonic() - began
    server = monitor.stop() if monitor is not None else {}
    return ServerRun(name, info, records, server, wall)


def cmd_wyoming_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from server.bench.report import progress_display

    if args.manifest is None:
        raise BenchError("--wyoming needs --manifest M.jsonl")
    if args.from_report is not None or args.variant or str(args.concurrency) != "1":
        raise BenchError(
            "--wyoming measures one voice command at a time on one whisperstream "
            "configuration: leave out --from, --variant and --concurrency"
        )
    if args.speed <= 0:
        raise BenchError("--speed must be above 0: latency needs real-time pacing")
    if args.server_pid is not None and not args.url:
        raise BenchError("--server-pid goes with --url")
    peers = [_parse_peer(p) for p in args.peer]
    target = None
    if args.url:
        parts = urlsplit(args.url)
        if parts.scheme != "tcp" or not parts.hostname or not parts.port:
            raise BenchError(f"--url {args.url!r}: with --wyoming, give tcp://HOST:PORT")
        target = (parts.hostname, parts.port)
    items = load_manifests(args.manifest, args.limit)
    commands = [(item, satellite_audio(item, args.stop_silence_s)) for item in items]

    console = Console(stderr=True)
    runs: list[ServerRun] = []
    with (
        progress_display(console) as progress,
        tempfile.TemporaryDirectory(prefix="whisperstream-wyoming-bench-") as tmp,
    ):
        log_dir = Path(tmp)
        if target is not None:
            runs.append(
                measure(
                    "whisperstream" if not peers else args.url,
                    *target,
                    args.server_pid,
                    commands,
                    args.speed,
                    progress,
                )
            )
        else:
            port = free_port()
            env = {
                "WHISPERSTREAM_WYOMING__ENABLED": "true",
                "WHISPERSTREAM_WYOMING__PORT": str(port),
                "WHISPERSTREAM_WYOMING__MAX_COMMAND_S": "3600",  # long files stay whole
                "WHISPERSTREAM_AUTH__API_KEYS": "[]",
            }
            with started_server(env, args.config, log_dir) as (_, pid):
                _wait_ready(port, None, None, "whisperstream")
                runs.append(
                    measure("whisperstream", "127.0.0.1", port, pid, commands, args.speed, progress)
                )
        for name, template in peers:
            with started_peer(name, template, log_dir) as (port, pid):
                runs.append(measure(name, "127.0.0.1", port, pid, commands, args.speed, progress))

    figures_list = [figures(run) for run in runs]
    caption = (
        f"{len(items)} files from {', '.join(str(m) for m in args.manifest)}, "
        f"{sum(len(p) for _, p in commands) / 2 / SR:.0f} s of audio, speed "
        f"{args.speed:g}, audio-stop {args.stop_silence_s:g} s after the last speech, "
        f"{machine_line()}. WER after Whisper's English normalizer; "
        "audio-stop → transcript: wall seconds from writing audio-stop to the "
        "transcript's arrival."
    )
    if args.markdown:
        print(markdown(figures_list))
        print(f"\n{caption}")
    else:
        print_rows(
            "whisperstream bench --wyoming",
            [f["server"] for f in figures_list],
            table(figures_list),
            caption,
        )
    if args.out is not None:
        write_json(
            args.out,
            {
                "command": sys.argv,
                "code": code_version(),
                "machine": machine_record(),
                "manifest": [str(m) for m in args.manifest],
                "speed": args.speed,
                "stop_silence_s": args.stop_silence_s,
                "peers": dict(peers),
                "definitions": __doc__,
                "servers": [
                    {
                        **f,
                        "info": run.info,
                        "process": run.server,
                        "commands": [asdict(r) for r in run.records],
                    }
                    for f, run in zip(figures_list, runs, strict=True)
                ],
            },
            ensure_ascii=False,
        )
        console.print(f"wrote {args.out}")
    return 1 if any(f["failed"] for f in figures_list) else 0
