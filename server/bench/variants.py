"""Variants: named server configurations (config keys or WHISPERSTREAM_ variables) to run."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.bench.errors import BenchError


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
            raise BenchError(
                f"--variant {spec!r}: {part!r} is not KEY=VALUE with KEY a config "
                "key (streaming.step_s) or a WHISPERSTREAM_ variable"
            )
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
