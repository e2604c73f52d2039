"""Loading engines (server/engines): what a model can do, and why one will not load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.config import ModelSection
from server.engines import WhisperEngine, build_engine
from server.engines.decoding import Tokenizers, other_case_token
from server.engines.models import load_tokenizer, resolve_model_path
from streaming.engine import EngineCapabilities, EngineLoadError


@pytest.mark.model
def test_the_bundled_model_states_it_transcribes_english_on_the_cpu(
    engine: WhisperEngine,
) -> None:
    assert engine.capabilities == EngineCapabilities(
        languages=frozenset({"en"}), translation=False, device="cpu"
    )
    assert engine.capabilities.supports_language("en")
    assert not engine.capabilities.supports_language("fr")
    assert not hasattr(engine, "supports_language")  # callers ask the capabilities


def test_a_folder_without_model_bin_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(EngineLoadError, match=r"has no model\.bin: not a CTranslate2 model"):
        build_engine(ModelSection(name=str(tmp_path)))


def test_a_name_that_is_neither_a_folder_nor_a_hub_model_is_refused() -> None:
    # Not a known Whisper size and no "owner/name": refused without asking the hub.
    with pytest.raises(
        EngineLoadError,
        match=r"neither a local CTranslate2 folder nor "
        r"reachable on the model hub.*use model\.name: bundled, or a local path",
    ):
        build_engine(ModelSection(name="no-such-model"))


def test_a_hub_model_that_cannot_be_fetched_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real hub code runs, kept offline (as without a network) so the test never
    # waits on one.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(EngineLoadError, match="'whisperstream-tests/no-such-model' is neither"):
        resolve_model_path("whisperstream-tests/no-such-model")


def test_a_broken_model_bin_is_refused_with_what_ctranslate2_said(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"not a model")
    with pytest.raises(EngineLoadError, match="CTranslate2 cannot load the Whisper model in"):
        build_engine(ModelSection(name=str(tmp_path)))


def test_a_model_folder_without_its_tokenizer_is_refused(tmp_path: Path) -> None:
    bundled = Path(resolve_model_path("bundled"))
    for file in bundled.iterdir():
        if file.name != "tokenizer.json":
            os.symlink(file, tmp_path / file.name)
    with pytest.raises(EngineLoadError, match=r"has no tokenizer\.json"):
        build_engine(ModelSection(name=str(tmp_path)))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(EngineLoadError, match="is not a readable tokenizer"):
        build_engine(ModelSection(name=str(tmp_path)))


def test_the_torch_engine_without_pytorch_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed
    for name in [m for m in sys.modules if m.startswith("server.engines.torch_whisper")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(EngineLoadError, match=r"needs PyTorch.*pip install -e '\.\[torch\]'"):
        build_engine(ModelSection(engine="torch"))


def test_the_other_letter_case_of_a_one_token_word_is_found_in_the_tokenizer() -> None:
    tokenizer = Tokenizers(load_tokenizer(resolve_model_path("bundled")), False).get("en")

    def other(text: str) -> str | None:
        tokens = tokenizer.encode(text)
        token = other_case_token(tokenizer, tokens)
        return None if token is None else tokenizer.decode([token])

    assert other(" the") == " The"
    assert other(" Since") == " since"
    assert other(" I") == " i"
    # Not a letter first, several tokens, or an other spelling of several tokens.
    assert other(" 6") is None
    assert other(",") is None
    assert len(tokenizer.encode(" Norsemen")) > 1 and other(" Norsemen") is None
