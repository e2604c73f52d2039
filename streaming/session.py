"""One streaming session, sans-I/O: audio and control messages in, protocol messages and
inference jobs out.

The caller (the server, or a test) moves bytes: it feeds `receive_audio` and
`receive_message`, runs the job from `next_job` on an engine, hands the result to
`complete_job`, and sends what `take_messages` returns. One job is in flight at a time;
when the engine falls behind, intermediate partial steps are skipped (the next job
always covers the newest audio) while every segment's final is kept.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from streaming.audio import MODEL_SAMPLE_RATE_HZ, AudioFormat, StreamResampler, decode_frame
from streaming.engine import DecodeRequest, Hypothesis, Word
from streaming.policy import (
    PolicyOptions,
    drop_hallucination,
    drop_trailing_echo,
    normalize_word,
    promised_prefix,
    reads_other_case,
    tentative_words,
)
from streaming.protocol import (
    ClientMessage,
    Done,
    Final,
    Flush,
    Partial,
    ProtocolError,
    ServerMessage,
    SpeechEnd,
    SpeechStart,
    Start,
    Stop,
    WordTiming,
)
from streaming.vad import FrameClassifier, SegmentClosed, SpeechStarted, VadOptions, VadSegmenter

log = logging.getLogger(__name__)

WINDOW_CONTEXT_CHARS = 200  # promised text before the window, given as prompt
# A partial step's token budget past its draft: a few tokens, and more per second of audio
# the window gained since the hypothesis the draft comes from (fast speech says about 5
# tokens a second). Measured with every step on time (81 files, torch engine, 0.3 s
# steps), the draft and at most 3, 4, 6 or 10 tokens more: the same words (120, 119, 119,
# 121 errors in 2706 against 120) and latencies as with no budget, for 8, 6, 5 and 2 %
# less CPU (against the offline transcription's). 0.3 s steps get 4 here.
PARTIAL_BUDGET_TOKENS = 2
PARTIAL_BUDGET_TOKENS_PER_S = 6.0


@dataclass(frozen=True)
class SessionConfig:
    audio: AudioFormat = AudioFormat()
    language: str = "en"
    interim: bool = True
    vad: VadOptions = VadOptions()
    policy: PolicyOptions = PolicyOptions()
    # A resumed stream (docs/protocol.md, "Resuming a stream"): every time the session
    # sends is `offset_s` later, every segment number `first_segment` higher, and `done`
    # counts the stream's audio and segments, not only this connection's.
    offset_s: float = 0.0
    first_segment: int = 0


@dataclass(frozen=True)
class Job:
    session_id: str
    segment: int
    request: DecodeRequest
    final: bool
    start_sample: int  # where the decoded audio starts in the stream
    tail: bool = False  # decodes the audio after a final's last word (tail_gap_s)

    @property
    def audio_seconds(self) -> float:
        return len(self.request.audio) / MODEL_SAMPLE_RATE_HZ


@dataclass(frozen=True)
class _Ending:
    """A segment's final words, and what explains any the partials showed that they lack
    (the DEBUG line of `_explain_losses`): whether the hypothesis `heard` was
    `hallucinated` (then the words are the promised ones only), and `echo`, what the
    session's echo guard cut."""

    words: list[Word]
    hallucinated: bool = False
    heard: Hypothesis | None = None
    echo: tuple[Word, ...] = ()


@dataclass
class _Segment:
    index: int
    start_sample: int
    committed: list[Word] = field(default_factory=list)
    previous: tuple[Word, ...] = ()
    earlier: tuple[tuple[Word, ...], ...] = ()  # hypotheses before `previous`, newest last
    decoded_samples: int = 0
    last_partial: tuple[str, str] = ("", "")  # text and stable of the last partial sent
    # Sliding window: audio before window_start (samples from the segment start) is no
    # longer decoded; the first `trimmed` committed words, which it held, become context.
    window_start: int = 0
    trimmed: int = 0
    closed: SegmentClosed | None = None
    # The last partial step that came back: up to where it heard (a stream sample) and
    # what it heard; the final reuses it when it heard past the end of speech.
    heard_until: int = 0
    heard: Hypothesis | None = None
    # The words the last partial step showed, and those that it and the step before
    # both showed (what a reader saw twice in a row): the final must explain any it lacks.
    shown: tuple[Word, ...] = ()
    shown_twice: tuple[Word, ...] = ()
    # A final that stopped well before the end of speech, waiting for the decode of the
    # audio after its last word.
    ending: _Ending | None = None


def _timings(words: Sequence[Word], start_s: float, end_s: float) -> tuple[WordTiming, ...]:
    """Words of a segment's hypothesis as the stream's times, inside start_s..end_s.

    Punctuation that came as a word of its own (a "," after a forced prefix that ended
    before it) joins the word before it, as the text reads: a client that rebuilds the
    text from the words (Deepgram's `punctuated_word`) gets the same text."""
    timings: list[WordTiming] = []
    for w in words:
        w_start = min(max(start_s + w.start_s, start_s), end_s)
        w_end = min(max(start_s + w.end_s, w_start), end_s)
        text = w.text.strip()
        if timings and not any(c.isalnum() for c in text) and not w.text[:1].isspace():
            last = timings[-1]
            timings[-1] = replace(last, word=last.word + text, end=max(last.end, round(w_end, 3)))
            continue
        timings.append(
            WordTiming(text, round(w_start, 3), round(w_end, 3), round(float(w.probability), 4))
        )
    return tuple(timings)


def partial_budget(segment: _Segment, audio: np.ndarray, draft: int) -> int:
    """Tokens a partial step of `segment` may decode after its prefix: its draft's, and
    PARTIAL_BUDGET_TOKENS plus PARTIAL_BUDGET_TOKENS_PER_S for each second of audio past
    what the draft's hypothesis heard (the whole window when there is none)."""
    end = segment.start_sample + len(audio)
    since = segment.heard_until if segment.previous else segment.start_sample
    gained_s = max(0, end - max(since, segment.start_sample + segment.window_start))
    extra = PARTIAL_BUDGET_TOKENS_PER_S * gained_s / MODEL_SAMPLE_RATE_HZ
    return draft + PARTIAL_BUDGET_TOKENS + math.ceil(extra)


def _tokens(words: Sequence[Word]) -> list[int]:
    return [t for w in words for t in w.tokens]


def _common_tokens(a: Sequence[Word], b: Sequence[Word]) -> int:
    """How many leading tokens two word lists share (words may group tokens apart)."""
    n = 0
    for x, y in zip(_tokens(a), _tokens(b), strict=False):
        if x != y:
            break
        n += 1
    return n


def _words_within(words: Sequence[Word], tokens: int) -> int:
    """How many leading words lie wholly within the first `tokens` tokens."""
    count = taken = 0
    for w in words:
        taken += len(w.tokens)
        if taken > tokens:
            break
        count += 1
    return count


def _text(words: Sequence[Word]) -> str:
    return "".join(w.text for w in words).strip()


def _overlap(before: Sequence[Word], after: Sequence[Word]) -> int:
    """How many leading words of `after` say again the last words of `before` (a decode
    that starts at a word boundary the alignment placed early hears that word again)."""
    for k in range(min(len(before), len(after)), 0, -1):
        if list(map(normalize_word, after[:k])) == list(map(normalize_word, before[-k:])):
            return k
    return 0


class Session:
    def __init__(self, session_id: str, config: SessionConfig, classifier: FrameClassifier) -> None:
        self.id = session_id
        self.config = config
        self._classifier = classifier
        self._resampler = StreamResampler(config.audio.sample_rate_hz)
        self._vad = VadSegmenter(config.vad, classifier)
        self._out: list[ServerMessage] = []
        self._segments: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._to_finalize: deque[_Segment] = deque()
        self._next_index = config.first_segment
        self._in_flight: Job | None = None
        self._received_samples = 0  # at 16 kHz
        self._audio_seen = False
        self._stopping = False
        self._done = False
        self._finals_sent = 0
        self._history: deque[str] = deque(maxlen=8)  # recent final texts, for prompts

    def _time(self, samples: int) -> float:
        """A stream position (samples at 16 kHz on this connection) as a message's time."""
        return round(self.config.offset_s + samples / MODEL_SAMPLE_RATE_HZ, 3)

    # Input -----------------------------------------------------------------------

    @property
    def audio_seen(self) -> bool:
        return self._audio_seen

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def done(self) -> bool:
        return self._done

    @property
    def received_seconds(self) -> float:
        return self._received_samples / MODEL_SAMPLE_RATE_HZ

    @property
    def pending_seconds(self) -> float:
        """Audio of closed segments still waiting for their finals: what the engine is
        behind by, and what the session holds beyond its live segment."""
        samples = sum(len(s.closed.audio) for s in self._to_finalize if s.closed is not None)
        return samples / MODEL_SAMPLE_RATE_HZ

    def reconfigure(self, config: SessionConfig) -> None:
        """Apply a `start` message; only allowed before any audio."""
        if self._audio_seen:
            raise ProtocolError("bad_request", "'start' must come before any audio; it was ignored")
        self.__init__(self.id, config, self._classifier)  # type: ignore[misc]

    def receive_audio(self, data: bytes) -> None:
        if self._stopping:
            raise ProtocolError("bad_request", "audio after 'stop' is ignored")
        samples = decode_frame(data, self.config.audio)  # AudioFormatError -> bad_audio
        self._audio_seen = True
        self._push(self._resampler.process(samples))

    def receive_message(self, message: ClientMessage) -> None:
        if self._stopping:
            raise ProtocolError("bad_request", "the session is stopping; nothing follows 'stop'")
        if isinstance(message, Start):
            raise ProtocolError("bad_request", "'start' is only allowed as the first message")
        if isinstance(message, Flush):
            self._handle(self._vad.flush())
        elif isinstance(message, Stop):
            self._push(self._resampler.process(np.zeros(0, np.float32), last=True))
            self._handle(self._vad.flush(final=True))
            self._stopping = True
            self._maybe_done()

    def _push(self, samples: np.ndarray) -> None:
        self._received_samples += len(samples)
        self._handle(self._vad.push(samples))

    def _handle(self, events: list[SpeechStarted | SegmentClosed]) -> None:
        for event in events:
            if isinstance(event, SpeechStarted):
                self._out.append(SpeechStart(self._time(event.sample)))
                self._active = self._open_segment(event.segment_start_sample)
                continue
            segment = self._active or self._open_segment(event.start_sample)
            segment.closed = event
            self._to_finalize.append(segment)
            if event.speech_ended:
                self._out.append(SpeechEnd(self._time(event.speech_end_sample)))
                self._active = None
            else:  # cut at the maximum length: speech goes on in a new segment
                self._active = self._open_segment(event.end_sample)
        self._finalize_heard()

    def _open_segment(self, start_sample: int) -> _Segment:
        segment = _Segment(self._next_index, start_sample)
        self._segments[segment.index] = segment
        self._next_index += 1
        return segment

    # Jobs ------------------------------------------------------------------------

    def next_job(self) -> Job | None:
        """The next inference step, or None; finals first, then the newest partial."""
        if self._in_flight is not None or self._done:
            return None
        job = self._final_job() or self._partial_job()
        self._in_flight = job
        return job

    def _request(self, segment: _Segment, audio: np.ndarray, final: bool) -> DecodeRequest:
        """Decode the segment's live window: promised words inside it are the forced
        prefix, promised words before it (and earlier finals, if asked) the prompt. A
        partial step under AlignAtt may stop at the live edge; a final hears it all."""
        policy = self.config.policy
        history = " ".join(self._history)[-policy.prompt_chars :] if policy.prompt_chars else ""
        context = "".join(w.text for w in segment.committed[: segment.trimmed]).strip()
        prompt = f"{history} {context[-WINDOW_CONTEXT_CHARS:]}".strip()
        prefix = tuple(t for w in segment.committed[segment.trimmed :] for t in w.tokens)
        heard = tuple(t for w in segment.previous for t in w.tokens)
        draft = heard[len(prefix) :] if heard[: len(prefix)] == prefix else ()
        return DecodeRequest(
            audio=audio[segment.window_start :],
            prefix_tokens=prefix,
            # The last hypothesis's words after the prefix, most of which this step hears
            # again: the engine may check them in one pass (DecodeRequest.draft_tokens).
            draft_tokens=draft,
            # A final decodes all it hears.
            max_new_tokens=0 if final else partial_budget(segment, audio, len(draft)),
            prompt=prompt,
            language=self.config.language,
            stop_edge_s=policy.alignatt_edge_s
            if policy.policy == "alignatt" and not final
            else 0.0,
            stream_key=f"{self.id}/{segment.index}/{segment.window_start}",
            # A final promises all it hears: only partial steps' thresholds read it.
            other_case=not final and reads_other_case(len(audio) / MODEL_SAMPLE_RATE_HZ, policy),
        )

    def _final_job(self) -> Job | None:
        if not self._to_finalize:
            return None
        segment = self._to_finalize[0]
        assert segment.closed is not None
        if segment.ending is not None:
            return self._tail_job(segment, segment.ending)
        return Job(
            self.id,
            segment.index,
            self._request(segment, segment.closed.audio, True),
            True,
            segment.start_sample + segment.window_start,
        )

    def _tail_job(self, segment: _Segment, ending: _Ending) -> Job:
        """Decode what follows the final's last word, with no forced prefix (the prefix
        is what the decoder could not get past), its text as the prompt."""
        assert segment.closed is not None
        start = max(0, int(ending.words[-1].end_s * MODEL_SAMPLE_RATE_HZ))
        request = DecodeRequest(
            audio=segment.closed.audio[start:],
            prompt=_text(ending.words)[-WINDOW_CONTEXT_CHARS:],
            language=self.config.language,
        )
        return Job(self.id, segment.index, request, True, segment.start_sample + start, True)

    def _partial_job(self) -> Job | None:
        if not self.config.interim or self._active is None:
            return None
        current = self._vad.current_segment()
        if current is None:
            return None
        start, audio = current
        segment = self._active
        step = self.config.policy.step_s * MODEL_SAMPLE_RATE_HZ
        due = len(audio) - segment.decoded_samples >= step or self._endpoint_due(
            segment, len(audio)
        )
        if not due:
            return None
        segment.decoded_samples = len(audio)
        return Job(
            self.id,
            segment.index,
            self._request(segment, audio, False),
            False,
            start + segment.window_start,
        )

    @property
    def _endpoint_samples(self) -> int:
        """Silence after speech that a step must hear to stand as the final (0: never)."""
        return int(self.config.policy.endpoint_silence_s * MODEL_SAMPLE_RATE_HZ)

    def _endpoint_due(self, segment: _Segment, length: int) -> bool:
        """Speech seems to have ended and no step has heard that yet: one step now, so
        its words are ready to become the final when the VAD closes the segment."""
        margin = self._endpoint_samples
        silence = self._vad.trailing_silence_samples
        return 0 < margin <= silence and segment.decoded_samples < length - silence + margin

    def _heard_to_the_end(self, segment: _Segment) -> bool:
        """Whether the last partial step stands as the final. Only when the detector
        itself heard speech end (`end_ms` of silence): a stop or flush closes a segment
        before it could be sure, and a soft last word it took for silence was then lost
        (measured: "... turns to hatred and [jealousy]" over Wyoming, 3 of 75 files)."""
        closed = segment.closed
        margin = self._endpoint_samples
        return (
            margin > 0
            and closed is not None
            and closed.speech_ended
            and closed.heard_silence
            and segment.heard is not None
            and segment.heard_until >= closed.speech_end_sample + margin
        )

    def _finalize_heard(self) -> None:
        """Finalize closed segments, in order, whose last partial step heard them out."""
        while (
            self._to_finalize
            and self._to_finalize[0].ending is None
            and self._heard_to_the_end(self._to_finalize[0])
        ):
            segment = self._to_finalize[0]
            assert segment.heard is not None
            self._close(
                segment,
                _Ending(
                    list(segment.previous),
                    drop_hallucination(segment.heard, self.config.policy),
                    segment.heard,
                ),
            )
        self._maybe_done()

    def complete_job(self, job: Job, hypothesis: Hypothesis) -> None:
        assert self._in_flight is job, "complete_job takes the job in flight"
        self._in_flight = None
        segment = self._segments.get(job.segment)
        if segment is None:  # finalized from an earlier step while this one ran
            self._maybe_done()
            return
        shift_s = (job.start_sample - segment.start_sample) / MODEL_SAMPLE_RATE_HZ
        shifted = Hypothesis(
            tuple(
                replace(w, start_s=w.start_s + shift_s, end_s=w.end_s + shift_s)
                for w in hypothesis.words
            ),
            hypothesis.no_speech_prob,
            hypothesis.avg_logprob,
        )
        if job.tail:
            self._finish_tail(segment, shifted)
            self._finalize_heard()
            return
        kept = self._keep_promises(segment, shifted)
        words = drop_trailing_echo(kept, keep=len(segment.committed))
        log.debug(
            "session %s: %s of segment %d over %.2f-%.2f s: %r (promised %d)",
            self.id,
            "final" if job.final else "partial",
            segment.index,
            job.start_sample / MODEL_SAMPLE_RATE_HZ,
            job.start_sample / MODEL_SAMPLE_RATE_HZ + job.audio_seconds,
            "".join(w.text for w in words),
            len(segment.committed),
        )
        if job.final:
            self._close(
                segment,
                _Ending(
                    words,
                    drop_hallucination(hypothesis, self.config.policy),
                    hypothesis,
                    tuple(kept[len(words) :]),
                ),
            )
        else:
            segment.heard_until = job.start_sample + len(job.request.audio)
            segment.heard = hypothesis
            self._update_partial(segment, job, words)
        self._finalize_heard()

    def abandon_job(self, job: Job) -> None:
        """The engine failed on this job; the caller reports the error."""
        if self._in_flight is job:
            self._in_flight = None

    def _keep_promises(self, segment: _Segment, hypothesis: Hypothesis) -> list[Word]:
        """All words of the segment: the promised words as promised, then the new ones.

        The engine starts with the forced prefix, but may group its tokens into words
        differently (a lone "," promised as a word comes back joined to the word before):
        so the prefix is matched token by token, and the promised words are kept as
        they were.
        """
        in_window = segment.committed[segment.trimmed :]
        prefix = [t for w in in_window for t in w.tokens]
        taken, rest = 0, list(hypothesis.words)
        while rest and taken < len(prefix):
            taken += len(rest.pop(0).tokens)
        flat = [t for w in hypothesis.words for t in w.tokens]
        if taken != len(prefix) or flat[: len(prefix)] != prefix:
            # Never break the promise, and never say the promised words twice: keep only
            # what the engine heard after them.
            log.warning("session %s: hypothesis lost its forced prefix", self.id)
            end_s = in_window[-1].end_s if in_window else 0.0
            rest = [w for w in hypothesis.words if w.start_s >= end_s - 0.05]
        return segment.committed[: segment.trimmed] + in_window + rest

    def _update_partial(self, segment: _Segment, job: Job, words: list[Word]) -> None:
        window_s = (
            job.start_sample - segment.start_sample
        ) / MODEL_SAMPLE_RATE_HZ + job.audio_seconds  # the window's end, from the segment start
        policy = self.config.policy
        agreed = promised_prefix(segment.previous, words, window_s, policy, segment.earlier)
        # Promise only while the segment is live: once it is closed (a length cut may land
        # while this job is in flight) agreed words can lie beyond its audio, and forcing
        # them into its final would repeat them in the next segment.
        if len(agreed) > len(segment.committed) and segment is self._active:
            segment.committed = list(agreed)
            end_s = segment.committed[-1].end_s
            self._vad.protect_until(segment.start_sample + int(end_s * MODEL_SAMPLE_RATE_HZ))
            self._slide_window(segment, window_s)
        shown = tentative_words(
            segment.previous, words, len(segment.committed), window_s, self.config.policy
        )
        keep = max(policy.early_commit_agreements - 2, 0)
        segment.earlier = (*segment.earlier, segment.previous)[-keep:] if keep else ()
        segment.previous = tuple(words)
        twice = _words_within(shown, _common_tokens(segment.shown, shown))
        segment.shown_twice, segment.shown = tuple(shown[:twice]), tuple(shown)
        text = "".join(w.text for w in shown).strip()
        stable = "".join(w.text for w in segment.committed).strip()
        # A new promise is news even when the text is unchanged.
        if (text, stable) == segment.last_partial or (segment.closed is not None and not text):
            return
        segment.last_partial = (text, stable)
        start_s = self._time(segment.start_sample)
        end_s = self._time(job.start_sample + len(job.request.audio))
        self._out.append(
            Partial(
                segment=segment.index,
                text=text,
                start=start_s,
                end=end_s,
                stable=stable,
                words=_timings(shown, start_s, end_s),
            )
        )

    def _slide_window(self, segment: _Segment, window_end_s: float) -> None:
        """Keep decoding cheap: once the window is longer than max_window_s, move its
        start past promised words, best at a sentence end, into the gap before the next
        promised word (which stays in the window as forced prefix, so a clipped onset
        cannot change it)."""
        max_window_s = self.config.policy.max_window_s
        start_s = segment.window_start / MODEL_SAMPLE_RATE_HZ
        if max_window_s <= 0 or window_end_s - start_s <= max_window_s:
            return
        committed = segment.committed
        candidates = range(segment.trimmed + 1, len(committed))
        if not candidates:
            return
        sentence_ends = [
            k for k in candidates if committed[k - 1].text.rstrip().endswith((".", "?", "!"))
        ]
        k = max(sentence_ends or candidates)
        cut_s = (committed[k - 1].end_s + max(committed[k].start_s, committed[k - 1].end_s)) / 2
        segment.window_start = max(segment.window_start, int(cut_s * MODEL_SAMPLE_RATE_HZ))
        segment.trimmed = k

    def _close(self, segment: _Segment, ending: _Ending) -> None:
        """Finalize the segment, unless its words stop more than tail_gap_s before the
        VAD's end of speech: then its tail is decoded first (`_tail_job`)."""
        closed = segment.closed
        assert closed is not None
        if ending.hallucinated:
            ending = replace(ending, words=list(segment.committed))
        words = ending.words
        gap_s = self.config.policy.tail_gap_s
        speech_end_s = (closed.speech_end_sample - segment.start_sample) / MODEL_SAMPLE_RATE_HZ
        if gap_s > 0 and words and words[-1].end_s < speech_end_s - gap_s:
            log.debug(
                "session %s: the final of segment %d ends at %.2f s, speech at %.2f s: "
                "decoding its tail",
                self.id,
                segment.index,
                words[-1].end_s,
                speech_end_s,
            )
            segment.ending = ending
            return
        self._finalize(segment, ending)

    def _finish_tail(self, segment: _Segment, tail: Hypothesis) -> None:
        """Append what the tail decode heard after the final's last word: words centred
        after it, less any that repeat the final's last words, unless the decode looks
        invented (Whisper fills noise with "Thank you.")."""
        ending = segment.ending
        assert ending is not None
        last = ending.words[-1]
        added: list[Word] = []
        if not drop_hallucination(tail, self.config.policy):
            added = [w for w in tail.words if (w.start_s + w.end_s) / 2 > last.end_s]
            added = added[_overlap(ending.words, added) :]
        words = drop_trailing_echo(ending.words + added, keep=len(ending.words))
        if added:
            log.debug(
                "session %s: the tail of segment %d added %r",
                self.id,
                segment.index,
                _text(words[len(ending.words) :]),
            )
        segment.ending = None
        self._finalize(segment, replace(ending, words=words))

    def _finalize(self, segment: _Segment, ending: _Ending) -> None:
        """Send the segment's final, `ending.words`."""
        closed = segment.closed
        assert closed is not None
        words = ending.words
        promised = len(_tokens(segment.committed))
        if _common_tokens(segment.committed, words) < promised:
            # _keep_promises makes this impossible; should a path ever skip it, the
            # final still keeps every word a partial showed as stable.
            log.warning(
                "session %s: the final of segment %d lost promised words; kept",
                self.id,
                segment.index,
            )
            words = list(segment.committed) + words[_words_within(words, promised) :]
        self._explain_losses(segment, words, ending)
        self._to_finalize.popleft()
        del self._segments[segment.index]
        start_s, end_s = self._time(closed.start_sample), self._time(closed.end_sample)
        text = "".join(w.text for w in words).strip()
        if text:
            self._history.append(text)
        self._finals_sent += 1
        self._out.append(
            Final(segment.index, text, start_s, end_s, _timings(words, start_s, end_s))
        )

    def _explain_losses(self, segment: _Segment, words: Sequence[Word], ending: _Ending) -> None:
        """A DEBUG line for words the partials showed two steps in a row that the final
        (`words`, those of `ending` after the promise check) lacks, with the reason."""
        heard, echo = ending.heard, ending.echo
        shown = segment.shown_twice
        same = _common_tokens(shown, words)
        lost = shown[_words_within(shown, same) :]
        if not lost:
            return
        rest = words[_words_within(words, same) :]
        if ending.hallucinated:
            why = "the hallucination filter took the final's unpromised words for invented text"
            if heard is not None:
                why += (
                    f" (no_speech_prob {heard.no_speech_prob:.2f}, "
                    f"avg_logprob {heard.avg_logprob:.2f})"
                )
        elif echo and _common_tokens(lost, echo) > 0:
            why = f"the echo guard cut {_text(echo)!r}, a repeat without audio of its own"
        elif rest:
            why = f"the final's decode heard {_text(rest)!r} there instead"
        else:
            why = (
                "the final's decode ended before them (the model did not hear them in the "
                "closed segment, or the engine's guards cut them)"
            )
        log.debug(
            "session %s: the final of segment %d lacks %r, which partials showed two "
            "steps in a row: %s",
            self.id,
            segment.index,
            _text(lost),
            why,
        )

    def _maybe_done(self) -> None:
        if (
            self._stopping
            and not self._done
            and self._in_flight is None
            and not self._to_finalize
            and self._active is None
        ):
            self._done = True
            self._out.append(
                Done(
                    self._time(self._received_samples),
                    self.config.first_segment + self._finals_sent,
                )
            )

    # Output ----------------------------------------------------------------------

    def take_messages(self) -> list[ServerMessage]:
        out, self._out = self._out, []
        return out
