"""Deepgram's live streaming API, `/v1/listen` (WebSocket), as a front door on the
session host: raw audio frames in, `Results`, `SpeechStarted`, `UtteranceEnd` and
`Metadata` out, as Deepgram's SDKs read them.

Query parameters, and what each does here:

- `encoding=linear16` (raw 16-bit little-endian PCM; the only encoding taken),
  `sample_rate` (8000-48000, default 16000), `channels` (interleaved; averaged to mono).
- `language` (`en`, `en-US`: the part before `-`), `model` (accepted; the served model
  answers).
- `interim_results` (default false): `Results` with `is_final: false` while people
  speak, from the session's partials.
- `endpointing` (ms of silence, default 10 as Deepgram's; `false`): the silence that
  ends an utterance sets the VAD's `end_ms`, at least `MIN_ENDPOINTING_MS` (shorter
  pauses split words here); its `Results` say `speech_final: true`. With `false` no
  result is `speech_final` and the VAD keeps `vad.end_ms`.
- `utterance_end_ms`: an `UtteranceEnd` (`last_word_end`) once that much audio after the
  last final word holds no speech.
- `vad_events=true`: a `SpeechStarted` (`timestamp`) when the VAD hears speech begin.
- `punctuate` (default false, as Deepgram's): without it transcripts are lower case
  with no punctuation; `smart_format=true` implies it (Whisper writes numbers its own way).
- Others of Deepgram's (`diarize`, `keywords`, `redact`, ...) are refused by name.

`is_final: true` results are the session's finals (a segment of speech, cut at a pause,
at `vad.max_segment_s`, or by `Finalize`), with their words' times and probabilities
(`confidence`) and the mean of them; interim results carry the same for the words shown
so far (a later result may revise them). Client messages: `KeepAlive` (accepted; the idle rule of
`limits.idle_timeout_s` still counts audio only), `Finalize` (the open segment's final
now, `from_finalize: true`), `CloseStream` (the last finals, `Metadata`, close 1000).
Keys: `Authorization: Token KEY` (Deepgram's form) or `Bearer KEY`, or the browser's
`Sec-WebSocket-Protocol: token, KEY`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from server.compat.common import CompatState, WebSocketQueue, admission_refusal, request_key
from server.driver import CLOSE_BAD_REQUEST, SessionDriver
from streaming.audio import AudioFormatError
from streaming.protocol import (
    Done,
    Error,
    Final,
    Flush,
    Partial,
    ProtocolError,
    ServerMessage,
    SpeechEnd,
    SpeechStart,
    StreamParams,
    WordTiming,
)

log = logging.getLogger(__name__)

MIN_ENDPOINTING_MS = 200
DEFAULT_ENDPOINTING_MS = 10  # Deepgram's default
KNOWN = frozenset(
    {
        "encoding",
        "sample_rate",
        "channels",
        "language",
        "model",
        "interim_results",
        "endpointing",
        "utterance_end_ms",
        "vad_events",
        "punctuate",
        "smart_format",
        "version",
        "tier",
        "mip_opt_out",
        "tag",
        "extra",
        "numerals",
        "filler_words",
    }
)  # tag, extra, ...: labels and switches that change nothing here; accepted
_EDGE_PUNCTUATION = re.compile(r"^[^\w']+|[^\w']+$")
MODEL_UUID = "6b28e919-8427-4f32-9847-492e2efd7daf"  # stands for the served model


class BadParameter(ValueError):
    pass


@dataclass(frozen=True)
class ListenParams:
    sample_rate: int = 16_000
    channels: int = 1
    language: str | None = None
    model: str = "whisper"
    interim_results: bool = False
    endpointing_ms: int | None = DEFAULT_ENDPOINTING_MS  # None: endpointing=false
    utterance_end_ms: int | None = None
    vad_events: bool = False
    punctuate: bool = False


def _bool(name: str, value: str) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise BadParameter(f"{name} must be true or false, not {value[:40]!r}")


def _int(name: str, value: str, low: int, high: int) -> int:
    if not (value.isascii() and value.isdigit() and len(value) <= 7) or not (
        low <= int(value) <= high
    ):
        raise BadParameter(
            f"{name} must be a whole number from {low} to {high}, not {value[:40]!r}"
        )
    return int(value)


def parse_query(query: Mapping[str, str]) -> ListenParams:
    for name in query:
        if name not in KNOWN:
            raise BadParameter(f"the parameter {name[:60]!r} is not supported by this server")
    encoding = query.get("encoding", "linear16")
    if encoding != "linear16":
        raise BadParameter(
            f"encoding {encoding[:40]!r} is not supported; send raw 16-bit "
            "PCM with encoding=linear16 (containers and compressed audio are "
            "not taken on this endpoint)"
        )
    endpointing = query.get("endpointing")
    endpointing_ms: int | None = DEFAULT_ENDPOINTING_MS
    if endpointing is not None:
        if endpointing.lower() == "false":
            endpointing_ms = None
        elif endpointing.lower() == "true":
            endpointing_ms = DEFAULT_ENDPOINTING_MS
        else:
            endpointing_ms = _int("endpointing", endpointing, 0, 60_000)
    smart = _bool("smart_format", query["smart_format"]) if "smart_format" in query else False
    language = query.get("language")
    return ListenParams(
        sample_rate=_int("sample_rate", query["sample_rate"], 8000, 48_000)
        if "sample_rate" in query
        else 16_000,
        channels=_int("channels", query["channels"], 1, 8) if "channels" in query else 1,
        language=re.split(r"[-_]", language)[0].lower() if language else None,
        model=query.get("model", "whisper")[:80],
        interim_results=_bool("interim_results", query.get("interim_results", "false")),
        endpointing_ms=endpointing_ms,
        utterance_end_ms=_int("utterance_end_ms", query["utterance_end_ms"], 0, 60_000)
        if "utterance_end_ms" in query
        else None,
        vad_events=_bool("vad_events", query.get("vad_events", "false")),
        punctuate=smart or _bool("punctuate", query.get("punctuate", "false")),
    )


def _bare(text: str) -> str:
    return _EDGE_PUNCTUATION.sub("", text.strip())


class DeepgramOutlet:
    """The session's messages as Deepgram's, on one ordered queue."""

    def __init__(
        self, queue: WebSocketQueue, params: ListenParams, request_id: str, model_name: str
    ) -> None:
        self.queue = queue
        self.params = params
        self.request_id = request_id
        self.model_name = model_name
        self.driver: SessionDriver | None = None
        self.sha256 = hashlib.sha256()
        # Ends of speech not yet matched to their final, and whether Finalize made them.
        self._speech_ends: list[tuple[float, bool]] = []
        self.finalizing = False  # set while a Finalize closes the open segment
        self._speaking = False
        self._last_word_end: float | None = None  # of the utterance not yet ended

    # The Outlet ------------------------------------------------------------------

    def deliver(self, message: ServerMessage) -> None:
        if isinstance(message, SpeechStart):
            self._speaking = True
            if self.params.vad_events:
                self.queue.put({"type": "SpeechStarted", "channel": [0], "timestamp": message.t})
        elif isinstance(message, SpeechEnd):
            self._speaking = False
            self._speech_ends.append((message.t, self.finalizing))
        elif isinstance(message, Partial):
            if self.params.interim_results and message.text:
                words, confidence = self._words(message.words)
                self.queue.put(
                    self._results(
                        message.start,
                        message.end,
                        self._text(message.text),
                        confidence,
                        words,
                        is_final=False,
                        speech_final=False,
                    )
                )
        elif isinstance(message, Final):
            self._final(message)
        elif isinstance(message, Error):
            self.queue.put(
                {
                    "type": "Error",
                    "variant": message.code,
                    "description": message.message,
                    "message": message.message,
                    "code": message.code,
                }
            )
        elif isinstance(message, Done):
            self.queue.put(self._metadata(message))

    def close(self, code: int, reason: str) -> None:
        self.queue.close(code, reason)

    async def flushed(self) -> None:
        await self.queue.flushed()

    # Messages --------------------------------------------------------------------

    def _text(self, text: str) -> str:
        if self.params.punctuate:
            return text
        return " ".join(w for w in (_bare(t).lower() for t in text.split()) if w)

    def _final(self, final: Final) -> None:
        ended = [by for t, by in self._speech_ends if t <= final.end + 0.05]
        self._speech_ends = [(t, by) for t, by in self._speech_ends if t > final.end + 0.05]
        from_finalize = any(ended)
        words, confidence = self._words(final.words)
        speech_final = (not all(ended) if ended else False) and (
            self.params.endpointing_ms is not None
        )
        self.queue.put(
            self._results(
                final.start,
                final.end,
                self._text(final.text),
                confidence,
                words,
                is_final=True,
                speech_final=speech_final,
                from_finalize=from_finalize,
            )
        )
        if words:
            self._last_word_end = words[-1]["end"]
        self.check_utterance_end()

    def _words(self, timings: Sequence[WordTiming]) -> tuple[list[dict[str, Any]], float]:
        """Deepgram's `words` (punctuation only in `punctuated_word`) and their mean
        probability as the alternative's `confidence`."""
        timed = [w for w in timings if _bare(w.word)]
        words: list[dict[str, Any]] = [
            {
                "word": _bare(w.word).lower(),
                "start": w.start,
                "end": w.end,
                "confidence": w.probability,
                **({"punctuated_word": w.word} if self.params.punctuate else {}),
            }
            for w in timed
        ]
        confidence = round(sum(w.probability for w in timed) / len(timed), 4) if timed else 0.0
        return words, confidence

    def check_utterance_end(self) -> None:
        """`UtteranceEnd` once `utterance_end_ms` of audio after the last final word
        holds no speech (called after finals and after audio)."""
        gap_ms = self.params.utterance_end_ms
        driver = self.driver
        if gap_ms is None or self._last_word_end is None or driver is None or self._speaking:
            return
        if driver.session.received_seconds - self._last_word_end >= gap_ms / 1000:
            self.queue.put(
                {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": self._last_word_end}
            )
            self._last_word_end = None

    def _results(
        self,
        start: float,
        end: float,
        transcript: str,
        confidence: float,
        words: list[dict[str, Any]],
        *,
        is_final: bool,
        speech_final: bool,
        from_finalize: bool = False,
    ) -> dict[str, Any]:
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(max(end - start, 0.0), 3),
            "start": start,
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {
                "alternatives": [
                    {"transcript": transcript, "confidence": confidence, "words": words}
                ]
            },
            "metadata": {
                "request_id": self.request_id,
                "model_info": {
                    "name": self.model_name,
                    "version": "whisperstream",
                    "arch": "whisper",
                },
                "model_uuid": MODEL_UUID,
            },
        }

    def _metadata(self, done: Done) -> dict[str, Any]:
        created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": self.sha256.hexdigest(),
            "created": created,
            "duration": done.audio_seconds,
            "channels": self.params.channels,
            "models": [MODEL_UUID],
            "model_info": {
                MODEL_UUID: {"name": self.model_name, "version": "whisperstream", "arch": "whisper"}
            },
        }


class _Downmix:
    """Raw interleaved 16-bit frames as the session's samples: whole samples only (a
    frame may end mid-sample), channels averaged (then sent on as f32le)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.width = 2 * channels
        self._rest = b""

    def __call__(self, data: bytes) -> bytes:
        data = self._rest + data
        cut = len(data) - len(data) % self.width
        data, self._rest = data[:cut], data[cut:]
        if self.channels == 1 or not data:
            return data
        pcm = np.frombuffer(data, "<i2").reshape(-1, self.channels).astype(np.float32)
        mono: bytes = (pcm.mean(axis=1) / 32768.0).astype("<f4").tobytes()
        return mono


def _error_response(status: int, code: str, message: str, request_id: str) -> web.Response:
    """A refused handshake as Deepgram answers one: JSON, and the `dg-error` header."""
    body = {"err_code": code, "err_msg": message, "request_id": request_id}
    return web.json_response(
        body, status=status, headers={"dg-error": message[:200], "dg-request-id": request_id}
    )


def _presented_key(request: web.Request) -> str:
    key = request_key(request, ("token", "bearer"))
    if key:
        return key
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if len(offered) >= 2 and offered[0].lower() == "token":
        return offered[1]
    return ""


async def listen(state: CompatState, request: web.Request) -> web.StreamResponse:
    host = state.host
    request_id = str(uuid.uuid4())
    if not state.gate.key_ok(_presented_key(request)):
        host.metrics.refused_sessions.labels("auth").inc()
        return _error_response(
            401,
            "INVALID_AUTH",
            "Invalid credentials: send Authorization: Token KEY, one of the server's auth.api_keys",
            request_id,
        )
    try:
        params = parse_query({k: v for k, v in request.query.items()})
        config = host.session_config(
            StreamParams(
                sample_rate=params.sample_rate,
                encoding="pcm_s16le" if params.channels == 1 else "f32le",
                language=params.language,
                interim=params.interim_results,
            )
        )
    except (BadParameter, ProtocolError) as exc:
        message = exc.message if isinstance(exc, ProtocolError) else str(exc)
        host.metrics.refused_sessions.labels("bad_request").inc()
        return _error_response(400, "INVALID_QUERY_PARAMETER", message, request_id)
    if params.endpointing_ms is not None and "endpointing" in request.query:
        end_ms = max(params.endpointing_ms, MIN_ENDPOINTING_MS)
        config = dataclasses.replace(config, vad=dataclasses.replace(config.vad, end_ms=end_ms))
    refusal, address = admission_refusal(state, request)
    if refusal is not None:
        return _error_response(refusal.status, refusal.reason.upper(), refusal.text, request_id)
    limits = host.settings.limits
    ws = web.WebSocketResponse(
        protocols=("token",),
        max_msg_size=4 * limits.max_frame_bytes,
        heartbeat=limits.keepalive_s,
        compress=False,
    )
    if not ws.can_prepare(request).ok:
        return _error_response(426, "UPGRADE_REQUIRED", "this endpoint is a WebSocket", request_id)
    await ws.prepare(request)
    queue = WebSocketQueue(ws, limits.max_outbound_messages)
    outlet = DeepgramOutlet(queue, params, request_id, state.model_id())
    session_id = f"dg-{request_id[:8]}"
    driver = host.open_session(
        session_id, config, outlet, client_address=address, labels={"api": "deepgram"}
    )
    outlet.driver = driver
    log.info(
        "session %s: Deepgram /v1/listen from %s (%s, %d channel(s))",
        session_id,
        address,
        config.audio,
        params.channels,
    )
    await host.serve(driver, queue.send_loop(), _receive(ws, driver, outlet, state))
    if not ws.closed:
        await ws.close(code=driver.close_code or 1000)
    return ws


async def _receive(
    ws: web.WebSocketResponse, driver: SessionDriver, outlet: DeepgramOutlet, state: CompatState
) -> None:
    limits = state.host.settings.limits
    downmix = _Downmix(outlet.params.channels)
    bad = 0
    while driver.live and not driver.session.stopping:
        await driver.wait_for_room()
        if not driver.live:
            return
        message = await ws.receive()
        if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            break
        try:
            if message.type == WSMsgType.BINARY:
                data: bytes = message.data
                if not data:  # Deepgram's older way to say CloseStream
                    driver.stop()
                    continue
                if len(data) > limits.max_frame_bytes:
                    raise ProtocolError(
                        "limit",
                        f"frame of {len(data)} bytes is larger than "
                        f"limits.max_frame_bytes ({limits.max_frame_bytes}); "
                        "dropped, send smaller frames",
                    )
                outlet.sha256.update(data)
                driver.receive_audio(downmix(data))
                outlet.check_utterance_end()
            elif message.type == WSMsgType.TEXT:
                _control(message.data, driver, outlet, limits.max_text_bytes)
        except AudioFormatError as exc:
            driver.send_error("bad_audio", str(exc))
            bad += 1
        except ProtocolError as exc:
            if exc.fatal:
                driver.fail(CLOSE_BAD_REQUEST, exc.code, exc.message)
                return
            driver.send_error(exc.code, exc.message)
            bad += 1
        if bad >= limits.max_bad_messages:
            driver.fail(
                CLOSE_BAD_REQUEST,
                "bad_request",
                f"{bad} bad messages (limits.max_bad_messages); the session was closed",
            )
            return
    else:
        if driver.live:  # CloseStream: the finals and Metadata follow; read until the close
            async for _ in ws:
                pass
    driver.client_gone()


def _control(text: str, driver: SessionDriver, outlet: DeepgramOutlet, max_bytes: int) -> None:
    if len(text.encode()) > max_bytes:
        raise ProtocolError(
            "limit", f"text message larger than limits.max_text_bytes ({max_bytes} bytes); ignored"
        )
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError(
            "bad_request",
            'a text message must be JSON: {"type": "KeepAlive"}, "Finalize" or "CloseStream"',
        ) from None
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "KeepAlive":
        return
    if kind == "Finalize":
        outlet.finalizing = True  # the end of speech this makes is not an endpoint
        try:
            driver.receive_message(Flush())
        finally:
            outlet.finalizing = False
    elif kind == "CloseStream":
        driver.stop()
    else:
        raise ProtocolError(
            "bad_request",
            f"unknown message type {str(kind)[:40]!r}; expected KeepAlive, Finalize or CloseStream",
        )
