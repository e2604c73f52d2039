"""Imports point one way: server -> streaming <- client; the core does no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE_FORBIDDEN = {"asyncio", "websockets", "aiomqtt", "server", "client", "socket"}
# Model backends load files, download and set process-wide threads: server/engines/.
BACKENDS = {"ctranslate2", "faster_whisper", "tokenizers", "huggingface_hub", "threadpoolctl"}


def _imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_streaming_core_imports_no_io_and_nothing_above_it() -> None:
    for path, names in _imports("streaming").items():
        assert not names & CORE_FORBIDDEN, f"{path} imports {names & CORE_FORBIDDEN}"


def test_model_backends_live_in_server_engines_not_in_the_core() -> None:
    for path, names in _imports("streaming").items():
        assert not names & BACKENDS, f"{path} imports {names & BACKENDS}"
    outside = {path: names & BACKENDS for package in ("server", "client")
               for path, names in _imports(package).items()
               if names & BACKENDS and not path.startswith("server/engines/")}
    assert not outside, f"backends imported outside server/engines: {outside}"


def test_client_does_not_import_the_server() -> None:
    for path, names in _imports("client").items():
        assert "server" not in names, f"{path} imports server"
