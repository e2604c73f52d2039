"""Replicas behind a real load balancer, as deployed: two `whisperstream serve` processes
on the bundled model, and HAProxy (Debian's) running the project's own
deploy/haproxy.cfg with only its addresses changed, all on loopback.

- 4 sessions spread 2 and 2 (leastconn); a full replica leaves rotation (its /readyz is
  HAProxy's check) and comes back when a session ends;
- kill -9 of the replica serving `whisperstream stream` in the middle of a sentence: the
  client reconnects through the balancer, resends the audio since its last final, exits
  0, and its transcript is that of an uninterrupted run;
- SIGTERM of a replica with live sessions: they get their finals and `done`; sessions
  started during the drain land on the other replica; nothing is refused for good.

Needs `haproxy` (apt-get install haproxy; .ci/run installs it): without it the tests
skip with that reason, except in CI (`CI=true`), where they fail.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jiwer
import pytest
from fakes import free_port
from harness import ROOT
from speech import Utterance, synthesize, wer
from whisper_normalizer.english import EnglishTextNormalizer

from client.stream import Transcript, stream_file

pytestmark = pytest.mark.model

CONFIG = ROOT / "deploy" / "haproxy.cfg"
SPEED = 2.0
# Three sentences; the middle one is long, so that a kill lands well inside it.
SENTENCES = [
    "The library opens at nine in the morning on weekdays.",
    "Our train was delayed by twenty minutes because of a signal failure near the station.",
    "Thank you all for coming, and see you next week.",
]
REPLICA_ENV = {
    "WHISPERSTREAM_MODEL__WORKERS": "1",  # two replicas share this machine's cores
    # Every test client is on 127.0.0.1: the per-client limit would count them as one.
    "WHISPERSTREAM_LIMITS__MAX_SESSIONS_PER_CLIENT": "32",
    "WHISPERSTREAM_SERVER__TRUSTED_PROXIES": '["127.0.0.1/32"]',
}


def _haproxy() -> str:
    path = shutil.which("haproxy")
    if path is None:
        reason = "haproxy is missing: apt-get install -y haproxy"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
        pytest.skip(reason)
    return path


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str) -> float:
        status, text = _get(f"{self.http}/metrics")
        assert status == 200, text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    @property
    def active(self) -> int:
        return int(self.metric("whisperstream_active_sessions"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sessions(self) -> set[str]:
        """The ids of the sessions this replica opened (its log says so)."""
        return set(re.findall(r"session (\w+): opened", self.log()))


@dataclass
class Balancer:
    port: int
    stats_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    replicas: list[Replica] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def status(self) -> dict[str, str]:
        """HAProxy's view of each replica: UP, DOWN, ..."""
        _, text = _get(f"http://127.0.0.1:{self.stats_port}/stats;csv")
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            r["svname"]: r["status"]
            for r in rows
            if r["pxname"] == "replicas" and r["svname"] not in ("BACKEND", "FRONTEND")
        }

    def wait_status(self, name: str, status: str, timeout_s: float = 10) -> float:
        began = time.monotonic()
        _wait(
            lambda: self.status().get(name, "").startswith(status),
            timeout_s,
            f"HAProxy to mark {name} {status} (it says {self.status()})",
        )
        return time.monotonic() - began

    def replica_of(self, session_id: str) -> str:
        (name,) = [r.name for r in self.replicas if session_id in r.sessions()]
        return name


def haproxy_config(port: int, stats_port: int, replicas: list[Replica]) -> str:
    """deploy/haproxy.cfg with the test's addresses: its binds and its servers."""
    text = CONFIG.read_text()
    for shipped, here in (
        ("bind :8765", f"bind 127.0.0.1:{port}"),
        ("bind :8404", f"bind 127.0.0.1:{stats_port}"),
    ):
        assert text.count(shipped) == 1, shipped
        text = text.replace(shipped, here)
    servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port}" for r in replicas)
    text, replaced = re.subn(r"^ *server-template .*$", servers, text, flags=re.M)
    assert replaced == 1
    return text


@contextmanager
def cluster(tmp_path: Path, *envs: dict[str, str]) -> Iterator[Balancer]:
    """Replicas (one per env, `whisperstream serve` as a user starts it) behind HAProxy."""
    haproxy = _haproxy()
    with ExitStack() as stack:
        replicas = []
        for i, env in enumerate(envs or ({}, {}), 1):
            port, log_path = free_port(), tmp_path / f"r{i}.log"
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
                    cwd=ROOT,
                    env={**os.environ, **REPLICA_ENV, **env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            stack.callback(_end, process)
            replicas.append(Replica(f"r{i}", port, process, log_path))
        for replica in replicas:
            _wait(lambda r=replica: _ready(r), 60, f"{replica.name} to be ready")  # type: ignore[misc]
        port, stats_port = free_port(), free_port()
        config, log_path = tmp_path / "haproxy.cfg", tmp_path / "haproxy.log"
        config.write_text(haproxy_config(port, stats_port, replicas))
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [haproxy, "-db", "-f", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        stack.callback(_end, process)
        balancer = Balancer(port, stats_port, process, log_path, replicas)
        _wait(lambda: _stats_up(balancer), 20, "HAProxy to see every replica UP")
        yield balancer


def _ready(replica: Replica) -> bool:
    assert replica.process.poll() is None, replica.log()
    try:
        return _get(f"{replica.http}/readyz")[0] == 200
    except OSError:
        return False


def _stats_up(balancer: Balancer) -> bool:
    assert balancer.process.poll() is None, balancer.log_path.read_text()
    try:
        status = balancer.status()
    except OSError:
        return False
    return len(status) == len(balancer.replicas) and all(s == "UP" for s in status.values())


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(30)


async def _hold(url: str, n: int) -> tuple[list[Any], list[str]]:
    """Open n sessions one after another; each stays open (no audio yet)."""
    import json

    import websockets

    sockets, ids = [], []
    for _ in range(n):
        ws = await websockets.connect(url)
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready", ready
        sockets.append(ws)
        ids.append(ready["session"])
    return sockets, ids


@pytest.fixture(scope="module")
def speech() -> Utterance:
    return synthesize(SENTENCES)


def test_sessions_spread_two_and_two_by_least_connections(tmp_path: Path) -> None:
    with cluster(tmp_path) as lb:

        async def run() -> tuple[list[int], list[str]]:
            sockets, ids = await _hold(lb.url, 4)
            active = [r.active for r in lb.replicas]
            for ws in sockets:
                await ws.close()
            return active, ids

        active, ids = asyncio.run(run())
        where = [lb.replica_of(i) for i in ids]
    assert active == [2, 2], active
    assert sorted(where) == ["r1", "r1", "r2", "r2"], where


def test_a_full_replica_leaves_rotation_and_the_next_session_lands_on_the_other(
    tmp_path: Path,
) -> None:
    """r1 takes one session (limits.max_sessions): once it has one, its /readyz answers
    503, HAProxy takes it out of rotation, and new sessions go to r2 without r1 ever
    refusing one; when its session ends, r1 is back."""
    with cluster(tmp_path, {"WHISPERSTREAM_LIMITS__MAX_SESSIONS": "1"}, {}) as lb:
        r1 = lb.replicas[0]

        async def run() -> dict[str, Any]:
            got: dict[str, Any] = {}
            held, ids = await _hold(lb.url, 1)
            if lb.replica_of(ids[0]) == "r2":  # leastconn: the next one goes to r1
                more, more_ids = await _hold(lb.url, 1)
                held, ids = held + more, ids + more_ids
            assert r1.active == 1
            got["out_after_s"] = await asyncio.to_thread(lb.wait_status, "r1", "DOWN")
            got["readyz"] = _get(f"{r1.http}/readyz")
            next_ones, next_ids = await _hold(lb.url, 2)
            got["next"] = [lb.replica_of(i) for i in next_ids]
            got["refused_by_r1"] = r1.metric("whisperstream_refused_sessions_total")
            on_r1 = [ws for ws, i in zip(held, ids, strict=True) if lb.replica_of(i) == "r1"]
            for ws in on_r1:
                await ws.close()
            got["back_after_s"] = await asyncio.to_thread(lb.wait_status, "r1", "UP")
            again, again_ids = await _hold(lb.url, 1)
            got["again"] = lb.replica_of(again_ids[0])
            for ws in held + next_ones + again:
                await ws.close()
            return got

        got = asyncio.run(run())
    assert got["readyz"] == (503, "not ready: full: 1 of 1 sessions (limits.max_sessions)\n")
    assert got["out_after_s"] < 3.0, got
    assert got["next"] == ["r2", "r2"], got
    assert got["refused_by_r1"] == 0, "HAProxy still sent r1 sessions it had to refuse"
    assert got["again"] == "r1", got  # back in rotation: fewest sessions again


def _finals_from_lines(output: str) -> list[tuple[str, str]]:
    """`[00:01.20 → 00:03.40] text` lines as (times, text)."""
    lines = [line for line in output.splitlines() if line.startswith("[")]
    return [(line.split("] ", 1)[0] + "]", line.split("] ", 1)[1]) for line in lines]


def _span(times: str) -> tuple[float, float]:
    """`[00:01.20 → 00:03.40]` as (1.2, 3.4)."""
    (m0, s0), (m1, s1) = re.findall(r"(\d+):(\d+\.\d+)", times)
    return int(m0) * 60 + float(s0), int(m1) * 60 + float(s1)


def _stream_cli(url: str, wav: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "stream",
            str(wav),
            "--speed",
            str(SPEED),
            "--url",
            url,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def lost_phrases(reference: str, hypothesis: str, words: int = 2) -> list[str]:
    """Runs of at least `words` reference words missing from the hypothesis."""
    normalize = EnglishTextNormalizer()
    ref, hyp = normalize(reference), normalize(hypothesis)
    out = jiwer.process_words(ref, hyp)
    ref_words = ref.split()
    return [
        " ".join(ref_words[c.ref_start_idx : c.ref_end_idx])
        for c in out.alignments[0]
        if c.type == "delete" and c.ref_end_idx - c.ref_start_idx >= words
    ]


def test_kill_9_of_the_replica_serving_a_stream_mid_sentence_loses_no_word(
    tmp_path: Path, speech: Utterance
) -> None:
    with cluster(tmp_path) as lb:
        whole = _stream_cli(lb.url, speech.path)
        whole_out, whole_err = whole.communicate(timeout=120)
        assert whole.returncode == 0, whole_err
        uninterrupted = _finals_from_lines(whole_out)
        # The middle of the second sentence, in the audio: where the replica dies.
        second_start, second_end = _span(uninterrupted[1][0])
        kill_at_s = (second_start + second_end) / 2

        client = _stream_cli(lb.url, speech.path)
        _wait(lambda: sum(r.active for r in lb.replicas) == 1, 30, "the session to start")
        (serving,) = [r for r in lb.replicas if r.active == 1]
        _wait(
            lambda: serving.metric("whisperstream_audio_seconds_total") >= kill_at_s,
            60,
            "the stream to reach the middle of the second sentence",
        )
        heard_s = serving.metric("whisperstream_audio_seconds_total")
        serving.process.send_signal(signal.SIGKILL)
        killed_out, killed_err = client.communicate(timeout=120)
        (other,) = [r for r in lb.replicas if r is not serving]
        resumed = re.findall(r"resuming a stream at ([\d.]+) s, segment (\d+)", other.log())
    cut = _finals_from_lines(killed_out)
    print(
        "\nuninterrupted run                            | kill -9 of "
        f"{serving.name} at {heard_s:.1f} s of audio"
    )
    for i in range(max(len(uninterrupted), len(cut))):
        left = " ".join(uninterrupted[i]) if i < len(uninterrupted) else ""
        right = " ".join(cut[i]) if i < len(cut) else ""
        print(f"{left:<44} | {right}")
    print(f"client stderr: {killed_err.strip()}")
    print(f"{other.name} log: resumed at {resumed}")
    assert client.returncode == 0, killed_err
    assert second_start < heard_s < second_end, (second_start, heard_s, second_end)
    assert "reconnecting" in killed_err
    assert resumed and resumed[0][1] == "1", resumed  # from the end of the first final
    assert len({t for t, _ in cut}) == len(cut), f"a line printed twice: {cut}"
    reference = " ".join(text for _, text in uninterrupted)
    transcript = " ".join(text for _, text in cut)
    assert wer(reference, transcript) <= 0.1, (reference, transcript)
    assert not lost_phrases(reference, transcript), lost_phrases(reference, transcript)
    assert wer(speech.text, transcript) <= 0.15, transcript


def test_sigterm_drains_a_replica_its_sessions_finish_and_new_ones_land_on_the_other(
    tmp_path: Path, speech: Utterance
) -> None:
    """r1 drains with a grace of 2 s (HAProxy checks every second) and a long timeout:
    its live sessions stream on to their end (finals, `done`); a session started in the
    grace is admitted wherever it lands; those started once HAProxy has taken r1 out
    land on r2; no client sees a refusal it does not get past."""
    drain = {
        "WHISPERSTREAM_LIMITS__DRAIN_GRACE_S": "2",
        "WHISPERSTREAM_LIMITS__SHUTDOWN_TIMEOUT_S": "30",
    }
    with cluster(tmp_path, drain, drain) as lb:
        r1, r2 = lb.replicas

        async def run() -> dict[str, Any]:
            got: dict[str, Any] = {"notices": []}

            def stream() -> asyncio.Task[Transcript]:
                return asyncio.create_task(
                    stream_file(speech.path, lb.url, speed=SPEED, on_notice=got["notices"].append)
                )

            live = [stream() for _ in range(2)]
            await asyncio.to_thread(_wait, lambda: r1.active + r2.active == 2, 30, "2 sessions")
            assert (r1.active, r2.active) == (1, 1)
            await asyncio.sleep(1.0)  # into the first sentence
            r1.process.send_signal(signal.SIGTERM)
            sigterm = time.monotonic()
            in_grace = stream()
            got["out_after_s"] = await asyncio.to_thread(lb.wait_status, "r1", "DOWN")
            during = [stream() for _ in range(2)]
            await asyncio.sleep(max(0.0, sigterm + 2.5 - time.monotonic()))  # past the grace
            after_grace = [stream()]
            got["live"] = await asyncio.gather(*live)
            got["in_grace"] = await in_grace
            got["during"] = await asyncio.gather(*during, *after_grace)
            got["r1_exit"] = await asyncio.to_thread(r1.process.wait, 60)
            got["r1_exit_after_s"] = time.monotonic() - sigterm
            return got

        got = asyncio.run(run())
        where = {
            name: [
                lb.replica_of(t.messages[0]["session"])
                for t in (got[name] if isinstance(got[name], list) else [got[name]])
            ]
            for name in ("live", "in_grace", "during")
        }
        r1_log = r1.log()
    drain_lines = [
        line.split(" ", 3)[-1]
        for line in r1_log.splitlines()
        if "drain" in line or "shutting down" in line or "closed after" in line
    ]
    print("\nr1 (SIGTERM) log:\n  " + "\n  ".join(drain_lines))
    print(
        f"HAProxy took r1 out {got['out_after_s']:.2f} s after SIGTERM; r1 exited "
        f"{got['r1_exit']} {got['r1_exit_after_s']:.1f} s after it"
    )
    for name in ("live", "in_grace", "during"):
        transcripts = got[name] if isinstance(got[name], list) else [got[name]]
        for transcript, replica in zip(transcripts, where[name], strict=True):
            print(
                f"{name:>8} on {replica}: {transcript.connections} connection(s), "
                f"done={bool(transcript.of_type('done'))}: {transcript.text}"
            )
    print(f"client notices: {got['notices']}")
    assert sorted(where["live"]) == ["r1", "r2"]
    assert got["r1_exit"] == 0
    for name in ("live", "in_grace", "during"):
        for transcript in got[name] if isinstance(got[name], list) else [got[name]]:
            assert transcript.complete and transcript.close_code == 1000, name
            assert transcript.connections == 1, (name, got["notices"])  # none refused
            assert wer(speech.text, transcript.text) <= 0.15, (name, transcript.text)
    assert where["during"] == ["r2", "r2", "r2"], where
    assert got["out_after_s"] < 2.0, got["out_after_s"]  # inside the grace
    assert "draining: /readyz answers 503" in r1_log
    assert "draining: new sessions refused" in r1_log
    assert "drained: every session has ended" in r1_log
    assert not got["notices"], got["notices"]
