"""Scoring a streamed session against its reference: words, alignment, WER, latencies.

Words are compared after Whisper's English text normalizer and aligned with a Levenshtein
alignment (jiwer); the definitions of the latencies, revisions and retractions are in the
docstring of server.bench.cli.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

SPOKEN_SLACK_S = 0.5  # reference words starting this soon after the audio sent count as spoken
CONTEXT_WORDS = 3  # a word is shown correctly when these words before it are right too
SPEECH_GAP_S = 0.5  # reference words closer than this count as one stretch of speech
LOST_PHRASE_WORDS = 3  # a lost phrase: this many reference words in a row, or more
LATENCY_KINDS = ("first_correct", "settled", "final", "segment_end_to_final")


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


def lost_phrases(
    ref: Sequence[str],
    offline: Sequence[str],
    streamed: Sequence[str],
    min_words: int = LOST_PHRASE_WORDS,
) -> list[tuple[int, int]]:
    """Runs of at least `min_words` consecutive reference words that the offline
    transcript has (each aligned as equal) and the streamed finals do not (none of them
    equal): phrases the model could hear that streaming lost. (start, end) indices into
    `ref`, end excluded."""
    offline_hits = {i for i, (kind, _) in enumerate(align(ref, offline)) if kind == "equal"}
    streamed_hits = {i for i, (kind, _) in enumerate(align(ref, streamed)) if kind == "equal"}
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for i in range(len(ref) + 1):
        lost = i < len(ref) and i in offline_hits and i not in streamed_hits
        if lost and start is None:
            start = i
        elif not lost and start is not None:
            if i - start >= min_words:
                runs.append((start, i))
            start = None
    return runs


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
    words with aligned times. See the docstring of server.bench.cli for the definitions.
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
    last_finals = {
        int(m["segment"]): str(m.get("text", "")) for _, m in messages if m.get("type") == "final"
    }
    finished = [w for k in sorted(last_finals) for w in normalize(last_finals[k])]
    right = [i for i, (kind, _) in enumerate(align(words, finished)) if kind == "equal"]
    context = [
        right[max(0, p - CONTEXT_WORDS) : p]
        for p in (bisect.bisect_left(right, i) for i in range(n))
    ]

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
