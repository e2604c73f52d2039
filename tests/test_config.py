"""Configuration: config.yaml, environment variables and flags, validated with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from server.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_config_yaml_holds_every_key_with_the_built_in_default() -> None:
    on_disk = yaml.safe_load((ROOT / "config.yaml").read_text())
    defaults = Settings().model_dump(mode="json")
    assert on_disk == defaults


def test_environment_overrides_the_file_and_flags_override_both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("server:\n  port: 7000\nlimits:\n  max_sessions: 2\n")
    assert load_settings(config).server.port == 7000
    monkeypatch.setenv("WHISPERSTREAM_SERVER__PORT", "9000")
    monkeypatch.setenv("WHISPERSTREAM_LIMITS__MAX_SESSIONS", "4")
    monkeypatch.setenv("WHISPERSTREAM_AUTH__API_KEYS", '["k1", "k2"]')
    settings = load_settings(config)
    assert settings.server.port == 9000
    assert settings.limits.max_sessions == 4
    assert [k.get_secret_value() for k in settings.auth.api_keys] == ["k1", "k2"]
    assert load_settings(config, {"server": {"port": 9100}}).server.port == 9100


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("WHISPERSTREAM_SERVER__PORT", "not-a-port", "server.port"),
        ("WHISPERSTREAM_VAD__AGGRESSIVENESS", "7", "vad.aggressiveness"),
        ("WHISPERSTREAM_LIMITS__MAX_SESSIONS", "0", "limits.max_sessions"),
        ("WHISPERSTREAM_STREAMING__ENCODING", "mp3", "streaming.encoding"),
    ],
)
def test_an_invalid_value_fails_with_the_key_named(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(ROOT / "config.yaml")


def test_unknown_key_in_the_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("server:\n  prot: 7000\n")
    with pytest.raises(ConfigError, match=r"server\.prot"):
        load_settings(config)


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_api_keys_never_show_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHISPERSTREAM_AUTH__API_KEYS", '["sekrit-key"]')
    settings = load_settings(ROOT / "config.yaml")
    assert "sekrit-key" not in repr(settings)


def _leaf_keys(model: object, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    keys = []
    for name, value in model.__dict__.items():
        if isinstance(value, BaseModel):
            keys += _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_the_readme_documents_every_config_key() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in _leaf_keys(Settings()) if f"`{k}`" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"
