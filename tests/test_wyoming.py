"""whisperstream as a Wyoming speech-to-text service, over real TCP, with the `wyoming`
package's own AsyncTcpClient playing Home Assistant's part as its Wyoming integration does:
describe -> info; transcribe, audio-start, 16 kHz 16-bit mono audio-chunks, audio-stop,
then read until `transcript`.

The middle layer runs with `ScriptedWhisper` (words "w1 w2 ..."); one test runs the real
model on synthesized speech and compares words by error rate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from fakes import ScriptedWhisper, free_port, scripted_words
from harness import LiveServer, serve_command, serving, settings_with
from speech import Utterance, read_pcm, wer
from wyoming.asr import Transcribe, Transcript, TranscriptChunk
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event
from wyoming.info import Describe, Info
from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from server.discovery import SERVICE_TYPE, announced_address, service_name
from streaming.audio import to_pcm_s16le
from streaming.engine import Engine

SR = 16_000
CHUNK_SAMPLES = 1024  # what Wyoming satellites send per audio-chunk
TIMEOUT_S = 30.0


def speech_like(seconds: float, rate: int = SR, bursts: int = 2) -> np.ndarray:
    """Loud voiced bursts with pauses the VAD ends a segment on: float32 in [-1, 1].
    ScriptedWhisper hears a word in each loud half second."""
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sign(np.sin(2 * np.pi * 200 * t))
    burst_s = seconds / bursts
    loud = ((t % burst_s) > 0.3) & ((t % burst_s) < burst_s - 1.0)
    return (tone * loud).astype(np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    return to_pcm_s16le(samples.astype(np.float32))


@dataclass
class Heard:
    """What one voice command got back, each event with its arrival time."""

    events: list[tuple[float, Event]] = field(default_factory=list)
    stop_sent: float | None = None  # when audio-stop was written

    def of(self, kind: str) -> list[tuple[float, Event]]:
        return [(t, e) for t, e in self.events if e.type == kind]

    @property
    def types(self) -> list[str]:
        return [e.type for _, e in self.events]

    @property
    def transcript(self) -> str:
        found = self.of("transcript")
        assert len(found) == 1, self.types
        return Transcript.from_event(found[0][1]).text

    @property
    def chunks(self) -> str:
        return "".join(TranscriptChunk.from_event(e).text for _, e in self.of("transcript-chunk"))


@contextmanager
def wyoming_server(
    engine: Engine | None = None, **wyoming: Any
) -> Iterator[tuple[LiveServer, int]]:
    """The whole server with `wyoming` enabled on a free port (`limits` too, if given)."""
    port = free_port()
    limits = wyoming.pop("limits", None)
    sections: dict[str, dict[str, Any]] = {"wyoming": {"enabled": True, "port": port, **wyoming}}
    if limits:
        sections["limits"] = limits
    with serving(engine or ScriptedWhisper(), settings_with(**sections)) as live:
        yield live, port


async def _read_info(client: AsyncTcpClient) -> Info:
    await client.write_event(Describe().event())
    while True:
        event = await client.read_event()
        assert event is not None, "connection closed before info"
        if Info.is_type(event.type):
            return Info.from_event(event)


async def describe(port: int) -> Info:
    async with AsyncTcpClient("127.0.0.1", port, read_timeout=TIMEOUT_S) as client:
        return await _read_info(client)


async def command_on(
    client: AsyncTcpClient,
    pcm: bytes,
    *,
    rate: int = SR,
    channels: int = 1,
    speed: float = 4.0,
    language: str | None = "en",
    until: str = "transcript-stop",
    after: int = 0,
) -> Heard:
    """One voice command on a connection, as Home Assistant sends it (transcribe,
    audio-start, chunks of CHUNK_SAMPLES at `speed` times real time, audio-stop), with
    every event read as it comes, until `until` (or an error). Once answered before its
    audio-stop, only `after` more chunks are sent, then the audio-stop."""
    heard = Heard()

    async def read() -> None:
        while True:
            try:
                event = await client.read_event()
            except ConnectionError:  # reset after its error event: audio was still coming
                event = None
            if event is None:
                return
            heard.events.append((time.monotonic(), event))
            if event.type in (until, "error"):
                return

    reader = asyncio.create_task(read())
    try:
        await client.write_event(Transcribe(language=language).event())
        await client.write_event(AudioStart(rate=rate, width=2, channels=channels).event())
        step = CHUNK_SAMPLES * 2 * channels
        began, extra = time.monotonic(), 0
        for i, offset in enumerate(range(0, len(pcm), step)):
            if heard.of("error"):
                break  # refused: the server closes the connection
            if reader.done():
                extra += 1
                if extra > after:
                    break
            await client.write_event(
                AudioChunk(
                    rate=rate, width=2, channels=channels, audio=pcm[offset : offset + step]
                ).event()
            )
            await asyncio.sleep(
                max(0.0, began + (i + 1) * CHUNK_SAMPLES / rate / speed - time.monotonic())
            )
        if not heard.of("error"):
            heard.stop_sent = time.monotonic()
            await client.write_event(AudioStop().event())
    except ConnectionError:  # closed after an error event, which the reader reads
        await asyncio.wait_for(reader, TIMEOUT_S)
        assert heard.of("error"), "the server closed the connection with no error event"
    await asyncio.wait_for(reader, TIMEOUT_S)
    return heard


async def voice_command(port: int, pcm: bytes, **options: Any) -> Heard:
    """One voice command on a connection of its own (`command_on`'s options)."""
    client = AsyncTcpClient("127.0.0.1", port, read_timeout=TIMEOUT_S)
    await client.connect()
    try:
        return await command_on(client, pcm, **options)
    finally:
        with contextlib.suppress(ConnectionError):  # a refused command's connection is reset
            await client.disconnect()


def test_describe_answers_info_with_a_streaming_asr_program() -> None:
    with wyoming_server() as (_, port):
        info = asyncio.run(describe(port))
    assert len(info.asr) == 1
    program = info.asr[0]
    assert program.name == "whisperstream" and program.installed and program.version
    assert program.supports_transcript_streaming
    assert program.requires_external_vad  # without stop_on_silence, audio-stop ends a command
    assert "audio-stop" in (program.description or "")
    [model] = program.models
    assert model.name == "scripted" and model.installed and model.languages == ["en"]
    assert model.attribution.name == "OpenAI"


class _WyomingBrowser:
    """Home Assistant's side of zeroconf: browse `_wyoming._tcp.local.`, resolve what is
    added, note what is removed."""

    def __init__(self) -> None:
        self.zeroconf = AsyncZeroconf()
        self.added: asyncio.Queue[str] = asyncio.Queue()
        self.removed: asyncio.Queue[str] = asyncio.Queue()
        self.browser = AsyncServiceBrowser(
            self.zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._changed]
        )

    def _changed(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change is ServiceStateChange.Added:
            self.added.put_nowait(name)
        elif state_change is ServiceStateChange.Removed:
            self.removed.put_nowait(name)

    async def next_named(self, queue: asyncio.Queue[str], name: str) -> str:
        async with asyncio.timeout(TIMEOUT_S):
            while (found := await queue.get()) != name:
                pass
        return found

    async def resolve(self, name: str) -> AsyncServiceInfo:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        assert await info.async_request(self.zeroconf.zeroconf, 3000), name
        return info

    async def close(self) -> None:
        await self.browser.async_cancel()
        await self.zeroconf.async_close()


def test_zeroconf_announces_the_service_home_assistant_connects_to_and_withdraws_it() -> None:
    name = f"whisperstream-test-{os.getpid()}-{time.monotonic_ns()}"
    instance = f"{name}.{SERVICE_TYPE}"

    async def discover_and_describe(port: int) -> tuple[AsyncServiceInfo, Info, _WyomingBrowser]:
        browser = _WyomingBrowser()
        await browser.next_named(browser.added, instance)
        found = await browser.resolve(instance)
        [address] = found.parsed_addresses()
        assert found.port == port
        async with AsyncTcpClient(address, found.port, read_timeout=TIMEOUT_S) as client:
            await client.write_event(Describe().event())
            info = await _read_info(client)
        return found, info, browser

    async def withdrawn(browser: _WyomingBrowser) -> None:
        try:
            await browser.next_named(browser.removed, instance)
        finally:
            await browser.close()

    loop = asyncio.new_event_loop()
    try:
        with wyoming_server(zeroconf=True, zeroconf_name=name) as (_, port):
            found, info, browser = loop.run_until_complete(discover_and_describe(port))
        # The server has stopped: its goodbye removes it from Home Assistant's list.
        loop.run_until_complete(withdrawn(browser))
    finally:
        loop.close()
    assert found.parsed_addresses() == ["127.0.0.1"]  # wyoming.host, as configured
    assert found.properties.get(b"program") == b"whisperstream"
    assert info.asr and info.asr[0].name == "whisperstream"


def test_transcript_chunks_come_before_audio_stop_and_add_up_to_the_transcript() -> None:
    pcm = pcm16(speech_like(6.0, bursts=2))
    with wyoming_server() as (live, port):
        heard = asyncio.run(voice_command(port, pcm, speed=2.0))
        info = asyncio.run(describe(port))  # the server serves on
    assert info.asr
    types = heard.types
    assert types[0] == "transcript-start" and types[-2:] == ["transcript", "transcript-stop"]
    assert scripted_words(heard.transcript, at_least=4), heard.transcript
    assert heard.stop_sent is not None
    early = [t for t, _ in heard.of("transcript-chunk") if t < heard.stop_sent]
    assert early, f"no transcript-chunk before audio-stop: {types}"
    assert heard.transcript.startswith(heard.chunks) and heard.chunks, (
        heard.chunks,
        heard.transcript,
    )
    assert live.app.active_sessions == 0


def test_home_assistants_exact_flow_reading_only_after_audio_stop() -> None:
    """Home Assistant writes the whole command before it reads anything, and stops at the
    transcript: the streaming events wait in the socket and are skipped."""

    async def home_assistant(port: int, pcm: bytes) -> str:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=TIMEOUT_S) as client:
            await client.write_event(Transcribe(language="en-US").event())
            await client.write_event(AudioStart(rate=SR, width=2, channels=1).event())
            step = CHUNK_SAMPLES * 2
            for offset in range(0, len(pcm), step):
                await client.write_event(
                    AudioChunk(
                        rate=SR, width=2, channels=1, audio=pcm[offset : offset + step]
                    ).event()
                )
                await asyncio.sleep(0.01)
            await client.write_event(AudioStop().event())
            while True:
                event = await client.read_event()
                assert event is not None, "connection lost"
                if Transcript.is_type(event.type):
                    return Transcript.from_event(event).text

    with wyoming_server() as (live, port):
        text = asyncio.run(home_assistant(port, pcm16(speech_like(4.0, bursts=1))))
        assert scripted_words(text), text
        deadline = time.monotonic() + 10
        while live.app.active_sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.app.active_sessions == 0


def test_44_1_khz_stereo_is_resampled_and_mixed_down() -> None:
    rate = 44_100
    mono = speech_like(5.0, rate=rate, bursts=1)
    stereo = np.stack([mono, np.zeros_like(mono)], axis=1).reshape(-1)  # speech on the left
    with wyoming_server() as (_, port):
        heard = asyncio.run(voice_command(port, pcm16(stereo), rate=rate, channels=2))
    assert scripted_words(heard.transcript), heard.transcript
    assert heard.types[-1] == "transcript-stop"


def test_silence_only_gets_an_empty_transcript() -> None:
    with wyoming_server() as (live, port):
        heard = asyncio.run(voice_command(port, bytes(2 * SR * 3)))
        assert live.app.active_sessions == 0
    assert heard.transcript == "" and not heard.of("transcript-chunk") and not heard.of("error")
    assert heard.types == ["transcript-start", "transcript", "transcript-stop"]


def test_a_client_that_disconnects_mid_command_frees_its_session() -> None:
    async def vanish(port: int, pcm: bytes) -> None:
        client = AsyncTcpClient("127.0.0.1", port)
        await client.connect()
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=SR, width=2, channels=1).event())
        for offset in range(0, len(pcm) // 2, CHUNK_SAMPLES * 2):
            await client.write_event(
                AudioChunk(
                    rate=SR, width=2, channels=1, audio=pcm[offset : offset + CHUNK_SAMPLES * 2]
                ).event()
            )
        await asyncio.sleep(0.3)
        await client.disconnect()  # no audio-stop

    with wyoming_server() as (live, port):
        asyncio.run(vanish(port, pcm16(speech_like(6.0))))
        deadline = time.monotonic() + 10
        while live.app.active_sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.app.active_sessions == 0
        heard = asyncio.run(voice_command(port, pcm16(speech_like(3.0, bursts=1))))
        assert scripted_words(heard.transcript, at_least=2), heard.transcript


async def _raw(port: int, data: bytes) -> Event | None:
    """Write bytes that are not a proper event; the first event back (or None: closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        event = await asyncio.wait_for(async_read_event(reader), TIMEOUT_S)
        rest = await asyncio.wait_for(reader.read(), TIMEOUT_S)  # then the server closes
        assert rest == b""
        return event
    finally:
        writer.close()


@pytest.mark.parametrize(
    "data",
    [
        b"this is not json\n",
        b'{"data": {"text": "no type"}}\n',
        b'{"type": "audio-chunk", "payload_length": 99999999999}\n',
        b'{"type": "audio-start", "data_length": "many"}\n',
        b'{"type": "' + b"x" * 70_000 + b'"}\n',
    ],
    ids=["not-json", "no-type", "huge-payload", "bad-length", "long-line"],
)
def test_a_malformed_header_gets_an_error_event_and_the_server_serves_on(data: bytes) -> None:
    with wyoming_server() as (live, port):
        event = asyncio.run(_raw(port, data))
        assert event is not None and Error.is_type(event.type), event
        assert Error.from_event(event).code == "bad_request"
        assert asyncio.run(describe(port)).asr
        heard = asyncio.run(voice_command(port, pcm16(speech_like(3.0, bursts=1))))
        assert scripted_words(heard.transcript, at_least=2)
        assert live.app.active_sessions == 0


@pytest.mark.parametrize(
    ("start", "code", "says"),
    [
        (AudioStart(rate=SR, width=1, channels=1), "bad_audio", "16-bit"),
        (AudioStart(rate=SR, width=2, channels=6), "bad_audio", "1 or 2"),
        (AudioStart(rate=96_000, width=2, channels=1), "bad_audio", "48000"),
    ],
)
def test_an_audio_format_it_cannot_take_gets_an_error_event(
    start: AudioStart, code: str, says: str
) -> None:
    async def command(port: int) -> list[Event]:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=TIMEOUT_S) as client:
            await client.write_event(Transcribe(language="en").event())
            await client.write_event(start.event())
            events = []
            while (event := await client.read_event()) is not None:
                events.append(event)
            return events

    with wyoming_server() as (live, port):
        events = asyncio.run(command(port))
        assert live.app.active_sessions == 0
    assert [e.type for e in events] == ["error"], events
    error = Error.from_event(events[0])
    assert error.code == code and says in error.text, error


def test_an_unknown_language_and_a_full_server_are_refused_with_error_events() -> None:
    async def scenario(port: int) -> tuple[Heard, Heard]:
        german = await voice_command(port, pcm16(speech_like(1.0)), language="de")
        # One command holds the only slot while another asks for one.
        holder = asyncio.create_task(
            voice_command(port, pcm16(speech_like(4.0, bursts=1)), speed=1.0)
        )
        await asyncio.sleep(1.0)
        refused = await voice_command(port, pcm16(speech_like(1.0)))
        held = await holder
        assert scripted_words(held.transcript, at_least=2), held.transcript
        return german, refused

    with wyoming_server(limits={"max_sessions": 1}) as (_, port):
        german, refused = asyncio.run(scenario(port))
    [(_, error)] = german.of("error")
    assert "not supported" in Error.from_event(error).text
    [(_, busy)] = refused.of("error")
    assert Error.from_event(busy).code == "busy", busy
    assert not german.of("transcript") and not refused.of("transcript")


def test_stop_on_silence_sends_the_transcript_at_the_first_pause() -> None:
    """The pause after the first of two bursts ends the command; the audio that follows,
    up to its audio-stop, is dropped, and the next command on the connection is served."""

    async def two_commands(port: int) -> tuple[Heard, Heard]:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=TIMEOUT_S) as client:
            first = await command_on(client, pcm16(speech_like(8.0, bursts=2)), speed=2.0, after=5)
            second = await command_on(client, pcm16(speech_like(3.0, bursts=1)))
        return first, second

    with wyoming_server(stop_on_silence=True) as (live, port):
        info = asyncio.run(describe(port))
        first, second = asyncio.run(two_commands(port))
        assert live.app.active_sessions == 0
    assert not info.asr[0].requires_external_vad
    assert "first pause" in (info.asr[0].description or "")
    assert first.stop_sent is not None
    [(at, _)] = first.of("transcript")
    assert at < first.stop_sent, "the transcript waited for audio-stop"
    words = first.transcript.split()
    assert scripted_words(first.transcript, at_least=2) and len(words) <= 6, words
    assert first.types[-1] == "transcript-stop"
    assert second.types[0] == "transcript-start", second.types  # nothing left of the first
    assert scripted_words(second.transcript, at_least=2), second.transcript


def test_serve_refuses_wyoming_on_a_public_address_unless_allowed() -> None:
    """Wyoming has no authentication: API keys do not protect it."""
    env = {
        **os.environ,
        "WHISPERSTREAM_WYOMING__ENABLED": "true",
        "WHISPERSTREAM_WYOMING__HOST": "0.0.0.0",
        "WHISPERSTREAM_AUTH__API_KEYS": '["k"]',
    }
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 2, result.stderr
    assert "allow_public_without_auth" in result.stderr


def test_the_wyoming_bench_cuts_audio_as_a_satellite_and_measures_a_server(
    tmp_path: Path,
) -> None:
    from server.bench.manifest import Item
    from server.bench.wyoming import satellite_audio
    from server.cli import main

    wav = tmp_path / "command.wav"
    audio = np.concatenate([speech_like(4.0, bursts=1), np.zeros(3 * SR, np.float32)])
    with wave.open(str(wav), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SR)
        out.writeframes(pcm16(audio))
    cut_s = len(satellite_audio(Item("c", wav, ""), 0.7)) / 2 / SR
    assert 3.0 + 0.7 <= cut_s <= 3.0 + 0.7 + 0.4, cut_s  # speech ends at 3.0 s
    assert len(satellite_audio(Item("c", wav, ""), 0.0)) == 2 * len(audio)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "c", "wav": "command.wav", "text": "w1 w2 w3"}) + "\n")
    report = tmp_path / "r.json"
    with wyoming_server() as (_, port):
        code = main(
            [
                "bench",
                "--wyoming",
                "--url",
                f"tcp://127.0.0.1:{port}",
                "--manifest",
                str(manifest),
                "--speed",
                "4",
                "--out",
                str(report),
            ]
        )
    assert code == 0
    [server] = json.loads(report.read_text())["servers"]
    assert server["files"] == 1 and server["failed"] == 0 and server["streaming"]
    assert server["stop_to_transcript_p50_s"] is not None
    assert server["chunks_before_stop_per_file"] >= 1
    [command] = server["commands"]
    assert scripted_words(command["transcript"], at_least=2), command


@pytest.mark.model
def test_the_real_model_transcribes_a_voice_command_with_a_small_wer(
    engine: Engine, three_sentences: Utterance
) -> None:
    samples, rate = read_pcm(three_sentences.path)
    audio = soxr.resample(samples.astype(np.float32) / 32768.0, rate, SR)  # as HA sends it
    with wyoming_server(engine) as (_, port):
        heard = asyncio.run(voice_command(port, pcm16(audio), speed=2.0))
    text = heard.transcript
    assert wer(three_sentences.text, text) <= 0.15, text
    assert heard.stop_sent is not None
    assert any(t < heard.stop_sent for t, _ in heard.of("transcript-chunk")), heard.types
    assert text.startswith(heard.chunks) and len(heard.chunks.split()) >= 10, heard.chunks


def test_zeroconf_announces_a_reachable_address_for_a_wildcard_bind() -> None:
    assert announced_address("127.0.0.1") == "127.0.0.1"
    assert announced_address("localhost") == "127.0.0.1"
    address = announced_address("0.0.0.0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as own:
        own.bind((address, 0))  # an address of this machine, not a guess
    assert service_name("kitchen.pi") == f"kitchen-pi.{SERVICE_TYPE}"


def test_a_drain_refuses_new_commands_after_its_grace_while_a_live_one_finishes() -> None:
    """SIGTERM (`live.stop()`): past `limits.drain_grace_s` a new voice command gets an
    error event, as the other front doors refuse; the command being spoken gets its
    transcript."""
    long_pcm, short_pcm = pcm16(speech_like(6.0, bursts=2)), pcm16(speech_like(2.0, bursts=1))
    limits = {"drain_grace_s": 0.5, "shutdown_timeout_s": 10.0}
    with wyoming_server(limits=limits) as (live, port):

        async def run() -> tuple[Heard, Heard]:
            speaking = asyncio.create_task(voice_command(port, long_pcm, speed=1.0))
            await asyncio.sleep(1.5)
            live.stop()
            await asyncio.sleep(1.0)  # past the grace
            refused = await voice_command(port, short_pcm, speed=4.0)
            return await asyncio.wait_for(speaking, TIMEOUT_S), refused

        finished, refused = asyncio.run(run())
    [(_, error)] = refused.of("error")
    assert Error.from_event(error).code == "shutting_down", refused.types
    assert not refused.of("transcript")
    assert scripted_words(finished.transcript), finished.types
    assert finished.types[-1] == "transcript-stop"


@pytest.mark.model
def test_whisperstream_serve_with_wyoming_loads_the_model_then_serves_a_command(
    three_sentences: Utterance,
) -> None:
    """`whisperstream serve` as a user starts it for Home Assistant: the model loads after
    the ports open (the Wyoming service must not ask it for its languages before), then
    describe and a voice command are served."""
    port = free_port()
    env = {"WHISPERSTREAM_WYOMING__ENABLED": "true", "WHISPERSTREAM_WYOMING__PORT": str(port)}
    samples, rate = read_pcm(three_sentences.path)
    audio = soxr.resample(samples.astype(np.float32) / 32768.0, rate, SR)
    with serve_command(env) as served:
        info = asyncio.run(describe(port))
        heard = asyncio.run(voice_command(port, pcm16(audio), speed=4.0))
        assert served.process.poll() is None
    assert info.asr and info.asr[0].models[0].name == "whisper-tiny.en (bundled)"
    assert wer(three_sentences.text, heard.transcript) <= 0.15, heard.transcript
