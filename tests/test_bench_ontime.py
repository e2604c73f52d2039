"""`python -m server.bench.ontime`: every step answered before the next frame, and one
real run over the test speech."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from fakes import EnergyClassifier
from speech import Utterance, one_file_manifest

from server.bench.ontime import main, replay
from streaming.engine import DecodeRequest, EngineCapabilities, Hypothesis, Word
from streaming.session import Session, SessionConfig


class CountingEngine:
    """Hears one word however much audio it is given, and counts the windows."""

    name = "counting"
    capabilities = EngineCapabilities()

    def __init__(self) -> None:
        self.windows_s: list[float] = []

    def transcribe(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        self.windows_s += [len(r.audio) / 16_000 for r in requests]
        return [Hypothesis((Word(" hello", 0.0, 0.4, 0.95, (1,)),)) for _ in requests]


def test_every_step_of_a_segment_runs_when_its_audio_has_come() -> None:
    engine = CountingEngine()
    session = Session("s", SessionConfig(), EnergyClassifier())
    speech = np.ones(16_000 * 3) * 0.3
    audio = np.concatenate([speech, np.zeros(16_000)])

    replayed = replay(session, engine, (audio * 32767).astype("<i2").tobytes())

    assert replayed.text == "hello"
    assert replayed.steps == len(engine.windows_s)
    step_s = SessionConfig().policy.step_s
    partial_windows = engine.windows_s[:-1]
    # A window each step_s of speech, none skipped: they grow by one step at a time.
    assert len(partial_windows) >= 3.0 / step_s - 2, engine.windows_s
    growth = np.diff(partial_windows)
    assert np.all(growth <= step_s + 0.03), engine.windows_s


def test_each_message_is_stamped_with_the_audio_that_had_come() -> None:
    session = Session("s", SessionConfig(), EnergyClassifier())
    audio = np.concatenate([np.zeros(16_000), np.ones(16_000 * 2) * 0.3, np.zeros(16_000)])

    replayed = replay(session, CountingEngine(), (audio * 32767).astype("<i2").tobytes())

    times = [t for t, _ in replayed.messages]
    assert times == sorted(times) and times[-1] == 4.0
    kinds = {m["type"]: t for t, m in reversed(replayed.messages)}  # each kind's first
    assert 1.0 <= kinds["speech_start"] < 1.3, replayed.messages
    assert 1.0 < kinds["partial"] < 3.0
    # The final comes once the VAD has heard the end of speech, within the second after.
    assert 3.0 < kinds["final"] < 4.0


@pytest.mark.model
def test_two_variants_over_the_test_speech(
    tmp_path: Path, three_sentences: Utterance, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = one_file_manifest(three_sentences, tmp_path)
    out = tmp_path / "ontime.json"

    variants = "--variant base --variant finals:streaming.interim=false"
    code = main([*f"--manifest {manifest} {variants} --out {out}".split()])

    assert code == 0
    printed = capsys.readouterr().out
    assert "| | base | finals |" in printed and "| WER, manifest.jsonl |" in printed
    assert "| word → settled p50 / p90 |" in printed
    assert "| streamed / offline CPU |" in printed
    report = json.loads(out.read_text())
    for run in report["runs"]:
        (file,) = run["files"]
        assert file["words"] == len(three_sentences.text.split())
        assert file["errors"] <= 0.1 * file["words"], file["text"]
        # Each variant's CPU, and the same engine's offline transcription as its baseline.
        assert file["cpu_s"] > 0 and file["offline_cpu_s"] > 0, file
        assert run["cpu_s"] == pytest.approx(file["cpu_s"], abs=0.1)
    base, finals = (run["files"][0] for run in report["runs"])
    # Words settle in partials soon after they are said; without partials, in finals,
    # after the end of their sentence (up to its length and the VAD's 0.45 s later).
    assert len(base["settled"]) >= 0.9 * base["words"]
    assert 0.0 < np.median(base["settled"]) < 1.5, base["settled"]
    assert np.median(finals["settled"]) > np.median(base["settled"]) + 0.3
    assert max(finals["segment_end_to_final"]) < 1.5, finals
    assert base["steps"] >= three_sentences.duration_s / 0.3 / 2, base
    assert finals["steps"] == len(three_sentences.sentences), finals  # one final each
    assert report["runs"][1]["overrides"] == {"WHISPERSTREAM_STREAMING__INTERIM": "false"}
