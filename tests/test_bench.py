"""`whisperstream bench`: the latency bookkeeping on hand-made logs, and one real run."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from speech import Utterance, one_file_manifest

from server.bench.errors import BenchError
from server.bench.manifest import Item, load_manifest, load_manifests
from server.bench.offline import OfflineResult, quiet_cuts, trim_to_sound
from server.bench.report import markdown_table, run_figures, runs_from_report
from server.bench.runner import RunResult, StreamRecord, items_for_level
from server.bench.scoring import RefWord, analyse_session, lost_phrases, normalize, speech_seconds
from server.bench.variants import Variant, parse_variant
from server.cli import main


def words(*spec: tuple[str, float, float]) -> list[RefWord]:
    return [RefWord(w, s, e) for w, s, e in spec]


def partial(k: int, text: str, stable: str = "") -> dict[str, Any]:
    return {
        "type": "partial",
        "segment": k,
        "text": text,
        "start": 0.0,
        "end": 1.0,
        "stable": stable,
    }


def final(k: int, text: str) -> dict[str, Any]:
    return {"type": "final", "segment": k, "text": text, "start": 0.0, "end": 1.0, "words": []}


def test_latencies_of_one_segment_with_a_revision_and_a_retraction() -> None:
    ref = words(("the", 0.0, 0.3), ("quick", 0.3, 0.6), ("brown", 0.6, 0.9), ("fox", 0.9, 1.2))
    log = [
        (0.0, {"type": "ready"}),
        (0.8, partial(0, "The quick")),
        (1.1, partial(0, "The quick brown box", stable="The quick")),
        # "fox" is right here, but "quick" before it is not: not yet shown correctly.
        (1.4, partial(0, "The quack brown fox", stable="The quick")),
        (1.6, partial(0, "The quick brown fox", stable="The quick brown")),
        (2.0, final(0, "The quick brown fox.")),
        (2.01, {"type": "done", "audio_seconds": 1.5, "segments": 1}),
    ]
    a = analyse_session(ref, log, speed=1.0)
    assert a.first_correct == pytest.approx([0.5, 0.2, 0.2, 0.4])
    assert a.settled == pytest.approx([0.8, 0.5, 0.7, 0.8])  # fox: settled by the final
    assert a.final == pytest.approx([1.7, 1.4, 1.1, 0.8])
    assert a.segment_end_to_final == pytest.approx({0: 0.8})
    assert (a.partials, a.revisions, a.retractions, a.segments) == (4, 2, 1, 1)
    assert a.transcript == "The quick brown fox."


def test_latencies_of_two_segments_at_double_speed_with_errors_in_the_final() -> None:
    ref = words(
        ("hello", 0.0, 0.4),
        ("world", 0.4, 0.8),
        ("good", 2.0, 2.4),
        ("morning", 2.4, 2.8),
        ("all", 2.8, 3.0),
    )
    log = [
        (0.6, partial(0, "hello world")),
        (0.9, final(0, "Hello world.")),
        (1.6, partial(1, "good morning", stable="good")),
        (1.8, final(1, "good mourning.")),  # "morning" wrong, "all" dropped
    ]
    a = analyse_session(ref, log, speed=2.0)  # audio time t was sent at wall time t / 2
    assert a.first_correct == pytest.approx([0.4, 0.2, 0.4, 0.2, None])
    assert a.settled == pytest.approx([0.7, 0.5, 0.4, 0.4, None])
    assert a.final == pytest.approx([0.7, 0.5, 0.6, 0.4, None])
    assert a.segment_end_to_final == pytest.approx({0: 0.5, 1: 0.4})
    assert a.latencies("first_correct") == pytest.approx([0.4, 0.2, 0.4, 0.2])
    assert (a.revisions, a.retractions, a.segments) == (0, 0, 2)


def test_words_not_spoken_yet_are_not_matched_by_an_early_guess() -> None:
    # "the" is said twice; a partial at wall 0.5 s can only mean the first one.
    ref = words(
        ("the", 0.0, 0.2),
        ("cat", 0.2, 0.5),
        ("saw", 0.5, 0.8),
        ("the", 3.0, 3.2),
        ("dog", 3.2, 3.5),
    )
    a = analyse_session(ref, [(0.5, partial(0, "the")), (4.0, final(0, "the cat saw the dog"))])
    assert a.first_correct[0] == pytest.approx(0.3)
    assert a.first_correct[3] == pytest.approx(0.8)


def test_speech_seconds_merges_short_gaps() -> None:
    ref = words(("a", 0.0, 0.5), ("b", 0.7, 1.0), ("c", 3.0, 3.5))
    assert speech_seconds(ref) == pytest.approx(1.5)
    assert speech_seconds([]) == 0.0


def test_offline_windows_cut_at_silences_and_cover_the_audio() -> None:
    rate = 16_000
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(70 * rate)).astype(np.float32)
    for silence_s in (20.0, 41.0):
        audio[int(silence_s * rate) : int((silence_s + 0.5) * rate)] = 0.0
    windows = quiet_cuts(audio, rate)
    assert windows[0][0] == 0 and windows[-1][1] == len(audio)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(windows))
    cuts = [end / rate for _, end in windows[:-1]]
    assert cuts[:2] == [pytest.approx(20.25, abs=0.2), pytest.approx(41.25, abs=0.2)]
    assert all((end - start) / rate <= 28.0 for start, end in windows)
    assert quiet_cuts(audio[: 10 * rate], rate) == [(0, 10 * rate)]


def test_aligned_words_are_pulled_in_from_silence() -> None:
    rate = 16_000
    t = np.arange(3 * rate) / rate
    audio = np.zeros(3 * rate, np.float32)
    for start, end in ((0.5, 0.8), (0.9, 1.2)):  # two words, then silence
        sound = (t >= start) & (t < end)
        audio[sound] = 0.3 * np.sin(2 * np.pi * 220 * t[sound])
    audio += 1e-4 * np.random.default_rng(0).standard_normal(len(audio)).astype(np.float32)
    # As the alignment places them: the first word takes the lead-in, the last the pause.
    trimmed = trim_to_sound(words(("one", 0.0, 0.85), ("two", 0.85, 2.5)), audio, rate)
    spans: list[object] = [(w.start, w.end) for w in trimmed]
    assert spans == [
        (pytest.approx(0.5, abs=0.02), pytest.approx(0.8, abs=0.02)),
        (pytest.approx(0.9, abs=0.02), pytest.approx(1.2, abs=0.02)),
    ]


def test_variants_and_manifests_are_checked() -> None:
    v = parse_variant('fast:streaming.step_s=0.3,WHISPERSTREAM_AUTH__API_KEYS=["a","b"]')
    assert v.name == "fast"
    assert v.env == {
        "WHISPERSTREAM_STREAMING__STEP_S": "0.3",
        "WHISPERSTREAM_AUTH__API_KEYS": '["a","b"]',
    }
    assert parse_variant("baseline").env == {}
    with pytest.raises(BenchError):
        parse_variant("bad:step_s")
    with pytest.raises(BenchError):
        load_manifest(Path("/nonexistent/manifest.jsonl"))


def test_manifests_combine_and_a_recording_listed_twice_is_streamed_once(
    tmp_path: Path,
) -> None:
    for name in ("a.wav", "b.wav", "c.wav"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "one.jsonl").write_text(
        "".join(json.dumps({"wav": w, "text": w}) + "\n" for w in ("a.wav", "b.wav"))
    )
    (tmp_path / "two.jsonl").write_text(
        json.dumps({"wav": str(tmp_path / "b.wav"), "text": "again"})
        + "\n"
        + json.dumps({"wav": "c.wav", "text": "c"})
        + "\n"
    )
    items = load_manifests([tmp_path / "one.jsonl", tmp_path / "two.jsonl"])
    assert [(i.id, i.text) for i in items] == [("a", "a.wav"), ("b", "b.wav"), ("c", "c")]
    assert [i.id for i in load_manifests([tmp_path / "two.jsonl"], limit=1)] == ["b"]


def test_more_streams_than_files_stream_files_again() -> None:
    items = [Item("a", Path("a.wav"), "one"), Item("b", Path("b.wav"), "two")]
    assert items_for_level(items, 1) == items == items_for_level(items, 2)
    assert [i.id for i in items_for_level(items, 5)] == ["a", "b", "a", "b", "a"]


def test_markdown_table_has_a_column_per_run() -> None:
    figures = {
        "variant": "a",
        "concurrency": 1,
        "files": 1,
        "audio_s": 60.0,
        "speech_s": 50.0,
        "wer": 0.1,
        "offline_wer": 0.08,
        "revisions_per_speech_min": 3.0,
        "stable_retractions": 0,
        "server_cpu_s_per_audio_s": None,
        "server_peak_rss_mb": None,
        "segments": 4,
        "failed_sessions": 0,
        "latency_s": {
            k: {"p50": 0.5, "p90": 1.0, "n": 3}
            for k in ("first_correct", "settled", "final", "segment_end_to_final")
        },
    }
    table = markdown_table(
        [figures, {**figures, "variant": "b", "concurrency": 2, "lost_phrases": 3}]
    )
    assert "| | a ×1 | b ×2 |" in table
    assert "| streamed - offline | +2.0 points | +2.0 points |" in table
    assert "| lost phrases | n/a | 3 |" in table  # figures from before they were counted


# Lost phrases -----------------------------------------------------------------------------

REFERENCE = normalize(
    "may justly be considered as the invention of the art of printing and the press"
)


def test_a_lost_phrase_is_three_words_in_a_row_that_offline_got_and_streaming_did_not() -> None:
    offline = list(REFERENCE)
    streamed = REFERENCE[:5] + REFERENCE[10:]  # "the invention of the art" never shown
    assert lost_phrases(REFERENCE, offline, streamed) == [(5, 10)]
    # Two words lost are a word error, not a phrase.
    assert lost_phrases(REFERENCE, offline, REFERENCE[:5] + REFERENCE[7:]) == []
    # Words the offline pass missed too are the model's, not streaming's.
    assert lost_phrases(REFERENCE, REFERENCE[:5] + REFERENCE[10:], streamed) == []
    # Misheard words count as lost; one heard right ("the") ends the run.
    misheard = [*REFERENCE[:5], "a", "convention", "off", "the", "heart", *REFERENCE[10:]]
    assert lost_phrases(REFERENCE, offline, misheard) == [(5, 8)]
    assert lost_phrases(REFERENCE, offline, REFERENCE[:-3]) == [
        (len(REFERENCE) - 3, len(REFERENCE))
    ]
    assert lost_phrases(REFERENCE, offline, []) == [(0, len(REFERENCE))]
    assert lost_phrases([], [], []) == []


def _run_of(text: str, finals: list[str]) -> tuple[RunResult, dict[str, OfflineResult]]:
    ref_words = normalize(text)
    item = Item("f1", Path("f1.wav"), text)
    messages: list[tuple[float, dict[str, Any]]] = [(0.0, {"type": "ready"})]
    messages += [(1.0 + k, final(k, t)) for k, t in enumerate(finals)]
    messages.append((9.0, {"type": "done", "audio_seconds": 8.0, "segments": len(finals)}))
    record = StreamRecord(item, 8.0, messages, 1000, None)
    run = RunResult(
        Variant("v"), 1, [record], {}, ("bundled", "int8", 1, "ctranslate2"), "tiny", 9.0
    )
    ref = [RefWord(w, 0.4 * i, 0.4 * i + 0.3) for i, w in enumerate(ref_words)]
    return run, {"f1": OfflineResult(text, [(0.0, 8.0)], ref)}


def test_lost_phrases_are_listed_per_file_and_counted_in_the_figures() -> None:
    text = "may justly be considered as the invention of the art of printing."
    run, offline = _run_of(text, ["May justly be considered as", "of printing."])
    figures, files = run_figures(run, offline, (0, 12), speed=1.0)
    assert figures["lost_phrases"] == 1
    (lost,) = files[0]["lost_phrases"]
    assert lost == {
        "words": "the invention of the art",
        "ref_index": 5,
        "length": 5,
        "start": 2.0,
        "end": 3.9,
    }
    whole, _ = _run_of(text, [text])
    assert run_figures(whole, offline, (0, 12), speed=1.0)[0]["lost_phrases"] == 0


def test_a_report_from_before_lost_phrases_is_analysed_again_with_them(tmp_path: Path) -> None:
    # The JSON of an earlier bench: no lost phrases anywhere, only the messages.
    text = "may justly be considered as the invention of the art of printing."
    run, offline = _run_of(text, ["May justly be considered as", "of printing."])
    old_figures, old_files = run_figures(run, offline, (0, 12), speed=1.0)
    del old_figures["lost_phrases"]
    for file in old_files:
        del file["lost_phrases"]
    report = tmp_path / "old.json"
    report.write_text(
        json.dumps(
            {
                "manifest": "m.jsonl",
                "speed": 1.0,
                "runs": [{"figures": old_figures, "files": old_files}],
            }
        )
    )
    (again,), _ = runs_from_report(report, None)
    figures, files = run_figures(again, offline, (0, 12), speed=1.0)
    assert figures["lost_phrases"] == 1
    assert files[0]["lost_phrases"][0]["words"] == "the invention of the art"


@pytest.mark.model
def test_bench_runs_end_to_end_against_servers_it_starts(
    tmp_path: Path, three_sentences: Utterance, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = one_file_manifest(three_sentences, tmp_path)
    out = tmp_path / "report.json"
    code = main(
        [
            "bench",
            "--manifest",
            str(manifest),
            "--speed",
            "2",
            "--out",
            str(out),
            "--variant",
            "base",
            "--variant",
            "finals:streaming.interim=false",
            "--markdown",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| | base ×1 | finals ×1 |" in printed
    report = json.loads(out.read_text())
    base, finals_only = (run["figures"] for run in report["runs"])
    for figures in (base, finals_only):
        assert figures["files"] == 1 and figures["failed_sessions"] == 0
        assert figures["wer"] <= 0.15, report["runs"][0]["files"][0]["transcript"]
        assert figures["offline_wer"] is not None and figures["offline_wer"] <= 0.15
        assert figures["stable_retractions"] == 0
        for kind, entry in figures["latency_s"].items():
            assert entry["n"] > 0, kind
            for q in ("p50", "p90"):
                assert math.isfinite(entry[q]) and 0.0 <= entry[q] < 10.0, (kind, entry)
        assert figures["server_cpu_s_per_audio_s"] > 0
        assert figures["server_peak_rss_mb"] > 50
    assert base["partials"] > 0 and finals_only["partials"] == 0  # the override reached it
    # Model steps from the server's /metrics; with no partials, one final step a segment.
    servers = [run["server"] for run in report["runs"]]
    assert base["model_steps_per_audio_s"].get("partial", 0) > 0, servers
    assert finals_only["model_steps_per_audio_s"] == {
        "final": round(finals_only["segments"] / finals_only["audio_s"], 3)
    }, servers
    assert 0 < finals_only["model_busy_s_per_audio_s"] < base["model_busy_s_per_audio_s"], servers
    assert finals_only["overrides"] == {"WHISPERSTREAM_STREAMING__INTERIM": "false"}
    logged = report["runs"][0]["files"][0]
    assert logged["messages"][0][1]["type"] == "ready"
    assert len(logged["words"]) == len(three_sentences.text.split())
    ends = [w["end"] for w in logged["words"]]
    assert ends == sorted(ends) and 0 < ends[-1] <= three_sentences.duration_s

    figures = report["runs"][0]["figures"]
    assert figures["offline_cpu_s_per_audio_s"] > 0  # the baseline's cost, measured
    assert figures["server_cpu_vs_offline"] == pytest.approx(
        # both figures are rounded to 3 decimals, the ratio is not: a relative tolerance
        figures["server_cpu_s_per_audio_s"] / figures["offline_cpu_s_per_audio_s"],
        rel=0.05,
    )
    # The log alone is enough to analyse the runs again, to the same figures (but the
    # offline pass, which runs again, and so costs what it costs this time).
    again = tmp_path / "again.json"
    assert main(["bench", "--from", str(out), "--out", str(again)]) == 0
    measured_again = ("wall_s", "offline_cpu_s_per_audio_s", "server_cpu_vs_offline")
    for before, after in zip(report["runs"], json.loads(again.read_text())["runs"], strict=True):
        assert after["figures"] == {
            **before["figures"],
            **{k: after["figures"][k] for k in measured_again},
        }


def test_an_engine_variant_sets_model_engine() -> None:
    from server.bench.runner import model_key_of
    from server.bench.variants import variant_settings

    variant = parse_variant("torch:model.engine=torch")
    assert variant.env == {"WHISPERSTREAM_MODEL__ENGINE": "torch"}
    settings = variant_settings(None, variant)
    assert settings.model.engine == "torch"
    # Each engine is compared with its own offline transcription.
    assert model_key_of(settings) != model_key_of(variant_settings(None, parse_variant("ct2")))


def test_the_step_benchmark_times_a_step_of_an_engine() -> None:
    from fakes import ScriptedWhisper

    from server.bench.step import time_step
    from streaming.engine import DecodeRequest

    engine = ScriptedWhisper()
    audio = np.full(16_000, 0.3, dtype=np.float32)
    result = time_step(engine, DecodeRequest(audio), repeat=3)
    assert engine.calls == 4  # a warm-up, then three timed
    assert result["cpu_s"] >= 0 and result["wall_s"] >= 0 and result["new_tokens"] >= 1
