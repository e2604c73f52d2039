"""Session, the sans-I/O streaming state machine, driven by a scripted engine.

The audio is value-coded: word k is a 0.25 s run of the constant 0.2 + 0.01 k, words are
separated by 0.15 s of silence. The fake engine reads the words back from any window of
audio, so every transcript the session should produce is known exactly, and the energy
classifier makes the VAD boundaries exact too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from fakes import EnergyClassifier

from streaming.audio import MODEL_SAMPLE_RATE_HZ, AudioFormat, AudioFormatError
from streaming.engine import DecodeRequest, Hypothesis, Word
from streaming.policy import PolicyOptions
from streaming.protocol import (
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
    StreamParams,
)
from streaming.session import (
    PARTIAL_BUDGET_TOKENS,
    PARTIAL_BUDGET_TOKENS_PER_S,
    Job,
    Session,
    SessionConfig,
)
from streaming.vad import VadOptions

SR = MODEL_SAMPLE_RATE_HZ
WORD_S = 0.25
GAP_S = 0.15
CHUNK = 480  # 30 ms of 16 kHz audio per binary frame
CONFIG = SessionConfig(
    audio=AudioFormat(SR, "pcm_s16le"),
    vad=VadOptions(),
    policy=PolicyOptions(step_s=0.5, holdback_s=0.5),
)
# Every closed segment decoded once more for its final (no reuse of the endpoint step).
DECODE_FINALS = replace(CONFIG, policy=replace(CONFIG.policy, endpoint_silence_s=0.0))


# Value-coded audio and the engine that reads it ------------------------------------------


def level(k: int) -> float:
    return 0.2 + 0.01 * k


@dataclass(frozen=True)
class Spoken:
    k: int
    start: int  # samples from the start of the stream
    end: int

    @property
    def text(self) -> str:
        return f"w{self.k}"


def compose(plan: Sequence[float | list[int]], rate: int = SR) -> tuple[np.ndarray, list[Spoken]]:
    """Seconds of silence, or lists of word numbers spoken as one utterance."""
    parts: list[np.ndarray] = []
    spoken: list[Spoken] = []
    position = 0
    for item in plan:
        if isinstance(item, list):
            for i, k in enumerate(item):
                if i:
                    parts.append(np.zeros(round(GAP_S * rate), np.float32))
                    position += round(GAP_S * rate)
                n = round(WORD_S * rate)
                parts.append(np.full(n, level(k), np.float32))
                spoken.append(Spoken(k, position * SR // rate, (position + n) * SR // rate))
                position += n
        else:
            parts.append(np.zeros(round(item * rate), np.float32))
            position += round(item * rate)
    return np.concatenate(parts), spoken


def pcm(audio: np.ndarray) -> bytes:
    return bytes((np.round(np.clip(audio, -1, 1) * 32767)).astype("<i2").tobytes())


def token(k: int) -> int:
    return 100 + k


def make_word(k: int, start_s: float, end_s: float) -> Word:
    return Word(f" w{k}", start_s, end_s, 0.9, (token(k),))


def hear(audio: np.ndarray) -> list[Word]:
    """The words in a window: runs above 0.05, identified by their median level."""
    loud = np.concatenate([[False], np.abs(audio) > 0.05, [False]])
    edges = np.flatnonzero(np.diff(loud.astype(np.int8)))
    words = []
    for start, end in zip(edges[::2], edges[1::2], strict=True):
        if end - start < SR // 100:  # shorter than 10 ms: an edge, not a word
            continue
        k = round((float(np.median(audio[start:end])) - 0.2) / 0.01)
        words.append(make_word(k, int(start) / SR, int(end) / SR))
    return words


class ScriptedEngine:
    """Transcribes value-coded audio, honouring the forced prefix as the contract says."""

    name = "scripted"

    def __init__(self) -> None:
        self.requests: list[DecodeRequest] = []
        self.prefix_misses = 0  # forced words the audio did not start with

    def transcribe(self, requests: Sequence[DecodeRequest]) -> list[Hypothesis]:
        self.requests.extend(requests)
        return [self._one(r) for r in requests]

    def _one(self, request: DecodeRequest) -> Hypothesis:
        heard = hear(request.audio)
        forced = list(request.prefix_tokens)
        if [w.tokens[0] for w in heard[: len(forced)]] == forced:
            words = heard
        else:  # keep the promise anyway, then what follows the promised words
            self.prefix_misses += 1
            end = len(request.audio) / SR
            words = [make_word(t - 100, end, end) for t in forced]
            words += [w for w in heard if w.start_s >= end]
        return Hypothesis(tuple(words), no_speech_prob=0.01, avg_logprob=-0.2)


# Driving a session ----------------------------------------------------------------------

Rewrite = Callable[[Job, Hypothesis], Hypothesis]


@dataclass
class Run:
    session: Session
    engine: ScriptedEngine
    messages: list[ServerMessage] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)

    def of(self, kind: type[ServerMessage]) -> list[ServerMessage]:
        return [m for m in self.messages if isinstance(m, kind)]

    @property
    def finals(self) -> list[Final]:
        return [m for m in self.messages if isinstance(m, Final)]

    @property
    def partials(self) -> list[Partial]:
        return [m for m in self.messages if isinstance(m, Partial)]


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def run_session(
    audio: np.ndarray,
    *,
    config: SessionConfig = CONFIG,
    chunk_bytes: int = 2 * CHUNK,
    lag_chunks: int = 0,
    stop: bool = True,
    rewrite: Rewrite | None = None,
    data: bytes | None = None,
) -> Run:
    """Feed the audio frame by frame; a job finishes `lag_chunks` frames after it starts."""
    run = Run(Session("s1", config, EnergyClassifier()), ScriptedEngine())
    session = run.session
    in_flight: tuple[Job, int] | None = None

    def pump(now: int, drain: bool = False) -> None:
        nonlocal in_flight
        while True:
            if in_flight is not None:
                running, since = in_flight
                if not drain and now - since < lag_chunks:
                    return
                hypothesis = run.engine.transcribe([running.request])[0]
                if rewrite is not None:
                    hypothesis = rewrite(running, hypothesis)
                session.complete_job(running, hypothesis)
                in_flight = None
            job = session.next_job()
            if job is None:
                return
            run.jobs.append(job)
            in_flight = (job, now)

    for now, frame in enumerate(chunks(pcm(audio) if data is None else data, chunk_bytes)):
        session.receive_audio(frame)
        pump(now)
        run.messages.extend(session.take_messages())
    if stop:
        session.receive_message(Stop())
        pump(0, drain=True)
        run.messages.extend(session.take_messages())
    return run


def words_of(final: Final) -> list[str]:
    return [w.word for w in final.words]


def assert_promises_kept(run: Run) -> None:
    """`stable` starts each partial's text, only grows, and starts its segment's final."""
    for partial in run.partials:
        assert partial.text.split()[: len(partial.stable.split())] == partial.stable.split()
    for final in run.finals:
        stables = [p.stable.split() for p in run.partials if p.segment == final.segment]
        for earlier, later in itertools.pairwise(stables):
            assert later[: len(earlier)] == earlier
        if stables:
            assert words_of(final)[: len(stables[-1])] == stables[-1]
        final_at = run.messages.index(final)
        assert all(
            i < final_at
            for i, m in enumerate(run.messages)
            if isinstance(m, Partial) and m.segment == final.segment
        )


# Three utterances: 0.5 s silence, 5 words, 1 s, 3 words, 1 s, 4 words, 0.3 s, stop.
THREE, THREE_SPOKEN = compose([0.5, [0, 1, 2, 3, 4], 1.0, [5, 6, 7], 1.0, [8, 9, 10, 11], 0.3])
THREE_TEXTS = [["w0", "w1", "w2", "w3", "w4"], ["w5", "w6", "w7"], ["w8", "w9", "w10", "w11"]]


@pytest.fixture(scope="module")
def three() -> Run:
    return run_session(THREE)


# One segment, in order -------------------------------------------------------------------


def test_one_utterance_gives_speech_start_partials_speech_end_and_final_in_order() -> None:
    audio, _ = compose([0.5, [0, 1, 2, 3, 4], 1.0])

    run = run_session(audio)

    kinds = [type(m).__name__ for m in run.messages]
    assert kinds[0] == "SpeechStart"
    assert kinds[-1] == "Done"
    assert kinds.count("SpeechStart") == kinds.count("SpeechEnd") == kinds.count("Final") == 1
    assert kinds.count("Partial") >= 3
    first_final = kinds.index("Final")
    assert set(kinds[1 : kinds.index("SpeechEnd")]) == {"Partial"}
    assert all(k != "Partial" for k in kinds[first_final:])
    # speech_end is the VAD's decision and goes out at once; the final follows its decode.
    assert kinds.index("SpeechEnd") < first_final
    (final,) = run.finals
    assert final.segment == 0
    assert words_of(final) == ["w0", "w1", "w2", "w3", "w4"]
    assert final.text == "w0 w1 w2 w3 w4"
    assert run.engine.prefix_misses == 0


def test_speech_start_and_end_times_follow_the_spoken_words() -> None:
    audio, spoken = compose([0.5, [0, 1, 2], 1.0])

    run = run_session(audio)

    (start,) = run.of(SpeechStart)
    (end,) = run.of(SpeechEnd)
    (final,) = run.finals
    assert isinstance(start, SpeechStart) and isinstance(end, SpeechEnd)
    frame_s = 0.03  # VAD decisions are per frame: the frames holding the first and last sound
    assert spoken[0].start / SR - frame_s < start.t <= spoken[0].start / SR
    assert spoken[-1].end / SR <= end.t < spoken[-1].end / SR + frame_s
    assert final.start == pytest.approx(start.t - 0.24)  # pad_ms before the first speech
    assert final.end == pytest.approx(end.t + 0.24)  # and after the last


# Partials, stable text and finals ---------------------------------------------------------


def test_segments_are_numbered_in_order_with_the_right_words(three: Run) -> None:
    assert [f.segment for f in three.finals] == [0, 1, 2]
    assert [words_of(f) for f in three.finals] == THREE_TEXTS
    assert [f.text for f in three.finals] == [" ".join(t) for t in THREE_TEXTS]
    assert sorted({p.segment for p in three.partials}) == [0, 1, 2]
    assert three.engine.prefix_misses == 0


def test_partial_segments_never_go_back(three: Run) -> None:
    segments = [p.segment for p in three.partials]
    assert segments == sorted(segments)


def test_stable_is_a_prefix_of_the_partial_text(three: Run) -> None:
    for partial in three.partials:
        assert partial.text.startswith(partial.stable)
        assert partial.text.split()[: len(partial.stable.split())] == partial.stable.split()
    assert any(p.stable for p in three.partials), "the scenario must promise some words"


def test_stable_text_is_never_retracted_by_later_partials_or_the_final(three: Run) -> None:
    for final in three.finals:
        stables = [p.stable.split() for p in three.partials if p.segment == final.segment]
        for earlier, later in itertools.pairwise(stables):
            assert later[: len(earlier)] == earlier
        assert stables, "every segment here is long enough for partials"
        assert words_of(final)[: len(stables[-1])] == stables[-1]


def test_each_final_comes_after_every_partial_of_its_segment(three: Run) -> None:
    for final in three.finals:
        final_at = three.messages.index(final)
        partials_at = [
            i
            for i, m in enumerate(three.messages)
            if isinstance(m, Partial) and m.segment == final.segment
        ]
        assert partials_at and max(partials_at) < final_at


def test_partials_of_a_segment_cover_its_span(three: Run) -> None:
    for final in three.finals:
        for partial in (p for p in three.partials if p.segment == final.segment):
            assert partial.start == final.start
            assert partial.end > partial.start


def test_final_word_times_lie_inside_the_segment_and_match_the_audio(three: Run) -> None:
    spoken = iter(THREE_SPOKEN)
    for final in three.finals:
        for word in final.words:
            assert final.start <= word.start <= word.end <= final.end
            truth = next(spoken)
            assert word.word == truth.text
            assert word.start == pytest.approx(truth.start / SR, abs=2e-3)
            assert word.end == pytest.approx(truth.end / SR, abs=2e-3)
            assert word.probability == 0.9


def test_a_decode_gets_what_its_previous_decode_heard_after_the_prefix_as_a_draft() -> None:
    # The engine may check the draft in one pass instead of decoding it token by token
    # (DecodeRequest.draft_tokens): it is the segment's last hypothesis past the prefix.
    heard: list[tuple[Job, Hypothesis]] = []

    def record(job: Job, hypothesis: Hypothesis) -> Hypothesis:
        heard.append((job, hypothesis))
        return hypothesis

    run = run_session(THREE, config=DECODE_FINALS, rewrite=record)
    drafted = 0
    for k, (job, _) in enumerate(heard):
        request = job.request
        before = [h for j, h in heard[:k] if j.segment == job.segment and not j.tail]
        if not before or job.tail:
            assert request.draft_tokens == ()
            continue
        previous = before[-1].tokens
        if previous[: len(request.prefix_tokens)] == request.prefix_tokens:
            assert request.prefix_tokens + request.draft_tokens == previous
            drafted += bool(request.draft_tokens)
        else:
            assert request.draft_tokens == ()
    assert drafted >= len(heard) // 2, (drafted, len(heard))
    assert [words_of(f) for f in run.finals] == THREE_TEXTS


def test_a_partial_decode_is_budgeted_past_its_draft_and_a_final_is_not() -> None:
    # What a decoder writes far past the audio the previous step heard is text it invents
    # past the live edge: a partial step may decode its draft and a few tokens more per
    # second of new audio (session.partial_budget); a final decodes all it hears.
    run = run_session(THREE, config=DECODE_FINALS)
    partials = [j for j in run.jobs if not j.final]
    finals = [j for j in run.jobs if j.final]
    assert partials and finals
    assert all(j.request.max_new_tokens == 0 for j in finals)
    step_s = DECODE_FINALS.policy.step_s
    for job in partials:
        request = job.request
        least = len(request.draft_tokens) + PARTIAL_BUDGET_TOKENS
        assert request.max_new_tokens >= least
        if request.draft_tokens:  # a step after the one that heard the draft
            assert request.max_new_tokens <= least + 1 + PARTIAL_BUDGET_TOKENS_PER_S * (
                step_s + 0.2
            )
        else:  # the segment's first: its window's audio is all new
            extra = math.ceil(PARTIAL_BUDGET_TOKENS_PER_S * job.audio_seconds)
            assert request.max_new_tokens == least + extra
    assert [words_of(f) for f in run.finals] == THREE_TEXTS


def test_decodes_force_the_promised_words_and_each_segment_is_finalised_once() -> None:
    run = run_session(THREE, config=DECODE_FINALS)

    assert any(r.prefix_tokens for r in run.engine.requests)
    final_jobs = [j for j in run.jobs if j.final]
    assert [j.segment for j in final_jobs] == [0, 1, 2]
    assert [words_of(f) for f in run.finals] == THREE_TEXTS
    assert all(j.request.language == "en" and j.request.prompt == "" for j in run.jobs)
    assert all(j.session_id == "s1" for j in run.jobs)
    assert_promises_kept(run)


def test_a_final_after_silence_is_the_step_that_heard_it_with_no_decode_after_the_close(
    three: Run,
) -> None:
    assert [words_of(f) for f in three.finals] == THREE_TEXTS
    # The first two segments closed on the VAD's own silence: their finals are the steps
    # that heard them out. The last one was closed by `stop` 0.3 s after its words, before
    # the VAD could be sure speech had ended: it is decoded once more.
    assert [j.segment for j in three.jobs if j.final] == [2]
    for final in three.finals[:2]:  # it comes with the end of speech: nothing to decode
        assert isinstance(three.messages[three.messages.index(final) - 1], SpeechEnd)
    # the step that became the final ran once the silence reached endpoint_silence_s
    margin = int(CONFIG.policy.endpoint_silence_s * SR)
    ends = [j.start_sample + len(j.request.audio) for j in three.jobs]
    for spoken_end in (THREE_SPOKEN[4].end, THREE_SPOKEN[7].end, THREE_SPOKEN[11].end):
        assert any(spoken_end + margin <= end <= spoken_end + margin + 2 * CHUNK for end in ends), (
            spoken_end
        )


def test_a_segment_closed_by_stop_is_decoded_again_not_taken_from_the_endpoint_step() -> None:
    # A soft last word the detector took for silence: the endpoint step ran before it was
    # said. Stopping 0.35 s after the words closes the segment: its final hears it all.
    audio, _ = compose([0.5, [0, 1, 2], 0.35])
    run = run_session(audio)
    assert [j.segment for j in run.jobs if j.final] == [0]
    assert words_of(run.finals[0]) == ["w0", "w1", "w2"]


def test_prompt_chars_gives_later_decodes_the_end_of_earlier_finals() -> None:
    config = replace(
        DECODE_FINALS, language="de", policy=replace(DECODE_FINALS.policy, prompt_chars=8)
    )

    run = run_session(THREE, config=config)

    final_prompts = [j.request.prompt for j in run.jobs if j.final]
    assert final_prompts == ["", "w0 w1 w2 w3 w4"[-8:], "w0 w1 w2 w3 w4 w5 w6 w7"[-8:]]
    assert [words_of(f) for f in run.finals] == THREE_TEXTS
    assert all(j.request.language == "de" for j in run.jobs)


def test_an_abandoned_final_job_is_offered_again() -> None:
    audio, _ = compose([0.5, [0, 1, 2], 1.0])
    session = Session("s1", replace(CONFIG, interim=False), EnergyClassifier())
    engine = ScriptedEngine()
    session.receive_audio(pcm(audio))
    session.receive_message(Stop())

    failed = session.next_job()
    assert failed is not None and failed.final
    assert session.next_job() is None  # one job in flight at a time
    session.abandon_job(failed)
    retry = session.next_job()

    assert retry is not None and retry.final and retry.segment == failed.segment
    session.complete_job(retry, engine.transcribe([retry.request])[0])
    messages = session.take_messages()
    assert [type(m) for m in messages] == [SpeechStart, SpeechEnd, Final, Done]


# Stop and Done ----------------------------------------------------------------------------


def test_stop_gives_every_segment_a_final_then_exactly_one_done(three: Run) -> None:
    done = three.messages[-1]
    assert isinstance(done, Done)
    assert [type(m) for m in three.messages].count(Done) == 1
    assert done.segments == 3 == len(three.finals)
    assert done.audio_seconds == pytest.approx(len(THREE) / SR, abs=1e-3)
    assert three.session.done


def test_stop_during_speech_closes_the_segment_with_the_partial_frame() -> None:
    audio, _ = compose([0.5, [0, 1, 2]])  # no silence: the stream ends mid-segment
    audio = audio[:-123]  # and not on a VAD frame boundary

    run = run_session(audio)

    (final,) = run.finals
    assert words_of(final) == ["w0", "w1", "w2"]
    assert final.end == pytest.approx(len(audio) / SR, abs=1e-3)
    (end,) = run.of(SpeechEnd)
    assert isinstance(end, SpeechEnd)
    assert end.t <= final.end
    done = run.messages[-1]
    assert isinstance(done, Done)
    assert done.audio_seconds == pytest.approx(len(audio) / SR, abs=1e-3)


def test_speech_end_at_stop_marks_the_last_speech_not_the_end_of_the_stream(
    three: Run,
) -> None:
    last = THREE_SPOKEN[-1]
    end = three.of(SpeechEnd)[-1]
    assert isinstance(end, SpeechEnd)
    assert last.end / SR <= end.t < last.end / SR + 0.03
    assert three.finals[-1].end == pytest.approx(len(THREE) / SR, abs=1e-3)


def test_stop_without_speech_gives_done_with_no_segments() -> None:
    run = run_session(np.zeros(SR, np.float32))

    assert run.messages == [Done(audio_seconds=1.0, segments=0)]


def test_stop_before_any_audio_gives_done_at_once() -> None:
    session = Session("s1", CONFIG, EnergyClassifier())

    session.receive_message(Stop())

    assert session.take_messages() == [Done(audio_seconds=0.0, segments=0)]
    assert session.done
    assert session.next_job() is None


def test_nothing_follows_done(three: Run) -> None:
    session = three.session
    assert session.next_job() is None
    assert session.take_messages() == []
    with pytest.raises(ProtocolError):
        session.receive_audio(pcm(np.zeros(CHUNK, np.float32)))
    with pytest.raises(ProtocolError):
        session.receive_message(Flush())
    with pytest.raises(ProtocolError):
        session.receive_message(Stop())
    assert session.take_messages() == []


def test_audio_after_stop_is_a_protocol_error_even_while_finals_are_pending() -> None:
    session = Session("s1", CONFIG, EnergyClassifier())
    audio, _ = compose([0.5, [0, 1, 2], 1.0])
    session.receive_audio(pcm(audio))
    session.receive_message(Stop())
    assert not session.done  # the final is still to be decoded

    with pytest.raises(ProtocolError) as caught:
        session.receive_audio(pcm(audio))

    assert caught.value.code == "bad_request"
    assert session.stopping


def test_done_counts_the_audio_received_at_48_khz_in_16_khz_seconds() -> None:
    rate = 48_000
    audio, _ = compose([0.5, [0, 1, 2], 1.0], rate=rate)
    config = replace(CONFIG, audio=AudioFormat(rate, "pcm_s16le"))

    run = run_session(audio, config=config, chunk_bytes=2 * 1440)

    done = run.messages[-1]
    assert isinstance(done, Done)
    assert done.audio_seconds == pytest.approx(len(audio) / rate, abs=2e-3)
    (final,) = run.finals
    assert words_of(final) == ["w0", "w1", "w2"]


def test_f32le_audio_in_odd_sized_frames_is_reassembled() -> None:
    audio, _ = compose([0.5, [0, 1, 2], 1.0])
    config = replace(CONFIG, audio=AudioFormat(SR, "f32le"))
    data = audio.astype("<f4").tobytes()

    run = run_session(audio, config=config, data=data, chunk_bytes=4 * 333)

    assert [words_of(f) for f in run.finals] == [["w0", "w1", "w2"]]


def test_a_frame_with_a_partial_sample_is_refused_and_the_session_goes_on() -> None:
    session = Session("s1", CONFIG, EnergyClassifier())

    with pytest.raises(AudioFormatError):
        session.receive_audio(b"\x00\x00\x00")

    assert not session.audio_seen
    session.receive_audio(b"\x00\x00")
    assert session.received_seconds == pytest.approx(1 / SR)


@pytest.mark.parametrize("chunk_bytes", [2 * 7, 2 * 160, 2 * 1001, 2 * 4000, 2 * 16000])
def test_finals_do_not_depend_on_how_the_audio_is_framed(chunk_bytes: int) -> None:
    reference = run_session(THREE)

    run = run_session(THREE, chunk_bytes=chunk_bytes)

    assert run.finals == reference.finals
    assert run.of(SpeechStart) == reference.of(SpeechStart)
    assert run.of(SpeechEnd) == reference.of(SpeechEnd)
    assert run.messages[-1] == reference.messages[-1]


# Control messages --------------------------------------------------------------------------


def test_start_message_is_refused_by_receive_message() -> None:
    session = Session("s1", CONFIG, EnergyClassifier())

    with pytest.raises(ProtocolError, match="only allowed as the first message"):
        session.receive_message(Start(StreamParams()))


def test_reconfigure_before_audio_applies_the_new_settings() -> None:
    session = Session("s1", CONFIG, EnergyClassifier())
    new = replace(CONFIG, interim=False, language="de")

    session.reconfigure(new)

    assert session.config == new
    assert session.id == "s1"


def test_reconfigure_after_audio_is_a_protocol_error() -> None:
    session = Session("s1", CONFIG, EnergyClassifier())
    session.receive_audio(pcm(np.zeros(CHUNK, np.float32)))

    with pytest.raises(ProtocolError) as caught:
        session.reconfigure(replace(CONFIG, interim=False))

    assert caught.value.code == "bad_request"
    assert session.config == CONFIG


def test_flush_finalises_the_open_segment_without_waiting_for_silence() -> None:
    audio, _ = compose([0.5, [0, 1, 2]])
    session = Session("s1", CONFIG, EnergyClassifier())
    engine = ScriptedEngine()
    session.receive_audio(pcm(audio))

    session.receive_message(Flush())
    messages = session.take_messages()
    while (job := session.next_job()) is not None:
        session.complete_job(job, engine.transcribe([job.request])[0])
    messages += session.take_messages()

    assert [type(m) for m in messages] == [SpeechStart, SpeechEnd, Final]
    final = messages[-1]
    assert isinstance(final, Final)
    assert words_of(final) == ["w0", "w1", "w2"]
    assert not session.done


def test_interim_false_gives_finals_but_no_partials() -> None:
    run = run_session(THREE, config=replace(CONFIG, interim=False))

    assert run.partials == []
    assert all(job.final for job in run.jobs)
    assert [words_of(f) for f in run.finals] == THREE_TEXTS
    assert isinstance(run.messages[-1], Done)


# Hallucinations ----------------------------------------------------------------------------


def thank_you(job: Job, hypothesis: Hypothesis) -> Hypothesis:
    """On final decodes and on steps ending in silence, the promised words and then
    Whisper's favourite invention."""
    if not job.final and np.max(np.abs(job.request.audio[-SR // 6 :])) > 0.01:  # > a gap
        return hypothesis
    promised = hypothesis.words[: len(job.request.prefix_tokens)]
    end = job.audio_seconds
    invented = (
        Word(" Thank", end - 0.4, end - 0.2, 0.4, (50,)),
        Word(" you.", end - 0.2, end, 0.4, (51,)),
    )
    return Hypothesis(promised + invented, no_speech_prob=0.9, avg_logprob=-1.5)


def test_a_hallucinated_final_yields_empty_text() -> None:
    run = run_session(THREE, config=replace(CONFIG, interim=False), rewrite=thank_you)

    assert [f.text for f in run.finals] == ["", "", ""]
    assert all(f.words == () for f in run.finals)
    done = run.messages[-1]
    assert isinstance(done, Done)
    assert done.segments == 3


@pytest.mark.parametrize("config", [CONFIG, DECODE_FINALS], ids=["endpoint step", "decoded"])
def test_a_hallucinated_final_keeps_the_promised_words_only(config: SessionConfig) -> None:
    run = run_session(THREE, config=config, rewrite=thank_you)

    assert len(run.finals) == 3
    for final in run.finals:
        stables = [p.stable for p in run.partials if p.segment == final.segment]
        assert stables[-1], "the scenario must promise words before the final"
        assert words_of(final) == stables[-1].split()
        assert "Thank" not in final.text


# A slow engine -----------------------------------------------------------------------------


@pytest.mark.parametrize("lag_chunks", [25, 40, 70])  # 0.75 s to 2.1 s per job
def test_a_slow_engine_skips_partial_steps_but_loses_no_final(lag_chunks: int) -> None:
    fast = run_session(THREE)

    slow = run_session(THREE, lag_chunks=lag_chunks)

    assert len(slow.jobs) < len(fast.jobs)
    assert [words_of(f) for f in slow.finals] == THREE_TEXTS
    assert [f.segment for f in slow.finals] == [0, 1, 2]
    assert_promises_kept(slow)
    done = slow.messages[-1]
    assert isinstance(done, Done) and done.segments == 3
    assert slow.engine.prefix_misses == 0


def test_each_partial_job_covers_the_newest_audio() -> None:
    run = run_session(THREE, lag_chunks=17)

    partial_jobs = [j for j in run.jobs if not j.final]
    for before, after in itertools.pairwise(partial_jobs):
        if before.segment == after.segment:
            # At least step_s (and, with the lag, more than one step) of new audio.
            grown = after.audio_seconds - before.audio_seconds
            assert grown >= 0.5
            assert after.start_sample == before.start_sample


# Long segments ----------------------------------------------------------------------------

LONG, LONG_SPOKEN = compose([0.5, list(range(20)), 1.0])  # 7.85 s of continuous speech
CUT_CONFIG = replace(CONFIG, vad=VadOptions(max_segment_s=2.0))


@pytest.mark.parametrize("lag_chunks", [0, 4, 11, 17, 23, 31, 45])
def test_long_speech_is_cut_into_segments_without_losing_or_repeating_words(
    lag_chunks: int,
) -> None:
    run = run_session(LONG, config=CUT_CONFIG, lag_chunks=lag_chunks)

    assert len(run.finals) >= 4
    assert [f.segment for f in run.finals] == list(range(len(run.finals)))
    heard = [w for f in run.finals for w in words_of(f)]
    assert heard == [s.text for s in LONG_SPOKEN]
    for before, after in itertools.pairwise(run.finals):
        assert before.end == after.start  # the cut segments tile the speech
    assert len(run.of(SpeechStart)) == len(run.of(SpeechEnd)) == 1
    for final in run.finals:
        assert all(final.start <= w.start <= w.end <= final.end for w in final.words)
    assert_promises_kept(run)
    assert run.engine.prefix_misses == 0  # no final was forced to hold words it lacks


def test_stop_right_after_a_cut_at_the_last_frame_finishes_cleanly() -> None:
    # One sound over frames 10 to 67; the segment (from frame 2, with 240 ms of padding)
    # reaches 67 frames with the silent frame 68, the quietest, and the stream stops there.
    audio = np.concatenate(
        [
            np.zeros(10 * CHUNK, np.float32),
            np.full(58 * CHUNK, level(3), np.float32),
            np.zeros(CHUNK, np.float32),
        ]
    )

    run = run_session(audio, config=replace(CUT_CONFIG, interim=False))

    assert [words_of(f) for f in run.finals] == [["w3"], []]
    assert run.finals[0].start == 2 * CHUNK / SR
    assert run.finals[0].end == run.finals[1].start == 68 * CHUNK / SR
    done = run.messages[-1]
    assert isinstance(done, Done) and done.segments == 2


# A resumed stream: offset_s and first_segment ----------------------------------------------


def _shifted(message: ServerMessage, offset_s: float, first: int) -> ServerMessage:
    """What the same message says in a stream resumed at `offset_s`, segment `first`."""

    def t(x: float) -> float:
        return round(x + offset_s, 3)

    if isinstance(message, SpeechStart | SpeechEnd):
        return replace(message, t=t(message.t))
    if isinstance(message, Partial | Final):
        words = tuple(replace(w, start=t(w.start), end=t(w.end)) for w in message.words)
        return replace(
            message,
            segment=message.segment + first,
            start=t(message.start),
            end=t(message.end),
            words=words,
        )
    if isinstance(message, Done):
        return replace(
            message, audio_seconds=t(message.audio_seconds), segments=message.segments + first
        )
    return message


def test_an_offset_and_a_first_segment_shift_every_time_and_number_the_session_sends(
    three: Run,
) -> None:
    resumed = run_session(THREE, config=replace(CONFIG, offset_s=3600.25, first_segment=7))

    assert resumed.messages == [_shifted(m, 3600.25, 7) for m in three.messages]
    done = resumed.messages[-1]
    assert isinstance(done, Done) and done.segments == 10  # the stream's: 0..9, 7 here


def test_resuming_from_the_end_of_a_final_gives_the_rest_of_the_transcript(three: Run) -> None:
    """The rule of docs/protocol.md: a client that lost its connection after the first
    final sends the audio from that final's end again, with offset_s and first_segment;
    the finals of both connections, joined, are the transcript of one connection."""
    first = three.finals[0]
    resume_at = round(first.end * SR)

    resumed = run_session(
        THREE[resume_at:],
        config=replace(CONFIG, offset_s=resume_at / SR, first_segment=first.segment + 1),
    )

    finals = [first, *resumed.finals]
    assert [f.segment for f in finals] == [0, 1, 2]
    assert [words_of(f) for f in finals] == THREE_TEXTS
    for again, once in zip(resumed.finals, three.finals[1:], strict=True):
        # The VAD's 30 ms frames now start elsewhere: boundaries move by less than one.
        assert again.start == pytest.approx(once.start, abs=0.031)
        assert again.end == pytest.approx(once.end, abs=0.031)
    done = resumed.messages[-1]
    assert isinstance(done, Done)
    assert done.segments == 3 and done.audio_seconds == pytest.approx(len(THREE) / SR, abs=1e-3)


# A final that stops short of the end of speech (tail_gap_s) -------------------------------

TEN, TEN_SPOKEN = compose([0.5, list(range(10)), 1.0])


def stops_after(seconds: float) -> Rewrite:
    """A decoder that, past a misheard prefix, gives up: no word after `seconds` of the
    stream, except when decoding a final's tail (no prefix)."""

    def rewrite(job: Job, hypothesis: Hypothesis) -> Hypothesis:
        if job.tail:
            return hypothesis
        start_s = job.start_sample / SR
        kept = tuple(w for w in hypothesis.words if start_s + w.start_s < seconds)
        return replace(hypothesis, words=kept)

    return rewrite


@pytest.mark.parametrize("config", [CONFIG, DECODE_FINALS], ids=["endpoint step", "decoded"])
def test_a_final_that_stops_short_of_the_speech_gets_its_tail_decoded(
    config: SessionConfig,
) -> None:
    run = run_session(TEN, config=config, rewrite=stops_after(1.8))
    assert [words_of(f) for f in run.finals] == [[f"w{k}" for k in range(10)]]
    tails = [j for j in run.jobs if j.tail]
    assert len(tails) == 1
    # no forced prefix (what the decoder could not get past), the words so far as prompt
    assert tails[0].request.prefix_tokens == ()
    assert tails[0].request.prompt == "w0 w1 w2 w3"
    timings = run.finals[0].words
    assert [round(w.start, 2) for w in timings[4:]] == [
        round(s.start / SR, 2) for s in TEN_SPOKEN[4:]
    ]
    assert_promises_kept(run)


def test_a_segments_windows_share_a_stream_key_and_each_extends_the_last() -> None:
    # The torch engine reuses encoder states by stream key when the audio continues:
    # every keyed request must start with the previous one's audio, a segment's steps
    # and final sharing one key; a tail (other audio) has none.
    run = run_session(TEN, config=DECODE_FINALS, rewrite=stops_after(1.8))
    last: dict[str, np.ndarray] = {}
    for job in run.jobs:
        key = job.request.stream_key
        if job.tail:
            assert key == ""
            continue
        assert key.startswith(f"s1/{job.segment}/")
        if key in last:
            previous = last[key]
            assert np.array_equal(job.request.audio[: len(previous)], previous)
        last[key] = job.request.audio
    assert len(last) == 1 and any(j.final and not j.tail for j in run.jobs)
    three = run_session(THREE, config=DECODE_FINALS)
    assert len({j.request.stream_key for j in three.jobs}) == 3  # one per segment


def test_without_the_tail_guard_those_words_are_lost() -> None:
    config = replace(CONFIG, policy=replace(CONFIG.policy, tail_gap_s=0.0))
    run = run_session(TEN, config=config, rewrite=stops_after(1.8))
    assert [words_of(f) for f in run.finals] == [["w0", "w1", "w2", "w3"]]
    assert not any(j.tail for j in run.jobs)


def test_a_final_that_reaches_the_end_of_speech_costs_no_tail_decode() -> None:
    run = run_session(TEN)
    assert [words_of(f) for f in run.finals] == [[f"w{k}" for k in range(10)]]
    assert not any(j.tail for j in run.jobs)


def test_a_tail_that_looks_invented_or_repeats_the_last_word_adds_nothing_invented() -> None:
    def invented(job: Job, hypothesis: Hypothesis) -> Hypothesis:
        if job.tail:
            return Hypothesis((make_word(99, 0.1, 0.5),), no_speech_prob=0.9, avg_logprob=-1.5)
        return stops_after(1.8)(job, hypothesis)

    run = run_session(TEN, rewrite=invented)
    assert [words_of(f) for f in run.finals] == [["w0", "w1", "w2", "w3"]]

    def repeats(job: Job, hypothesis: Hypothesis) -> Hypothesis:
        if job.tail:  # hears the end of w3 again before the words that follow it
            return replace(hypothesis, words=(make_word(3, 0.0, 0.1), *hypothesis.words))
        return stops_after(1.8)(job, hypothesis)

    run = run_session(TEN, rewrite=repeats)
    assert [words_of(f) for f in run.finals] == [[f"w{k}" for k in range(10)]]
