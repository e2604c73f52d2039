"""The shape the code promises (docs/architecture.md): imports point one way,
server -> streaming <- client; the core imports only what it is allowed; no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("streaming", "server", "client")

# What the sans-I/O core may import: pure standard-library modules, its three
# third-party libraries, and itself. Anything else (asyncio, sockets, files, threads,
# subprocesses, a model runtime) belongs in server/.
CORE_ALLOWED = {
    "__future__",
    "collections",
    "dataclasses",
    "enum",
    "io",
    "itertools",
    "json",
    "logging",
    "math",
    "re",
    "typing",
    "wave",
    "numpy",
    "soxr",
    "webrtcvad",
    "streaming",
}
# Model backends load files, download and set process-wide threads: server/engines/.
BACKENDS = {
    "ctranslate2",
    "faster_whisper",
    "tokenizers",
    "huggingface_hub",
    "threadpoolctl",
    "torch",
}
# Silero VAD's runtime (and its package, whose model file is all that is used): only the
# classifier that runs it, server/vad_silero.py, behind the core's FrameClassifier.
VAD_RUNTIMES = {"onnxruntime", "silero_vad"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module this file imports, anywhere in it (function-level imports too),
    with `from package import module` resolved to the module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(
                f"{node.module}.{alias.name}"
                for alias in node.names
                if f"{node.module}.{alias.name}" in modules
            )
    return names


def test_the_core_imports_only_what_its_allowlist_names() -> None:
    modules = _modules()
    for name, path in modules.items():
        if name.split(".")[0] != "streaming":
            continue
        tops = {imported.split(".")[0] for imported in _imported(path, modules)}
        assert tops <= CORE_ALLOWED, f"{name} imports {sorted(tops - CORE_ALLOWED)}"


def test_model_backends_are_imported_only_in_server_engines() -> None:
    modules = _modules()
    outside = {}
    for name, path in modules.items():
        backends = {i.split(".")[0] for i in _imported(path, modules)} & BACKENDS
        if backends and not name.startswith("server.engines"):
            outside[name] = backends
    assert not outside, f"backends imported outside server/engines: {outside}"


def test_the_vad_runtime_is_imported_only_by_the_silero_classifier() -> None:
    modules = _modules()
    outside = {
        name: runtimes
        for name, path in modules.items()
        if (runtimes := {i.split(".")[0] for i in _imported(path, modules)} & VAD_RUNTIMES)
        and name != "server.vad_silero"
    }
    assert not outside, f"VAD runtimes imported outside server/vad_silero.py: {outside}"


def test_client_does_not_import_the_server() -> None:
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("client"):
            imported = _imported(path, modules)
            assert not {i for i in imported if i.split(".")[0] == "server"}, name


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in the graph, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # A package's __init__ is not a dependency of its submodules' importers: an edge
        # goes to the module itself.
        graph[name] = {i for i in _imported(path, modules) if i in modules and i != name}
    return graph


def test_the_project_has_no_import_cycle() -> None:
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
