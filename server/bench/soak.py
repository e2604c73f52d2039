"""The `whisperstream soak` command: N streams for a given time, with clients leaving.

For `--minutes`, `--streams` workers each keep one session busy at real-time pace: a
worker picks a file of the manifest (at random, seeded), streams it, and starts the next
session as soon as this one is over. A fraction of the sessions (`--leave-fraction`,
spread evenly over the run) leave early: at a random point between a quarter and three
quarters of their file the client closes the connection without `stop`. The others send
`stop` and must receive every final, then `done`. After `--minutes` no new session
starts; the running ones finish, then the server the soak started is stopped.

Figures:

- server RSS, sampled every `--sample-every` seconds (psutil): before the first session
  (idle, model loaded), at the start (the first sample after the warm-up, the first
  minute or a quarter of the run if that is shorter), at the end (the last sample before
  `--minutes` were over, so under the same load as at the start), the growth from start
  to end (MB and %) and over the last third of the window (a plateau, or a leak), the
  slope of a least-squares line through the samples after the warm-up, the maximum
  during the run (sampled every 0.25 s; the JSON also has the kernel's high-water mark
  VmHWM, which includes loading the model), and after the last session ended;
- lag, per final: its arrival minus the moment the audio up to the final's `end` had
  been sent (audio time t counts as sent at t / speed after the session's first frame, as
  in `whisperstream bench`). A segment's `end` includes its padding (`vad.pad_ms`), and
  the VAD closes it after `vad.end_ms` of silence, so the lag includes about the
  difference. p50, p90 and max of the finals that arrived in the first third of the
  `--minutes` window, in the last third, and of all (per minute in the JSON);
- finals: for the sessions that sent `stop`, `done.segments` (expected) against the finals
  received, and segment numbers missing from 0 .. segments - 1 or received twice;
- sessions admitted (the server accepted the WebSocket), refused (HTTP 503 or 429), left
  early, and errors by code: the server's `error` messages by their `code`, plus
  `http_<status>` for other refusals, `connect` when the server could not be reached,
  `close_<code>` and `no_done` for sessions that sent `stop` but did not end with `done`.

Exit code 0 when every session that sent `stop` got `done` with all its finals, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from client.stream import ClientError, PaceClock, paced_frames, run_session, stream_url
from server.addresses import is_loopback
from server.bench.errors import BenchError
from server.bench.machine import machine_line, machine_record
from server.bench.manifest import Item, load_manifest, read_pcm
from server.bench.monitor import ProcessMonitor
from server.bench.report import code_version, print_rows, progress_display, rounded, write_json
from server.bench.runner import started_server
from server.bench.scoring import percentile
from server.bench.variants import Variant, variant_settings

WARMUP_MAX_S = 60.0  # RSS "start" is taken after this, or a quarter of the run if shorter
REFUSED_BACKOFF_S = 1.0  # a refused worker waits this long before it tries again
LEAVE_BETWEEN = (0.25, 0.75)  # where in its file a leaving session closes, as a fraction
REFUSED_STATUSES = (429, 503)


@dataclass
class SessionLog:
    """One session of the soak; times in seconds since the soak began."""

    worker: int
    number: int  # in order of start, over all workers
    item: str
    started: float
    ended: float = 0.0
    leave_at_s: float | None = None  # audio seconds after which the client leaves
    outcome: str = ""  # done, left, refused, incomplete, error
    http_status: int | None = None
    close_code: int | None = None
    audio_sent_s: float = 0.0
    finals: list[int] = field(default_factory=list)  # segment numbers, in arrival order
    done_segments: int | None = None
    missing: list[int] = field(default_factory=list)
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)  # codes
    lags: list[tuple[float, float]] = field(default_factory=list)  # (arrival, lag)
    problem: str | None = None


def _is_loopback_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("ws", "wss") and is_loopback(parts.hostname or "")


def _http_status(message: str) -> int | None:
    found = re.search(r"HTTP (\d{3})", message)
    return int(found.group(1)) if found else None


class Soak:
    """The workers, their sessions, and the counters the progress line shows."""

    def __init__(
        self,
        items: list[Item],
        url: str,
        streams: int,
        window_s: float,
        speed: float,
        leave_fraction: float,
        seed: int,
        api_key: str | None,
    ) -> None:
        self.items, self.url, self.streams = items, url, streams
        self.window_s, self.speed, self.api_key = window_s, speed, api_key
        self.leave_fraction, self.seed = leave_fraction, seed
        self.audio: dict[str, tuple[bytes, int]] = {}
        for item in items:
            if item.id not in self.audio:
                self.audio[item.id] = read_pcm(item.wav)
        self.sessions: list[SessionLog] = []
        self.live = 0
        self.finals = 0
        self.audio_s = 0.0
        self.t0 = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _leaves(self, number: int) -> bool:
        """Spread the leaving sessions evenly: session n leaves when n * fraction crosses
        a whole number."""
        f = self.leave_fraction
        return math.floor((number + 1) * f + 1e-9) > math.floor(number * f + 1e-9)

    async def run(self) -> None:
        self.t0 = time.monotonic()
        await asyncio.gather(*(self._worker(w) for w in range(self.streams)))

    async def _worker(self, worker: int) -> None:
        rng = random.Random(self.seed * 1000 + worker)
        while self.now() < self.window_s:
            item = rng.choice(self.items)
            pcm, rate = self.audio[item.id]
            duration = len(pcm) / 2 / rate
            number = len(self.sessions)
            leave_at = rng.uniform(*LEAVE_BETWEEN) * duration if self._leaves(number) else None
            log = SessionLog(
                worker,
                number,
                item.id,
                round(self.now(), 3),
                leave_at_s=None if leave_at is None else round(leave_at, 2),
            )
            self.sessions.append(log)
            self.live += 1
            try:
                await self._session(log, pcm, rate, leave_at)
            except ClientError as exc:
                log.http_status = _http_status(str(exc))
                if log.http_status in REFUSED_STATUSES:
                    log.outcome = "refused"
                else:
                    log.outcome = "error"
                    log.problem = str(exc)
                    log.errors.append(f"http_{log.http_status}" if log.http_status else "connect")
            except Exception as exc:  # a soak of many minutes reports, rather than stops
                log.outcome = "error"
                log.problem = f"{type(exc).__name__}: {exc}"
                log.errors.append(f"client_{type(exc).__name__}")
            finally:
                self.live -= 1
                log.ended = round(self.now(), 3)
            if log.outcome in ("refused", "error"):
                await asyncio.sleep(REFUSED_BACKOFF_S)

    async def _session(
        self, log: SessionLog, pcm: bytes, rate: int, leave_at: float | None
    ) -> None:
        clock = PaceClock()
        arrivals: list[tuple[float, dict[str, Any]]] = []
        leaving = asyncio.Event()

        def on_message(message: dict[str, Any]) -> None:
            arrivals.append((time.monotonic(), message))
            if message.get("type") == "final":
                self.finals += 1

        def on_audio(seconds: float) -> None:
            log.audio_sent_s += seconds
            self.audio_s += seconds

        async def frames() -> AsyncIterator[bytes]:
            async for chunk in paced_frames(pcm, rate, self.speed, clock, on_audio):
                if leave_at is not None and log.audio_sent_s >= leave_at:
                    leaving.set()
                    await asyncio.Event().wait()  # until the session is cancelled
                yield chunk

        url = stream_url(self.url, sample_rate=rate, encoding="pcm_s16le")
        task = asyncio.create_task(
            run_session(url, frames(), on_message, self.api_key, reconnect=None)
        )
        if leave_at is not None:
            leave = asyncio.create_task(leaving.wait())
            await asyncio.wait({task, leave}, return_when=asyncio.FIRST_COMPLETED)
            leave.cancel()
            if not task.done():
                # Closes the connection (a close frame, no `stop`) while audio is due.
                task.cancel()
        (result,) = await asyncio.gather(task, return_exceptions=True)
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result
        self._record(
            log,
            arrivals,
            clock,
            left=isinstance(result, asyncio.CancelledError),
            close_code=None if isinstance(result, BaseException) else result.close_code,
        )

    def _record(
        self,
        log: SessionLog,
        arrivals: list[tuple[float, dict[str, Any]]],
        clock: PaceClock,
        left: bool,
        close_code: int | None,
    ) -> None:
        origin = clock.origin
        done: dict[str, Any] | None = None
        for arrival, message in arrivals:
            kind = message.get("type")
            if kind == "final":
                log.finals.append(int(message["segment"]))
                if origin is not None:
                    lag = arrival - (origin + float(message["end"]) / self.speed)
                    log.lags.append((round(arrival - self.t0, 3), round(lag, 3)))
            elif kind == "error":
                log.errors.append(str(message.get("code")))
            elif kind == "done":
                done = message
        log.close_code = close_code
        if left:
            log.outcome = "left"
            return
        if done is None or close_code != 1000:
            log.outcome = "incomplete"
            log.errors.append("no_done" if done is None else f"close_{close_code}")
            log.problem = f"ended with close code {close_code}" + ("" if done else " and no 'done'")
            return
        log.outcome = "done"
        log.done_segments = int(done.get("segments", -1))
        received = set(log.finals)
        log.missing = sorted(set(range(log.done_segments)) - received)
        log.duplicates = len(log.finals) - len(received)
        extra = sorted(received - set(range(log.done_segments)))
        if log.missing or log.duplicates or extra:
            log.problem = f"done.segments {log.done_segments}, finals {sorted(log.finals)}"


# Figures ---------------------------------------------------------------------------


def _lag_stats(values: list[float]) -> dict[str, Any]:
    return {
        "p50": rounded(percentile(values, 50)),
        "p90": rounded(percentile(values, 90)),
        "max": rounded(max(values)) if values else None,
        "n": len(values),
    }


def _mb(x: float | None) -> float | None:
    return None if x is None else round(x / 2**20, 1)


def rss_figures(
    samples: list[tuple[float, int]],
    window_s: float,
    warmup_s: float,
    idle: int | None,
    after: int | None,
    peak: int | None,
) -> dict[str, Any]:
    """RSS figures from (seconds since the soak began, bytes) samples."""
    loaded = [(t, r) for t, r in samples if warmup_s <= t <= window_s]
    start = loaded[0] if loaded else None
    end = loaded[-1] if loaded else None
    late = next(((t, r) for t, r in loaded if t >= window_s * 2 / 3), None)
    growth = slope = late_growth = None
    if start is not None and end is not None:
        growth = end[1] - start[1]
    if late is not None and end is not None:
        late_growth = end[1] - late[1]
    if len(loaded) >= 2:
        ts = [t for t, _ in loaded]
        rs = [r for _, r in loaded]
        mt, mr = sum(ts) / len(ts), sum(rs) / len(rs)
        var = sum((t - mt) ** 2 for t in ts)
        if var > 0:
            slope = sum((t - mt) * (r - mr) for t, r in zip(ts, rs, strict=True)) / var * 60
    return {
        "idle_mb": _mb(idle),
        "start_mb": _mb(start[1]) if start else None,
        "start_at_s": round(start[0], 1) if start else None,
        "end_mb": _mb(end[1]) if end else None,
        "end_at_s": round(end[0], 1) if end else None,
        "growth_mb": _mb(growth),
        "growth_pct": round(100 * growth / start[1], 2)
        if growth is not None and start and start[1]
        else None,
        "growth_last_third_mb": _mb(late_growth),
        "last_third_from_s": round(late[0], 1) if late else None,
        "slope_mb_per_min": _mb(slope),
        "max_mb": _mb(peak if peak else max((r for _, r in samples), default=None)),
        "after_mb": _mb(after),
        "samples": len(samples),
        "warmup_s": round(warmup_s, 1),
    }


def soak_figures(soak: Soak, window_s: float, wall_s: float) -> dict[str, Any]:
    sessions = soak.sessions
    by_outcome = Counter(s.outcome for s in sessions)
    stopped = [s for s in sessions if s.outcome in ("done", "incomplete")]
    finished = [s for s in sessions if s.outcome == "done"]
    lags = [(t, lag) for s in sessions for t, lag in s.lags]
    third = window_s / 3
    per_minute: dict[int, list[float]] = {}
    for t, lag in lags:
        per_minute.setdefault(int(t // 60), []).append(lag)
    errors = Counter(code for s in sessions for code in s.errors)
    return {
        "streams": soak.streams,
        "minutes": round(window_s / 60, 3),
        "speed": soak.speed,
        "leave_fraction": soak.leave_fraction,
        "wall_s": round(wall_s, 1),
        "audio_s": round(soak.audio_s, 1),
        "sessions": {
            "attempted": len(sessions),
            "admitted": sum(s.outcome in ("done", "incomplete", "left") for s in sessions),
            "completed": by_outcome["done"],
            "incomplete": by_outcome["incomplete"],
            "left_early": by_outcome["left"],
            "refused": by_outcome["refused"],
            "refused_by_status": dict(
                Counter(str(s.http_status) for s in sessions if s.outcome == "refused")
            ),
            "client_errors": by_outcome["error"],
        },
        "finals": {
            # Sessions that sent `stop`: done.segments against finals received.
            "expected": sum(s.done_segments or 0 for s in finished),
            "received": sum(len(s.finals) for s in finished),
            "received_incomplete_sessions": sum(
                len(s.finals) for s in stopped if s.outcome != "done"
            ),
            "missing_segments": sum(len(s.missing) for s in finished),
            "duplicate_segments": sum(s.duplicates for s in finished),
            "sessions_with_problems": sum(s.problem is not None for s in stopped),
            "received_by_leavers": sum(len(s.finals) for s in sessions if s.outcome == "left"),
        },
        "errors": dict(sorted(errors.items())),
        "lag_s": {
            "first_third": _lag_stats([lag for t, lag in lags if t < third]),
            "last_third": _lag_stats([lag for t, lag in lags if 2 * third <= t <= window_s]),
            "all": _lag_stats([lag for _, lag in lags]),
            "per_minute": {str(m): _lag_stats(v) for m, v in sorted(per_minute.items())},
        },
    }


def table_rows(f: dict[str, Any]) -> list[tuple[str, list[str]]]:
    def mb(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.0f} MB"

    def lag(entry: dict[str, Any]) -> str:
        if entry["p50"] is None:
            return "n/a"
        return f"{entry['p50']:.2f} / {entry['p90']:.2f} / {entry['max']:.2f} s ({entry['n']})"

    rss, s, fin, lags = f["rss"], f["sessions"], f["finals"], f["lag_s"]
    growth = "n/a"
    if rss["growth_mb"] is not None:
        growth = f"{rss['growth_mb']:+.1f} MB ({rss['growth_pct']:+.1f} %)"
    slope = "n/a" if rss["slope_mb_per_min"] is None else f"{rss['slope_mb_per_min']:+.2f} MB/min"
    refused = ", ".join(f"{n}×{code}" for code, n in sorted(s["refused_by_status"].items()))
    rows = [
        ("streams / minutes / speed", f"{f['streams']} / {f['minutes']:g} / {f['speed']:g}"),
        ("wall time / audio streamed", f"{f['wall_s'] / 60:.1f} / {f['audio_s'] / 60:.1f} min"),
        ("server RSS idle (model loaded)", mb(rss["idle_mb"])),
        (
            "server RSS start / end (at s)",
            f"{mb(rss['start_mb'])} ({rss['start_at_s']:.0f}) / {mb(rss['end_mb'])} "
            f"({rss['end_at_s']:.0f})"
            if rss["start_mb"] is not None
            else "n/a",
        ),
        ("RSS growth start → end", growth),
        (
            "RSS growth in the last third",
            "n/a"
            if rss["growth_last_third_mb"] is None
            else f"{rss['growth_last_third_mb']:+.1f} MB",
        ),
        ("RSS slope after warm-up", slope),
        ("RSS max in the run / after it", f"{mb(rss['max_mb'])} / {mb(rss['after_mb'])}"),
        ("lag p50 / p90 / max, first third", lag(lags["first_third"])),
        ("lag p50 / p90 / max, last third", lag(lags["last_third"])),
        ("lag p50 / p90 / max, all", lag(lags["all"])),
        ("finals expected / received (stop)", f"{fin['expected']} / {fin['received']}"),
        (
            "missing / duplicate segments",
            f"{fin['missing_segments']} / {fin['duplicate_segments']}",
        ),
        ("sessions admitted / completed", f"{s['admitted']} / {s['completed']}"),
        ("left early / incomplete", f"{s['left_early']} / {s['incomplete']}"),
        ("refused (HTTP 503/429)", f"{s['refused']}" + (f" ({refused})" if refused else "")),
        ("errors by code", ", ".join(f"{k}: {v}" for k, v in f["errors"].items()) or "none"),
        (
            "server CPU s / audio s",
            "n/a"
            if f.get("server_cpu_s_per_audio_s") is None
            else f"{f['server_cpu_s_per_audio_s']:.3f}",
        ),
    ]
    return [(label, [value]) for label, value in rows]


# The command -----------------------------------------------------------------------


def add_subcommand(sub: Any) -> None:
    """`whisperstream soak ...`, for server.cli's parser."""
    p = sub.add_parser(
        "soak",
        help="keep N streams busy for a while and watch the server's memory and lag",
        description="Streams files of a manifest at real-time pace on N connections for a "
        "given time, with some clients leaving early, and reports the server's RSS at start "
        "and end, the lag of finals early and late in the run, and finals expected and "
        "received. Definitions: the docstring of server/bench/soak.py.",
    )
    p.add_argument(
        "--manifest",
        type=Path,
        required=True,
        help="JSON lines with 'wav' (relative to the manifest)",
    )
    p.add_argument("--streams", type=int, default=4, help="sessions at once (default 4)")
    p.add_argument(
        "--minutes",
        type=float,
        required=True,
        help="start new sessions for this long; running ones then finish",
    )
    p.add_argument(
        "--leave-fraction",
        type=float,
        default=0.2,
        help="share of sessions that close mid-file without 'stop' (default 0.2)",
    )
    p.add_argument("--speed", type=float, default=1.0, help="pace relative to real time")
    p.add_argument("--out", type=Path, default=None, help="write figures and sessions as JSON")
    p.add_argument(
        "--url", default=None, help="a running server on a loopback address (default: start one)"
    )
    p.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="with --url: the server's process, for its memory and CPU",
    )
    p.add_argument("--api-key", default=None, help="with --url: the server's API key")
    p.add_argument("--config", type=Path, default=None, help="config file for the started server")
    p.add_argument(
        "--sample-every", type=float, default=5.0, help="seconds between RSS samples (default 5)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of file and leave-point choices")
    p.set_defaults(func=cmd_soak)


def cmd_soak(args: argparse.Namespace) -> int:
    try:
        return _soak(args)
    except BenchError as exc:
        print(f"whisperstream soak: {exc}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> None:
    if args.streams < 1:
        raise BenchError("--streams must be at least 1")
    if not args.minutes > 0:
        raise BenchError("--minutes must be above 0")
    if not 0 <= args.leave_fraction <= 1:
        raise BenchError("--leave-fraction must be between 0 and 1")
    if not args.speed > 0:
        raise BenchError("--speed must be above 0: lag needs real-time pacing")
    if not args.sample_every > 0:
        raise BenchError("--sample-every must be above 0")
    if args.url is not None and not _is_loopback_url(args.url):
        raise BenchError(
            f"--url {args.url}: only ws:// or wss:// on a loopback address "
            "(127.0.0.1, ::1, localhost)"
        )
    if args.server_pid is not None and args.url is None:
        raise BenchError("--server-pid goes with --url")


def _soak(args: argparse.Namespace) -> int:
    from rich.console import Console

    _check(args)
    items = load_manifest(args.manifest, need_text=False)
    window_s = args.minutes * 60
    warmup_s = min(WARMUP_MAX_S, window_s / 4)
    console = Console(stderr=True)
    soak = Soak(
        items,
        args.url or "",
        args.streams,
        window_s,
        args.speed,
        args.leave_fraction,
        args.seed,
        args.api_key if args.url else None,
    )
    settings = variant_settings(args.config, Variant("default"))

    with contextlib.ExitStack() as stack:
        if args.url:
            pid = args.server_pid
        else:
            # The soak's own server listens on loopback only: no keys needed.
            env = {"WHISPERSTREAM_AUTH__API_KEYS": "[]"}
            if args.streams > settings.limits.max_sessions:
                env["WHISPERSTREAM_LIMITS__MAX_SESSIONS"] = str(args.streams)
            if args.streams > settings.limits.max_sessions_per_client:
                env["WHISPERSTREAM_LIMITS__MAX_SESSIONS_PER_CLIENT"] = str(args.streams)
            log_dir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="whisperstream-soak-"))
            )
            console.log("starting the server ...")
            soak.url, pid = stack.enter_context(started_server(env, args.config, log_dir))
        monitor = ProcessMonitor(pid, series_every=args.sample_every) if pid else None
        idle = monitor.rss() if monitor is not None else None
        progress = stack.enter_context(progress_display(console))
        if monitor is not None:
            monitor.start()
        began = time.monotonic()
        asyncio.run(_run_with_progress(soak, progress, console, monitor))
        wall = time.monotonic() - began
        after = monitor.rss() if monitor is not None else None
        server = monitor.stop() if monitor is not None else {}
        samples = [] if monitor is None else [(t - soak.t0, r) for t, r in monitor.samples]

    figures = soak_figures(soak, window_s, wall)
    figures["rss"] = rss_figures(
        samples, window_s, warmup_s, idle, after, server.get("sampled_peak_rss_bytes")
    )
    figures["rss"]["high_water_mb"] = _mb(server.get("peak_rss_bytes"))  # since the start
    cpu = server.get("cpu_s")
    figures["server_cpu_s"] = rounded(cpu)
    figures["server_cpu_s_per_audio_s"] = (
        rounded(cpu / soak.audio_s, 4) if cpu is not None and soak.audio_s else None
    )
    caption = (
        f"{len(items)} files from {args.manifest}, {machine_line()}, load "
        f"average {os.getloadavg()[0]:.1f}. Lag: final's arrival minus the sending "
        "of its segment's end (p50 / p90 / max, finals counted); thirds of the "
        f"{args.minutes:g} min window by arrival. RSS start: first sample after "
        f"{warmup_s:g} s; end: last sample in the window."
    )
    print_rows("whisperstream soak", ["value"], table_rows(figures), caption)
    problems = [s for s in soak.sessions if s.outcome in ("done", "incomplete") and s.problem]
    for s in problems[:10]:
        console.print(f"session {s.number} ({s.item}): {s.problem}")
    if args.out is not None:
        report = {
            "command": sys.argv,
            "manifest": str(args.manifest),
            "url": soak.url if args.url else "started by the soak",
            "machine": machine_record(),
            "code": code_version(),
            "definitions": __doc__,
            "figures": figures,
            "server": server,
            "rss_samples_mb": [[round(t, 2), _mb(r)] for t, r in samples],
            "sessions": [_session_json(s) for s in soak.sessions],
        }
        write_json(args.out, report)
        console.print(f"wrote {args.out}")
    return 1 if problems or figures["finals"]["expected"] != figures["finals"]["received"] else 0


def _session_json(s: SessionLog) -> dict[str, Any]:
    out = asdict(s)
    out["lags"] = [list(x) for x in s.lags]
    out["audio_sent_s"] = round(s.audio_sent_s, 2)
    return out


async def _run_with_progress(
    soak: Soak, progress: Any, console: Any, monitor: ProcessMonitor | None
) -> None:
    """The soak, with a progress line (and a log line a minute when not on a terminal)."""
    task = progress.add_task("soak (s)", total=round(soak.window_s), audio="")
    quiet_terminal = not console.is_terminal

    def status() -> str:
        rss = monitor.rss() if monitor is not None else None
        return (
            f"{soak.live} live, {len(soak.sessions)} sessions, {soak.finals} finals, "
            f"{soak.audio_s / 60:.1f} min audio"
            + (f", RSS {rss / 2**20:.0f} MB" if rss is not None else "")
        )

    runner = asyncio.create_task(soak.run())
    next_log = 60.0
    while not runner.done():
        await asyncio.wait({runner}, timeout=1.0)
        elapsed = soak.now()
        progress.update(
            task,
            completed=min(elapsed, soak.window_s),
            audio=status(),
            description="soak (s)" if elapsed < soak.window_s else "finishing",
        )
        if quiet_terminal and elapsed >= next_log:
            console.log(f"{elapsed / 60:.0f} min: {status()}")
            next_log += 60.0
    await runner
