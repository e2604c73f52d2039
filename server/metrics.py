"""Prometheus metrics, one registry per server (so tests can run several servers)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.scheduler import BatchStats

_LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_sessions = Gauge(
            "whisperstream_active_sessions", "Sessions connected now", registry=r
        )
        self.sessions = Counter("whisperstream_sessions", "Sessions accepted", registry=r)
        self.refused_sessions = Counter(
            "whisperstream_refused_sessions",
            "Sessions refused before the upgrade",
            ["reason"],
            registry=r,
        )
        self.audio_seconds = Counter(
            "whisperstream_audio_seconds", "Seconds of audio received (at 16 kHz)", registry=r
        )
        self.steps = Counter("whisperstream_steps", "Inference steps run", ["kind"], registry=r)
        self.batch_size = Histogram(
            "whisperstream_batch_size",
            "Windows per model call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "whisperstream_batch_seconds",
            "Wall time of one model call",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.step_latency = Histogram(
            "whisperstream_step_latency_seconds",
            "From a step's newest audio arriving to its result",
            ["kind"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.lag = Histogram(
            "whisperstream_lag_seconds",
            "How far a session's results trail the audio it has sent",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.errors = Counter(
            "whisperstream_errors", "Error messages sent to clients", ["code"], registry=r
        )
        self.finals = Counter("whisperstream_finals", "Final messages produced", registry=r)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_seconds.observe(stats.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
