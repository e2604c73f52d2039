"""An engine whose model loads after the server listens.

`whisperstream serve` opens its port first and loads the model in a worker thread
(app.py): meanwhile `/healthz` answers 200 (the process is alive) and `/readyz` 503
"loading the model", so an orchestrator neither kills a replica whose model is still
being downloaded nor sends it sessions. Until `load` has returned, nothing may ask it to
transcribe: the server admits no session before it is ready.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from streaming.engine import DecodeRequest, Engine, EngineCapabilities, Hypothesis


class DeferredEngine:
    """An `Engine` that is `load`ed later, then is the engine that `build` returned."""

    def __init__(self, build: Callable[[], Engine], name: str) -> None:
        self._build = build
        self._engine: Engine | None = None
        self._name = name

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    async def load(self) -> None:
        """Build the engine in a worker thread; its EngineLoadError propagates."""
        if self._engine is None:
            self._engine = await asyncio.to_thread(self._build)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the model is not loaded yet")
        return self._engine

    @property
    def name(self) -> str:
        return self._engine.name if self._engine is not None else self._name

    @property
    def capabilities(self) -> EngineCapabilities:
        return self.engine.capabilities

    def transcribe(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        return self.engine.transcribe(requests)
