"""The server process while it is measured: CPU seconds, RSS, and its /metrics counters."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any


class ProcessMonitor:
    """CPU seconds and peak RSS of a process between start() and stop().

    With `series_every`, it also keeps `samples`: (monotonic time, RSS bytes) about every
    `series_every` seconds.
    """

    def __init__(self, pid: int, series_every: float | None = None) -> None:
        import psutil

        self._process = psutil.Process(pid)
        self._peak = 0
        self._cpu0 = 0.0
        self._series_every = series_every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="bench-monitor")

    def _cpu(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system + times.children_user + times.children_system)

    def rss(self) -> int | None:
        """The process's RSS now, in bytes (None once it is gone)."""
        try:
            return int(self._process.memory_info().rss)
        except Exception:
            return None

    def _sample(self) -> None:
        next_kept = time.monotonic()
        while True:
            rss = self.rss()
            if rss is not None:
                self._peak = max(self._peak, rss)
                now = time.monotonic()
                if self._series_every is not None and now >= next_kept:
                    self.samples.append((now, rss))
                    next_kept = max(next_kept + self._series_every, now)
            if self._stop.wait(0.25):
                break

    def start(self) -> None:
        self._cpu0 = self._cpu()
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        cpu = self._cpu() - self._cpu0
        peak, source = self._peak, "sampled every 0.25 s"
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{self._process.pid}/status").read_text()
            found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
            if found:  # the kernel's own high-water mark, since the process started
                peak, source = int(found.group(1)) * 1024, "VmHWM"
        return {
            "cpu_s": cpu,
            "peak_rss_bytes": peak,
            "rss_source": source,
            "sampled_peak_rss_bytes": self._peak,
        }


def model_counters(url: str, api_key: str | None) -> dict[str, float] | None:
    """The server's inference counters so far, from its /metrics: steps by kind, model
    calls, and the wall seconds spent in them (None when /metrics does not answer)."""
    from prometheus_client.parser import text_string_to_metric_families

    parts = urllib.parse.urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(f"{scheme}://{parts.netloc}/metrics", headers=headers)
    text = None
    for _ in range(3):  # a server busy with many streams may answer late
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
            break
        except (OSError, ValueError):
            time.sleep(0.5)
    if text is None:
        return None
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "whisperstream_steps_total":
                counters[f"steps_{sample.labels.get('kind', '')}"] = sample.value
            elif sample.name == "whisperstream_batch_seconds_sum":
                counters["model_s"] = sample.value
            elif sample.name == "whisperstream_batch_seconds_count":
                counters["model_calls"] = sample.value
    return counters


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 30.0) -> None:
    """Stop a server the bench started: SIGTERM (it finishes its sessions), then kill."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
