"""OpenAI's files API (`/v1/audio/transcriptions`, `/v1/models`) through OpenAI's own
Python SDK, pointed at the test server: every response format and `stream=True` on
speech the tests synthesize (real model), and bad input in the middle layer (scripted
engine): an error in OpenAI's shape, and the server goes on."""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Iterator

import av
import httpx
import numpy as np
import openai
import pytest
import soxr
from fakes import ScriptedWhisper, scripted_words
from harness import LiveServer, serving, settings_with
from speech import Utterance, read_pcm, synthesize, wer

from server.engines.ct2 import CTranslate2Whisper

KEY = "compat-test-key"
LONG_SPEECH = [  # over 28 s: transcribed in windows cut at quiet points
    "Streaming speech recognition turns spoken words into text while people are still talking.",
    "The weather today is sunny with a light breeze from the west.",
    "Please send the quarterly report to the finance team before Friday.",
    "My favourite place to walk is the park near the river, early in the morning.",
    "The train to the city leaves at half past eight and arrives before ten.",
    "We will meet again next week to decide which of the plans to follow.",
]


def _client(live: LiveServer, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.compat_url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def model_server(engine: CTranslate2Whisper) -> Iterator[LiveServer]:
    with serving(engine, settings_with(compat={"enabled": True})) as live:
        yield live


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[LiveServer]:
    settings = settings_with(
        compat={"enabled": True, "max_upload_bytes": 400_000}, auth={"api_keys": [KEY]}
    )
    with serving(ScriptedWhisper(), settings) as live:
        yield live


def _encoded(utterance: Utterance, container: str, codec: str, rate: int, channels: int) -> bytes:
    """The utterance re-encoded with PyAV's FFmpeg, at another rate and channel count."""
    pcm, source_rate = read_pcm(utterance.path)
    audio = soxr.resample(pcm.astype(np.float32) / 32768.0, source_rate, rate)
    layout = "stereo" if channels == 2 else "mono"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        assert isinstance(stream, av.AudioStream)
        planes = np.repeat(audio[np.newaxis, :].astype(np.float32), channels, axis=0)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buffer.getvalue()


# The real model ---------------------------------------------------------------------


@pytest.mark.model
def test_every_response_format_transcribes_the_speech(
    model_server: LiveServer, three_sentences: Utterance
) -> None:
    client = _client(model_server)
    listed = client.models.list().data
    assert [m.id for m in listed] == ["whisper-tiny.en-bundled"]
    assert client.models.retrieve(listed[0].id).id == listed[0].id

    def create(**kwargs: object) -> object:
        with three_sentences.path.open("rb") as file:
            return client.audio.transcriptions.create(file=file, model="whisper-1", **kwargs)  # type: ignore[call-overload]

    plain = create()
    assert isinstance(plain, openai.types.audio.Transcription)
    assert wer(three_sentences.text, plain.text) <= 0.1, plain.text
    text = create(response_format="text")
    assert isinstance(text, str) and text.endswith("\n")
    assert wer(three_sentences.text, text) <= 0.1, text

    srt = create(response_format="srt")
    assert isinstance(srt, str)
    cues = re.findall(r"(\d+)\n(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n(.+)\n", srt)
    assert [int(c[0]) for c in cues] == list(range(1, len(cues) + 1)) and len(cues) >= 3, srt
    assert all(a <= b for _, a, b, _ in cues)
    assert wer(three_sentences.text, " ".join(c[3] for c in cues)) <= 0.1
    vtt = create(response_format="vtt")
    assert isinstance(vtt, str) and vtt.startswith("WEBVTT\n\n")
    assert re.search(r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}", vtt), vtt

    verbose = create(response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert isinstance(verbose, openai.types.audio.TranscriptionVerbose)
    assert verbose.language == "english"
    assert abs(verbose.duration - three_sentences.duration_s) < 0.1
    assert wer(three_sentences.text, verbose.text) <= 0.1
    assert verbose.segments and len(verbose.segments) >= 3
    assert verbose.words and abs(len(verbose.words) - len(three_sentences.text.split())) <= 3
    starts = [w.start for w in verbose.words]
    assert starts == sorted(starts) and all(w.start <= w.end for w in verbose.words)
    assert all(re.fullmatch(r"[\w'-]+", w.word) for w in verbose.words), verbose.words
    assert wer(three_sentences.text, " ".join(w.word for w in verbose.words)) <= 0.1
    # The second sentence starts after the first pause (0.5 s lead, then ~4.5 s of speech).
    second = next(s for s in verbose.segments if "weather" in s.text.lower())
    assert 3.0 < second.start < 8.0, second


@pytest.mark.model
def test_stream_true_sends_each_window_as_it_is_decoded_then_done(model_server: LiveServer) -> None:
    long = synthesize(LONG_SPEECH)
    assert long.duration_s > 30
    client = _client(model_server)
    with long.path.open("rb") as file:
        events = list(
            client.audio.transcriptions.create(file=file, model="gpt-4o-transcribe", stream=True)
        )
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and kinds.count("transcript.text.done") == 1
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) >= 2, kinds  # one a window
    done = events[-1]
    assert isinstance(done, openai.types.audio.TranscriptionTextDoneEvent)
    assert "".join(deltas) == done.text
    assert wer(long.text, done.text) <= 0.15, done.text


@pytest.mark.model
@pytest.mark.parametrize(
    ("container", "codec", "rate", "channels"),
    [
        ("flac", "flac", 22_050, 1),
        ("ogg", "libopus", 48_000, 2),
        ("mp3", "libmp3lame", 44_100, 2),
        ("mp4", "aac", 32_000, 1),
        ("webm", "libopus", 48_000, 1),
    ],
    ids=["flac", "ogg-opus", "mp3", "m4a-aac", "webm"],
)
def test_files_in_the_formats_people_upload(
    model_server: LiveServer,
    other_speech: Utterance,
    container: str,
    codec: str,
    rate: int,
    channels: int,
) -> None:
    client = _client(model_server)
    data = _encoded(other_speech, container, codec, rate, channels)
    name = "speech.m4a" if container == "mp4" else f"speech.{container}"
    result = client.audio.transcriptions.create(file=(name, data), model="whisper-1", language="en")
    # 0.2: given this whole file, tiny.en sometimes drops its last two words ("the
    # morning"), as it does for the WAV itself at 22.05 kHz.
    assert wer(other_speech.text, result.text) <= 0.2, result.text


# Bad input (scripted engine) --------------------------------------------------------


def _speech_file(utterance: Utterance) -> tuple[str, bytes]:
    return ("speech.wav", utterance.path.read_bytes())


def test_a_wrong_key_gets_a_401_in_openais_shape(
    scripted_server: LiveServer, other_speech: Utterance
) -> None:
    client = _client(scripted_server, key="wrong")
    with pytest.raises(openai.AuthenticationError) as caught:
        client.audio.transcriptions.create(file=_speech_file(other_speech), model="whisper-1")
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    response = httpx.get(f"{scripted_server.compat_url}/v1/models")  # no key at all
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "invalid_request_error"
    result = _client(scripted_server).audio.transcriptions.create(
        file=_speech_file(other_speech), model="whisper-1"
    )
    assert scripted_words(result.text), result.text


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"response_format": "diarized_json"}, "response_format", "supported: json, text"),
        ({"extra_body": {"speed": "2"}}, "speed", "Unrecognized request argument"),
        (
            {"extra_body": {"known_speaker_names[]": "alice"}},
            "known_speaker_names",
            "not supported",
        ),
        ({"temperature": 7}, "temperature", "from 0 to 1"),
        ({"timestamp_granularities": ["sentence"]}, "timestamp_granularities", "segment, word"),
        ({"language": "de"}, "language", "English only"),
        ({"stream": True, "response_format": "srt"}, "response_format", "json or text"),
        (
            {"file": ("notes.txt", b"these are not the sounds you are looking for" * 40)},
            "file",
            "not audio",
        ),
        ({"file": ("empty.wav", b"")}, "file", "empty"),
    ],
    ids=[
        "format",
        "unknown-field",
        "diarizing-field",
        "temperature",
        "granularity",
        "language",
        "stream-srt",
        "not-audio",
        "empty",
    ],
)
def test_bad_input_gets_a_400_that_says_what_and_the_server_goes_on(
    scripted_server: LiveServer,
    other_speech: Utterance,
    kwargs: dict[str, object],
    param: str,
    words: str,
) -> None:
    client = _client(scripted_server)
    arguments: dict[str, object] = {
        "file": _speech_file(other_speech),
        "model": "whisper-1",
        **kwargs,
    }
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(**arguments)  # type: ignore[call-overload]
    error = caught.value
    assert error.status_code == 400 and error.param == param, error.body
    assert words in error.message, error.message
    assert isinstance(error.body, dict) and error.body["type"] == "invalid_request_error"
    result = client.audio.transcriptions.create(file=_speech_file(other_speech), model="whisper-1")
    assert scripted_words(result.text), result.text


def test_an_oversized_upload_is_refused_with_413(
    scripted_server: LiveServer, three_sentences: Utterance
) -> None:
    data = three_sentences.path.read_bytes()
    assert len(data) > 400_000
    client = _client(scripted_server)
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.transcriptions.create(file=("big.wav", data * 8), model="whisper-1")
    assert caught.value.status_code == 413 and caught.value.code == "file_too_large"
    assert "compat.max_upload_bytes" in caught.value.message

    # Without a Content-Length (chunked), the size is counted as the file arrives.
    def chunked() -> Iterator[bytes]:
        boundary = b"--b0undary"
        yield (
            boundary + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
            b"whisper-1\r\n" + boundary + b"\r\nContent-Disposition: form-data; "
            b'name="file"; filename="big.wav"\r\nContent-Type: audio/wav\r\n\r\n'
        )
        for _ in range(3):
            yield data
        yield b"\r\n" + boundary + b"--\r\n"

    response = httpx.post(
        f"{scripted_server.compat_url}/v1/audio/transcriptions",
        content=chunked(),
        timeout=30,
        headers={
            "Authorization": f"Bearer {KEY}",
            "Content-Type": "multipart/form-data; boundary=b0undary",
        },
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "file_too_large"
    result = client.audio.transcriptions.create(file=("ok.wav", data[:150_000]), model="whisper-1")
    assert scripted_words(result.text), result.text


def test_more_uploads_than_compat_max_uploads_get_429(other_speech: Utterance) -> None:
    engine = ScriptedWhisper()
    settings = settings_with(compat={"enabled": True, "max_uploads": 1})
    with serving(engine, settings) as live:
        client = _client(live)
        engine.gate.clear()  # the first upload waits in the engine
        first: dict[str, object] = {}

        def upload() -> None:
            first["result"] = client.audio.transcriptions.create(
                file=_speech_file(other_speech), model="whisper-1"
            )

        thread = threading.Thread(target=upload)
        thread.start()
        deadline = 100
        while live.app.compat is not None and live.app.compat.state.uploads == 0 and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        with pytest.raises(openai.RateLimitError) as caught:
            client.audio.transcriptions.create(file=_speech_file(other_speech), model="whisper-1")
        assert caught.value.code == "rate_limit_exceeded"
        assert "compat.max_uploads" in caught.value.message
        engine.gate.set()
        thread.join(30)
        result = first["result"]
        assert isinstance(result, openai.types.audio.Transcription)
        assert scripted_words(result.text)


def test_one_client_cannot_take_every_upload_slot(other_speech: Utterance) -> None:
    """Two clients behind a trusted proxy: the first may hold one upload
    (compat.max_uploads_per_client), so a second slot is left for the other."""
    engine = ScriptedWhisper()
    settings = settings_with(
        compat={"enabled": True, "max_uploads": 2, "max_uploads_per_client": 1},
        server={"trusted_proxies": ["127.0.0.1/32"]},
    )

    def behind_proxy(live: LiveServer, address: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{live.compat_url}/v1",
            api_key=KEY,
            max_retries=0,
            default_headers={"X-Forwarded-For": address},
        )

    with serving(engine, settings) as live:
        assert live.app.compat is not None
        state = live.app.compat.state
        greedy, other = behind_proxy(live, "203.0.113.7"), behind_proxy(live, "203.0.113.8")
        engine.gate.clear()  # uploads wait in the engine
        results: dict[str, object] = {}

        def upload(name: str, client: openai.OpenAI) -> threading.Thread:
            def run() -> None:
                results[name] = client.audio.transcriptions.create(
                    file=_speech_file(other_speech), model="whisper-1"
                )

            thread = threading.Thread(target=run)
            thread.start()
            return thread

        def wait_for_uploads(n: int) -> None:
            deadline = time.monotonic() + 10
            while state.uploads < n and time.monotonic() < deadline:
                time.sleep(0.05)
            assert state.uploads == n

        first = upload("greedy", greedy)
        wait_for_uploads(1)
        with pytest.raises(openai.RateLimitError) as caught:
            greedy.audio.transcriptions.create(file=_speech_file(other_speech), model="whisper-1")
        assert "compat.max_uploads_per_client" in caught.value.message
        assert caught.value.response.headers["Retry-After"] == "1"
        second = upload("other", other)
        wait_for_uploads(2)  # the other client got the slot the greedy one could not take
        engine.gate.set()
        first.join(30)
        second.join(30)
        for name in ("greedy", "other"):
            result = results[name]
            assert isinstance(result, openai.types.audio.Transcription), name
            assert scripted_words(result.text)
        assert state.uploads == 0 and not state.uploads_by_client


def test_unknown_models_and_paths_get_404_and_a_foreign_host_421(
    scripted_server: LiveServer,
) -> None:
    client = _client(scripted_server)
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-5")
    assert caught.value.code == "model_not_found"
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.get(f"{scripted_server.compat_url}/v1/secret/../nothing", headers=headers)
    assert response.status_code == 404 and "nothing" not in response.text
    assert response.json()["error"]["code"] == "not_found"
    response = httpx.get(f"{scripted_server.compat_url}/v1/audio/transcriptions", headers=headers)
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    with serving(ScriptedWhisper(), settings_with(compat={"enabled": True})) as open_server:
        url = f"{open_server.compat_url}/v1/models"
        assert httpx.get(url).status_code == 200  # no keys configured: any key, or none
        assert httpx.get(url, headers={"Host": "evil.example"}).status_code == 421
        response = httpx.get(url, headers={"Origin": "https://evil.example"})
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "origin_not_allowed"


def test_the_compat_apis_are_off_by_default() -> None:
    with serving(ScriptedWhisper()) as live:
        assert live.app.compat is None
