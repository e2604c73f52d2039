"""The `whisperstream bench` command: accuracy and latency of streaming on real recordings.

For each run (a server configuration, `--variant`, at a number of simultaneous streams,
`--concurrency`) the files of a manifest are streamed at real-time pace through a server
(one the bench starts as a subprocess, or `--url`), and every message is recorded with its
arrival time. Wall time is measured from the moment audio time 0 was sent: the frame that
ends at audio time t is sent at wall time t / speed, as a microphone delivers it. With
more streams than files, files are streamed again so that that many run at once.

After the streaming (so that it never competes with the server for the CPU), the bench
loads the same Whisper model itself and computes, per file:

- the offline transcript: the whole file with the same engine, in one window when it is
  at most OFFLINE_SINGLE_WINDOW_S long, else in consecutive windows of 15 to 25 s cut at
  the quietest 0.3 s, each with the previous window's text as the prompt;
- reference word times: forced alignment of the normalized reference text against the
  audio (the engine's `align_words`, the cross-attention alignment that gives the server
  its word times), window by window for long files (reference words are given to the
  offline window their offline match fell in), with word edges then pulled in from
  silence by the audio's energy (`trim_to_sound`).

Then, with words normalized by Whisper's English text normalizer and hypotheses aligned to
the reference with a Levenshtein alignment (jiwer), and the reference restricted to the
words that had started by the time a message arrived (plus SPOKEN_SLACK_S for alignment
error), each reference word gets three latencies (arrival minus the word's aligned end):

- first correct: the first partial or final after which the transcript so far (finals,
  then the open segment's partial) has this word as a hit, and also the (up to)
  CONTEXT_WORDS reference words before it that the finished transcript gets right;
- settled: the first message after which the settled transcript (finals, then the open
  segment's `stable` prefix) reaches this word (a hit or a substitution of it or of a
  later word), or the final that covers it, whichever is first;
- final: the first final after which the finals so far reach this word;

and each final gets the time from the aligned end of the last reference word it covers to
its arrival. A partial revision is a partial whose words (lower case, punctuation dropped)
do not extend the previous partial of its segment; a `stable` retraction is a partial or
final whose text does not start with the segment's last `stable`.

Cost: the server process's CPU seconds (all threads) and peak RSS; and, from the server's
/metrics, its model steps (partial and final) and the wall seconds its model calls took,
each per second of audio streamed.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from streaming.whisper_ct2 import CTranslate2Whisper

SPOKEN_SLACK_S = 0.5  # reference words starting this soon after the audio sent count as spoken
OFFLINE_SINGLE_WINDOW_S = 28.0  # longer files are transcribed offline window by window
OFFLINE_MIN_WINDOW_S = 15.0
OFFLINE_MAX_WINDOW_S = 25.0
QUIET_SPAN_S = 0.3  # the span whose energy picks a cut between offline windows
CONTEXT_WORDS = 3  # a word is shown correctly when these words before it are right too
TRIM_DROP_DB = 40.0  # see trim_to_sound
TRIM_FLOOR_DB = 10.0
SPEECH_GAP_S = 0.5  # reference words closer than this count as one stretch of speech
SERVER_START_TIMEOUT_S = 120.0
OFFLINE_METHOD = (
    f"whole file when <= {OFFLINE_SINGLE_WINDOW_S:g} s, else {OFFLINE_MIN_WINDOW_S:g}-"
    f"{OFFLINE_MAX_WINDOW_S:g} s windows cut at the quietest {QUIET_SPAN_S:g} s, previous "
    "window's text as prompt"
)
LATENCY_KINDS = ("first_correct", "settled", "final", "segment_end_to_final")


class BenchError(RuntimeError):
    """A reason the benchmark cannot run, for the user."""


# Manifest --------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    id: str
    wav: Path
    text: str


def load_manifest(path: Path, limit: int | None = None, need_text: bool = True) -> list[Item]:
    """JSON lines with `wav` (relative to the manifest's folder) and `text` (optional
    without `need_text`)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BenchError(f"cannot read the manifest {path}: {exc.strerror or exc}") from None
    items: list[Item] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            wav = Path(row["wav"])
            text = str(row["text"] if need_text else row.get("text", ""))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            wanted = "'wav' and 'text'" if need_text else "'wav'"
            raise BenchError(
                f"{path}:{number}: expected a JSON object with {wanted} ({exc})"
            ) from None
        wav = wav if wav.is_absolute() else path.parent / wav
        if not wav.is_file():
            raise BenchError(f"{path}:{number}: no such file {wav}")
        items.append(Item(str(row.get("id") or wav.stem), wav, text))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise BenchError(f"{path} lists no files")
    return items


def load_manifests(paths: Sequence[Path], limit: int | None = None) -> list[Item]:
    """The files of several manifests in order, each recording once (the first listing)."""
    items: list[Item] = []
    seen: set[Path] = set()
    for path in paths:
        for item in load_manifest(path):
            wav = item.wav.resolve()
            if wav not in seen:
                seen.add(wav)
                items.append(item)
    return items[:limit] if limit is not None else items


# Words and alignment ---------------------------------------------------------------


@lru_cache(maxsize=1)
def _normalizer() -> Callable[[str], str]:
    from whisper_normalizer.english import EnglishTextNormalizer

    normalizer: Callable[[str], str] = EnglishTextNormalizer()
    return normalizer


@lru_cache(maxsize=65536)
def _normalized(text: str) -> tuple[str, ...]:
    return tuple(_normalizer()(text).split())


def normalize(text: str) -> list[str]:
    """Words after Whisper's English text normalizer (as published Whisper WERs use)."""
    return list(_normalized(text))


def display_words(text: str) -> list[str]:
    """Words as a reader sees them change: lower case, punctuation dropped."""
    return re.findall(r"[\w']+", text.lower())


def align(ref: Sequence[str], hyp: Sequence[str]) -> list[tuple[str, int | None]]:
    """For each reference word: 'equal', 'substitute' or 'delete', and its hypothesis index.

    A Levenshtein alignment of words (jiwer); insertions are left out.
    """
    if not ref:
        return []
    if not hyp:
        return [("delete", None)] * len(ref)
    import jiwer

    out: list[tuple[str, int | None]] = []
    chunks = jiwer.process_words(" ".join(ref), " ".join(hyp)).alignments[0]
    for chunk in chunks:
        if chunk.type == "insert":
            continue
        for k in range(chunk.ref_end_idx - chunk.ref_start_idx):
            j = chunk.hyp_start_idx + k if chunk.type in ("equal", "substitute") else None
            out.append((chunk.type, j))
    assert len(out) == len(ref)
    return out


def word_errors(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Substitutions, deletions and insertions."""
    if not ref:
        return len(hyp)
    if not hyp:
        return len(ref)
    import jiwer

    o = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return int(o.substitutions + o.deletions + o.insertions)


def _hits(alignment: list[tuple[str, int | None]]) -> list[int]:
    return [i for i, (kind, _) in enumerate(alignment) if kind == "equal"]


def _reach(alignment: list[tuple[str, int | None]]) -> int:
    """How many reference words the hypothesis has reached: last matched word + 1."""
    for i in range(len(alignment) - 1, -1, -1):
        if alignment[i][1] is not None:
            return i + 1
    return 0


# Latency of one session --------------------------------------------------------------


@dataclass(frozen=True)
class RefWord:
    word: str  # normalized
    start: float  # audio seconds, from the forced alignment
    end: float


@dataclass
class SessionAnalysis:
    """Per reference word and per final: latencies in wall seconds (None: never)."""

    first_correct: list[float | None]
    settled: list[float | None]
    final: list[float | None]
    segment_end_to_final: dict[int, float]
    transcript: str  # the finals, joined
    partials: int = 0
    revisions: int = 0
    retractions: int = 0
    segments: int = 0
    errors: list[str] = field(default_factory=list)

    def latencies(self, kind: str) -> list[float]:
        if kind == "segment_end_to_final":
            return list(self.segment_end_to_final.values())
        values: list[float | None] = getattr(self, kind)
        return [v for v in values if v is not None]


def analyse_session(
    ref: Sequence[RefWord],
    messages: Sequence[tuple[float, dict[str, Any]]],
    speed: float = 1.0,
) -> SessionAnalysis:
    """Latencies of one session from its message log.

    `messages` are (arrival, message) with arrival in wall seconds from the moment audio
    time 0 was sent, so that audio time t was sent at t / speed; `ref` are the reference
    words with aligned times. See the module's docstring for the definitions.
    """
    n = len(ref)
    starts = [w.start for w in ref]
    words = [w.word for w in ref]
    arrived: dict[str, list[float | None]] = {
        k: [None] * n for k in ("first_correct", "settled", "final")
    }
    finals: dict[int, list[str]] = {}
    final_texts: dict[int, str] = {}
    final_arrival: dict[int, float] = {}
    partial: dict[int, list[str]] = {}
    stable: dict[int, list[str]] = {}
    promised: dict[int, str] = {}
    shown: dict[int, list[str]] = {}
    result = SessionAnalysis([], [], [], {}, "")
    # A word shown correctly needs the words before it right too: those of the last
    # CONTEXT_WORDS before it that the finished transcript gets right (a guard against
    # a word matched by chance in a garbled partial).
    last_finals = {int(m["segment"]): str(m.get("text", ""))
                   for _, m in messages if m.get("type") == "final"}
    finished = [w for k in sorted(last_finals) for w in normalize(last_finals[k])]
    right = [i for i, (kind, _) in enumerate(align(words, finished)) if kind == "equal"]
    context = [right[max(0, p - CONTEXT_WORDS) : p]
               for p in (bisect.bisect_left(right, i) for i in range(n))]

    def mark(kind: str, indices: Iterator[int] | range | list[int], t: float) -> None:
        target = arrived[kind]
        for i in indices:
            if target[i] is None:
                target[i] = t

    def joined(parts: dict[int, list[str]], *more: dict[int, list[str]]) -> list[str]:
        merged = dict(parts)
        for extra in more:
            for k, v in extra.items():
                merged.setdefault(k, v)
        return [w for k in sorted(merged) for w in merged[k]]

    for t, m in messages:
        kind = m.get("type")
        if kind == "error":
            result.errors.append(f"{m.get('code')}: {m.get('message')}")
            continue
        if kind not in ("partial", "final"):
            continue
        k = int(m["segment"])
        text = str(m.get("text", ""))
        if k in promised and not text.startswith(promised[k]):
            result.retractions += 1
        if kind == "partial":
            result.partials += 1
            now = display_words(text)
            before = shown.get(k)
            if before is not None and now[: len(before)] != before:
                result.revisions += 1
            shown[k] = now
            partial[k] = normalize(text)
            if m.get("stable"):
                promised[k] = str(m["stable"])
                stable[k] = normalize(promised[k])
        else:
            finals[k] = normalize(text)
            final_texts[k] = text
            final_arrival[k] = t
            for open_state in (partial, stable, promised, shown):
                open_state.pop(k, None)
        # Only the reference words spoken by now can be matched.
        spoken = bisect.bisect_right(starts, t * speed + SPOKEN_SLACK_S)
        prefix = words[:spoken]
        hits = set(_hits(align(prefix, joined(finals, partial))))
        mark("first_correct", [i for i in sorted(hits) if hits.issuperset(context[i])], t)
        if kind == "final" or m.get("stable"):
            mark("settled", range(_reach(align(prefix, joined(finals, stable)))), t)
        if kind == "final":
            mark("final", range(_reach(align(prefix, joined(finals)))), t)

    for i in range(n):
        settled, final = arrived["settled"][i], arrived["final"][i]
        if final is not None and (settled is None or final < settled):
            arrived["settled"][i] = final

    def latency(t: float | None, i: int) -> float | None:
        return None if t is None else t - ref[i].end / speed

    for key in ("first_correct", "settled", "final"):
        setattr(result, key, [latency(t, i) for i, t in enumerate(arrived[key])])

    # Each final: the last reference word its words are aligned to.
    tagged = [(k, w) for k in sorted(finals) for w in finals[k]]
    last_word: dict[int, int] = {}
    for i, (_, j) in enumerate(align(words, [w for _, w in tagged])):
        if j is not None:
            last_word[tagged[j][0]] = i
    result.segment_end_to_final = {
        k: final_arrival[k] - ref[i].end / speed for k, i in sorted(last_word.items())
    }
    result.segments = len(finals)
    result.transcript = " ".join(final_texts[k] for k in sorted(final_texts) if final_texts[k])
    return result


def speech_seconds(ref: Sequence[RefWord]) -> float:
    """Time covered by reference words, gaps shorter than SPEECH_GAP_S included."""
    total, span_start, span_end = 0.0, None, 0.0
    for w in ref:
        if span_start is None:
            span_start, span_end = w.start, w.end
        elif w.start - span_end < SPEECH_GAP_S:
            span_end = max(span_end, w.end)
        else:
            total += span_end - span_start
            span_start, span_end = w.start, w.end
    if span_start is not None:
        total += span_end - span_start
    return total


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# Offline transcription and reference times ------------------------------------------


def quiet_cuts(
    audio: np.ndarray,
    rate: int = 16_000,
    min_s: float = OFFLINE_MIN_WINDOW_S,
    max_s: float = OFFLINE_MAX_WINDOW_S,
    single_s: float = OFFLINE_SINGLE_WINDOW_S,
) -> list[tuple[int, int]]:
    """Windows (start, end sample) covering the audio, each cut at the quietest span."""
    import numpy as np

    total = len(audio)
    if total <= single_s * rate:
        return [(0, total)]
    hop = rate // 100
    frames = len(audio) // hop
    energy = np.square(audio[: frames * hop].astype(np.float64)).reshape(frames, hop).mean(1)
    span = max(1, int(QUIET_SPAN_S * 100))
    smooth = np.convolve(energy, np.ones(span) / span, mode="same")
    windows, start = [], 0
    while total - start > single_s * rate:
        lo, hi = (start + int(min_s * rate)) // hop, (start + int(max_s * rate)) // hop
        cut = (lo + int(np.argmin(smooth[lo:hi]))) * hop
        windows.append((start, cut))
        start = cut
    windows.append((start, total))
    return windows


@dataclass
class OfflineResult:
    text: str
    windows: list[tuple[float, float]]
    ref: list[RefWord]


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """A recording's samples (float32 mono) and sample rate (streaming.audio.read_wav)."""
    from streaming.audio import AudioFormatError, read_wav

    try:
        return read_wav(path)
    except AudioFormatError as exc:
        raise BenchError(str(exc)) from None


def read_pcm(path: Path) -> tuple[bytes, int]:
    """A recording as the 16-bit PCM it is streamed as, and its sample rate."""
    from streaming.audio import to_pcm_s16le

    samples, rate = read_audio(path)
    return to_pcm_s16le(samples), rate


def read_audio_16k(path: Path) -> np.ndarray:
    """A recording at the model's 16 kHz, for the offline baseline."""
    import numpy as np
    import soxr

    audio, rate = read_audio(path)
    if rate != 16_000:
        audio = soxr.resample(audio, rate, 16_000).astype(np.float32)
    return audio


def offline_transcribe(
    engine: CTranslate2Whisper, audio: np.ndarray
) -> tuple[list[tuple[int, int]], list[str]]:
    """The windows and their texts."""
    from streaming.engine import DecodeRequest

    windows = quiet_cuts(audio)
    texts: list[str] = []
    for start, end in windows:
        prompt = texts[-1] if texts else ""
        texts.append(engine.transcribe([DecodeRequest(audio[start:end], prompt=prompt)])[0].text)
    return windows, texts


def reference_times(
    engine: CTranslate2Whisper,
    audio: np.ndarray,
    ref_words: list[str],
    windows: list[tuple[int, int]],
    window_texts: list[str],
) -> list[RefWord]:
    """Forced alignment of the reference words, window by window."""
    if not ref_words:
        return []
    owner = [0] * len(ref_words)
    if len(windows) > 1:
        tagged = [(w, word) for w, text in enumerate(window_texts) for word in normalize(text)]
        alignment = align(ref_words, [word for _, word in tagged])
        known = [tagged[j][0] if j is not None else None for _, j in alignment]
        last = next((w for w in known if w is not None), 0)
        for i, w in enumerate(known):
            last = w if w is not None else last
            owner[i] = last
    out: list[RefWord] = []
    for w, (start, end) in enumerate(windows):
        group = [word for word, o in zip(ref_words, owner, strict=True) if o == w]
        if not group:
            continue
        offset = start / 16_000
        aligned = engine.align_words(audio[start:end], group)
        out.extend(RefWord(word, offset + a.start_s, offset + a.end_s)
                   for word, a in zip(group, aligned, strict=True))
    return trim_to_sound(out, audio)


def trim_to_sound(words: list[RefWord], audio: np.ndarray, rate: int = 16_000) -> list[RefWord]:
    """Pull aligned word edges in from silence.

    The alignment's word boundaries are where its path jumps from one token to the next,
    so a word next to a pause tends to take part of the pause. Each word keeps the 10 ms
    frames from its first to its last within TRIM_DROP_DB of its own loudest frame and
    TRIM_FLOOR_DB above the recording's noise floor (its 10th percentile), and then at
    most twice the median word length (capped at 0.7 s), as faster-whisper does.
    """
    import numpy as np

    hop = rate // 100
    frames = len(audio) // hop
    if not words or frames == 0:
        return words
    power = np.square(audio[: frames * hop].astype(np.float64)).reshape(frames, hop).mean(1)
    db = 10 * np.log10(power + 1e-10)
    floor = float(np.percentile(db, 10))
    spans: list[tuple[float, float]] = []
    for w in words:
        a = min(int(w.start * 100), frames - 1)
        b = min(max(math.ceil(w.end * 100), a + 1), frames)
        span = db[a:b]
        loud = np.nonzero(span >= max(float(span.max()) - TRIM_DROP_DB, floor + TRIM_FLOOR_DB))[0]
        if len(loud):
            spans.append((max(w.start, (a + loud[0]) / 100),
                          min(w.end, (a + loud[-1] + 1) / 100)))
        else:
            spans.append((w.start, w.end))
    longest = 2 * min(float(np.median([e - s for s, e in spans])), 0.7)
    return [RefWord(w.word, s, max(s, min(e, s + longest)))
            for w, (s, e) in zip(words, spans, strict=True)]


# Streaming -------------------------------------------------------------------------


@dataclass
class StreamRecord:
    item: Item
    duration_s: float
    messages: list[tuple[float, dict[str, Any]]]
    close_code: int | None
    error: str | None


async def stream_one(
    item: Item, url: str, speed: float, api_key: str | None,
    on_audio: Callable[[float], None],
) -> StreamRecord:
    from client.stream import ClientError, PaceClock, paced_frames, run_session, stream_url

    pcm, rate = read_pcm(item.wav)
    duration = len(pcm) / 2 / rate
    clock = PaceClock()
    full_url = stream_url(url, sample_rate=rate, encoding="pcm_s16le")
    try:
        transcript = await run_session(
            full_url, paced_frames(pcm, rate, speed, clock, on_audio), api_key=api_key
        )
    except ClientError as exc:
        return StreamRecord(item, duration, [], None, str(exc))
    origin = clock.origin
    if origin is None:
        origin = transcript.arrivals[0] if transcript.arrivals else 0.0
    messages = [(round(t - origin, 4), m)
                for t, m in zip(transcript.arrivals, transcript.messages, strict=True)]
    error = None
    if transcript.close_code != 1000 or not transcript.of_type("done"):
        error = f"session ended with close code {transcript.close_code} and no 'done'"
    return StreamRecord(item, duration, messages, transcript.close_code, error)


async def stream_all(
    items: list[Item], url: str, concurrency: int, speed: float, api_key: str | None,
    on_audio: Callable[[float], None], on_done: Callable[[StreamRecord], None],
) -> list[StreamRecord]:
    """A pool of `concurrency` workers over the files; records in manifest order."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(items)):
        queue.put_nowait(i)
    records: dict[int, StreamRecord] = {}

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            records[i] = await stream_one(items[i], url, speed, api_key, on_audio)
            on_done(records[i])

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return [records[i] for i in range(len(items))]


# The server process ----------------------------------------------------------------


class ProcessMonitor:
    """CPU seconds and peak RSS of a process between start() and stop().

    With `series_every`, it also keeps `samples`: (monotonic time, RSS bytes) about every
    `series_every` seconds.
    """

    def __init__(self, pid: int, series_every: float | None = None) -> None:
        import psutil

        self._process = psutil.Process(pid)
        self._peak = 0
        self._cpu0 = 0.0
        self._series_every = series_every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="bench-monitor")

    def _cpu(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system + times.children_user + times.children_system)

    def rss(self) -> int | None:
        """The process's RSS now, in bytes (None once it is gone)."""
        try:
            return int(self._process.memory_info().rss)
        except Exception:
            return None

    def _sample(self) -> None:
        next_kept = time.monotonic()
        while True:
            rss = self.rss()
            if rss is not None:
                self._peak = max(self._peak, rss)
                now = time.monotonic()
                if self._series_every is not None and now >= next_kept:
                    self.samples.append((now, rss))
                    next_kept = max(next_kept + self._series_every, now)
            if self._stop.wait(0.25):
                break

    def start(self) -> None:
        self._cpu0 = self._cpu()
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        cpu = self._cpu() - self._cpu0
        peak, source = self._peak, "sampled every 0.25 s"
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{self._process.pid}/status").read_text()
            found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
            if found:  # the kernel's own high-water mark, since the process started
                peak, source = int(found.group(1)) * 1024, "VmHWM"
        return {"cpu_s": cpu, "peak_rss_bytes": peak, "rss_source": source,
                "sampled_peak_rss_bytes": self._peak}


def model_counters(url: str, api_key: str | None) -> dict[str, float] | None:
    """The server's inference counters so far, from its /metrics: steps by kind, model
    calls, and the wall seconds spent in them (None when /metrics does not answer)."""
    from prometheus_client.parser import text_string_to_metric_families

    parts = urllib.parse.urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(f"{scheme}://{parts.netloc}/metrics", headers=headers)
    text = None
    for _ in range(3):  # a server busy with many streams may answer late
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
            break
        except (OSError, ValueError):
            time.sleep(0.5)
    if text is None:
        return None
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "whisperstream_steps_total":
                counters[f"steps_{sample.labels.get('kind', '')}"] = sample.value
            elif sample.name == "whisperstream_batch_seconds_sum":
                counters["model_s"] = sample.value
            elif sample.name == "whisperstream_batch_seconds_count":
                counters["model_calls"] = sample.value
    return counters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def started_server(
    env_overrides: dict[str, str], config: Path | None, log_dir: Path
) -> Iterator[tuple[str, int]]:
    """`whisperstream serve` as a subprocess on a free loopback port; yields (url, pid)."""
    port = _free_port()
    env = {**os.environ, **env_overrides}
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port)]
    if config is not None:
        command += ["--config", str(config)]
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise BenchError(f"the server exited with code {process.returncode}:\n{tail}")
            health = f"http://127.0.0.1:{port}/healthz"
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError(f"the server did not answer /healthz within "
                                 f"{SERVER_START_TIMEOUT_S:g} s; its log: {log_path}")
            time.sleep(0.2)
        yield f"ws://127.0.0.1:{port}/v1/stream", process.pid
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# Variants --------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    env: dict[str, str] = field(default_factory=dict)


def env_name(key: str) -> str:
    """`streaming.step_s` -> WHISPERSTREAM_STREAMING__STEP_S; env names stay as they are."""
    if "." in key:
        return "WHISPERSTREAM_" + "__".join(part.upper() for part in key.split("."))
    return key.upper()


def parse_variant(spec: str) -> Variant:
    """`NAME` or `NAME:KEY=VALUE,KEY=VALUE` with KEY a config key or a WHISPERSTREAM_ variable."""
    name, _, rest = spec.partition(":")
    if not name.strip():
        raise BenchError(f"--variant {spec!r}: give it a name, e.g. fast:streaming.step_s=0.3")
    env: dict[str, str] = {}
    for part in re.split(r",(?=\s*[A-Za-z_][\w.]*=)", rest) if rest.strip() else []:
        key, eq, value = part.partition("=")
        key = env_name(key.strip())
        if not eq or not key.startswith("WHISPERSTREAM_"):
            raise BenchError(f"--variant {spec!r}: {part!r} is not KEY=VALUE with KEY a config "
                             "key (streaming.step_s) or a WHISPERSTREAM_ variable")
        env[key] = value.strip()
    return Variant(name.strip(), env)


@contextlib.contextmanager
def _environment(overrides: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def variant_settings(config: Path | None, variant: Variant) -> Any:
    from server.config import ConfigError, load_settings

    with _environment(variant.env):
        try:
            return load_settings(config)
        except ConfigError as exc:
            raise BenchError(f"variant {variant.name}: {exc}") from None


# Figures ---------------------------------------------------------------------------


@dataclass
class RunResult:
    variant: Variant
    concurrency: int
    records: list[StreamRecord]
    server: dict[str, Any]
    model_key: tuple[str, str, int]
    model_name: str = ""
    wall_s: float = 0.0


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, digits)


def run_figures(
    run: RunResult, offline: dict[str, OfflineResult], offline_errors: tuple[int, int],
    speed: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The figures of one run, and its per-file log."""
    files: list[dict[str, Any]] = []
    errors = ref_total = 0
    audio_s = speech_s = 0.0
    partials = revisions = retractions = segments = failed = server_errors = 0
    pooled: dict[str, list[float]] = {k: [] for k in LATENCY_KINDS}
    unreached = {k: 0 for k in ("first_correct", "settled", "final")}
    for record in run.records:
        result = offline[record.item.id]
        ref_words = normalize(record.item.text)
        analysis = analyse_session(result.ref, record.messages, speed)
        hyp = normalize(analysis.transcript)
        file_errors = word_errors(ref_words, hyp)
        errors += file_errors
        ref_total += len(ref_words)
        audio_s += record.duration_s
        speech_s += speech_seconds(result.ref)
        partials += analysis.partials
        revisions += analysis.revisions
        retractions += analysis.retractions
        segments += analysis.segments
        server_errors += len(analysis.errors)
        failed += record.error is not None
        for kind in LATENCY_KINDS:
            pooled[kind] += analysis.latencies(kind)
        for kind in unreached:
            unreached[kind] += sum(v is None for v in getattr(analysis, kind))
        files.append({
            "id": record.item.id,
            "wav": str(record.item.wav),
            # Unrounded: `--from` sums these again and must reach the same figures.
            "duration_s": record.duration_s,
            "reference": record.item.text,
            "transcript": analysis.transcript,
            "offline_transcript": result.text,
            "wer": _round(file_errors / len(ref_words)) if ref_words else None,
            "error": record.error,
            "close_code": record.close_code,
            "partials": analysis.partials,
            "revisions": analysis.revisions,
            "retractions": analysis.retractions,
            "words": [
                {"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3),
                 **{k: _round(getattr(analysis, k)[i]) for k in unreached}}
                for i, w in enumerate(result.ref)
            ],
            "segment_end_to_final": {str(k): _round(v)
                                     for k, v in analysis.segment_end_to_final.items()},
            "messages": [[t, m] for t, m in record.messages],
        })
    speech_min = speech_s / 60
    cpu_s = run.server.get("cpu_s")
    model = run.server.get("model") or {}
    figures: dict[str, Any] = {
        "variant": run.variant.name,
        "overrides": run.variant.env,
        "concurrency": run.concurrency,
        "model": run.model_name,
        "files": len(run.records),
        "audio_s": round(audio_s, 2),
        "speech_s": round(speech_s, 2),
        "reference_words": ref_total,
        "wer": _round(errors / ref_total, 4) if ref_total else None,
        "offline_wer": _round(offline_errors[0] / offline_errors[1], 4)
        if offline_errors[1] else None,
        "failed_sessions": failed,
        "server_errors": server_errors,
        "segments": segments,
        "partials": partials,
        "revisions": revisions,
        "revisions_per_speech_min": _round(revisions / speech_min, 2) if speech_min else None,
        "stable_retractions": retractions,
        "words_never": unreached,
        "latency_s": {
            kind: {"p50": _round(percentile(values, 50)), "p90": _round(percentile(values, 90)),
                   "n": len(values)}
            for kind, values in pooled.items()
        },
        "server_cpu_s": _round(cpu_s),
        "server_cpu_s_per_audio_s": _round(cpu_s / audio_s, 4)
        if cpu_s is not None and audio_s else None,
        "model_steps_per_audio_s": {
            kind: _round(model[f"steps_{kind}"] / audio_s, 3) if audio_s else None
            for kind in ("partial", "final") if f"steps_{kind}" in model},
        "model_busy_s_per_audio_s": _round(model["model_s"] / audio_s, 4)
        if "model_s" in model and audio_s else None,
        "server_peak_rss_mb": round(run.server["peak_rss_bytes"] / 2**20, 1)
        if run.server.get("peak_rss_bytes") else None,
        "server_rss_source": run.server.get("rss_source"),
        "wall_s": round(run.wall_s, 1),
    }
    return figures, files


def table_rows(figures: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f} %"

    def lat(f: dict[str, Any], kind: str) -> str:
        entry = f["latency_s"][kind]
        if entry["p50"] is None:
            return "n/a"
        return f"{entry['p50']:.2f} / {entry['p90']:.2f} s"

    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    def steps(f: dict[str, Any]) -> str:
        per = f.get("model_steps_per_audio_s") or {}
        if not per:
            return "n/a"
        return f"{per.get('partial') or 0:.2f} + {per.get('final') or 0:.2f}"

    def delta(f: dict[str, Any]) -> str:
        if f["wer"] is None or f["offline_wer"] is None:
            return "n/a"
        return f"{100 * (f['wer'] - f['offline_wer']):+.1f} points"

    return [
        ("files / audio / speech", [f"{f['files']} / {f['audio_s'] / 60:.1f} / "
                                    f"{f['speech_s'] / 60:.1f} min" for f in figures]),
        ("WER, streamed finals", [pct(f["wer"]) for f in figures]),
        ("WER, offline (same model)", [pct(f["offline_wer"]) for f in figures]),
        ("streamed - offline", [delta(f) for f in figures]),
        ("word → first correct p50 / p90", [lat(f, "first_correct") for f in figures]),
        ("word → settled p50 / p90", [lat(f, "settled") for f in figures]),
        ("word → final p50 / p90", [lat(f, "final") for f in figures]),
        ("segment end → final p50 / p90", [lat(f, "segment_end_to_final") for f in figures]),
        ("partial revisions / min of speech",
         [num(f["revisions_per_speech_min"], ".1f") for f in figures]),
        ("stable retractions", [str(f["stable_retractions"]) for f in figures]),
        ("server CPU s / audio s", [num(f["server_cpu_s_per_audio_s"], ".3f") for f in figures]),
        ("model steps / audio s, partial + final", [steps(f) for f in figures]),
        ("model busy s / audio s", [num(f.get("model_busy_s_per_audio_s"), ".3f")
                                    for f in figures]),
        ("server peak RSS", [num(f["server_peak_rss_mb"], ".0f") + " MB"
                             if f["server_peak_rss_mb"] is not None else "n/a"
                             for f in figures]),
        ("segments / failed sessions", [f"{f['segments']} / {f['failed_sessions']}"
                                        for f in figures]),
    ]


def column_name(f: dict[str, Any]) -> str:
    return f"{f['variant']} ×{f['concurrency']}"


def markdown_table(figures: list[dict[str, Any]]) -> str:
    rows = table_rows(figures)
    lines = ["| | " + " | ".join(column_name(f) for f in figures) + " |",
             "|---|" + "---|" * len(figures)]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]
    return "\n".join(lines)


def print_table(figures: list[dict[str, Any]], caption: str, markdown: bool) -> None:
    if markdown:
        print(markdown_table(figures))
        print(f"\n{caption}")
        return
    print_rows("whisperstream bench", [column_name(f) for f in figures], table_rows(figures),
               caption)


def print_rows(
    title: str, columns: list[str], rows: list[tuple[str, list[str]]], caption: str
) -> None:
    """A table on stdout (rich): a label column, then one right-aligned column each."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("")
    for name in columns:
        table.add_column(name, justify="right")
    for label, values in rows:
        table.add_row(label, *values)
    Console().print(table)


# The command -----------------------------------------------------------------------


def add_subcommand(sub: Any) -> None:
    """`whisperstream bench ...`, for server.cli's parser."""
    p = sub.add_parser(
        "bench", help="stream a manifest of recordings through a server and measure it",
        description="Streams each file of a manifest at real-time pace through a server and "
        "prints WER (streamed and offline, same model), word latencies, revisions, and the "
        "server's CPU and memory. Definitions: the docstring of server/bench.py.",
    )
    p.add_argument("--manifest", type=Path, action="append", default=None,
                   help="JSON lines with 'wav' (relative to the manifest) and 'text'; "
                        "repeatable (a file listed twice is streamed once)")
    p.add_argument("--concurrency", default="1",
                   help="streams at once; a comma-separated list runs each (e.g. 1,4); "
                        "with more streams than files, files are streamed again")
    p.add_argument("--speed", type=float, default=1.0, help="pace relative to real time")
    p.add_argument("--out", type=Path, default=None, help="write figures and raw log as JSON")
    p.add_argument("--limit", type=int, default=None, help="only the first K files")
    p.add_argument("--url", default=None,
                   help="a running server (default: start one per variant on a free port)")
    p.add_argument("--server-pid", type=int, default=None,
                   help="with --url: the server's process, for its CPU and memory")
    p.add_argument("--api-key", default=None, help="with --url: the server's API key")
    p.add_argument("--config", type=Path, default=None,
                   help="config file for the started server and the offline model")
    p.add_argument("--variant", action="append", default=[], metavar="NAME[:KEY=VAL,...]",
                   help="a server configuration to run, one after another; KEY is a config "
                   "key (streaming.step_s) or a WHISPERSTREAM_ variable; repeatable")
    p.add_argument("--from", dest="from_report", type=Path, default=None, metavar="R.json",
                   help="no streaming: analyse again the message log of an earlier --out")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.set_defaults(func=cmd_bench)


def _code_version() -> str | None:
    """The git commit of the code under test, with '+changes' when the tree differs."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if dirty.strip() else "")


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        return _bench(args)
    except BenchError as exc:
        print(f"whisperstream bench: {exc}", file=sys.stderr)
        return 2


def _progress(console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[audio]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, refresh_per_second=2,
    )


def _stream_runs(
    args: argparse.Namespace, items: list[Item], variants: list[Variant], levels: list[int],
    settings: dict[str, Any], progress: Any, log_dir: Path,
) -> list[RunResult]:
    """Each variant at each concurrency, one after another, each on a fresh server."""
    durations = {item.id: stream_duration(item) for item in items}
    quiet_terminal = not progress.console.is_terminal
    runs: list[RunResult] = []
    for variant in variants:
        s = settings[variant.name]
        model_key = (s.model.name, s.model.compute_type, s.model.beam_size)
        for level in levels:
            label = f"{variant.name} ×{level}"
            level_items = items_for_level(items, level)
            total_audio = sum(durations[item.id] for item in level_items)
            task = progress.add_task(f"streaming {label}", total=len(level_items), audio="")
            sent = [0.0]

            def on_audio(seconds: float, task: Any = task, sent: list[float] = sent,
                         total: float = total_audio) -> None:
                sent[0] += seconds
                progress.update(task, audio=f"{sent[0] / 60:.1f}/{total / 60:.1f} min audio")

            def on_done(record: StreamRecord, task: Any = task, label: str = label) -> None:
                progress.advance(task)
                if quiet_terminal or record.error:
                    progress.console.log(f"{label}: {record.item.id}"
                                         + (f": {record.error}" if record.error else ""))

            with contextlib.ExitStack() as stack:
                if args.url:
                    url, pid = args.url, args.server_pid
                else:
                    env = dict(variant.env)
                    # The bench's own server listens on loopback only: no keys needed.
                    env["WHISPERSTREAM_AUTH__API_KEYS"] = "[]"
                    if level > s.limits.max_sessions:
                        env["WHISPERSTREAM_LIMITS__MAX_SESSIONS"] = str(level)
                    if level > s.limits.max_sessions_per_client:  # all from one address
                        env["WHISPERSTREAM_LIMITS__MAX_SESSIONS_PER_CLIENT"] = str(level)
                    url, pid = stack.enter_context(started_server(env, args.config, log_dir))
                monitor = ProcessMonitor(pid) if pid is not None else None
                if monitor is not None:
                    monitor.start()
                key = args.api_key if args.url else None
                counted = model_counters(url, key)
                began = time.monotonic()
                records = asyncio.run(stream_all(
                    level_items, url, level, args.speed, key, on_audio, on_done))
                wall = time.monotonic() - began
                server = monitor.stop() if monitor is not None else {}
                now = model_counters(url, key)
                if counted is not None and now is not None:
                    server["model"] = {k: v - counted.get(k, 0.0) for k, v in now.items()}
            names = {m.get("model") for r in records for _, m in r.messages[:1]
                     if m.get("type") == "ready"}
            runs.append(RunResult(variant, level, records, server, model_key,
                                  ", ".join(sorted(n for n in names if n)), wall))
    return runs


def items_for_level(items: list[Item], level: int) -> list[Item]:
    """The files for `level` streams: with fewer files than streams, files are streamed
    again (from the first) so that `level` streams run at once; WER counts each stream."""
    if level <= len(items):
        return items
    return [items[i % len(items)] for i in range(level)]


def stream_duration(item: Item) -> float:
    """The seconds of audio a file streams."""
    samples, rate = read_audio(item.wav)
    return len(samples) / rate


def _runs_from_report(path: Path, config: Path | None) -> tuple[list[RunResult], dict[str, Any]]:
    """The runs of an earlier --out, to analyse again."""
    try:
        report = json.loads(path.read_text())
        runs = []
        for run in report["runs"]:
            f = run["figures"]
            variant = Variant(f["variant"], dict(f.get("overrides") or {}))
            s = variant_settings(config, variant)
            server = run.get("server")
            if server is None:  # reports from before the raw figures were kept
                server = {"cpu_s": f.get("server_cpu_s"),
                          "peak_rss_bytes": int((f.get("server_peak_rss_mb") or 0) * 2**20),
                          "rss_source": f.get("server_rss_source")}
            records = [
                StreamRecord(Item(file["id"], Path(file["wav"]), file["reference"]),
                             file["duration_s"], [(t, m) for t, m in file["messages"]],
                             file.get("close_code"), file.get("error"))
                for file in run["files"]
            ]
            runs.append(RunResult(variant, int(f["concurrency"]), records, server,
                                  (s.model.name, s.model.compute_type, s.model.beam_size),
                                  f.get("model", ""), float(f.get("wall_s", 0.0))))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{path} is not a report of whisperstream bench --out ({exc})") from None
    if not runs:
        raise BenchError(f"{path} holds no runs")
    return runs, report


def _offline_pass(
    runs: list[RunResult], items: list[Item], settings: dict[str, Any], progress: Any,
) -> dict[tuple[str, str, int], dict[str, OfflineResult]]:
    """Offline transcripts per model, and the reference times (from the first model)."""
    from server.engine import build_engine

    offline: dict[tuple[str, str, int], dict[str, OfflineResult]] = {}
    for run in runs:
        key = run.model_key
        if key in offline:
            continue
        s = settings[run.variant.name]
        engine = build_engine(s.model)
        task = progress.add_task(f"offline {engine.name}", total=len(items), audio="")
        first = next(iter(offline.values()), None)
        results: dict[str, OfflineResult] = {}
        for item in items:
            audio = read_audio_16k(item.wav)
            windows, texts = offline_transcribe(engine, audio)
            ref = (first[item.id].ref if first is not None else
                   reference_times(engine, audio, normalize(item.text), windows, texts))
            results[item.id] = OfflineResult(
                " ".join(t for t in texts if t),
                [(a / 16_000, b / 16_000) for a, b in windows], ref)
            progress.advance(task)
        offline[key] = results
    return offline


def _bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    if (args.manifest is None) == (args.from_report is None):
        raise BenchError("give --manifest M.jsonl (to stream) or --from R.json (to analyse "
                         "an earlier run again)")
    if args.speed <= 0:
        raise BenchError("--speed must be above 0: latency needs real-time pacing")
    try:
        levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    except ValueError:
        raise BenchError("--concurrency takes numbers, e.g. 1 or 1,4") from None
    if not levels or min(levels) < 1:
        raise BenchError("--concurrency must be at least 1")
    variants = [parse_variant(v) for v in args.variant] or [Variant("default")]
    if len({v.name for v in variants}) != len(variants):
        raise BenchError("--variant names must differ")
    if args.url and (len(variants) > 1 or variants[0].env):
        raise BenchError("--variant starts its own servers; leave out --url")
    if args.server_pid is not None and not args.url:
        raise BenchError("--server-pid goes with --url")

    console = Console(stderr=True)
    with _progress(console) as progress, \
            tempfile.TemporaryDirectory(prefix="whisperstream-bench-") as tmp:
        if args.from_report is not None:
            runs, earlier = _runs_from_report(args.from_report, args.config)
            manifest, speed = str(earlier.get("manifest")), float(earlier.get("speed", 1.0))
            items = [r.item for r in runs[0].records]
            code, command = earlier.get("code"), earlier.get("command")
            settings = {r.variant.name: variant_settings(args.config, r.variant) for r in runs}
        else:
            items = load_manifests(args.manifest, args.limit)
            manifest, speed = ", ".join(str(m) for m in args.manifest), args.speed
            code, command = _code_version(), sys.argv
            settings = {v.name: variant_settings(args.config, v) for v in variants}
            runs = _stream_runs(args, items, variants, levels, settings, progress, Path(tmp))
        # After the servers have stopped, so that it does not compete with them.
        offline = _offline_pass(runs, items, settings, progress)

    per_run = []
    for run in runs:
        results = offline[run.model_key]
        counted = [(word_errors(normalize(i.text), normalize(results[i.id].text)),
                    len(normalize(i.text))) for i in items]
        totals = (sum(e for e, _ in counted), sum(n for _, n in counted))
        figures, files = run_figures(run, results, totals, speed)
        per_run.append((run, figures, files))

    figures_list = [f for _, f, _ in per_run]
    cores = os.cpu_count()
    models = sorted({f["model"] for f in figures_list if f["model"]})
    no_server = all(not r.server for r in runs)
    caption = (
        f"{len(items)} files from {manifest}, speed {speed:g}, "
        f"model {', '.join(models) or 'n/a'}, {cores} cores"
        + ("; server CPU and RSS: n/a (pass --server-pid)" if no_server else "")
        + f".\nOffline: {OFFLINE_METHOD}. Latencies: wall seconds from the end of the word "
        "in the audio (forced alignment of the reference) to the message's arrival."
    )
    print_table(figures_list, caption, args.markdown)
    if args.out is not None:
        report = {
            "command": command,
            "analysed_by": sys.argv if args.from_report is not None else None,
            "manifest": manifest,
            "speed": speed,
            "machine": {"cpu_count": cores, "loadavg": os.getloadavg()},
            "code": code,
            "offline_method": OFFLINE_METHOD,
            "definitions": __doc__,
            "runs": [{"figures": f, "server": run.server, "files": files}
                     for run, f, files in per_run],
            "offline": {
                "/".join(map(str, key)): {
                    item_id: dataclasses.asdict(result) for item_id, result in results.items()
                }
                for key, results in offline.items()
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        console.print(f"wrote {args.out}")
    return 1 if any(f["failed_sessions"] for f in figures_list) else 0
