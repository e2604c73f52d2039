"""The PyTorch engine (server/engines/torch_whisper): the same hypotheses as the
CTranslate2 engine, the forced prefix read in one decoder pass, batches that do not
change a window's result, and weights from every format it reads, with no download."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch",
    reason="the torch engine needs PyTorch: pip install -e '.[torch]' (make test installs it)",
)

from speech import Utterance, read_pcm, wer, word_errors  # noqa: E402

from server.config import ModelSection  # noqa: E402
from server.engines import WhisperEngine, build_engine  # noqa: E402
from server.engines.decoding import MAX_WINDOW_S, Tokenizers, other_case_token  # noqa: E402
from server.engines.models import load_tokenizer, resolve_model_path  # noqa: E402
from server.engines.torch_whisper import TorchWhisper  # noqa: E402
from server.engines.torch_whisper.alignment import dtw  # noqa: E402
from server.engines.torch_whisper.model import EncoderBlock  # noqa: E402
from server.engines.torch_whisper.weights import (  # noqa: E402
    OPENAI_ALIGNMENT_HEADS,
    convert_ct2,
    decode_alignment_heads,
    read_ct2_variables,
)
from streaming.audio import MODEL_SAMPLE_RATE_HZ  # noqa: E402
from streaming.engine import DecodeRequest, Hypothesis  # noqa: E402

pytestmark = pytest.mark.model
RATE = MODEL_SAMPLE_RATE_HZ


@pytest.fixture(scope="session")
def torch_engine() -> WhisperEngine:
    """The bundled tiny.en on PyTorch, as `model.engine: torch` loads it (int8)."""
    return build_engine(ModelSection(engine="torch"))


@pytest.fixture(scope="session")
def torch_float32() -> TorchWhisper:
    """float32: the reference the other weight formats must match exactly."""
    return TorchWhisper(compute_type="float32", cpu_threads=1)


def _read_16k(utterance: Utterance) -> np.ndarray:
    import soxr

    pcm, rate = read_pcm(utterance.path)
    return np.asarray(soxr.resample(pcm.astype(np.float32) / 32768, rate, RATE), np.float32)


@pytest.fixture(scope="session")
def speech_16k(three_sentences: Utterance) -> np.ndarray:
    return _read_16k(three_sentences)


def _sentence_spans(audio: np.ndarray, min_gap_s: float = 0.6) -> list[tuple[int, int]]:
    """The spoken stretches of the test speech (its sentences), by frame energy."""
    hop = RATE // 100
    frames = len(audio) // hop
    loud = np.square(audio[: frames * hop]).reshape(frames, hop).mean(1) > 1e-5
    spans, start, quiet = [], None, 0
    for i, on in enumerate(loud):
        if on:
            start = i if start is None else start
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet >= min_gap_s * 100:
                spans.append((start, i - quiet + 1))
                start = None
    if start is not None:
        spans.append((start, frames))
    pad = 20  # 0.2 s of silence around each sentence, as the VAD keeps
    return [(max(0, a - pad) * hop, min(frames, b + pad) * hop) for a, b in spans]


def _windows(audio: np.ndarray) -> list[np.ndarray]:
    """Each sentence whole, and cut in the middle of its speech (a live window)."""
    out = []
    for a, b in _sentence_spans(audio):
        out.append(audio[a:b])
        out.append(audio[a : a + (b - a) * 3 // 5])
    return out


def _text(hypotheses: list[Hypothesis]) -> str:
    return " ".join(h.text for h in hypotheses)


def test_both_engines_hear_the_same_words_at_the_same_times(
    engine: WhisperEngine,
    torch_engine: WhisperEngine,
    speech_16k: np.ndarray,
    three_sentences: Utterance,
) -> None:
    windows = _windows(speech_16k)
    assert len(windows) == 2 * len(three_sentences.sentences)
    ct2 = [engine.transcribe([DecodeRequest(w)])[0] for w in windows]
    pt = [torch_engine.transcribe([DecodeRequest(w)])[0] for w in windows]
    assert wer(_text(ct2), _text(pt)) <= 0.05, (_text(ct2), _text(pt))
    assert wer(" ".join(three_sentences.sentences), _text(pt[::2])) <= 0.10, _text(pt)
    # The same words (as the guards left them) at the same times, on most words.
    offsets, matched = [], 0
    for a, b in zip(ct2, pt, strict=True):
        left, right = (
            [w.text.strip().lower() for w in a.words],
            [w.text.strip().lower() for w in b.words],
        )
        for block in SequenceMatcher(a=left, b=right, autojunk=False).get_matching_blocks():
            for k in range(block.size):
                wa, wb = a.words[block.a + k], b.words[block.b + k]
                offsets.append(max(abs(wa.start_s - wb.start_s), abs(wa.end_s - wb.end_s)))
                matched += 1
    assert matched >= 0.9 * sum(len(h.words) for h in ct2)
    close = sum(o <= 0.1 for o in offsets) / len(offsets)
    assert close >= 0.9, sorted(offsets)[-10:]
    # The probabilities the session thresholds are alike too.
    probs_a = [w.probability for h in ct2 for w in h.words]
    probs_b = [w.probability for h in pt for w in h.words]
    assert abs(float(np.mean(probs_a)) - float(np.mean(probs_b))) < 0.05


def test_both_engines_time_a_known_transcript_alike(
    engine: WhisperEngine,
    torch_engine: WhisperEngine,
    speech_16k: np.ndarray,
    three_sentences: Utterance,
) -> None:
    a, b = _sentence_spans(speech_16k)[1]
    words = three_sentences.sentences[1].split()
    ct2 = engine.align_words(speech_16k[a:b], words)
    pt = torch_engine.align_words(speech_16k[a:b], words)
    assert [w.text for w in pt] == [" " + w for w in words]
    close = [
        abs(x.start_s - y.start_s) <= 0.1 and abs(x.end_s - y.end_s) <= 0.1
        for x, y in zip(ct2, pt, strict=True)
    ]
    assert sum(close) >= 0.9 * len(words), [
        (x.start_s, y.start_s) for x, y in zip(ct2, pt, strict=True)
    ]


def _from_second_words(
    engine: WhisperEngine, audio: np.ndarray, sentences: Sequence[str]
) -> list[np.ndarray]:
    """Each sentence from its second word on: windows that start mid-sentence, as a VAD
    segment after a pause does, where Whisper cannot hear which letter case comes first."""
    windows = []
    for (a, b), sentence in zip(_sentence_spans(audio), sentences, strict=True):
        second = engine.align_words(audio[a:b], sentence.split())[1]
        windows.append(audio[a + int((second.start_s - 0.05) * RATE) : b])
    return windows


@pytest.mark.parametrize("which", ["engine", "torch_engine"])
def test_a_windows_first_word_is_also_scored_in_its_other_letter_case(
    which: str,
    request: pytest.FixtureRequest,
    speech_16k: np.ndarray,
    three_sentences: Utterance,
) -> None:
    engine: WhisperEngine = request.getfixturevalue(which)
    tokenizer = Tokenizers(load_tokenizer(resolve_model_path("bundled")), False).get("en")
    scored = 0
    for window in _from_second_words(engine, speech_16k, three_sentences.sentences):
        words = engine.transcribe([DecodeRequest(window, other_case=True)])[0].words
        assert words, "a window of speech was heard as nothing"
        # Scored only when asked: the session asks while its early-commit rule reads it.
        unasked = engine.transcribe([DecodeRequest(window)])[0].words
        assert [w.tokens for w in unasked] == [w.tokens for w in words]
        assert all(w.other_case_probability == 0.0 for w in unasked)
        assert all(w.other_case_probability == 0.0 for w in words[1:])
        other = other_case_token(tokenizer, words[0].tokens)
        if other is None:
            assert words[0].other_case_probability == 0.0
            continue
        scored += 1
        # The probability of the other spelling in the same place: what the engine gives
        # that spelling when it is forced there as the prefix.
        forced = engine.transcribe([DecodeRequest(window, prefix_tokens=(other,))])[0]
        assert words[0].other_case_probability == pytest.approx(
            forced.words[0].probability, abs=0.01
        )
        # Two tokens of one distribution.
        assert 0.0 < words[0].probability + words[0].other_case_probability <= 1.0 + 1e-3
        # After promised words the case is the decoder's to tell from them: not scored.
        after = engine.transcribe(
            [DecodeRequest(window, prefix_tokens=words[0].tokens, other_case=True)]
        )[0]
        assert all(w.other_case_probability == 0.0 for w in after.words)
    assert scored >= 2  # "speech", "weather", "send": one token in either case


def test_the_forced_prefix_is_kept_and_split_at_its_own_word_boundaries(
    torch_engine: TorchWhisper,
    speech_16k: np.ndarray,
) -> None:
    a, b = _sentence_spans(speech_16k)[0]
    tokenizer = torch_engine._tokenizers.get("en")
    # Ends inside a word: " rec" "og", which the model goes on with ("nition").
    prefix = tuple(tokenizer.encode(" Streaming speech recog"))
    hypothesis = torch_engine.transcribe([DecodeRequest(speech_16k[a:b], prefix_tokens=prefix)])[0]
    assert hypothesis.tokens[: len(prefix)] == prefix
    promised = [w.tokens for w in hypothesis.words[:3]]
    assert [t for group in promised for t in group] == list(prefix)
    assert [w.text for w in hypothesis.words[:3]] == [" Streaming", " speech", " recog"]
    assert len(hypothesis.words) > 3, hypothesis.text  # new words after the promised ones
    assert all(w.start_s <= w.end_s for w in hypothesis.words)


def _batch_requests(audio: np.ndarray, engine: TorchWhisper) -> list[DecodeRequest]:
    spans = _sentence_spans(audio)
    (a0, b0), (a1, b1) = spans[0], spans[1]
    whole = engine.transcribe([DecodeRequest(audio[a0:b0])])[0]
    return [
        DecodeRequest(audio[a0 : a0 + 3 * RATE]),
        DecodeRequest(audio[a0:b0], prefix_tokens=whole.tokens[:6]),
        DecodeRequest(audio[a1:b1], prompt=whole.text),
        DecodeRequest(audio[a1 : a1 + 2 * RATE], prefix_tokens=whole.tokens[:2]),
        DecodeRequest(audio[:100]),  # too short to hold a word
    ]


def test_a_batch_decodes_each_window_as_alone(
    torch_engine: TorchWhisper, torch_float32: TorchWhisper, speech_16k: np.ndarray
) -> None:
    # Windows of different lengths, prefixes and prompts. Attention runs request by
    # request and int8 scales each row by itself: float32 gives exactly the numbers a
    # window gets alone. An int8 decoding step of several requests computes each row's
    # integer products exactly as alone, but scales them in one call (Int8Linear): the
    # last bits of the floats after them may round apart, and a near tie may go another
    # way, so int8 is held to the same words by error rate.
    for engine in (torch_float32, torch_engine):
        requests = _batch_requests(speech_16k, engine)
        batched = engine.transcribe(requests)
        alone = [engine.transcribe([r])[0] for r in requests]
        assert batched[-1].words == ()
        if engine is torch_engine:
            assert word_errors(_text(alone), _text(batched)) <= 1
            assert all(
                x.no_speech_prob == pytest.approx(y.no_speech_prob, abs=0.02)
                for x, y in zip(batched, alone, strict=True)
            )
            continue
        assert [h.tokens for h in batched] == [h.tokens for h in alone]
        for x, y in zip(batched, alone, strict=True):
            for u, v in zip(x.words, y.words, strict=True):
                assert (u.text, u.start_s, u.end_s) == (v.text, v.start_s, v.end_s)
                assert u.probability == pytest.approx(v.probability, abs=1e-4)
            assert x.no_speech_prob == pytest.approx(y.no_speech_prob, abs=1e-4)
            assert x.avg_logprob == pytest.approx(y.avg_logprob, abs=1e-4)


def test_a_decoding_step_computes_only_the_requests_that_go_on(
    torch_float32: TorchWhisper, speech_16k: np.ndarray
) -> None:
    # A request that has ended (end of text, its budget) costs a batch's later steps
    # nothing: each step's rows are the requests still decoding. (float32: a batch
    # decodes exactly as alone, so each request takes as many steps as alone.)
    requests = _batch_requests(speech_16k, torch_float32)[:4]
    calls: list[int] = []

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        calls.append(int(args[0].shape[0]))  # the rows of its tokens [batch, len]

    handle = torch_float32.model.decoder.register_forward_pre_hook(hook)
    try:
        steps = []
        for r in requests:
            calls.clear()
            torch_float32.transcribe([r])
            steps.append(len(calls) - 1)  # after the first pass, one call per step
        calls.clear()
        torch_float32.transcribe(requests)
    finally:
        handle.remove()
    assert len(set(steps)) > 1, steps  # they end at different steps
    assert calls == [len(requests)] + [sum(s > k for s in steps) for k in range(max(steps))]


def _decoder_calls(engine: TorchWhisper) -> tuple[list[int], Callable[[], None]]:
    """The number of tokens each decoder forward call reads, while installed."""
    lengths: list[int] = []

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        lengths.append(int(args[0].shape[1]))

    handle = engine.model.decoder.register_forward_pre_hook(hook)
    return lengths, handle.remove


def test_a_40_token_prefix_is_read_in_one_decoder_pass(
    torch_engine: TorchWhisper,
    speech_16k: np.ndarray,
    other_speech: Utterance,
) -> None:
    audio = np.concatenate([speech_16k, _read_16k(other_speech)])[: int(MAX_WINDOW_S * RATE)]
    spoken = torch_engine.transcribe([DecodeRequest(audio)])[0].tokens
    assert len(spoken) >= 40, len(spoken)
    prefix = spoken[:40]
    lengths, remove = _decoder_calls(torch_engine)
    try:
        hypothesis = torch_engine.transcribe([DecodeRequest(audio, prefix_tokens=prefix)])[0]
    finally:
        remove()
    assert hypothesis.tokens[:40] == prefix
    new = len(hypothesis.tokens) - 40
    # One pass over start of transcript, no-timestamps, the 40 promised tokens and a
    # guessed end of text; then one call per new token, and one for the end of text (its
    # alignment row).
    assert lengths[0] == 2 + 40 + 1
    assert all(n == 1 for n in lengths[1:])
    assert len(lengths) - 1 <= new + 2, (lengths, new)


def test_a_draft_that_decoding_agrees_with_takes_no_decoding_steps(
    torch_float32: TorchWhisper, speech_16k: np.ndarray
) -> None:
    # A session's step hears again most of what its previous step heard after the
    # prefix: fed as a draft in the first pass, the tokens greedy decoding chooses alike
    # need no step of their own; from the first that differs on, it decodes step by step.
    a, b = _sentence_spans(speech_16k)[0]
    window = speech_16k[a:b]
    heard = torch_float32.transcribe([DecodeRequest(window)])[0]
    prefix, rest = heard.tokens[:3], heard.tokens[3:]
    assert len(rest) >= 5, heard.text
    wrong = torch_float32._tokenizers.get("en").encode(" purple elephants")
    lengths, remove = _decoder_calls(torch_float32)
    try:
        plain = torch_float32.transcribe([DecodeRequest(window, prefix_tokens=prefix)])[0]
        plain_calls = list(lengths)
        results = []
        for draft in (rest, rest[:2] + tuple(wrong), tuple(wrong)):
            lengths.clear()
            request = DecodeRequest(window, prefix_tokens=prefix, draft_tokens=draft)
            results.append((torch_float32.transcribe([request])[0], list(lengths)))
    finally:
        remove()
    (right, right_calls), (half, half_calls), (off, off_calls) = results
    assert plain_calls[0] == 2 + 3 + 1  # task tokens, the prefix, a guessed end of text
    assert len(plain_calls) == 1 + len(rest) + 1  # a step per new token and end of text
    # All right: one pass, the end of text included. Two right: steps from the third.
    assert right_calls == [2 + 3 + len(rest) + 1]
    assert half_calls[0] == 2 + 3 + 2 + len(wrong) + 1
    assert len(half_calls) == 1 + len(rest) - 2 + 1
    assert len(off_calls) == len(plain_calls)
    for hypothesis in (right, half, off):
        assert word_errors(plain.text, hypothesis.text) == 0, (plain.text, hypothesis.text)
        assert [w.start_s for w in hypothesis.words] == pytest.approx(
            [w.start_s for w in plain.words], abs=0.021
        )
        assert hypothesis.avg_logprob == pytest.approx(plain.avg_logprob, abs=1e-3)


def test_both_engines_decode_no_more_new_tokens_than_asked(
    engine: WhisperEngine, torch_engine: TorchWhisper, speech_16k: np.ndarray
) -> None:
    # A partial step's budget (DecodeRequest.max_new_tokens): tokens after the prefix,
    # the end of text aside. The torch engine then takes no step past it.
    a, b = max(_sentence_spans(speech_16k), key=lambda s: s[1] - s[0])
    window = speech_16k[a:b]
    whole = torch_engine.transcribe([DecodeRequest(window)])[0].tokens
    assert len(whole) >= 12, whole
    prefix = whole[:2]
    for model in (engine, torch_engine):
        free = model.transcribe([DecodeRequest(window, prefix_tokens=prefix)])[0]
        capped = model.transcribe([DecodeRequest(window, prefix_tokens=prefix, max_new_tokens=4)])[
            0
        ]
        assert len(free.tokens) >= len(prefix) + 8, (model.name, free.text)
        assert capped.tokens[:2] == prefix
        assert 1 <= len(capped.tokens) - len(prefix) <= 4, (model.name, capped.text)
        assert capped.tokens == free.tokens[: len(capped.tokens)], (capped.text, free.text)
    lengths, remove = _decoder_calls(torch_engine)
    try:
        torch_engine.transcribe(
            [DecodeRequest(window, prefix_tokens=prefix, draft_tokens=whole[2:5], max_new_tokens=4)]
        )
    finally:
        remove()
    assert lengths[0] == 2 + 2 + 3 + 1  # the draft's 3 tokens, and its end of text
    assert len(lengths) <= 1 + 1  # the 4th token past the prefix, fed for its alignment


def test_alignatt_stops_decoding_where_attention_reaches_the_live_edge(
    torch_engine: TorchWhisper,
    speech_16k: np.ndarray,
) -> None:
    a, b = _sentence_spans(speech_16k)[0]
    window = speech_16k[a : a + (b - a) * 3 // 5]  # cut mid-sentence: a live window
    window_s = len(window) / RATE
    lengths, remove = _decoder_calls(torch_engine)
    try:
        whole = torch_engine.transcribe([DecodeRequest(window)])[0]
        calls_whole = len(lengths)
        lengths.clear()
        stopped = torch_engine.transcribe([DecodeRequest(window, stop_edge_s=0.5)])[0]
        calls_stopped = len(lengths)
    finally:
        remove()
    assert 0 < len(stopped.words) < len(whole.words), (stopped.text, whole.text)
    assert stopped.tokens == whole.tokens[: len(stopped.tokens)]  # the same words, fewer
    assert calls_stopped < calls_whole
    assert stopped.words[-1].end_s <= window_s - 0.2, (stopped.words[-1], window_s)


@pytest.fixture(scope="module")
def reusing_engine() -> TorchWhisper:
    """int8, as served, keeping encoder positions 2 s before a window's end."""
    return TorchWhisper(cpu_threads=1, encoder_reuse_s=2.0)


def _encoded_rows(engine: TorchWhisper) -> tuple[list[int], Callable[[], None]]:
    """Per encoder call, how many positions (of the widest window) it computed."""
    rows: list[int] = []

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        rows.append(int(args[0].shape[1]))

    first: EncoderBlock = engine.model.encoder.blocks[0]  # type: ignore[assignment]
    handle = first.attn.qkv.register_forward_pre_hook(hook)
    return rows, handle.remove


def _grow(audio: np.ndarray, step_s: float = 0.3) -> list[np.ndarray]:
    """A live window as a session sends it: longer by a step each time."""
    step = int(step_s * RATE)
    return [audio[:end] for end in range(step, len(audio) + step, step)]


def test_a_growing_window_encodes_only_its_last_seconds_again(
    reusing_engine: TorchWhisper, speech_16k: np.ndarray, three_sentences: Utterance
) -> None:
    # The longest sentence, stepped as a session steps it: each step computes the
    # positions of its last 2 s, the step's new audio and the tail pad, not the window.
    a, b = max(_sentence_spans(speech_16k), key=lambda s: s[1] - s[0])
    sentence = speech_16k[a:b]
    rows, remove = _encoded_rows(reusing_engine)
    try:
        for window in _grow(sentence):
            hypothesis = reusing_engine.transcribe([DecodeRequest(window, stream_key="s/0/0")])[0]
    finally:
        remove()
    whole = reusing_engine.transcribe([DecodeRequest(sentence)])[0]
    positions = len(sentence) // 320 + 50  # 50 a second, and TAIL_PAD_S (1 s)
    assert rows[0] < 0.3 * 50 + 50 + 2  # the first step: the whole (short) window
    assert max(rows[-3:]) <= (2.0 + 0.3 + 1.0) * 50 + 2 < positions
    # The same words as the window encoded whole (by error rate: int8 rounding).
    assert wer(whole.text, hypothesis.text) <= 0.1, (whole.text, hypothesis.text)
    assert wer(" ".join(three_sentences.sentences), hypothesis.text) < 0.8  # one sentence


def test_a_window_that_does_not_continue_its_key_is_encoded_whole(
    reusing_engine: TorchWhisper, speech_16k: np.ndarray
) -> None:
    (a, b), (c, d) = _sentence_spans(speech_16k)[:2]
    reusing_engine.transcribe([DecodeRequest(speech_16k[a:b], stream_key="t/0/0")])
    other = speech_16k[c:d]
    rows, remove = _encoded_rows(reusing_engine)
    try:
        again = reusing_engine.transcribe([DecodeRequest(other, stream_key="t/0/0")])[0]
    finally:
        remove()
    assert rows == [len(other) // 320 + 50]  # every position computed again
    assert again.tokens == reusing_engine.transcribe([DecodeRequest(other)])[0].tokens


def test_growing_windows_decode_alike_in_a_batch_and_alone(
    reusing_engine: TorchWhisper, speech_16k: np.ndarray
) -> None:
    # Two sessions' windows, kept states of different lengths in one batch: each
    # decodes as it does alone (by error rate: int8 steps of several requests may round
    # a near tie apart, see test_a_batch_decodes_each_window_as_alone).
    (a, b), (c, d) = _sentence_spans(speech_16k)[:2]
    first, second = _grow(speech_16k[a:b]), _grow(speech_16k[c:d])
    steps = min(len(first), len(second))
    first, second = first[:steps], second[len(second) - steps :]
    alone = [
        (
            reusing_engine.transcribe([DecodeRequest(x, stream_key="a1")])[0],
            reusing_engine.transcribe([DecodeRequest(y, stream_key="b1")])[0],
        )
        for x, y in zip(first, second, strict=True)
    ]
    batched = [
        reusing_engine.transcribe(
            [DecodeRequest(x, stream_key="a2"), DecodeRequest(y, stream_key="b2")]
        )
        for x, y in zip(first, second, strict=True)
    ]
    words = sum(len(_text([h]).split()) for pair in alone for h in pair)
    errors = sum(
        word_errors(_text([h]), _text([g]))
        for pair, other in zip(alone, batched, strict=True)
        for h, g in zip(pair, other, strict=True)
    )
    assert errors <= max(2, words // 50), (errors, words)
    assert alone[-1][0].words and alone[-1][1].words


def test_weights_convert_from_model_bin_and_the_conversion_is_cached(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from server.engines.torch_whisper import weights

    first = weights.load_ct2_folder(Path(resolve_model_path("bundled")))
    cached = list((tmp_path / "cache" / "whisperstream" / "torch").glob("ct2-*.pt"))
    assert len(cached) == 1
    assert first.dims.n_vocab == 51864 and first.dims.n_text_layer == 4
    assert first.alignment_heads == [(1, 0), (2, 0), (2, 5), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4)]

    def no_conversion(*_: object) -> None:
        raise AssertionError("converted again despite the cache")

    monkeypatch.setattr(weights, "convert_ct2", no_conversion)
    second = weights.load_ct2_folder(Path(resolve_model_path("bundled")))
    assert second.state.keys() == first.state.keys()
    assert all(torch.equal(second.state[k], first.state[k]) for k in first.state)


def test_openai_alignment_heads_of_tiny_en_are_those_ctranslate2_lists() -> None:
    heads = decode_alignment_heads(OPENAI_ALIGNMENT_HEADS["tiny.en"], 4, 6)
    config = json.loads((Path(resolve_model_path("bundled")) / "config.json").read_text())
    assert heads == [tuple(h) for h in config["alignment_heads"]]


def test_dtw_finds_the_path_openai_whisper_finds() -> None:
    def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # timing.py's loops
        n, m = x.shape
        cost = np.full((n + 1, m + 1), np.inf)
        cost[0, 0] = 0
        trace = np.zeros((n + 1, m + 1))
        for j in range(1, m + 1):
            for i in range(1, n + 1):
                c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
                c, t = (
                    (c0, 0) if c0 < c1 and c0 < c2 else (c1, 1) if c1 < c0 and c1 < c2 else (c2, 2)
                )
                cost[i, j], trace[i, j] = x[i - 1, j - 1] + c, t
        trace[0, :], trace[:, 0] = 2, 1
        i, j, path = n, m, []
        while i > 0 or j > 0:
            path.append((i - 1, j - 1))
            i, j = {0: (i - 1, j - 1), 1: (i - 1, j), 2: (i, j - 1)}[int(trace[i, j])]
        steps = np.array(path[::-1])
        return steps[:, 0], steps[:, 1]

    rng = np.random.default_rng(7)
    for _ in range(40):
        x = rng.normal(size=(int(rng.integers(1, 12)), int(rng.integers(1, 40))))
        got, want = dtw(x), reference(x)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


# --- the other weight formats, written from the bundled model --------------------------


def _openai_state(state: dict[str, Any], n_enc: int, n_dec: int) -> dict[str, Any]:
    """openai-whisper's names and separate projections, from the converted state."""
    out: dict[str, Any] = {}
    d = state["decoder.token_embedding.weight"].shape[1]
    for part, n in (("encoder", n_enc), ("decoder", n_dec)):
        for i in range(n):
            p = f"{part}.blocks.{i}"
            q, k, v = state[f"{p}.attn.qkv.weight"].split(d)
            qb, _, vb = state[f"{p}.attn.qkv.bias"].split(d)
            out |= {
                f"{p}.attn.query.weight": q,
                f"{p}.attn.query.bias": qb,
                f"{p}.attn.key.weight": k,
                f"{p}.attn.value.weight": v,
                f"{p}.attn.value.bias": vb,
            }
            for name, src in (
                ("attn.out", "attn.out"),
                ("attn_ln", "attn_ln"),
                ("mlp_ln", "mlp_ln"),
                ("mlp.0", "mlp.fc1"),
                ("mlp.2", "mlp.fc2"),
                ("cross_attn.query", "cross.query"),
                ("cross_attn.out", "cross.out"),
                ("cross_attn_ln", "cross_ln"),
            ):
                for suffix in ("weight", "bias"):
                    if f"{p}.{src}.{suffix}" in state:
                        out[f"{p}.{name}.{suffix}"] = state[f"{p}.{src}.{suffix}"]
            if part == "decoder":
                ck, cv = state[f"{p}.cross.kv.weight"].split(d)
                _, cvb = state[f"{p}.cross.kv.bias"].split(d)
                out |= {
                    f"{p}.cross_attn.key.weight": ck,
                    f"{p}.cross_attn.value.weight": cv,
                    f"{p}.cross_attn.value.bias": cvb,
                }
    for key in ("encoder.conv1", "encoder.conv2", "encoder.ln_post", "decoder.ln"):
        out[f"{key}.weight"], out[f"{key}.bias"] = state[f"{key}.weight"], state[f"{key}.bias"]
    for key in (
        "encoder.positional_embedding",
        "decoder.positional_embedding",
        "decoder.token_embedding.weight",
    ):
        out[key] = state[key]
    return out


def _hf_state(openai: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face's names, from openai-whisper's."""
    renames = [
        ("blocks.", "layers."),
        (".attn.query", ".self_attn.q_proj"),
        (".attn.key", ".self_attn.k_proj"),
        (".attn.value", ".self_attn.v_proj"),
        (".attn.out", ".self_attn.out_proj"),
        (".attn_ln", ".self_attn_layer_norm"),
        (".cross_attn.query", ".encoder_attn.q_proj"),
        (".cross_attn.key", ".encoder_attn.k_proj"),
        (".cross_attn.value", ".encoder_attn.v_proj"),
        (".cross_attn.out", ".encoder_attn.out_proj"),
        (".cross_attn_ln", ".encoder_attn_layer_norm"),
        (".mlp.0", ".fc1"),
        (".mlp.2", ".fc2"),
        (".mlp_ln", ".final_layer_norm"),
        ("encoder.ln_post", "encoder.layer_norm"),
        ("decoder.ln.", "decoder.layer_norm."),
        ("encoder.positional_embedding", "encoder.embed_positions.weight"),
        ("decoder.positional_embedding", "decoder.embed_positions.weight"),
        ("decoder.token_embedding", "decoder.embed_tokens"),
    ]
    out = {}
    for key, value in openai.items():
        for old, new in renames:
            key = key.replace(old, new)
        out["model." + key] = value
    return out


def _write_safetensors(file: Path, tensors: dict[str, Any]) -> None:
    header: dict[str, Any] = {}
    blobs, at = [], 0
    for key, value in tensors.items():
        raw = value.contiguous().numpy().astype(np.float16).tobytes()
        header[key] = {
            "dtype": "F16",
            "shape": list(value.shape),
            "data_offsets": [at, at + len(raw)],
        }
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.fixture(scope="module")
def converted() -> Iterator[tuple[Any, dict[str, Any]]]:
    dims, state = convert_ct2(read_ct2_variables(Path(resolve_model_path("bundled")) / "model.bin"))
    yield dims, state


def _same_as_bundled(engine: TorchWhisper, reference: TorchWhisper, audio: np.ndarray) -> None:
    got = engine.transcribe([DecodeRequest(audio)])[0]
    want = reference.transcribe([DecodeRequest(audio)])[0]
    assert got.tokens == want.tokens
    assert [(w.start_s, w.end_s) for w in got.words] == [(w.start_s, w.end_s) for w in want.words]


def test_an_openai_whisper_checkpoint_loads_and_decodes_as_the_bundled_model(
    tmp_path: Path,
    converted: tuple[Any, dict[str, Any]],
    torch_float32: TorchWhisper,
    speech_16k: np.ndarray,
) -> None:
    dims, state = converted
    file = tmp_path / "tiny.en.pt"  # the name gives the alignment heads
    torch.save(
        {
            "dims": dims.__dict__,
            "model_state_dict": _openai_state(state, dims.n_audio_layer, dims.n_text_layer),
        },
        file,
    )
    engine = TorchWhisper(str(file), compute_type="float32", cpu_threads=1)
    assert engine.model.decoder.alignment_heads == torch_float32.model.decoder.alignment_heads
    a, b = _sentence_spans(speech_16k)[0]
    _same_as_bundled(engine, torch_float32, speech_16k[a:b])


def test_a_hugging_face_folder_loads_and_decodes_as_the_bundled_model(
    tmp_path: Path,
    converted: tuple[Any, dict[str, Any]],
    torch_float32: TorchWhisper,
    speech_16k: np.ndarray,
) -> None:
    dims, state = converted
    _write_safetensors(
        tmp_path / "model.safetensors",
        _hf_state(_openai_state(state, dims.n_audio_layer, dims.n_text_layer)),
    )
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "whisper",
                "num_mel_bins": dims.n_mels,
                "max_source_positions": dims.n_audio_ctx,
                "d_model": dims.n_audio_state,
                "encoder_attention_heads": dims.n_audio_head,
                "encoder_layers": dims.n_audio_layer,
                "vocab_size": dims.n_vocab,
                "max_target_positions": dims.n_text_ctx,
                "decoder_attention_heads": dims.n_text_head,
                "decoder_layers": dims.n_text_layer,
            }
        )
    )
    bundled = Path(resolve_model_path("bundled"))
    heads = json.loads((bundled / "config.json").read_text())["alignment_heads"]
    (tmp_path / "generation_config.json").write_text(json.dumps({"alignment_heads": heads}))
    shutil.copy(bundled / "tokenizer.json", tmp_path / "tokenizer.json")
    engine = TorchWhisper(str(tmp_path), compute_type="float32", cpu_threads=1)
    a, b = _sentence_spans(speech_16k)[2]
    _same_as_bundled(engine, torch_float32, speech_16k[a:b])


def test_what_the_torch_engine_cannot_do_is_refused_with_the_setting_to_change() -> None:
    from streaming.engine import EngineLoadError

    with pytest.raises(EngineLoadError, match=r"greedily: set model\.beam_size: 1"):
        build_engine(ModelSection(engine="torch", beam_size=5))
    with pytest.raises(EngineLoadError, match=r"set model\.timestamps: false"):
        build_engine(ModelSection(engine="torch", timestamps=True))
    with pytest.raises(EngineLoadError, match="no compute type 'int16'"):
        build_engine(ModelSection(engine="torch", compute_type="int16"))
    if not torch.cuda.is_available():
        with pytest.raises(EngineLoadError, match="PyTorch finds no CUDA GPU"):
            build_engine(ModelSection(engine="torch", device="cuda"))


def test_int8_layers_multiply_alike_with_either_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch._int_mm is slow (a plain loop on CPUs PyTorch has no int8 kernel for),
    inputs of many rows and the int8 weights are multiplied as float32 instead: the same
    products, so the engine hears the same words on every CPU; a decoding step's single
    rows take fbgemm's kernel either way."""
    from server.engines.torch_whisper import model

    torch.manual_seed(0)
    linear = torch.nn.Linear(1536, 96)  # 1536 inputs: sums past float32's exact 2**24
    layers = {}
    for slow in (False, True):
        monkeypatch.setattr(model, "int8_products_are_slow", lambda slow=slow: slow)
        layers[slow] = model.Int8Linear(linear)
        assert (layers[slow].weight_float_t is not None) == slow
    for x in (torch.randn(2, 50, 1536), torch.randn(3, 1, 1536)):  # an encoder, a step
        with torch.no_grad():
            reference, fast, slow_out = linear(x), layers[False](x), layers[True](x)
        assert fast.shape == slow_out.shape == reference.shape
        assert float((fast - reference).norm() / reference.norm()) < 0.02
        assert float((slow_out - fast).abs().max()) < 1e-4 * float(fast.abs().max())


@pytest.mark.parametrize("outputs,bias", [(1152, True), (4000, False)])
def test_a_decoding_step_of_several_requests_scales_each_row_by_itself(
    outputs: int, bias: bool
) -> None:
    """Int8Linear's one-call kernel for a step's rows: each row quantized with its own
    scale, so a row gets the same numbers in any batch of two or more, and the numbers
    it gets alone but for the last bits of the floats."""
    from server.engines.torch_whisper import model

    torch.manual_seed(1)
    linear = torch.nn.Linear(384, outputs, bias=bias)
    layer = model.Int8Linear(linear)
    # Rows of very different ranges and offsets: one scale for all would crush the small.
    x = torch.randn(9, 1, 384) * torch.logspace(-2, 1, 9)[:, None, None] + torch.randn(9, 1, 1)
    with torch.no_grad():
        batched = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(9)])
        reference = linear(x)
        for lo, hi in ((0, 2), (3, 8), (1, 9)):
            assert torch.equal(layer(x[lo:hi]), batched[lo:hi])
    for row in range(9):
        size = float(alone[row].abs().max())
        assert float((batched[row] - alone[row]).abs().max()) < 1e-5 * size
        error = (alone[row] - reference[row]).norm() / reference[row].norm()
        assert float(error) < 0.02, row
