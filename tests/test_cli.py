"""The `whisperstream` command as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import free_port
from harness import ROOT, serve_command
from speech import Utterance, wer

from client.mic import open_sounddevice
from client.stream import ClientError


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.model
def test_serve_then_stream_prints_timed_final_lines(other_speech: Utterance) -> None:
    with serve_command() as server:
        result = _cli("stream", str(other_speech.path), "--speed", "0", "--url", server.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines and all(line.startswith("[00:") and "→" in line for line in lines), lines
    text = " ".join(line.split("] ", 1)[1] for line in lines)
    assert wer(other_speech.text, text) <= 0.10, text


def test_stream_to_a_server_that_is_down_says_so(other_speech: Utterance) -> None:
    result = _cli(
        "stream",
        str(other_speech.path),
        "--url",
        f"ws://127.0.0.1:{free_port()}/v1/stream",
        timeout=30,
    )
    assert result.returncode == 1
    assert "cannot connect" in result.stderr


def test_stream_of_a_file_that_is_not_wav_says_so(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.wav"
    bogus.write_text("not audio")
    result = _cli("stream", str(bogus), timeout=30)
    assert result.returncode == 1
    assert "not a readable PCM WAV file" in result.stderr


def test_serve_with_an_invalid_setting_names_the_key() -> None:
    result = _cli("serve", env={"WHISPERSTREAM_SERVER__PORT": "eighty"}, timeout=30)
    assert result.returncode == 2
    assert "server.port" in result.stderr


def test_serve_with_a_model_that_will_not_load_says_why(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _cli("serve", "--model", str(empty), timeout=60)
    assert result.returncode == 2, result.stderr
    assert "has no model.bin" in result.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.bin").write_bytes(b"not a model")
    result = _cli("serve", "--model", str(broken), timeout=60)
    assert result.returncode == 2, result.stderr
    assert "CTranslate2 cannot load the Whisper model" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_public_address_without_keys() -> None:
    result = _cli("serve", "--host", "0.0.0.0", timeout=30)
    assert result.returncode == 2
    assert "auth.api_keys" in result.stderr
    # The compatible APIs' listener is held to the same rule.
    result = _cli(
        "serve",
        timeout=30,
        env={"WHISPERSTREAM_COMPAT__ENABLED": "true", "WHISPERSTREAM_COMPAT__HOST": "0.0.0.0"},
    )
    assert result.returncode == 2
    assert "0.0.0.0" in result.stderr and "auth.api_keys" in result.stderr


def test_mic_without_a_device_or_portaudio_gives_a_clear_message() -> None:
    # CI machines have no sound card; with or without libportaudio2 the message says why.
    try:
        open_sounddevice()
    except ClientError as exc:
        assert "PortAudio" in str(exc) or "no microphone" in str(exc)
    else:
        pytest.skip("this machine has a microphone")
    result = _cli("mic", timeout=30)
    assert result.returncode == 1
    assert "PortAudio" in result.stderr or "no microphone" in result.stderr


def test_the_terminal_renderer_prints_each_segment_once(capsys: pytest.CaptureFixture[str]) -> None:
    """A resumed stream goes on after its last final; should a server send a final of an
    earlier segment again, it is not printed twice."""
    import io

    from client.render import TerminalRenderer

    out = io.StringIO()
    renderer = TerminalRenderer(out)
    final = {"type": "final", "segment": 0, "text": "hello there", "start": 0.0, "end": 1.5}
    renderer.show({"type": "ready"})
    renderer.show(final)
    renderer.notice("the connection closed (1006); reconnecting")
    renderer.show({"type": "ready", "offset_s": 1.5, "first_segment": 1})
    renderer.show(final)
    renderer.show({"type": "partial", "segment": 0, "text": "hello", "start": 0.0, "end": 1.0})
    renderer.show({**final, "segment": 1, "text": "again", "start": 1.5, "end": 2.0})
    assert out.getvalue().splitlines() == [
        "[00:00.00 → 00:01.50] hello there",
        "[00:01.50 → 00:02.00] again",
    ]
    assert "whisperstream: the connection closed (1006); reconnecting" in capsys.readouterr().err


def test_stream_help_offers_to_turn_reconnecting_off() -> None:
    result = _cli("stream", "--help", timeout=30)
    assert result.returncode == 0 and "--no-reconnect" in result.stdout
