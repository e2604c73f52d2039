"""Hermes ASR: whisperstream as the speech recognizer of Hermes-speaking voice assistants
(Rhasspy and others), over the broker configured in `mqtt`.

Per Hermes listening session (siteId, sessionId), the same sans-I/O `Session` as a
WebSocket client gets, on the server's shared inference scheduler:

- `hermes/asr/startListening` opens it (`siteId`, `sessionId`, `lang`, `stopOnSilence`,
  `wakewordId`).
- `hermes/audioServer/SITE/audioFrame` payloads are small WAV files; their samples feed
  every open session of SITE (any PCM rate from 8 to 48 kHz, any channel count).
- With `stopOnSilence` (the default), the first pause the VAD sees ends the voice command;
  `hermes/asr/stopListening` ends it in any case.
- When the command's last segment is transcribed, `hermes/asr/textCaptured` carries `text`,
  `likelihood` (mean word probability), `seconds` (time its transcription steps took), `siteId`,
  `sessionId`, `wakewordId`, `lang` and `asrTokens` (words with confidences, character
  ranges and times); with `hermes.partials`, `hermes/asr/partialTextCaptured` carries the
  text so far while people speak. Errors go to `hermes/error/asr`.

Letter case: Hermes payloads use camelCase keys. The command line of the `rhasspy-hermes`
package (`python -m rhasspyhermes transcribe-wav`) sends and expects snake_case keys
(`site_id`, `session_id`); a session opened with snake_case keys is answered in snake_case.
rhasspy-hermes' own message parser reads either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiomqtt
import numpy as np

from server.driver import CLOSE_BAD_REQUEST, CLOSE_GOING_AWAY, SessionDriver
from server.host import Host, driver_limits
from server.mqtt import MqttLink, Outgoing, to_json
from streaming.audio import AudioFormatError, read_wav
from streaming.protocol import (
    Done,
    Error,
    Final,
    Partial,
    ProtocolError,
    ServerMessage,
    SpeechEnd,
    StreamParams,
    WordTiming,
)
from streaming.session import SessionConfig

log = logging.getLogger(__name__)

TOPIC_START = "hermes/asr/startListening"
TOPIC_STOP = "hermes/asr/stopListening"
TOPIC_FRAMES = "hermes/audioServer/+/audioFrame"
TOPIC_TEXT = "hermes/asr/textCaptured"
TOPIC_PARTIAL = "hermes/asr/partialTextCaptured"
TOPIC_ERROR = "hermes/error/asr"
OUTBOX_SIZE = 1000  # Hermes messages waiting for the broker


def _snake_key(key: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()


def _snake(value: Any) -> Any:
    """A payload with every key in snake_case."""
    if isinstance(value, dict):
        return {_snake_key(k): _snake(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snake(v) for v in value]
    return value


def _field(payload: dict[str, Any], camel: str, default: Any = None) -> Any:
    """A payload field by its Hermes (camelCase) name, or its snake_case spelling."""
    if camel in payload:
        return payload[camel]
    return payload.get(_snake_key(camel), default)


def _language(lang: Any) -> str | None:
    """Hermes `lang` ("en", "en-US", "en_US") as a Whisper language code."""
    if not isinstance(lang, str) or not lang.strip():
        return None
    return re.split(r"[-_]", lang.strip())[0].lower()


def asr_tokens(text: str, words: list[WordTiming]) -> list[dict[str, Any]]:
    """Rhasspy's AsrToken for each word: value, confidence, its characters in `text`, times."""
    tokens, position = [], 0
    for word in words:
        start = text.find(word.word, position) if word.word else -1
        if start < 0:
            start = position
        end = start + len(word.word)
        position = end
        tokens.append(
            {
                "value": word.word,
                "confidence": word.probability,
                "rangeStart": start,
                "rangeEnd": end,
                "time": {"start": word.start, "end": word.end},
            }
        )
    return tokens


@dataclass
class _Listening:
    """One Hermes listening session: a voice command from one site."""

    site_id: str
    session_id: str | None
    wakeword_id: str | None
    lang: str | None
    stop_on_silence: bool
    snake_case: bool  # answer in the letter case the session was opened with
    driver: SessionDriver | None = None
    rate_hz: int = 0  # the rate of its first audio frame (0: none yet)
    finals: list[Final] = field(default_factory=list)
    finished: bool = False  # its textCaptured or error is out
    task: asyncio.Task[None] | None = None
    bad_frames: int = 0

    @property
    def key(self) -> tuple[str, str | None]:
        return self.site_id, self.session_id

    @property
    def name(self) -> str:
        return f"hermes:{self.site_id}:{self.session_id or '-'}"

    @property
    def stopping(self) -> bool:
        driver = self.driver
        return self.finished or driver is None or not driver.live or driver.session.stopping

    def text(self, partial: str = "") -> str:
        return " ".join(t for t in [*(f.text for f in self.finals), partial] if t)

    def likelihood(self) -> float:
        probabilities = [w.probability for f in self.finals for w in f.words]
        return round(sum(probabilities) / len(probabilities), 4) if probabilities else 0.0


class _HermesOutlet:
    """A listening session's messages, turned into Hermes events by `HermesAsr`."""

    def __init__(self, asr: HermesAsr, listening: _Listening) -> None:
        self.asr = asr
        self.listening = listening

    def deliver(self, message: ServerMessage) -> None:
        self.asr._on_session_message(self.listening, message)

    def close(self, code: int, reason: str) -> None:
        self.asr._forget(self.listening)

    async def flushed(self) -> None:
        return  # the MQTT link delivers on its own, in order


class HermesAsr:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.settings = host.settings
        self.cfg = host.settings.hermes
        self.link = MqttLink(
            host.settings.mqtt,
            name="hermes",
            queue_size=OUTBOX_SIZE,
            subscriptions=[(TOPIC_START, 1), (TOPIC_STOP, 1), (TOPIC_FRAMES, 0)],
            on_message=self._on_message,
        )
        self._listening: dict[tuple[str, str | None], _Listening] = {}
        limits = self.settings.limits
        self._limits = replace(driver_limits(limits), idle_finishes=True)

    @property
    def listening(self) -> int:
        return len(self._listening)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.link.running():
            log.info(
                "hermes: speech recognizer on %s:%d for %s",
                self.settings.mqtt.host,
                self.settings.mqtt.port,
                ", ".join(self.cfg.site_ids) if self.cfg.site_ids else "every site",
            )
            try:
                yield
            finally:
                tasks = [lst.task for lst in self._listening.values() if lst.task is not None]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self._listening.clear()

    # Incoming --------------------------------------------------------------------

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        if message.topic.matches(TOPIC_FRAMES):
            self._frame(topic.split("/")[2], bytes(payload))
            return
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError):
            log.warning("hermes: %s payload is not JSON; ignored", topic)
            return
        if not isinstance(data, dict):
            log.warning("hermes: %s payload is not a JSON object; ignored", topic)
        elif topic == TOPIC_START:
            self._start(data)
        elif topic == TOPIC_STOP:
            self._stop_request(data)

    def _start(self, data: dict[str, Any]) -> None:
        site_id = str(_field(data, "siteId") or "default")
        if self.cfg.site_ids and site_id not in self.cfg.site_ids:
            log.debug("hermes: site %s is not in hermes.site_ids; ignored", site_id)
            return
        session_id = _field(data, "sessionId")
        snake = ("site_id" in data or "session_id" in data) and not (
            "siteId" in data or "sessionId" in data
        )
        wakeword_id = _field(data, "wakewordId")
        listening = _Listening(
            site_id=site_id,
            session_id=str(session_id) if session_id is not None else None,
            wakeword_id=str(wakeword_id) if wakeword_id is not None else None,
            lang=_field(data, "lang"),
            stop_on_silence=bool(_field(data, "stopOnSilence", True)),
            snake_case=snake,
        )
        previous = self._listening.pop(listening.key, None)
        if previous is not None:
            log.info("%s: started again; the earlier one is dropped", listening.name)
            self._end(previous)
        if not self.host.accepting:
            self._fail(listening, "the server is shutting down")
            return
        if not self.host.model_ready.is_set():
            self._fail(listening, "the model is still loading; try again shortly")
            return
        if self.host.active_sessions >= self.settings.limits.max_sessions:
            self._fail(
                listening,
                f"busy: {self.host.active_sessions} sessions, the "
                "configured maximum (limits.max_sessions)",
            )
            return
        try:
            config = self._config(listening, self.settings.streaming.sample_rate)
        except ProtocolError as exc:
            self._fail(listening, exc.message)
            return
        max_s, key = (
            (self.cfg.max_command_s, "hermes.max_command_s")
            if listening.stop_on_silence
            else (self.settings.limits.max_session_s, "limits.max_session_s")
        )
        listening.driver = self.host.open_session(
            f"{listening.name}:{uuid.uuid4().hex[:6]}",
            config,
            _HermesOutlet(self, listening),
            limits=replace(self._limits, max_audio_s=max_s, max_audio_key=key),
            publish=False,
        )
        self._listening[listening.key] = listening
        listening.task = asyncio.get_running_loop().create_task(
            self.host.serve(listening.driver), name=listening.name
        )
        log.info("%s: listening (stopOnSilence %s)", listening.name, listening.stop_on_silence)

    def _stop_request(self, data: dict[str, Any]) -> None:
        site_id = str(_field(data, "siteId") or "default")
        session_id = _field(data, "sessionId")
        for listening in list(self._listening.values()):
            if listening.site_id == site_id and (
                not session_id or listening.session_id == str(session_id)
            ):
                self._stop(listening)

    def _frame(self, site_id: str, data: bytes) -> None:
        targets = [
            lst for lst in self._listening.values() if lst.site_id == site_id and not lst.stopping
        ]
        if not targets:
            return  # audio servers stream all the time; only open sessions listen
        try:
            samples, rate = read_wav(data)
        except AudioFormatError as exc:
            for listening in targets:
                listening.bad_frames += 1
                if listening.bad_frames == 1:
                    log.warning("%s: audioFrame: %s; dropped", listening.name, exc)
            return
        for listening in targets:
            self._feed(listening, samples, rate)

    def _config(self, listening: _Listening, rate_hz: int) -> SessionConfig:
        return self.host.session_config(
            StreamParams(
                sample_rate=rate_hz,
                encoding="f32le",
                language=_language(listening.lang),
                interim=self.cfg.partials,
            )
        )

    def _feed(self, listening: _Listening, samples: np.ndarray, rate_hz: int) -> None:
        driver = listening.driver
        assert driver is not None
        if listening.rate_hz == 0:  # the first frame sets the session's rate
            listening.rate_hz = rate_hz
            if rate_hz != driver.session.config.audio.sample_rate_hz:
                try:
                    driver.session.reconfigure(self._config(listening, rate_hz))
                except ProtocolError as exc:
                    self._fail(listening, exc.message)
                    return
        elif rate_hz != listening.rate_hz:
            listening.bad_frames += 1
            if listening.bad_frames == 1:
                log.warning(
                    "%s: audioFrame at %d Hz in a session at %d Hz; dropped",
                    listening.name,
                    rate_hz,
                    listening.rate_hz,
                )
            return
        try:
            driver.receive_audio(samples.tobytes())
        except (AudioFormatError, ProtocolError) as exc:
            log.warning("%s: audio dropped: %s", listening.name, exc)

    # The session -----------------------------------------------------------------

    def _on_session_message(self, listening: _Listening, message: ServerMessage) -> None:
        driver = listening.driver
        assert driver is not None
        if isinstance(message, Final):
            listening.finals.append(message)
        elif isinstance(message, SpeechEnd):
            if listening.stop_on_silence and not driver.session.stopping:
                log.info("%s: silence after speech; ending the voice command", listening.name)
                driver.stop()
        elif isinstance(message, Partial):
            if self.cfg.partials:
                self._publish(
                    TOPIC_PARTIAL,
                    listening,
                    self._captured(listening, message.text),
                    essential=False,
                )
        elif isinstance(message, Done):
            self._text_captured(listening)
        elif isinstance(message, Error):
            if message.code == "internal":
                self._fail(listening, message.message)
            elif message.code == "limit":
                log.info("%s: %s", listening.name, message.message)
            else:
                log.warning("%s: %s", listening.name, message.message)

    def _stop(self, listening: _Listening) -> None:
        if not listening.finished and listening.driver is not None:
            listening.driver.stop()

    def _end(self, listening: _Listening) -> None:
        """Drop the session with no word to the assistant (it was replaced, or failed)."""
        listening.finished = True
        if listening.driver is not None:
            listening.driver.end(CLOSE_GOING_AWAY, "dropped")
        self._forget(listening)

    def _forget(self, listening: _Listening) -> None:
        if self._listening.get(listening.key) is listening:
            del self._listening[listening.key]

    # Outgoing --------------------------------------------------------------------

    def _captured(self, listening: _Listening, partial: str = "") -> dict[str, Any]:
        return {
            "text": listening.text(partial),
            "likelihood": listening.likelihood(),
            # Every step counts: a final often comes from the step that heard the end of
            # speech, with no decode after the segment closed.
            "seconds": round(listening.driver.step_seconds if listening.driver else 0.0, 3),
            "siteId": listening.site_id,
            "sessionId": listening.session_id,
            "wakewordId": listening.wakeword_id,
            "lang": listening.lang,
        }

    def _text_captured(self, listening: _Listening) -> None:
        payload = self._captured(listening)
        words = [w for f in listening.finals for w in f.words]
        payload["asrTokens"] = [asr_tokens(payload["text"], words)] if words else None
        log.info("%s: textCaptured %r", listening.name, payload["text"])
        self._publish(TOPIC_TEXT, listening, payload, essential=True)
        listening.finished = True
        self._forget(listening)

    def _fail(self, listening: _Listening, error: str) -> None:
        if listening.finished:
            return
        log.warning("%s: %s", listening.name, error)
        self._publish(
            TOPIC_ERROR,
            listening,
            {
                "error": error,
                "context": "whisperstream",
                "siteId": listening.site_id,
                "sessionId": listening.session_id,
            },
            essential=True,
        )
        if listening.driver is not None and listening.driver.live:
            listening.driver.end(CLOSE_BAD_REQUEST, "failed")
        listening.finished = True
        self._forget(listening)

    def _publish(
        self, topic: str, listening: _Listening, payload: dict[str, Any], *, essential: bool
    ) -> None:
        body = _snake(payload) if listening.snake_case else payload
        self.link.send(
            Outgoing(topic, to_json(body), qos=1 if essential else 0),
            essential=essential,
            what=f"{topic} of {listening.name}",
        )
