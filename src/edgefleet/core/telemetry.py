"""Mergeable histograms and quantiles for telemetry: devices send buckets, the server adds them up."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

# Latency buckets grow by 5% from 1 microsecond: any quantile is known to within 2.5%.
_LATENCY_BASE_MS = 0.001
_LATENCY_GROWTH = 1.05
_LATENCY_LOG = math.log(_LATENCY_GROWTH)
_MAX_LATENCY_BUCKET = 500  # ~40 minutes: anything slower lands in the last bucket

CONFIDENCE_BINS = 20


class LatencyHistogram:
    """Sparse log-bucketed histogram of latencies in milliseconds."""

    __slots__ = ("buckets", "count")

    def __init__(self, buckets: Mapping[int, int] | None = None) -> None:
        self.buckets: dict[int, int] = dict(buckets or {})
        self.count = sum(self.buckets.values())

    def add(self, latency_ms: float) -> None:
        index = latency_bucket(latency_ms)
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1

    def merge(self, other: LatencyHistogram) -> None:
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1) in ms, as the geometric middle of its bucket; None when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError("quantile must be within [0, 1]")
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return bucket_middle_ms(index)
        return bucket_middle_ms(max(self.buckets))

    def to_json(self) -> dict[str, int]:
        return {str(index): n for index, n in sorted(self.buckets.items())}

    @classmethod
    def from_json(cls, data: Mapping[str, int]) -> LatencyHistogram:
        buckets: dict[int, int] = {}
        for key, n in data.items():
            index = int(key)
            if not 0 <= index <= _MAX_LATENCY_BUCKET or n < 0:
                raise ValueError(f"histogram bucket {key}={n} is out of range")
            buckets[index] = n
        return cls(buckets)


def latency_bucket(latency_ms: float) -> int:
    if math.isnan(latency_ms) or latency_ms <= _LATENCY_BASE_MS:
        return 0
    if math.isinf(latency_ms):
        return _MAX_LATENCY_BUCKET
    return min(_MAX_LATENCY_BUCKET, 1 + int(math.log(latency_ms / _LATENCY_BASE_MS) / _LATENCY_LOG))


def bucket_middle_ms(index: int) -> float:
    if index == 0:
        return _LATENCY_BASE_MS
    low = _LATENCY_BASE_MS * _LATENCY_GROWTH ** (index - 1)
    return low * math.sqrt(_LATENCY_GROWTH)


def confidence_bin(confidence: float) -> int:
    """Index of ``confidence`` (0..1) among CONFIDENCE_BINS equal bins."""
    if not math.isfinite(confidence):
        return 0
    return min(CONFIDENCE_BINS - 1, max(0, int(confidence * CONFIDENCE_BINS)))


def add_counts(total: dict[str, int], part: Mapping[str, int]) -> None:
    """Add a count mapping into ``total`` in place."""
    for key, n in part.items():
        total[key] = total.get(key, 0) + n


def add_bins(total: list[int], part: Iterable[int]) -> list[int]:
    """Element-wise sum of two bin lists, padding the shorter one."""
    values = list(part)
    width = max(len(total), len(values))
    return [(total[i] if i < len(total) else 0) + (values[i] if i < len(values) else 0) for i in range(width)]
