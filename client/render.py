"""Shows server messages on a terminal: partials rewritten in place, finals as lines."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO


def format_time(seconds: float) -> str:
    minutes, secs = divmod(max(seconds, 0.0), 60)
    return f"{int(minutes):02d}:{secs:05.2f}"


class TerminalRenderer:
    def __init__(self, out: TextIO = sys.stdout, as_json: bool = False) -> None:
        self.out = out
        self.as_json = as_json
        self.tty = out.isatty()
        self._partial_shown = False
        self._printed_segment = -1  # the last final printed: a segment is printed once

    def notice(self, text: str) -> None:
        """Something the client did (a reconnection): on stderr, the partial line gone."""
        self._clear()
        self.out.flush()
        sys.stderr.write(f"whisperstream: {text}\n")
        sys.stderr.flush()

    def show(self, message: dict[str, Any]) -> None:
        if self.as_json:
            self.out.write(json.dumps(message) + "\n")
            self.out.flush()
            return
        kind = message.get("type")
        segment = message.get("segment")
        if isinstance(segment, int) and segment <= self._printed_segment:
            return  # a resumed stream goes on after the last final; never print one twice
        if kind == "partial" and self.tty:
            text = str(message.get("text", ""))[-200:]
            self.out.write(f"\r\x1b[K\x1b[2m… {text}\x1b[0m")
            self._partial_shown = True
        elif kind == "final":
            self._clear()
            if isinstance(segment, int):
                self._printed_segment = segment
            if message.get("text"):
                start, end = format_time(message["start"]), format_time(message["end"])
                self.out.write(f"[{start} → {end}] {message['text']}\n")
        elif kind == "error":
            self._clear()
            sys.stderr.write(f"server error ({message.get('code')}): {message.get('message')}\n")
        elif kind == "done":
            self._clear()
        self.out.flush()

    def _clear(self) -> None:
        if self._partial_shown:
            self.out.write("\r\x1b[K")
            self._partial_shown = False
