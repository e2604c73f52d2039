"""`whisperstream soak`: a very short run against a server it starts, and its bookkeeping."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
from speech import Utterance, synthesize

from server.bench.soak import add_subcommand, rss_figures

SHORT_SPEECH = [
    "Turn on the lights in the kitchen.",
    "The meeting starts at nine tomorrow morning.",
]


def soak(*argv: str) -> int:
    """`whisperstream soak ARGV` (the subcommand server/cli.py adds)."""
    parser = argparse.ArgumentParser(prog="whisperstream")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["soak", *argv])
    return int(args.func(args))


def test_rss_figures_start_after_warm_up_and_end_inside_the_window() -> None:
    mb = 2**20
    samples = [
        (0.0, 100 * mb),
        (5.0, 200 * mb),
        (10.0, 210 * mb),
        (15.0, 220 * mb),
        (20.0, 230 * mb),
        (25.0, 150 * mb),
    ]
    f = rss_figures(
        samples, window_s=20.0, warmup_s=5.0, idle=90 * mb, after=150 * mb, peak=240 * mb
    )
    assert (f["idle_mb"], f["start_mb"], f["end_mb"], f["max_mb"], f["after_mb"]) == (
        90.0,
        200.0,
        230.0,
        240.0,
        150.0,
    )
    assert (f["start_at_s"], f["end_at_s"]) == (5.0, 20.0)
    assert f["growth_mb"] == 30.0 and f["growth_pct"] == 15.0
    assert f["growth_last_third_mb"] == 10.0 and f["last_third_from_s"] == 15.0
    assert f["slope_mb_per_min"] == pytest.approx(120.0)  # 2 MB/s after the warm-up


def test_soak_refuses_addresses_that_are_not_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    code = soak(
        "--manifest", str(manifest), "--minutes", "1", "--url", "ws://192.0.2.1:8765/v1/stream"
    )
    assert code == 2
    assert "loopback" in capsys.readouterr().err


def test_a_short_soak_gets_every_final_and_reports_memory_and_lag(
    tmp_path: Path, other_speech: Utterance, capsys: pytest.CaptureFixture[str]
) -> None:
    short = synthesize(SHORT_SPEECH)
    (tmp_path / "a.wav").symlink_to(other_speech.path)
    (tmp_path / "b.wav").symlink_to(short.path)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"wav": w}) + "\n" for w in ("a.wav", "b.wav")))
    out = tmp_path / "soak.json"
    began = time.monotonic()
    code = soak(
        "--manifest",
        str(manifest),
        "--streams",
        "2",
        "--minutes",
        "0.3",
        "--leave-fraction",
        "0.5",
        "--sample-every",
        "1",
        "--out",
        str(out),
    )
    took = time.monotonic() - began
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "whisperstream soak" in printed and "finals expected / received" in printed
    assert took < 60

    report = json.loads(out.read_text())
    f = report["figures"]
    assert f["streams"] == 2
    sessions, finals = f["sessions"], f["finals"]
    assert sessions["completed"] >= 2 and sessions["left_early"] >= 1
    assert sessions["admitted"] == sessions["completed"] + sessions["left_early"]
    assert sessions["incomplete"] == 0 and sessions["client_errors"] == 0
    assert finals["expected"] == finals["received"] >= 2
    assert finals["missing_segments"] == 0 and finals["duplicate_segments"] == 0
    assert finals["sessions_with_problems"] == 0
    rss = f["rss"]
    for key in ("idle_mb", "start_mb", "end_mb", "max_mb", "after_mb", "growth_mb"):
        assert rss[key] is not None, key
    assert rss["start_mb"] <= rss["max_mb"] and rss["end_mb"] <= rss["max_mb"]
    lag = f["lag_s"]
    # Which third a final lands in depends on the machine's speed: only the split is checked.
    assert lag["all"]["n"] > 0
    assert lag["first_third"]["n"] + lag["last_third"]["n"] <= lag["all"]["n"]
    assert 0 < lag["all"]["p50"] < 10
    left = [s for s in report["sessions"] if s["outcome"] == "left"]
    assert all(s["leave_at_s"] is not None and s["audio_sent_s"] < 10 for s in left)
    assert report["rss_samples_mb"]
