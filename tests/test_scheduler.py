"""The inference scheduler: batches of similar windows, oldest first, failures isolated."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from server.scheduler import BACKGROUND, InferenceScheduler
from streaming.engine import DecodeRequest, EngineCapabilities, Hypothesis, Word


class RecordingEngine:
    """A scripted engine: answers each window with its length, records the batches."""

    name = "recording"
    capabilities = EngineCapabilities()

    def __init__(self, fail_on_seconds: float | None = None) -> None:
        self.batches: list[list[float]] = []
        self.gate = threading.Event()
        self.fail_on_seconds = fail_on_seconds

    def transcribe(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        self.gate.wait(5)
        lengths = [len(r.audio) / 16_000 for r in requests]
        self.batches.append(lengths)
        if self.fail_on_seconds in lengths:
            raise RuntimeError("engine failure")
        return [Hypothesis((Word(f" {s:g}", 0.0, s, 1.0, (1,)),)) for s in lengths]


def _request(seconds: float) -> DecodeRequest:
    return DecodeRequest(np.zeros(int(seconds * 16_000), np.float32))


async def _submit_while_blocked(
    scheduler: InferenceScheduler, engine: RecordingEngine, seconds: list[float]
) -> list[Hypothesis]:
    blocker = asyncio.create_task(scheduler.transcribe(_request(9.0)))
    await asyncio.sleep(0.05)  # the blocker occupies the engine; the rest queue up
    tasks = [asyncio.create_task(scheduler.transcribe(_request(s))) for s in seconds]
    await asyncio.sleep(0.05)
    engine.gate.set()
    await blocker
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await scheduler.close()
    return results  # type: ignore[return-value]


def test_similar_windows_share_a_batch_and_dissimilar_ones_do_not() -> None:
    engine = RecordingEngine()
    scheduler = InferenceScheduler(engine, max_batch_size=8)
    results = asyncio.run(_submit_while_blocked(scheduler, engine, [2.0, 2.5, 8.0, 2.2]))
    assert [h.text for h in results] == ["2", "2.5", "8", "2.2"]
    assert engine.batches[1:] == [[2.0, 2.5, 2.2], [8.0]]


def test_the_oldest_window_leads_and_batch_size_is_capped() -> None:
    engine = RecordingEngine()
    scheduler = InferenceScheduler(engine, max_batch_size=2)
    asyncio.run(_submit_while_blocked(scheduler, engine, [5.0, 1.0, 1.1, 5.1]))
    assert engine.batches[1:] == [[5.0, 5.1], [1.0, 1.1]]


def test_batch_size_one_turns_batching_off() -> None:
    engine = RecordingEngine()
    scheduler = InferenceScheduler(engine, max_batch_size=1)
    asyncio.run(_submit_while_blocked(scheduler, engine, [1.0, 1.0, 1.0]))
    assert engine.batches[1:] == [[1.0], [1.0], [1.0]]


def test_a_failing_window_fails_alone() -> None:
    engine = RecordingEngine(fail_on_seconds=3.0)
    scheduler = InferenceScheduler(engine, max_batch_size=8)
    results = asyncio.run(_submit_while_blocked(scheduler, engine, [3.0, 3.1, 2.9]))
    assert isinstance(results[0], RuntimeError)
    assert [h.text for h in results[1:]] == ["3.1", "2.9"]


def test_live_steps_go_before_background_windows_and_never_share_their_batch() -> None:
    engine = RecordingEngine()
    scheduler = InferenceScheduler(engine, max_batch_size=8)

    async def scenario() -> list[Hypothesis]:
        blocker = asyncio.create_task(scheduler.transcribe(_request(9.0)))
        await asyncio.sleep(0.05)  # the engine is busy; what follows queues up
        upload = asyncio.create_task(scheduler.transcribe(_request(2.0), priority=BACKGROUND))
        await asyncio.sleep(0.01)
        live = [asyncio.create_task(scheduler.transcribe(_request(s))) for s in (2.1, 5.0)]
        await asyncio.sleep(0.05)
        engine.gate.set()
        results = await asyncio.gather(blocker, upload, *live)
        await scheduler.close()
        return results

    results = asyncio.run(scenario())
    assert [h.text for h in results] == ["9", "2", "2.1", "5"]
    # The upload was queued first and is as long as the 2.1 s step, yet both live steps
    # ran before it, and it ran alone.
    assert engine.batches == [[9.0], [2.1], [5.0], [2.0]]


def test_background_windows_leave_a_worker_free_for_live_steps() -> None:
    engine = RecordingEngine()
    running: list[float] = []
    most_background = 0
    lock = threading.Lock()
    transcribe = engine.transcribe

    def counting(requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        nonlocal most_background
        seconds = len(requests[0].audio) / 16_000
        with lock:
            running.append(seconds)
            most_background = max(most_background, sum(s >= 20 for s in running))
        try:
            return transcribe(requests)
        finally:
            with lock:
                running.remove(seconds)

    engine.transcribe = counting  # type: ignore[method-assign]
    scheduler = InferenceScheduler(engine, max_batch_size=1, workers=2)
    assert scheduler.max_background == 1

    async def scenario() -> None:
        uploads = [
            asyncio.create_task(scheduler.transcribe(_request(20.0 + k), priority=BACKGROUND))
            for k in range(3)
        ]
        await asyncio.sleep(0.1)  # one upload window holds a worker; the others wait
        assert running == [20.0]
        live = asyncio.create_task(scheduler.transcribe(_request(1.0)))
        await asyncio.sleep(0.1)
        assert sorted(running) == [1.0, 20.0]  # the live step got the free worker at once
        engine.gate.set()
        await asyncio.gather(live, *uploads)
        await scheduler.close()

    asyncio.run(scenario())
    assert most_background == 1


def test_with_two_workers_two_batches_run_at_once() -> None:
    engine = RecordingEngine()
    running, most = 0, 0
    lock = threading.Lock()
    transcribe = engine.transcribe

    def counting(requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return transcribe(requests)
        finally:
            with lock:
                running -= 1

    engine.transcribe = counting  # type: ignore[method-assign]
    scheduler = InferenceScheduler(engine, max_batch_size=8, workers=2)

    async def scenario() -> list[Hypothesis]:
        tasks = [asyncio.create_task(scheduler.transcribe(_request(s))) for s in (9.0, 1.0)]
        await asyncio.sleep(0.1)  # both windows are in the engine, held by its gate
        queued = [asyncio.create_task(scheduler.transcribe(_request(s))) for s in (2.0, 2.1)]
        await asyncio.sleep(0.05)
        engine.gate.set()
        results = await asyncio.gather(*tasks, *queued)
        await scheduler.close()
        return results

    results = asyncio.run(scenario())
    assert [h.text for h in results] == ["9", "1", "2", "2.1"]
    assert most == 2, "the second worker did not run a batch beside the first"
    assert sorted(map(sorted, engine.batches)) == [[1.0], [2.0, 2.1], [9.0]]


def test_closing_cancels_the_steps_of_a_running_batch() -> None:
    engine = RecordingEngine()  # its gate stays shut: the batch never finishes by itself
    scheduler = InferenceScheduler(engine, max_batch_size=8, workers=2)

    async def scenario() -> asyncio.Task[Hypothesis]:
        task = asyncio.create_task(scheduler.transcribe(_request(1.0)))
        await asyncio.sleep(0.05)
        await scheduler.close()
        await asyncio.gather(task, return_exceptions=True)
        return task

    task = asyncio.run(scenario())
    engine.gate.set()
    assert task.cancelled()


@pytest.mark.model
def test_real_model_batches_give_the_same_words_as_single_calls(engine: object) -> None:
    import soxr
    from speech import read_pcm, synthesize, wer, word_errors

    utterance = synthesize(["Batching several streams together must not change their words."])
    pcm, rate = read_pcm(utterance.path)
    audio = soxr.resample(pcm.astype(np.float32) / 32768.0, rate, 16_000).astype(np.float32)
    windows = [audio[: len(audio) * k // 4] for k in (3, 4)] + [audio]
    requests = [DecodeRequest(w) for w in windows]
    single = [engine.transcribe([r])[0].text for r in requests]  # type: ignore[attr-defined]
    batched = [h.text for h in engine.transcribe(requests)]  # type: ignore[attr-defined]
    # A shorter window is padded with more silence in a batch than alone, which may bend
    # a word at its cut edge ("word" for "words" on one CI machine); nothing more.
    assert batched[1] == batched[2]  # the same window twice in one batch: the same words
    for alone, together in zip(single, batched, strict=True):
        assert word_errors(alone, together) <= 1, (alone, together)
    assert wer(utterance.text, batched[2]) <= 0.1


def test_freed_memory_is_given_back_at_most_once_an_interval() -> None:
    engine = RecordingEngine()
    engine.gate.set()
    released: list[str] = []

    async def run(interval_s: float) -> None:
        scheduler = InferenceScheduler(
            engine,
            max_batch_size=1,
            release_memory_every_s=interval_s,
            release_memory=lambda: released.append(threading.current_thread().name),
        )
        for _ in range(3):
            await scheduler.transcribe(_request(1.0))
            await asyncio.sleep(0.01)  # the release follows the result
        await scheduler.close()

    asyncio.run(run(1e-9))
    assert len(released) == 3  # after every batch
    assert all(name.startswith("inference") for name in released)  # not on the event loop
    released.clear()
    asyncio.run(run(3600.0))
    asyncio.run(run(0.0))  # 0: never
    assert released == []


def test_release_free_memory_works_on_this_c_library() -> None:
    from server.memory import release_free_memory

    assert release_free_memory() is True  # glibc: the servers' platform
