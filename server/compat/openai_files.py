"""OpenAI's files API: `POST /v1/audio/transcriptions` and `GET /v1/models`.

An upload is read as it arrives (at most `compat.max_upload_bytes`), decoded with PyAV
to 16 kHz mono (server/compat/decode.py), and transcribed as the benchmark's offline
baseline is (streaming/longform.py: windows of 15-25 s cut at quiet points, each
prompted with the previous window's text), on the server's scheduler at
`BACKGROUND` priority, so a live session's step always goes first. At most
`compat.max_uploads` files are taken at once, `compat.max_uploads_per_client` of them
from one client (its address); more are refused with HTTP 429.

Multipart fields: `file`, `model` (any name: the served model answers), `language`,
`prompt` (the first window's prompt), `response_format` (`json`, `text`, `srt`,
`vtt`, `verbose_json`), `timestamp_granularities[]` (`segment`, `word`),
`temperature` (accepted; decoding is greedy or the configured beam), `include[]`
(`logprobs`: each word's log probability), `chunking_strategy` (accepted; files are
always cut at quiet points), `stream` (`true`: Server-Sent Events, one
`transcript.text.delta` per window as it is decoded, then `transcript.text.done`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, web

from server.compat.common import ApiError, CompatState, client_address, request_key
from server.compat.decode import AudioTooLong, UndecodableAudio, decode_to_16k
from server.scheduler import BACKGROUND
from streaming.audio import MODEL_SAMPLE_RATE_HZ
from streaming.engine import Hypothesis, Word
from streaming.longform import quiet_cuts, window_request
from streaming.policy import drop_hallucination
from streaming.protocol import ProtocolError, StreamParams

log = logging.getLogger(__name__)

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("segment", "word")
FIELDS = frozenset(
    {
        "file",
        "model",
        "language",
        "prompt",
        "response_format",
        "temperature",
        "stream",
        "timestamp_granularities[]",
        "timestamp_granularities",
        "include[]",
        "include",
        "chunking_strategy",
    }
)
UNSUPPORTED_FIELDS = frozenset(
    {  # OpenAI's, for diarizing models this server has not
        "known_speaker_names[]",
        "known_speaker_references[]",
        "known_speaker_names",
        "known_speaker_references",
    }
)
MAX_FIELD_BYTES = 65_536  # a form field other than the file
FORM_OVERHEAD_BYTES = 1_048_576  # the other fields and the multipart framing
SEGMENT_GAP_S = 1.0  # a pause this long between words starts a new segment
MAX_SEGMENT_S = 15.0  # and so does a segment this long
_EDGE_PUNCTUATION = re.compile(r"^[^\w']+|[^\w']+$")
_LANGUAGE_NAMES = {
    "en": "english",
    "de": "german",
    "fr": "french",
    "es": "spanish",
    "it": "italian",
    "pt": "portuguese",
    "nl": "dutch",
    "ru": "russian",
    "pl": "polish",
    "uk": "ukrainian",
    "cs": "czech",
    "sv": "swedish",
    "da": "danish",
    "no": "norwegian",
    "fi": "finnish",
    "tr": "turkish",
    "el": "greek",
    "hu": "hungarian",
    "ro": "romanian",
    "ar": "arabic",
    "he": "hebrew",
    "hi": "hindi",
    "ja": "japanese",
    "ko": "korean",
    "zh": "chinese",
    "vi": "vietnamese",
    "th": "thai",
    "id": "indonesian",
    "ca": "catalan",
}


@dataclass
class Upload:
    """What the form asked for."""

    data: bytes = b""
    filename: str = ""
    model: str = ""
    language: str | None = None
    prompt: str = ""
    response_format: str = "json"
    granularities: list[str] = field(default_factory=list)
    logprobs: bool = False
    stream: bool = False


@dataclass(frozen=True)
class Window:
    start_s: float
    end_s: float
    hypothesis: Hypothesis

    @property
    def text(self) -> str:
        return self.hypothesis.text


# Reading the form -------------------------------------------------------------------


async def _read_part(part: BodyPartReader, limit: int, what: str) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk(65_536):
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413,
                f"{what} is larger than {limit} bytes"
                + (" (compat.max_upload_bytes)" if what == "the file" else ""),
                param="file" if what == "the file" else None,
                code="file_too_large" if what == "the file" else None,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _flag(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0", ""):
        return False
    raise ApiError(
        400,
        f"Invalid value for '{name}': {value!r}; expected true or false",
        param=name,
        code="invalid_value",
    )


async def read_upload(request: web.Request, max_bytes: int) -> Upload:
    if not request.content_type.startswith("multipart/form-data"):
        raise ApiError(
            400,
            "the request must be multipart/form-data with a 'file' field "
            f"(got {request.content_type or 'no Content-Type'})",
        )
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise ApiError(400, f"malformed multipart body ({exc})") from None
    upload = Upload()
    seen_file = seen_model = False
    while True:
        try:
            part = await reader.next()
        except ValueError as exc:
            raise ApiError(400, f"malformed multipart body ({exc})") from None
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "nested multipart bodies are not supported")
        name = part.name or ""
        if name == "file":
            upload.data = await _read_part(part, max_bytes, "the file")
            upload.filename = part.filename or ""
            seen_file = True
            continue
        raw = await _read_part(part, MAX_FIELD_BYTES, f"field '{name}'")
        value = raw.decode("utf-8", errors="replace")
        if name in UNSUPPORTED_FIELDS:
            raise ApiError(
                400,
                f"'{name.rstrip('[]')}' is not supported by this server "
                "(it has no diarizing model)",
                param=name.rstrip("[]"),
                code="unsupported_parameter",
            )
        if name not in FIELDS:
            raise ApiError(
                400,
                f"Unrecognized request argument supplied: {name}",
                param=name,
                code="unknown_parameter",
            )
        _apply_field(upload, name.removesuffix("[]"), value)
        seen_model = seen_model or name == "model"
    if not seen_file:
        raise ApiError(
            400,
            "you must provide a 'file' with the audio (multipart field 'file')",
            param="file",
            code="missing_required_parameter",
        )
    if not seen_model:
        raise ApiError(
            400,
            "you must provide a 'model' parameter (any name will do: this "
            "server transcribes with the model it serves)",
            param="model",
            code="missing_required_parameter",
        )
    if not upload.data:
        raise ApiError(400, "the file is empty", param="file", code="invalid_value")
    if upload.stream and upload.response_format not in ("json", "text"):
        raise ApiError(
            400,
            f"stream=true is supported with response_format json or text, "
            f"not {upload.response_format}",
            param="response_format",
            code="unsupported_value",
        )
    return upload


def _apply_field(upload: Upload, name: str, value: str) -> None:
    if name == "model":
        upload.model = value
    elif name == "language":
        upload.language = value.strip().lower() or None
    elif name == "prompt":
        upload.prompt = value
    elif name == "response_format":
        if value not in RESPONSE_FORMATS:
            raise ApiError(
                400,
                f"Invalid value for 'response_format': {value!r}; supported: "
                f"{', '.join(RESPONSE_FORMATS)}",
                param="response_format",
                code="unsupported_value",
            )
        upload.response_format = value
    elif name == "temperature":
        try:
            temperature = float(value)
        except ValueError:
            temperature = math.nan
        if not 0.0 <= temperature <= 1.0:
            raise ApiError(
                400,
                f"Invalid value for 'temperature': {value!r}; expected a number from 0 to 1",
                param="temperature",
                code="invalid_value",
            )
    elif name == "timestamp_granularities":
        if value not in GRANULARITIES:
            raise ApiError(
                400,
                f"Invalid value for 'timestamp_granularities': {value!r}; supported: segment, word",
                param="timestamp_granularities",
                code="unsupported_value",
            )
        upload.granularities.append(value)
    elif name == "include":
        if value != "logprobs":
            raise ApiError(
                400,
                f"Invalid value for 'include': {value!r}; supported: logprobs",
                param="include",
                code="unsupported_value",
            )
        upload.logprobs = True
    elif name == "stream":
        upload.stream = _flag("stream", value)
    # chunking_strategy: accepted; files are always cut at quiet points


# Transcribing -----------------------------------------------------------------------


async def transcribe_windows(
    state: CompatState, audio: np.ndarray, language: str, prompt: str
) -> AsyncIterator[Window]:
    """Each window's hypothesis (times relative to the file), as it is decoded."""
    host = state.host
    policy = host.settings.streaming.policy_options()
    previous = ""
    for window in quiet_cuts(audio):
        request = window_request(audio, window, previous, prompt=prompt, language=language)
        hypothesis = await host.scheduler.transcribe(request, priority=BACKGROUND)
        if drop_hallucination(hypothesis, policy):  # judged no speech, as live finals are
            hypothesis = Hypothesis((), hypothesis.no_speech_prob, hypothesis.avg_logprob)
        start_s = window[0] / MODEL_SAMPLE_RATE_HZ
        shifted = tuple(
            Word(w.text, start_s + w.start_s, start_s + w.end_s, w.probability, w.tokens)
            for w in hypothesis.words
        )
        previous = hypothesis.text
        yield Window(
            start_s,
            window[1] / MODEL_SAMPLE_RATE_HZ,
            Hypothesis(shifted, hypothesis.no_speech_prob, hypothesis.avg_logprob),
        )


def _language(state: CompatState, upload: Upload) -> str:
    try:
        config = state.host.session_config(StreamParams(language=upload.language))
    except ProtocolError as exc:
        raise ApiError(400, exc.message, param="language", code="unsupported_language") from None
    return config.language


# Answers ----------------------------------------------------------------------------


def _join(windows: list[Window]) -> str:
    return " ".join(w.text for w in windows if w.text)


def _bare(word: Word) -> str:
    return _EDGE_PUNCTUATION.sub("", word.text.strip())


def _segments(windows: list[Window]) -> list[dict[str, Any]]:
    """Whisper-style segments: words grouped at sentence ends, pauses and window edges."""
    out: list[dict[str, Any]] = []
    for window in windows:
        group: list[Word] = []
        for word in window.hypothesis.words:
            if group and (
                word.start_s - group[-1].end_s >= SEGMENT_GAP_S
                or word.end_s - group[0].start_s > MAX_SEGMENT_S
            ):
                out.append(_segment(len(out), window, group))
                group = []
            group.append(word)
            if word.text.rstrip().endswith((".", "?", "!")):
                out.append(_segment(len(out), window, group))
                group = []
        if group:
            out.append(_segment(len(out), window, group))
    return out


def _segment(index: int, window: Window, words: list[Word]) -> dict[str, Any]:
    text = "".join(w.text for w in words)
    encoded = text.strip().encode()
    return {
        "id": index,
        "seek": round(window.start_s * 100),
        "start": round(words[0].start_s, 3),
        "end": round(max(words[-1].end_s, words[0].start_s), 3),
        "text": text if text.startswith(" ") else f" {text}",
        "tokens": [t for w in words for t in w.tokens],
        "temperature": 0.0,
        "avg_logprob": round(window.hypothesis.avg_logprob, 4),
        "compression_ratio": round(len(encoded) / len(zlib.compress(encoded)), 4)
        if encoded
        else 0.0,
        "no_speech_prob": round(window.hypothesis.no_speech_prob, 4),
    }


def _words(windows: list[Window]) -> list[dict[str, Any]]:
    return [
        {"word": bare, "start": round(w.start_s, 3), "end": round(w.end_s, 3)}
        for window in windows
        for w in window.hypothesis.words
        if (bare := _bare(w))
    ]


def _logprobs(words: tuple[Word, ...] | list[Word]) -> list[dict[str, Any]]:
    return [
        {
            "token": w.text,
            "logprob": round(math.log(max(w.probability, 1e-12)), 5),
            "bytes": list(w.text.encode()),
        }
        for w in words
    ]


def _timestamp(seconds: float, separator: str) -> str:
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def subtitles(segments: list[dict[str, Any]], vtt: bool) -> str:
    cues = []
    for n, segment in enumerate(segments, 1):
        sep = "." if vtt else ","
        times = f"{_timestamp(segment['start'], sep)} --> {_timestamp(segment['end'], sep)}"
        text = segment["text"].strip()
        cues.append(f"{times}\n{text}\n" if vtt else f"{n}\n{times}\n{text}\n")
    body = "\n".join(cues)
    return f"WEBVTT\n\n{body}" if vtt else body


def answer(upload: Upload, windows: list[Window], language: str, duration_s: float) -> web.Response:
    text = _join(windows)
    usage = {"type": "duration", "seconds": math.ceil(duration_s)}
    fmt = upload.response_format
    if fmt == "text":
        return web.Response(text=text + "\n", content_type="text/plain")
    if fmt in ("srt", "vtt"):
        return web.Response(
            text=subtitles(_segments(windows), fmt == "vtt"), content_type="text/plain"
        )
    if fmt == "verbose_json":
        body: dict[str, Any] = {
            "task": "transcribe",
            "language": _LANGUAGE_NAMES.get(language, language),
            "duration": round(duration_s, 3),
            "text": text,
        }
        granularities = upload.granularities or ["segment"]
        if "segment" in granularities:
            body["segments"] = _segments(windows)
        if "word" in granularities:
            body["words"] = _words(windows)
        body["usage"] = usage
        return web.json_response(body)
    body = {"text": text, "usage": usage}
    if upload.logprobs:
        body["logprobs"] = _logprobs([w for window in windows for w in window.hypothesis.words])
    return web.json_response(body)


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


async def _stream(
    request: web.Request, state: CompatState, upload: Upload, audio: np.ndarray, language: str
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    texts: list[str] = []
    words: list[Word] = []
    try:
        async for window in transcribe_windows(state, audio, language, upload.prompt):
            if _client_left(request):
                log.info("upload: the client left; transcription stopped")
                return response
            if not window.text:
                continue
            delta = window.text if not texts else f" {window.text}"
            texts.append(window.text)
            event: dict[str, Any] = {"type": "transcript.text.delta", "delta": delta}
            if upload.logprobs:
                event["logprobs"] = _logprobs(window.hypothesis.words)
            words.extend(window.hypothesis.words)
            await response.write(_sse(event))
        done: dict[str, Any] = {"type": "transcript.text.done", "text": " ".join(texts)}
        if upload.logprobs:
            done["logprobs"] = _logprobs(words)
        await response.write(_sse(done))
    except Exception as exc:  # the stream has begun: the error is an event of it
        if isinstance(exc, ConnectionError):
            return response
        log.exception("upload: transcription failed")
        await response.write(
            _sse(
                {
                    "error": ApiError(
                        500, "transcription failed on the server", type="server_error"
                    ).body()
                }
            )
        )
    await response.write_eof()
    return response


def _client_left(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# The routes -------------------------------------------------------------------------

# HTTP status of a refused upload -> label of whisperstream_refused_sessions_total
_REFUSALS = {401: "auth", 503: "shutdown", 429: "max_uploads", 413: "upload_size"}


def _upload_refusal(state: CompatState, client: str) -> ApiError | None:
    """HTTP 429 when the server, or this client, has as many uploads as it may have."""
    cfg = state.host.settings.compat
    if state.uploads >= cfg.max_uploads:
        message = (
            f"{state.uploads} files are being transcribed, the most at once "
            "(compat.max_uploads); try again shortly"
        )
    elif state.uploads_by_client[client] >= cfg.max_uploads_per_client:
        # Else one client could hold every slot and deny uploads to everyone else.
        message = (
            f"{state.uploads_by_client[client]} of your files are being transcribed, the "
            "most one client may have at once (compat.max_uploads_per_client); try again "
            "when one is done"
        )
    else:
        return None
    return ApiError(
        429, message, type="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"}
    )


def _check_key(state: CompatState, request: web.Request) -> None:
    if not state.gate.key_ok(request_key(request)):
        raise ApiError(
            401,
            "Incorrect API key provided (Authorization: Bearer KEY, one of "
            "the server's auth.api_keys)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def transcriptions(state: CompatState, request: web.Request) -> web.StreamResponse:
    cfg = state.host.settings.compat
    client = client_address(request, state)
    try:
        _check_key(state, request)
        if not state.host.accepting:
            raise ApiError(
                503,
                "the server is shutting down; try again later",
                type="server_error",
                code="server_shutting_down",
            )
        if (refusal := _upload_refusal(state, client)) is not None:
            raise refusal
        declared = request.content_length
        if declared is not None and declared > cfg.max_upload_bytes + FORM_OVERHEAD_BYTES:
            raise ApiError(
                413,
                f"the request of {declared} bytes is larger than "
                f"compat.max_upload_bytes ({cfg.max_upload_bytes})",
                param="file",
                code="file_too_large",
            )
    except ApiError as exc:
        reason = _REFUSALS.get(exc.status, "upload")
        state.host.metrics.refused_sessions.labels(reason).inc()
        return exc.response()
    state.uploads += 1
    state.uploads_by_client[client] += 1
    started = time.monotonic()
    try:
        upload = await read_upload(request, cfg.max_upload_bytes)
        language = _language(state, upload)
        try:
            audio = await asyncio.to_thread(decode_to_16k, upload.data, cfg.max_upload_s)
        except UndecodableAudio as exc:
            raise ApiError(
                400,
                f"could not decode {upload.filename or 'the file'}: {exc}",
                param="file",
                code="invalid_file_format",
            ) from None
        except AudioTooLong as exc:
            raise ApiError(400, str(exc), param="file", code="audio_too_long") from None
        upload.data = b""  # the decoded audio is all that is needed now
        duration_s = len(audio) / MODEL_SAMPLE_RATE_HZ
        state.host.metrics.audio_seconds.inc(duration_s)
        log.info(
            "upload %r: %.1f s of audio, %s%s",
            upload.filename,
            duration_s,
            upload.response_format,
            " (stream)" if upload.stream else "",
        )
        if upload.stream:
            return await _stream(request, state, upload, audio, language)
        windows = []
        async for window in transcribe_windows(state, audio, language, upload.prompt):
            if _client_left(request):
                log.info("upload %r: the client left; transcription stopped", upload.filename)
                return web.Response(status=499)
            windows.append(window)
        log.info("upload %r: transcribed in %.1f s", upload.filename, time.monotonic() - started)
        return answer(upload, windows, language, duration_s)
    except ApiError as exc:
        state.host.metrics.errors.labels("upload").inc()
        return exc.response()
    finally:
        state.uploads -= 1
        state.uploads_by_client[client] -= 1
        if not state.uploads_by_client[client]:
            del state.uploads_by_client[client]


def _model(state: CompatState) -> dict[str, Any]:
    return {
        "id": state.model_id(),
        "object": "model",
        "created": state.created,
        "owned_by": "whisperstream",
    }


async def models(state: CompatState, request: web.Request) -> web.Response:
    try:
        _check_key(state, request)
    except ApiError as exc:
        return exc.response()
    return web.json_response({"object": "list", "data": [_model(state)]})


async def model(state: CompatState, request: web.Request) -> web.Response:
    try:
        _check_key(state, request)
        name = request.match_info["model"]
        if name != state.model_id():
            raise ApiError(
                404,
                f"The model '{name}' does not exist; this server serves '{state.model_id()}'",
                param="model",
                code="model_not_found",
            )
    except ApiError as exc:
        return exc.response()
    return web.json_response(_model(state))
