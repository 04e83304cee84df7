"""Latency of a model with ONNX Runtime on this host: warm-up, then median and spread of timed runs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.build.evaluate import ORT_ERRORS, open_session
from edgefleet.errors import ModelError


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds per call at one batch size: median, 10th and 90th percentile, over ``runs`` calls."""

    batch: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    @property
    def spread_pct(self) -> float:
        """(p90 - p10) / median, in percent."""
        return 100.0 * (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else 0.0


def batch_of(x: np.ndarray, batch: int) -> np.ndarray:
    """``batch`` samples of x (cycled if x has fewer), as contiguous float32."""
    idx = np.arange(batch) % len(x)
    return np.ascontiguousarray(np.asarray(x)[idx], dtype=np.float32)


def measure_latency(
    model_bytes: bytes,
    x: np.ndarray,
    batch: int,
    *,
    warmup: int = 5,
    min_runs: int = 10,
    max_runs: int = 300,
    budget_s: float = 1.0,
    threads: int = 1,
) -> LatencyStats:
    """Time ``session.run`` on ``batch`` samples of x with ``threads`` intra-op threads.

    Runs at least ``min_runs`` and at most ``max_runs`` timed calls, stopping once ``budget_s`` is spent.
    """
    session = open_session(model_bytes, threads=threads)
    feed = {session.get_inputs()[0].name: batch_of(x, batch)}
    samples: list[float] = []
    try:
        for _ in range(warmup):
            session.run(None, feed)
        deadline = time.perf_counter() + budget_s
        while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() < deadline):
            start = time.perf_counter()
            session.run(None, feed)
            samples.append((time.perf_counter() - start) * 1e3)
    except ORT_ERRORS as exc:
        raise ModelError(f"inference failed at batch {batch}: {exc}") from exc
    return _stats(batch, samples)


def compare_latency(
    models: list[bytes], x: np.ndarray, batch: int, *, rounds: int = 7, runs: int = 15, threads: int = 1
) -> list[LatencyStats]:
    """Time several models in interleaved rounds, so that load from other processes hits them alike.

    Each round runs every model ``runs`` times; the result per model pools all its timed calls.
    """
    sessions = [open_session(m, threads=threads) for m in models]
    feeds = [{s.get_inputs()[0].name: batch_of(x, batch)} for s in sessions]
    return time_interleaved(sessions, feeds, batch, rounds=rounds, runs=runs)


def time_interleaved(sessions: Sequence[Any], feeds: Sequence[dict[str, np.ndarray]], batch: int, *,
                     rounds: int = 7, runs: int = 15) -> list[LatencyStats]:
    """Time already-open sessions, one feed each, in interleaved rounds (see :func:`compare_latency`)."""
    samples: list[list[float]] = [[] for _ in sessions]
    try:
        for s, feed in zip(sessions, feeds, strict=True):
            s.run(None, feed)
        for _ in range(rounds):
            for i, (s, feed) in enumerate(zip(sessions, feeds, strict=True)):
                for _ in range(runs):
                    start = time.perf_counter()
                    s.run(None, feed)
                    samples[i].append((time.perf_counter() - start) * 1e3)
    except ORT_ERRORS as exc:
        raise ModelError(f"inference failed at batch {batch}: {exc}") from exc
    return [_stats(batch, t) for t in samples]


def _stats(batch: int, samples: list[float]) -> LatencyStats:
    ordered = np.sort(np.asarray(samples))
    return LatencyStats(batch=batch, median_ms=float(np.median(ordered)), p10_ms=float(np.percentile(ordered, 10)),
                        p90_ms=float(np.percentile(ordered, 90)), runs=len(samples))
