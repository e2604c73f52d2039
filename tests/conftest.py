from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakes import ScriptedWhisper
from harness import running_server
from speech import Utterance, synthesize

from server.config import ModelSection
from server.engines import WhisperEngine, build_engine

THREE_SENTENCES = [
    "Streaming speech recognition turns spoken words into text while people are still talking.",
    "The weather today is sunny with a light breeze from the west.",
    "Please send the quarterly report to the finance team before Friday.",
]
OTHER_SPEECH = [
    "My favourite place to walk is the park near the river, early in the morning.",
]


@pytest.fixture(scope="session")
def engine() -> WhisperEngine:
    """The real bundled Whisper tiny.en model, loaded once, as the server loads it."""
    return build_engine(ModelSection())


@pytest.fixture(scope="session")
def server_url(engine: WhisperEngine) -> Iterator[str]:
    with running_server(engine) as url:
        yield url


@pytest.fixture
def scripted() -> ScriptedWhisper:
    """A fresh scripted engine, for a test that starts its own server."""
    return ScriptedWhisper()


@pytest.fixture(scope="session")
def scripted_url() -> Iterator[str]:
    """A real server on a free port whose engine is `ScriptedWhisper` (the middle layer)."""
    with running_server(ScriptedWhisper()) as url:
        yield url


@pytest.fixture(scope="session")
def three_sentences() -> Utterance:
    return synthesize(THREE_SENTENCES)


@pytest.fixture(scope="session")
def other_speech() -> Utterance:
    return synthesize(OTHER_SPEECH)
