"""The machine a benchmark ran on: its figures mean little without it.

The same code costs two to three times more CPU on an AVX2-only CPU than on one with
AVX-512, so every table names the CPU model, its vector extensions and the core count.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in _CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or "unknown CPU"


def vector_extensions() -> str:
    """The widest SIMD the kernels can take: what makes CPU figures differ between days."""
    flags = set((_cpuinfo_field("flags") or "").split())
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return "no AVX2"


def machine_line() -> str:
    """'AMD EPYC (AVX-512), 2 cores' for a table's caption."""
    return f"{cpu_model()} ({vector_extensions()}), {os.cpu_count()} cores"


def machine_record() -> dict[str, Any]:
    """The machine for a results JSON."""
    return {
        "cpu_model": cpu_model(),
        "vector_extensions": vector_extensions(),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }
