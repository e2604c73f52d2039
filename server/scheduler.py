"""One inference scheduler for all sessions: pending steps are run oldest first, in
batches of windows of similar length, on `workers` inference threads at once.

Several single-threaded calls at once, rather than one call spread over the cores: a
tiny model's matrices are too small for threads to share one call well (measured on a
2-core Intel VM, tiny.en int8, windows of 2-6 s: 54 ms a window with one thread, 97 ms
with two threads on one call, 24 ms with two calls at once of one thread each).

Fairness comes from two rules: each session has at most one step pending (the session
core guarantees it, and skips intermediate partial steps while it waits), and the
oldest pending step always leads the next batch, so no session starves.

Work that nobody watches live (an uploaded file's windows) is queued with
`priority=BACKGROUND`: it runs only when no live step waits, never shares a batch with
live steps, and holds at most `workers - 1` workers at once (one, with one worker), so a
live step waits behind at most one background window, and with two or more workers
behind none.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from server.memory import release_free_memory
from streaming.audio import MODEL_SAMPLE_RATE_HZ
from streaming.engine import DecodeRequest, Engine, Hypothesis

log = logging.getLogger(__name__)

# Padding a short window to a long one's length costs more than batching saves
# (measured: 4 equal windows batched 1.7x faster than serial; 5/7.5/15 s mixed, slower).
MAX_LENGTH_RATIO = 1.5

LIVE = 0  # a live session's step
BACKGROUND = 1  # an upload's window: after every live step


@dataclass
class _Pending:
    request: DecodeRequest
    future: asyncio.Future[Hypothesis]
    priority: int = LIVE
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def samples(self) -> int:
        return max(len(self.request.audio), 1)


@dataclass(frozen=True)
class BatchStats:
    size: int
    audio_seconds: float
    seconds: float


class InferenceScheduler:
    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 8,
        on_batch: Callable[[BatchStats], None] | None = None,
        workers: int = 1,
        release_memory_every_s: float = 2.0,
        release_memory: Callable[[], object] = release_free_memory,
    ) -> None:
        if workers < 1:
            raise ValueError("the scheduler needs at least one worker")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self._free = asyncio.Semaphore(workers)  # batches that may run now
        self._running: set[asyncio.Task[None]] = set()
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._background_running = 0  # batches of BACKGROUND priority in the engine
        self.max_background = max(1, workers - 1)
        self.batches: list[BatchStats] = []  # recent batches, for metrics and tests
        self._on_batch = on_batch
        # Freed inference buffers go back to the OS at most this often (0: never), see
        # server/memory.py.
        self.release_memory_every_s = release_memory_every_s
        self._release_memory = release_memory
        self._released_at = time.monotonic()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._running.clear()
        # The cancelled loop may have held a worker slot: a restarted one starts afresh.
        self._free = asyncio.Semaphore(self.workers)
        self._background_running = 0
        for pending in self._pending:
            pending.future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def transcribe(self, request: DecodeRequest, priority: int = LIVE) -> Hypothesis:
        """Queue one window; the result comes when its batch has run. Windows of a lower
        `priority` number go first (LIVE before BACKGROUND), the oldest first among equals."""
        self.start()
        future: asyncio.Future[Hypothesis] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(request, future, priority))
        self._wake.set()
        return await future

    def _next_batch(self) -> list[_Pending]:
        self._pending = [p for p in self._pending if not p.future.cancelled()]
        background_ok = self._background_running < self.max_background
        eligible = [p for p in self._pending if p.priority <= LIVE or background_ok]
        if not eligible:
            return []
        eligible.sort(key=lambda p: (p.priority, p.queued_at))
        lead = eligible[0]
        batch = [lead]
        same_prompt = bool(lead.request.prompt)
        for candidate in eligible[1:]:
            if len(batch) >= self.max_batch_size:
                break
            lengths = [p.samples for p in batch] + [candidate.samples]
            if (
                candidate.priority == lead.priority
                and bool(candidate.request.prompt) == same_prompt
                and max(lengths) / min(lengths) <= MAX_LENGTH_RATIO
            ):
                batch.append(candidate)
        chosen = set(map(id, batch))
        self._pending = [p for p in self._pending if id(p) not in chosen]
        return batch

    async def _run_singly(self, batch: list[_Pending]) -> None:
        """After a failed batch: only the windows that fail alone get the error."""
        loop = asyncio.get_running_loop()
        for pending in batch:
            try:
                result = await loop.run_in_executor(
                    self._executor, self.engine.transcribe, [pending.request]
                )
            except Exception as exc:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            else:
                if not pending.future.done():
                    pending.future.set_result(result[0])

    async def _run(self) -> None:
        """Start a batch whenever a worker is free; the batch is formed at that moment,
        so that steps queued while every worker was busy can share it."""
        while True:
            await self._free.acquire()
            batch = self._next_batch()
            while not batch:
                self._wake.clear()
                await self._wake.wait()
                batch = self._next_batch()
            if batch[0].priority > LIVE:
                self._background_running += 1
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            started = time.monotonic()
            try:
                hypotheses = await loop.run_in_executor(
                    self._executor, self.engine.transcribe, [p.request for p in batch]
                )
            except asyncio.CancelledError:  # closing: nobody may wait for these forever
                for pending in batch:
                    pending.future.cancel()
                raise
            except Exception:
                log.exception("inference failed for a batch of %d; retrying one by one", len(batch))
                await self._run_singly(batch)
                return
            stats = BatchStats(
                size=len(batch),
                audio_seconds=sum(p.samples for p in batch) / MODEL_SAMPLE_RATE_HZ,
                seconds=time.monotonic() - started,
            )
            self.batches = [*self.batches[-255:], stats]
            if self._on_batch is not None:
                self._on_batch(stats)
            for pending, hypothesis in zip(batch, hypotheses, strict=True):
                if not pending.future.done():
                    pending.future.set_result(hypothesis)
            now = time.monotonic()
            if 0 < self.release_memory_every_s <= now - self._released_at:
                self._released_at = now
                # On the worker's thread, after the results went out: no session waits.
                await loop.run_in_executor(self._executor, self._release_memory)
        finally:
            if batch[0].priority > LIVE:
                self._background_running -= 1
                self._wake.set()  # background windows held back may run now
            self._free.release()
