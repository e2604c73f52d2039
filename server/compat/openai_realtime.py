"""OpenAI's Realtime API, transcription sessions: `/v1/realtime?intent=transcription`
(WebSocket), as a front door on the session host.

Both session shapes are taken: the current one (`session.update` with
`session.type: "transcription"`, `audio.input.format` `audio/pcm` at 24 kHz,
`audio.input.transcription` `language`/`prompt`/`model`, `audio.input.turn_detection`
`server_vad` with `threshold`, `prefix_padding_ms`, `silence_duration_ms`, or `null`)
and the beta one (`transcription_session.update`, `input_audio_format: "pcm16"`,
`input_audio_transcription`, `turn_detection`), answered as `session.updated` and
`transcription_session.updated`. Settings that shape the audio (format, language, VAD)
apply before the first audio; `turn_detection` on or off and `include` at any time.

Items. With `server_vad` (the default), each stretch of speech the VAD hears is an item:
`input_audio_buffer.speech_started`, `.speech_stopped` and `.committed` carry its id.
With `turn_detection: null`, an item is everything up to the client's
`input_audio_buffer.commit`. Either way `conversation.item.input_audio_transcription
.delta` events only ever append: a delta is sent once its words are promised (the
session's `stable` prefix, while the speaker still speaks) or final, never a revision,
and `.completed` carries the item's whole text (with `logprobs`, one a word, when
`include` asks for `item.input_audio_transcription.logprobs`). `input_audio_buffer.clear`
drops the item not yet committed: no more deltas and no `.completed` for it.

Not here: conversations (`response.*`, `conversation.item.create`, audio out), G.711
input, `semantic_vad` (taken as `server_vad`), noise reduction (accepted, off); the
`prompt` is accepted and not used (live steps are prompted with their own text).
Keys: `Authorization: Bearer KEY`, or a browser's subprotocol
`openai-insecure-api-key.KEY`.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import json
import logging
import math
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from server.compat.common import (
    CompatState,
    WebSocketQueue,
    admission_refusal,
    openai_error,
    request_key,
)
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
from streaming.session import SessionConfig

log = logging.getLogger(__name__)

RATE_HZ = 24_000
MIN_SILENCE_MS = 200  # shorter pauses split words here
MIN_COMMIT_MS = 100  # OpenAI's: a commit needs at least this much audio
LOGPROBS = "item.input_audio_transcription.logprobs"
_CONVERSATION_EVENTS = ("response.", "conversation.", "output_audio_buffer.")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class BadEvent(ValueError):
    def __init__(
        self, message: str, *, param: str | None = None, code: str = "invalid_value"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class RealtimeSettings:
    rate_hz: int = RATE_HZ
    model: str = "whisper-1"
    language: str | None = None
    prompt: str = ""
    server_vad: bool = True
    threshold: float = 0.5
    prefix_padding_ms: int = 240
    silence_duration_ms: int = 450
    logprobs: bool = False


def _object(value: Any, param: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadEvent(f"'{param}' must be an object", param=param)
    return value


def _number(value: Any, param: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (low <= value <= high):
        raise BadEvent(
            f"'{param}' must be a number from {low:g} to {high:g}, not {value!r}", param=param
        )
    return float(value)


def _turn_detection(current: RealtimeSettings, value: Any, param: str) -> RealtimeSettings:
    if value is None:
        return dataclasses.replace(current, server_vad=False)
    vad = _object(value, param)
    kind = vad.get("type", "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise BadEvent(
            f"'{param}.type' must be server_vad, semantic_vad or null, not {str(kind)[:40]!r}",
            param=f"{param}.type",
        )
    changes: dict[str, Any] = {"server_vad": True}
    if "threshold" in vad:
        changes["threshold"] = _number(vad["threshold"], f"{param}.threshold", 0.0, 1.0)
    if "prefix_padding_ms" in vad:
        changes["prefix_padding_ms"] = int(
            _number(vad["prefix_padding_ms"], f"{param}.prefix_padding_ms", 0, 2000)
        )
    if "silence_duration_ms" in vad:
        changes["silence_duration_ms"] = int(
            _number(vad["silence_duration_ms"], f"{param}.silence_duration_ms", 0, 10_000)
        )
    return dataclasses.replace(current, **changes)


def _transcription(current: RealtimeSettings, value: Any, param: str) -> RealtimeSettings:
    options = _object(value, param)
    changes: dict[str, Any] = {}
    for name in ("model", "language", "prompt"):
        if name in options and options[name] is not None:
            if not isinstance(options[name], str):
                raise BadEvent(f"'{param}.{name}' must be a string", param=f"{param}.{name}")
            changes[name] = options[name][:2000]
    if "language" in changes:
        changes["language"] = changes["language"].split("-")[0].lower() or None
    return dataclasses.replace(current, **changes)


def _include(current: RealtimeSettings, value: Any, param: str) -> RealtimeSettings:
    if value is None:
        return dataclasses.replace(current, logprobs=False)
    if not isinstance(value, list) or any(v != LOGPROBS for v in value):
        raise BadEvent(f"'{param}' may hold only {LOGPROBS!r}", param=param)
    return dataclasses.replace(current, logprobs=bool(value))


def apply_update(current: RealtimeSettings, event: dict[str, Any]) -> RealtimeSettings:
    """The settings after a `session.update` or `transcription_session.update`."""
    session = _object(event.get("session"), "session")
    settings = current
    if event["type"] == "session.update":
        kind = session.get("type", "transcription")
        if kind != "transcription":
            raise BadEvent(
                f"this server serves transcription sessions only (session.type "
                f"'transcription'), not {str(kind)[:40]!r}",
                param="session.type",
            )
        audio_in = _object(
            _object(session.get("audio"), "session.audio").get("input"), "session.audio.input"
        )
        if "format" in audio_in:
            fmt = _object(audio_in["format"], "session.audio.input.format")
            if fmt.get("type", "audio/pcm") != "audio/pcm":
                raise BadEvent(
                    f"audio format {str(fmt.get('type'))[:40]!r} is not supported; "
                    "send audio/pcm (16-bit PCM)",
                    param="session.audio.input.format",
                    code="unsupported_value",
                )
            if "rate" in fmt:
                rate = _number(fmt["rate"], "session.audio.input.format.rate", 8000, 48_000)
                settings = dataclasses.replace(settings, rate_hz=int(rate))
        if "transcription" in audio_in:
            settings = _transcription(
                settings, audio_in["transcription"], "session.audio.input.transcription"
            )
        if "turn_detection" in audio_in:
            settings = _turn_detection(
                settings, audio_in["turn_detection"], "session.audio.input.turn_detection"
            )
    else:
        if "input_audio_format" in session and session["input_audio_format"] != "pcm16":
            raise BadEvent(
                f"input_audio_format {str(session['input_audio_format'])[:40]!r} "
                "is not supported; send pcm16",
                param="session.input_audio_format",
                code="unsupported_value",
            )
        if "input_audio_transcription" in session:
            settings = _transcription(
                settings, session["input_audio_transcription"], "session.input_audio_transcription"
            )
        if "turn_detection" in session:
            settings = _turn_detection(
                settings, session["turn_detection"], "session.turn_detection"
            )
    if "include" in session:
        settings = _include(settings, session["include"], "session.include")
    return settings


def _vad_json(settings: RealtimeSettings) -> dict[str, Any] | None:
    if not settings.server_vad:
        return None
    return {
        "type": "server_vad",
        "threshold": settings.threshold,
        "prefix_padding_ms": settings.prefix_padding_ms,
        "silence_duration_ms": settings.silence_duration_ms,
    }


def _transcription_json(settings: RealtimeSettings) -> dict[str, Any]:
    return {"model": settings.model, "language": settings.language, "prompt": settings.prompt}


def session_json(session_id: str, settings: RealtimeSettings, beta: bool) -> dict[str, Any]:
    include = [LOGPROBS] if settings.logprobs else []
    if beta:
        return {
            "id": session_id,
            "object": "realtime.transcription_session",
            "input_audio_format": "pcm16",
            "input_audio_transcription": _transcription_json(settings),
            "turn_detection": _vad_json(settings),
            "input_audio_noise_reduction": None,
            "include": include,
        }
    return {
        "type": "transcription",
        "id": session_id,
        "object": "realtime.transcription_session",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": settings.rate_hz},
                "transcription": _transcription_json(settings),
                "turn_detection": _vad_json(settings),
                "noise_reduction": None,
            }
        },
        "include": include,
    }


@dataclass
class _Item:
    id: str
    until_end: int | None = None  # complete once this many ends of speech are matched
    discarded: bool = False  # cleared: nothing more is sent for it
    committed: bool = False
    text: str = ""  # what its deltas said
    segment: int = -1  # the segment its text now comes from
    segment_text: str = ""  # what was said of that segment
    finals: list[str] = field(default_factory=list)
    words: list[WordTiming] = field(default_factory=list)
    audio_s: float = 0.0


class RealtimeOutlet:
    """The session's messages as Realtime events, on one ordered queue; it keeps the
    items (what is being transcribed, what was committed)."""

    def __init__(self, queue: WebSocketQueue, settings: RealtimeSettings) -> None:
        self.queue = queue
        self.settings = settings
        self.driver: SessionDriver | None = None
        self._items: deque[_Item] = deque()  # not yet completed, oldest first
        self._end_times: list[float] = []  # every end of speech heard, in order
        self._matched = 0  # ends of speech whose final has come
        self._last_committed: str | None = None
        self._quiet = False  # an end of speech the client made (commit, clear): no event
        self.received_since_commit_s = 0.0

    def send(self, event: dict[str, Any]) -> None:
        self.queue.put({"event_id": _id("event"), **event})

    def error(
        self,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        event_id: str | None = None,
    ) -> None:
        self.send(
            {
                "type": "error",
                "error": {
                    "type": type,
                    "code": code,
                    "message": message,
                    "param": param,
                    "event_id": event_id,
                },
            }
        )

    # Items -----------------------------------------------------------------------

    def _open_item(self) -> _Item:
        """The item speech now goes to: the newest one not closed, or a new one."""
        if not self._items or self._items[-1].until_end is not None:
            self._items.append(_Item(_id("item")))
        return self._items[-1]

    def _close_item(self, item: _Item) -> None:
        item.until_end = len(self._end_times)
        if not item.discarded and not item.committed:
            item.committed = True
            self.send(
                {
                    "type": "input_audio_buffer.committed",
                    "item_id": item.id,
                    "previous_item_id": self._last_committed,
                }
            )
            self._last_committed = item.id
        self._complete_heard()

    def _complete_heard(self) -> None:
        while (
            self._items
            and (until := self._items[0].until_end) is not None
            and until <= self._matched
        ):
            item = self._items.popleft()
            if item.discarded:
                continue
            event: dict[str, Any] = {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item.id,
                "content_index": 0,
                "transcript": " ".join(item.finals),
                "usage": {"type": "duration", "seconds": round(item.audio_s, 3)},
            }
            if self.settings.logprobs:
                event["logprobs"] = [
                    {
                        "token": w.word,
                        "logprob": round(math.log(max(w.probability, 1e-12)), 5),
                        "bytes": list(w.word.encode()),
                    }
                    for w in item.words
                ]
            self.send(event)

    def _front(self) -> _Item:
        """The item the session's text now belongs to: the oldest not completed (finals
        come in order, and a segment's partials only after every earlier final)."""
        return self._items[0] if self._items else self._open_item()

    def _append(self, item: _Item, segment: int, text: str) -> None:
        """Send what `text` (all of segment's promised or final text) adds, if it only adds."""
        if segment != item.segment:
            item.segment, item.segment_text = segment, ""
        said = item.segment_text
        if not text.startswith(said):
            log.warning(
                "realtime: segment %d's text %r does not extend %r; no delta", segment, text, said
            )
            return
        new = text[len(said) :]
        if not new:
            return
        item.segment_text = text
        delta = f" {new.lstrip()}" if not said and item.text else new
        item.text += delta
        if not item.discarded:
            self.send(
                {
                    "type": "conversation.item.input_audio_transcription.delta",
                    "item_id": item.id,
                    "content_index": 0,
                    "delta": delta,
                }
            )

    # Client events the outlet answers ----------------------------------------------

    def commit(self, driver: SessionDriver, event_id: str | None) -> None:
        if self.received_since_commit_s * 1000 < MIN_COMMIT_MS and not (
            self._items and self._items[-1].until_end is None and self._items[-1].text
        ):
            self.error(
                f"Error committing input audio buffer: buffer too small. Expected at "
                f"least {MIN_COMMIT_MS}ms of audio, but buffer only has "
                f"{self.received_since_commit_s * 1000:.2f}ms of audio.",
                code="input_audio_buffer_commit_empty",
                event_id=event_id,
            )
            return
        self._flush(driver)
        self._close_item(self._open_item())
        self.received_since_commit_s = 0.0

    def clear(self, driver: SessionDriver) -> None:
        self._flush(driver)
        item = self._open_item()
        item.discarded = True
        self._close_item(item)
        self.received_since_commit_s = 0.0
        self.send({"type": "input_audio_buffer.cleared"})

    def _flush(self, driver: SessionDriver) -> None:
        self._quiet = True  # the end of speech this makes is the client's, not heard
        try:
            driver.receive_message(Flush())
        finally:
            self._quiet = False

    # The Outlet ------------------------------------------------------------------

    def deliver(self, message: ServerMessage) -> None:
        if isinstance(message, SpeechStart):
            item = self._open_item()
            if self.settings.server_vad:
                pad_s = self.settings.prefix_padding_ms / 1000
                self.send(
                    {
                        "type": "input_audio_buffer.speech_started",
                        "item_id": item.id,
                        "audio_start_ms": max(0, round((message.t - pad_s) * 1000)),
                    }
                )
        elif isinstance(message, SpeechEnd):
            self._end_times.append(message.t)
            if self.settings.server_vad and not self._quiet:
                item = self._open_item()
                self.send(
                    {
                        "type": "input_audio_buffer.speech_stopped",
                        "item_id": item.id,
                        "audio_end_ms": round(message.t * 1000),
                    }
                )
                self._close_item(item)
                self.received_since_commit_s = 0.0
        elif isinstance(message, Partial):
            self._append(self._front(), message.segment, message.stable)
        elif isinstance(message, Final):
            item = self._front()
            self._append(item, message.segment, message.text)
            if message.text:
                item.finals.append(message.text)
            item.words.extend(message.words)
            item.audio_s += message.end - message.start
            # A final matches the ends of speech within its segment (a later segment may
            # have ended too, while this final was on its way).
            self._matched = bisect.bisect_right(self._end_times, message.end + 0.05)
            self._complete_heard()
        elif isinstance(message, Error):
            kind = (
                "server_error"
                if message.code in ("internal", "overloaded")
                else ("invalid_request_error")
            )
            self.error(message.message, type=kind, code=message.code)
        elif isinstance(message, Done):
            self._matched = len(self._end_times)
            for item in self._items:
                item.until_end = self._matched
            self._complete_heard()

    def close(self, code: int, reason: str) -> None:
        self.queue.close(code, reason)

    async def flushed(self) -> None:
        await self.queue.flushed()


def _config(state: CompatState, settings: RealtimeSettings) -> SessionConfig:
    """The session's settings; raises ProtocolError (an unsupported language)."""
    config = state.host.session_config(
        StreamParams(
            sample_rate=settings.rate_hz,
            encoding="pcm_s16le",
            language=settings.language,
            interim=True,
        )
    )
    aggressiveness = min(3, int(settings.threshold * 4))  # 0.5, OpenAI's default: 2, ours
    vad = dataclasses.replace(
        config.vad,
        aggressiveness=aggressiveness,
        pad_ms=settings.prefix_padding_ms,
        end_ms=max(settings.silence_duration_ms, MIN_SILENCE_MS),
    )
    return dataclasses.replace(config, vad=vad)


def _defaults(state: CompatState) -> RealtimeSettings:
    vad = state.host.settings.vad
    return RealtimeSettings(
        model=state.model_id(),
        prefix_padding_ms=vad.pad_ms,
        silence_duration_ms=vad.end_ms,
        threshold=min(vad.aggressiveness / 4 + 0.125, 1.0),
    )


def _presented_key(request: web.Request) -> str:
    key = request_key(request)
    if key:
        return key
    for offered in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        offered = offered.strip()
        if offered.startswith("openai-insecure-api-key."):
            return offered.removeprefix("openai-insecure-api-key.")
    return ""


async def realtime(state: CompatState, request: web.Request) -> web.StreamResponse:
    host = state.host
    if not state.gate.key_ok(_presented_key(request)):
        host.metrics.refused_sessions.labels("auth").inc()
        return openai_error(
            401,
            "Incorrect API key provided (Authorization: Bearer KEY, one "
            "of the server's auth.api_keys)",
            code="invalid_api_key",
        )
    intent = request.query.get("intent", "transcription")
    if intent != "transcription":
        return openai_error(
            400,
            f"this server serves transcription sessions only "
            f"(intent=transcription), not {intent[:40]!r}",
            param="intent",
            code="unsupported_value",
        )
    refusal, address = admission_refusal(state, request)
    if refusal is not None:
        return openai_error(
            int(refusal.status),
            refusal.text,
            code=refusal.reason,
            type="server_error" if refusal.status >= 500 else "requests",
        )
    settings = _defaults(state)
    config = _config(state, settings)
    limits = host.settings.limits
    ws = web.WebSocketResponse(
        protocols=("realtime",),
        max_msg_size=4 * limits.max_frame_bytes,
        heartbeat=limits.keepalive_s,
        compress=False,
    )
    if not ws.can_prepare(request).ok:
        return openai_error(426, "this endpoint is a WebSocket", code="upgrade_required")
    await ws.prepare(request)
    queue = WebSocketQueue(ws, limits.max_outbound_messages)
    outlet = RealtimeOutlet(queue, settings)
    session_id = _id("sess")
    driver = host.open_session(
        session_id, config, outlet, client_address=address, labels={"api": "openai-realtime"}
    )
    outlet.driver = driver
    log.info("session %s: OpenAI Realtime transcription from %s", session_id, address)
    outlet.send(
        {"type": "session.created", "session": session_json(session_id, settings, beta=False)}
    )
    connection = _Connection(ws, driver, outlet, state, session_id)
    await host.serve(driver, queue.send_loop(), connection.receive_loop())
    if not ws.closed:
        await ws.close(code=driver.close_code or 1000)
    return ws


class _Connection:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        driver: SessionDriver,
        outlet: RealtimeOutlet,
        state: CompatState,
        session_id: str,
    ) -> None:
        self.ws = ws
        self.driver = driver
        self.outlet = outlet
        self.state = state
        self.session_id = session_id
        self.bad = 0
        self._rest = b""  # half a sample, from an append of an odd number of bytes

    async def receive_loop(self) -> None:
        driver, limits = self.driver, self.state.host.settings.limits
        while driver.live and not driver.session.stopping:
            await driver.wait_for_room()
            if not driver.live:
                break
            message = await self.ws.receive()
            if message.type in (
                WSMsgType.CLOSE,
                WSMsgType.CLOSING,
                WSMsgType.CLOSED,
                WSMsgType.ERROR,
            ):
                break
            event_id = None
            try:
                if message.type != WSMsgType.TEXT:
                    raise BadEvent(
                        "events are JSON text messages; audio goes base64 in "
                        "input_audio_buffer.append",
                        code="invalid_event",
                    )
                if len(message.data) > limits.max_frame_bytes:
                    raise BadEvent(
                        f"event larger than limits.max_frame_bytes "
                        f"({limits.max_frame_bytes} bytes); send audio in smaller "
                        "appends",
                        code="event_too_large",
                    )
                try:
                    event = json.loads(message.data)
                except (ValueError, RecursionError):
                    raise BadEvent("the event is not valid JSON", code="invalid_json") from None
                if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                    raise BadEvent("an event must be a JSON object with a 'type'", param="type")
                event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
                self._event(event, event_id)
            except BadEvent as exc:
                self.outlet.error(exc.message, code=exc.code, param=exc.param, event_id=event_id)
                self.bad += 1
            except AudioFormatError as exc:
                self.outlet.error(str(exc), code="invalid_value", param="audio", event_id=event_id)
                self.bad += 1
            except ProtocolError as exc:
                if exc.fatal:
                    driver.fail(CLOSE_BAD_REQUEST, exc.code, exc.message)
                    break
                self.outlet.error(exc.message, code=exc.code, event_id=event_id)
                self.bad += 1
            if self.bad >= limits.max_bad_messages:
                driver.fail(
                    CLOSE_BAD_REQUEST,
                    "bad_request",
                    f"{self.bad} bad events (limits.max_bad_messages); the session was closed",
                )
                break
        driver.client_gone()

    def _event(self, event: dict[str, Any], event_id: str | None) -> None:
        kind: str = event["type"]
        outlet, driver = self.outlet, self.driver
        if kind == "input_audio_buffer.append":
            audio = event.get("audio")
            if not isinstance(audio, str):
                raise BadEvent("Invalid 'audio': expected base64-encoded PCM audio", param="audio")
            try:
                data = base64.b64decode(audio, validate=True)
            except (binascii.Error, ValueError):
                raise BadEvent(
                    "Invalid 'audio': the audio is not valid base64", param="audio"
                ) from None
            data, self._rest = self._rest + data, b""
            if len(data) % 2:
                data, self._rest = data[:-1], data[-1:]
            if data:
                driver.receive_audio(data)
                outlet.received_since_commit_s += len(data) / 2 / outlet.settings.rate_hz
        elif kind == "input_audio_buffer.commit":
            outlet.commit(driver, event_id)
        elif kind == "input_audio_buffer.clear":
            outlet.clear(driver)
        elif kind in ("session.update", "transcription_session.update"):
            self._update(event, beta=kind == "transcription_session.update")
        elif kind.startswith(_CONVERSATION_EVENTS):
            raise BadEvent(
                f"'{kind[:60]}' is not supported in a transcription session",
                param="type",
                code="unsupported_event",
            )
        else:
            raise BadEvent(
                f"Invalid value: {kind[:60]!r}. Supported values are: "
                "'session.update', 'transcription_session.update', "
                "'input_audio_buffer.append', 'input_audio_buffer.commit', "
                "'input_audio_buffer.clear'",
                param="type",
            )

    def _update(self, event: dict[str, Any], beta: bool) -> None:
        outlet, driver = self.outlet, self.driver
        settings = apply_update(outlet.settings, event)
        try:
            config = _config(self.state, settings)
        except ProtocolError as exc:  # an unsupported language: the session keeps its own
            raise BadEvent(
                exc.message,
                param="session.audio.input.transcription.language"
                if not beta
                else "session.input_audio_transcription.language",
                code="unsupported_language",
            ) from None
        if config != driver.session.config:
            if driver.session.audio_seen:
                raise BadEvent(
                    "the audio format, language and VAD settings can change only "
                    "before the first audio; the session keeps its settings",
                    param="session",
                    code="session_update_after_audio",
                )
            driver.session.reconfigure(config)
        outlet.settings = settings
        updated = "transcription_session.updated" if beta else "session.updated"
        outlet.send(
            {"type": updated, "session": session_json(self.session_id, settings, beta=beta)}
        )
