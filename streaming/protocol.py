"""Wire protocol v1 messages (see docs/protocol.md): parsing client text frames and
building server messages."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from streaming.audio import MAX_SAMPLE_RATE_HZ, MIN_SAMPLE_RATE_HZ

PROTOCOL_VERSION = 1
MAX_JSON_DEPTH = 16  # nesting of a client's JSON; a `start` with labels needs 2
MAX_NUMBER_DIGITS = 32  # a longer number in a client's JSON is refused, not parsed
MAX_RATE_DIGITS = 6  # sample rates are at most 48000
MAX_OFFSET_S = 1e7  # a resumed stream's time: 115 days of audio
MAX_FIRST_SEGMENT = 10**9


class ProtocolError(Exception):
    """Something the client sent that the server must answer with an `error` message."""

    def __init__(self, code: str, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal  # the session cannot go on: close after the error


@dataclass(frozen=True)
class StreamParams:
    """What a client may set by query parameter or `start` message."""

    sample_rate: int | None = None
    encoding: str | None = None
    language: str | None = None
    interim: bool | None = None
    labels: dict[str, str] = field(default_factory=dict)  # client's own tags, e.g. speaker
    # A stream resumed on a new connection (docs/protocol.md, "Resuming a stream"): the
    # stream time of this connection's first sample, and the number of its first segment.
    offset_s: float | None = None
    first_segment: int | None = None


@dataclass(frozen=True)
class Start:
    params: StreamParams


@dataclass(frozen=True)
class Flush:
    pass


@dataclass(frozen=True)
class Stop:
    pass


ClientMessage = Start | Flush | Stop

_LABEL_KEYS = ("source", "speaker", "labels")


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ProtocolError("bad_request", f"{name} must be true or false, not {value!r}")


def _parse_rate(name: str, value: Any) -> int:
    """A sample rate from JSON or the query string: an integer, or a string of ASCII
    digits (not "٣" or "²", which str.isdecimal() and int() would take), at most 6 long."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        digits = value.strip()
        if digits.isascii() and digits.isdigit() and len(digits) <= MAX_RATE_DIGITS:
            return int(digits)
    shown = value if not isinstance(value, str) or len(value) <= 40 else value[:40] + "..."
    raise ProtocolError(
        "bad_request",
        f"{name} must be an integer number of Hz from "
        f"{MIN_SAMPLE_RATE_HZ} to {MAX_SAMPLE_RATE_HZ}, not {shown!r}",
    )


def _parse_offset(name: str, value: Any) -> float:
    """Seconds from a number or a decimal string: finite, 0 to MAX_OFFSET_S."""
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and value.strip().isascii() and len(value) <= 20:
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or not 0 <= number <= MAX_OFFSET_S:
        shown = value if not isinstance(value, str) or len(value) <= 40 else value[:40] + "..."
        raise ProtocolError(
            "bad_request",
            f"{name} must be a number of seconds from 0 to {MAX_OFFSET_S:g}, not {shown!r}",
        )
    return number


def _parse_count(name: str, value: Any) -> int:
    """A whole number from an integer or a string of ASCII digits, 0 to MAX_FIRST_SEGMENT."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        digits = value.strip()
        if digits.isascii() and digits.isdigit() and len(digits) <= 12:
            number = int(digits)
    if number is None or not 0 <= number <= MAX_FIRST_SEGMENT:
        shown = value if not isinstance(value, str) or len(value) <= 40 else value[:40] + "..."
        raise ProtocolError(
            "bad_request",
            f"{name} must be a whole number from 0 to {MAX_FIRST_SEGMENT}, not {shown!r}",
        )
    return number


def parse_params(raw: dict[str, Any]) -> StreamParams:
    """Validate the stream parameters of a `start` message or the query string."""
    labels: dict[str, str] = {}
    for key in ("source", "speaker"):
        if key in raw:
            labels[key] = str(raw[key])
    if isinstance(raw.get("labels"), dict):
        labels.update({str(k): str(v) for k, v in raw["labels"].items()})
    encoding = raw.get("encoding")
    if encoding is not None and not isinstance(encoding, str):
        raise ProtocolError("bad_request", f"encoding must be a string, not {encoding!r}")
    language = raw.get("language")
    if language is not None and not isinstance(language, str):
        raise ProtocolError("bad_request", f"language must be a string, not {language!r}")
    return StreamParams(
        sample_rate=_parse_rate("sample_rate", raw["sample_rate"])
        if "sample_rate" in raw
        else None,
        encoding=encoding,
        language=language,
        interim=_parse_bool("interim", raw["interim"]) if "interim" in raw else None,
        labels=labels,
        offset_s=_parse_offset("offset_s", raw["offset_s"]) if "offset_s" in raw else None,
        first_segment=_parse_count("first_segment", raw["first_segment"])
        if "first_segment" in raw
        else None,
    )


def _json_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON text (strings skipped): checked before
    parsing, since the parser recurses once per level (30,000 "[" overflow its stack)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise ProtocolError(
            "bad_request",
            f"a number in the text frame has more than {MAX_NUMBER_DIGITS} digits; refused",
        )
    return int(digits)


def parse_client_text(text: str) -> ClientMessage:
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise ProtocolError(
            "bad_request", f"text frame nests JSON deeper than {MAX_JSON_DEPTH} levels; refused"
        )
    try:
        message = json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            "bad_request", f"text frame is not valid JSON ({exc.msg} at char {exc.pos})"
        ) from None
    if not isinstance(message, dict):
        raise ProtocolError("bad_request", "a text frame must be a JSON object with a 'type'")
    kind = message.get("type")
    if kind == "start":
        return Start(parse_params({k: v for k, v in message.items() if k != "type"}))
    if kind == "flush":
        return Flush()
    if kind == "stop":
        return Stop()
    raise ProtocolError(
        "bad_request", f"unknown message type {kind!r}; expected 'start', 'flush' or 'stop'"
    )


# Server to client ------------------------------------------------------------------


@dataclass(frozen=True)
class ServerMessage:
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"type": data.pop("type"), **{k: v for k, v in data.items() if v is not None}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


@dataclass(frozen=True)
class Ready(ServerMessage):
    session: str
    sample_rate: int
    encoding: str
    model: str
    language: str
    interim: bool
    protocol: int = PROTOCOL_VERSION
    # Only for a resumed stream: the offset and first segment in force (confirmed).
    offset_s: float | None = None
    first_segment: int | None = None
    type: str = "ready"


@dataclass(frozen=True)
class Started(ServerMessage):
    """Extra message: confirms the settings a `start` message put in force."""

    sample_rate: int
    encoding: str
    language: str
    interim: bool
    offset_s: float | None = None
    first_segment: int | None = None
    type: str = "started"


@dataclass(frozen=True)
class WordTiming:
    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Partial(ServerMessage):
    segment: int
    text: str
    start: float
    end: float
    stable: str = ""
    # The shown words with their times, for front doors whose partials carry words
    # (Deepgram's interim results); not on the native wire, which keeps partials small.
    words: tuple[WordTiming, ...] = ()
    type: str = "partial"

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        del data["words"]
        return data


@dataclass(frozen=True)
class Final(ServerMessage):
    segment: int
    text: str
    start: float
    end: float
    words: tuple[WordTiming, ...] = ()
    type: str = "final"


@dataclass(frozen=True)
class SpeechStart(ServerMessage):
    t: float
    type: str = "speech_start"


@dataclass(frozen=True)
class SpeechEnd(ServerMessage):
    t: float
    type: str = "speech_end"


@dataclass(frozen=True)
class Error(ServerMessage):
    code: str
    message: str
    type: str = "error"


@dataclass(frozen=True)
class Done(ServerMessage):
    audio_seconds: float
    segments: int
    type: str = "done"
