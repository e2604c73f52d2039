"""One streamed file's record: every message with its arrival time, and how it ended."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.bench.manifest import Item


@dataclass
class StreamRecord:
    item: Item
    duration_s: float
    messages: list[tuple[float, dict[str, Any]]]
    close_code: int | None
    error: str | None
