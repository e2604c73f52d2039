"""The one error of the bench and the soak: a reason they cannot run, for the user."""

from __future__ import annotations


class BenchError(RuntimeError):
    """A reason the benchmark cannot run, for the user."""
