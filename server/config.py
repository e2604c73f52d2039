"""Configuration: config.yaml, then WHISPERSTREAM_<SECTION>__<KEY> environment variables,
then command-line flags, validated in one place by pydantic-settings."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from streaming.audio import MAX_SAMPLE_RATE_HZ, MIN_SAMPLE_RATE_HZ, AudioFormat
from streaming.policy import Policy, PolicyOptions, Tentative
from streaming.vad import Detector, VadOptions

DEFAULT_CONFIG = Path("config.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    allow_public_without_auth: bool = False
    tls_cert: Path | None = None  # PEM certificate (chain): serve wss:// and https://
    tls_key: Path | None = None  # its PEM private key
    log_file: Path | None = None  # also log here; if it cannot be written, stderr only
    # Peers whose X-Forwarded-For / Forwarded header names the client (server/forwarding.py).
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list
    )
    # With no API keys, Host names answered besides loopback ones (DNS rebinding).
    allowed_hosts: list[str] = Field(default_factory=list)
    metrics_public: bool = False  # with API keys, serve /metrics without one

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        networks = []
        for item in value:
            try:  # "10.0.0.7" is one address; host bits in "10.0.0.7/8" are ignored
                networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address or network (CIDR, e.g. 10.0.0.0/8)"
                ) from None
        return networks

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        names = [name.strip().lower().strip("[]").rstrip(".") for name in value]
        for name in names:
            if not name or any(c in name for c in "/@ ") or (":" in name and not _is_ipv6(name)):
                raise ValueError(
                    f"{name!r} is not a host name or address (no scheme, "
                    "port or path, e.g. captions.example.org)"
                )
        return names

    @field_validator("tls_cert", "tls_key")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value


def _is_ipv6(name: str) -> bool:
    try:
        ipaddress.IPv6Address(name)
    except ValueError:
        return False
    return True


class ModelSection(_Section):
    name: str = "bundled"
    engine: Literal["ctranslate2", "torch"] = "ctranslate2"
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = Field(1, ge=0)
    workers: int = Field(0, ge=0, le=64)
    feature_threads: int = Field(1, ge=0)
    beam_size: int = Field(1, ge=1, le=10)
    max_batch_size: int = Field(8, ge=1, le=64)
    timestamps: bool = False
    release_memory_s: float = Field(2.0, ge=0.0)  # see server/memory.py; 0: never
    # torch engine: a step encodes again only its window's last this many seconds
    # (server/engines/torch_whisper/encoder_reuse.py); 0: every window whole. Off: in
    # one bench run 2.0 saved 15 % CPU for +0.7 WER points (README, Engines)
    encoder_reuse_s: float = Field(0.0, ge=0.0, le=28.0)

    @property
    def worker_count(self) -> int:
        """Model calls at once: `workers`, or one per CPU core this process may use."""
        return self.workers or len(os.sched_getaffinity(0))


class VadSection(_Section):
    detector: Detector = "webrtc"  # webrtcvad, or Silero VAD on onnxruntime
    aggressiveness: int = Field(2, ge=0, le=3)  # webrtc
    silero_threshold: float = Field(0.5, ge=0.2, le=0.9)  # silero
    frame_ms: Literal[10, 20, 30] = 30
    start_ms: int = Field(90, ge=0)
    end_ms: int = Field(450, ge=30)
    pad_ms: int = Field(240, ge=0)
    max_segment_s: float = Field(15.0, ge=2.0, le=28.0)
    normalize_level: bool = True

    @field_validator("detector")
    @classmethod
    def _installed(cls, value: str) -> str:
        if value == "silero":  # a missing model fails here, at start, not in a session
            import importlib.util

            from server.vad_silero import SileroUnavailable, model_path

            try:
                model_path()
            except SileroUnavailable as exc:
                raise ValueError(str(exc)) from None
            if importlib.util.find_spec("onnxruntime") is None:
                raise ValueError("vad.detector: silero needs onnxruntime: pip install onnxruntime")
        return value

    def options(self) -> VadOptions:
        return VadOptions(**self.model_dump())


class StreamingSection(_Section):
    language: str = "en"
    interim: bool = True
    sample_rate: int = Field(16000, ge=MIN_SAMPLE_RATE_HZ, le=MAX_SAMPLE_RATE_HZ)
    encoding: Literal["pcm_s16le", "f32le"] = "pcm_s16le"
    step_s: float = Field(0.3, ge=0.1, le=10.0)
    holdback_s: float = Field(0.3, ge=0.0)
    prompt_chars: int = Field(0, ge=0)
    max_window_s: float = Field(0.0, ge=0.0, le=28.0)
    early_commit_s: float = Field(3.0, ge=0.0, le=28.0)
    early_commit_probability: float = Field(0.6, ge=0.0, le=1.0)
    early_commit_agreements: int = Field(0, ge=0, le=100)
    early_commit_context_s: float = Field(1.5, ge=0.0, le=28.0)
    early_commit_context_probability: float = Field(0.5, ge=0.0, le=1.0)
    early_commit_ignore_case: bool = True
    tentative: Tentative = "agreed"
    tentative_edge_s: float = Field(0.5, ge=0.0, le=5.0)
    tentative_edge_probability: float = Field(0.9, ge=0.0, le=1.0)
    endpoint_silence_s: float = Field(0.2, ge=0.0, le=5.0)
    no_speech_threshold: float = Field(0.6, ge=0.0, le=1.0)
    logprob_threshold: float = -1.0
    policy: Policy = "local_agreement"
    alignatt_edge_s: float = Field(0.5, ge=0.0, le=5.0)
    tail_gap_s: float = Field(1.0, ge=0.0, le=28.0)

    @field_validator("early_commit_agreements")
    @classmethod
    def _more_than_local_agreement(cls, value: int) -> int:
        if value in (1, 2):  # two hypotheses agreeing is LocalAgreement itself
            raise ValueError("must be 0 (off) or at least 3")
        return value

    def policy_options(self) -> PolicyOptions:
        return PolicyOptions(
            step_s=self.step_s,
            holdback_s=self.holdback_s,
            prompt_chars=self.prompt_chars,
            max_window_s=self.max_window_s,
            early_commit_s=self.early_commit_s,
            early_commit_probability=self.early_commit_probability,
            early_commit_agreements=self.early_commit_agreements,
            early_commit_context_s=self.early_commit_context_s,
            early_commit_context_probability=self.early_commit_context_probability,
            early_commit_ignore_case=self.early_commit_ignore_case,
            tentative=self.tentative,
            tentative_edge_s=self.tentative_edge_s,
            tentative_edge_probability=self.tentative_edge_probability,
            endpoint_silence_s=self.endpoint_silence_s,
            no_speech_threshold=self.no_speech_threshold,
            logprob_threshold=self.logprob_threshold,
            policy=self.policy,
            alignatt_edge_s=self.alignatt_edge_s,
            tail_gap_s=self.tail_gap_s,
        )

    def audio_format(self) -> AudioFormat:
        return AudioFormat(self.sample_rate, self.encoding)


class LimitsSection(_Section):
    max_sessions: int = Field(8, ge=1)
    max_frame_bytes: int = Field(1_048_576, ge=1024)
    max_session_s: float = Field(4 * 3600.0, gt=0)
    idle_timeout_s: float = Field(60.0, gt=0)
    min_audio_ratio: float = Field(0.1, ge=0.0, le=1.0)
    max_outbound_messages: int = Field(1024, ge=16)
    # On SIGTERM (app.py, docs/scaling.md): /readyz answers 503 at once; new sessions are
    # still admitted for drain_grace_s, while the balancers notice; then refused (503).
    # Live sessions may run on for shutdown_timeout_s; those still open near its end
    # are finished (finals, done).
    drain_grace_s: float = Field(0.0, ge=0)
    shutdown_timeout_s: float = Field(10.0, gt=0)
    max_lag_s: float = Field(10.0, gt=0)
    max_sessions_per_client: int = Field(4, ge=1)
    max_text_bytes: int = Field(65_536, ge=256)
    max_bad_messages: int = Field(50, ge=1)
    handshake_timeout_s: float = Field(10.0, gt=0)
    # Ping every keepalive_s; a pong, or the server's unsent output, late by as much again
    # drops the connection (server/connection.py).
    keepalive_s: float = Field(20.0, gt=0)


class AuthSection(_Section):
    api_keys: list[SecretStr] = Field(default_factory=list)
    allowed_origins: list[str] = Field(default_factory=list)

    @field_validator("api_keys")
    @classmethod
    def _non_empty(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(not k.get_secret_value() for k in keys):
            raise ValueError("API keys must not be empty strings")
        return keys


class MqttSection(_Section):
    """The broker, and what of the WebSocket sessions goes on it (server/mqtt.py)."""

    enabled: bool = False  # publish every session's finals; the broker settings serve Hermes too
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    tls: bool | Path = False  # false, true (system CAs), or a CA certificate file
    username: str | None = None
    password: SecretStr | None = None
    client_id: str = ""  # empty: a random id per connection
    topic_prefix: str = "whisperstream"
    qos: Literal[0, 1, 2] = 1  # for finals and `done`; partials and VAD events use 0
    publish_partials: bool = False
    publish_vad: bool = False
    queue_size: int = Field(10_000, ge=1)  # finals waiting for the broker; more are dropped
    reconnect_max_s: float = Field(30.0, gt=0)  # longest wait between connection attempts

    @field_validator("tls", mode="before")
    @classmethod
    def _tls(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        if isinstance(value, str):
            if not Path(value).is_file():
                raise ValueError(f"CA certificate file {value!r} does not exist")
            return Path(value)
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip("/")
        if not value or any(c in value for c in "+#\0"):
            raise ValueError("must be a non-empty MQTT topic without wildcards (+, #)")
        return value


_BOOL_WORDS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


class HermesSection(_Section):
    """Hermes (Rhasspy) speech recognizer over MQTT, on the broker of `mqtt` (server/hermes.py)."""

    enabled: bool = False
    site_ids: list[str] = Field(default_factory=list)  # sites to serve; empty: every site
    partials: bool = False  # publish hermes/asr/partialTextCaptured while people speak
    max_command_s: float = Field(30.0, gt=0)  # with stopOnSilence, longest voice command


class WyomingSection(_Section):
    """Wyoming speech-to-text service for Home Assistant and Wyoming satellites
    (server/wyoming.py)."""

    enabled: bool = False
    host: str = "127.0.0.1"  # the protocol has no authentication: see README
    port: int = Field(10300, ge=1, le=65535)
    stop_on_silence: bool = False  # the first pause ends the command, before audio-stop
    max_command_s: float = Field(60.0, gt=0)  # longest voice command; then its transcript
    zeroconf: bool = False  # announce `_wyoming._tcp` by mDNS, as Home Assistant discovers
    zeroconf_name: str = Field("whisperstream", min_length=1)  # the name Home Assistant shows


class CompatSection(_Section):
    """The OpenAI- and Deepgram-compatible APIs, on a listener of their own (server/compat/)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # speaches' port; 0: any free port
    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1024)  # OpenAI's own limit: 25 MB
    max_uploads: int = Field(2, ge=1)  # files transcribed at once; more get HTTP 429
    max_uploads_per_client: int = Field(1, ge=1)  # of those, one client's at once; 429
    max_upload_s: float = Field(3600.0, gt=0)  # longest file, in seconds of audio


def _check_tls(settings: Settings) -> None:
    if (settings.server.tls_cert is None) != (settings.server.tls_key is None):
        raise ConfigError(
            "invalid configuration: server.tls_cert and server.tls_key go "
            "together; set both or neither"
        )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="WHISPERSTREAM_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )
    server: ServerSection = ServerSection()
    model: ModelSection = ModelSection()
    vad: VadSection = VadSection()
    streaming: StreamingSection = StreamingSection()
    limits: LimitsSection = LimitsSection()
    auth: AuthSection = AuthSection()
    mqtt: MqttSection = MqttSection()
    hermes: HermesSection = HermesSection()
    wyoming: WyomingSection = WyomingSection()
    compat: CompatSection = CompatSection()


class ConfigError(ValueError):
    """Invalid configuration; the message names the key."""


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{key}: {item['msg']}{shown}")
    return "invalid configuration: " + "; ".join(lines)


def load_settings(
    config_path: Path | None = None, overrides: dict[str, dict[str, Any]] | None = None
) -> Settings:
    """Defaults < config file < environment < overrides (the command-line flags)."""
    path = config_path if config_path is not None else DEFAULT_CONFIG
    if config_path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")

    class _FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if path.is_file():
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
            return tuple(sources)

    try:
        loaded = _FileSettings(**(overrides or {}))  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except ValueError as exc:  # e.g. YAML or JSON in an environment variable
        raise ConfigError(f"invalid configuration: {exc}") from None
    settings = Settings.model_validate(loaded.model_dump())
    _check_tls(settings)
    return settings
