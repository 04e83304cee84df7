"""Mergeable histograms and quantiles for telemetry: devices send buckets, the server adds them up.

Latency buckets are log-spaced from 1 microsecond, so the relative error of any quantile is bounded whatever
the latency: on the current scale (``FINE``) buckets grow by 2% and a quantile read from its bucket's geometric
middle is within 1% of the truth (0.2 ms and 200 ms alike). Batches of older agents used 5% buckets (``COARSE``,
within 2.5%); they stay readable: a histogram remembers its scale, the wire form names it (``"s": 1`` among
the buckets; absent means the old scale), and merging two scales re-bins the coarse one onto the fine one.

On the wire a batch's histogram is whichever of two forms is shorter (:meth:`LatencyHistogram.to_wire`): the
sparse map ``{"index": count, ..., "s": scale}``, or the dense run ``[scale, first index, count, count, ...]`` from
the fastest to the slowest bucket, which a model's latencies (close together, many buckets apart on the fine
scale) make about four times smaller. :meth:`LatencyHistogram.from_wire` reads both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping

_LATENCY_BASE_MS = 0.001
COARSE, FINE = 0, 1
_GROWTH = {COARSE: 1.05, FINE: 1.02}
_LOG = {scale: math.log(growth) for scale, growth in _GROWTH.items()}
_MAX_BUCKET = {COARSE: 500, FINE: 1250}  # ~40 minutes: anything slower lands in the last bucket
SCALE_KEY = "s"

CONFIDENCE_BINS = 20


class LatencyHistogram:
    """Sparse log-bucketed histogram of latencies in milliseconds, on one bucket scale."""

    __slots__ = ("buckets", "count", "scale")

    def __init__(self, buckets: Mapping[int, int] | None = None, scale: int = FINE) -> None:
        self.buckets: dict[int, int] = dict(buckets or {})
        self.count = sum(self.buckets.values())
        self.scale = scale

    def add(self, latency_ms: float) -> None:
        index = latency_bucket(latency_ms, self.scale)
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other`` in; an empty histogram takes the other's scale, two scales meet on the finer one."""
        if not other.buckets:
            return
        if not self.buckets:
            self.scale = other.scale
        if other.scale != self.scale:
            if self.scale == COARSE:
                self.buckets, self.scale = _rebin(self.buckets, COARSE, FINE), FINE
            if other.scale == COARSE:
                other = LatencyHistogram(_rebin(other.buckets, COARSE, FINE), FINE)
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
                return bucket_middle_ms(index, self.scale)
        return bucket_middle_ms(max(self.buckets), self.scale)

    def edges(self) -> list[tuple[float, float, int]]:
        """Every non-empty bucket as (lower edge ms, upper edge ms, count), fastest first."""
        return [(*bucket_edges_ms(i, self.scale), n) for i, n in sorted(self.buckets.items()) if n]

    @property
    def relative_error(self) -> float:
        """The most a quantile read from this histogram can be off, relative to the truth."""
        return math.sqrt(_GROWTH[self.scale]) - 1.0

    def to_json(self) -> dict[str, int]:
        out = {str(index): n for index, n in sorted(self.buckets.items())}
        if self.scale != COARSE and out:
            out[SCALE_KEY] = self.scale
        return out

    def to_wire(self) -> dict[str, int] | list[int]:
        """The shorter of the sparse map (:meth:`to_json`) and the dense run ``[scale, first, counts...]`` (``-k``:
        ``k`` empty buckets)."""
        if not self.buckets:
            return {}
        first, last = min(self.buckets), max(self.buckets)
        out: list[int] = [self.scale, first]
        gap = 0
        for i in range(first, last + 1):
            n = self.buckets.get(i, 0)
            if not n:
                gap += 1
                continue
            if gap:
                out.append(0 if gap == 1 else -gap)
                gap = 0
            out.append(n)
        sparse = self.to_json()
        return out if len(json.dumps(out, separators=(",", ":"))) < len(json.dumps(sparse, separators=(",", ":"))) \
            else sparse

    @classmethod
    def from_wire(cls, data: Mapping[str, int] | list[int]) -> LatencyHistogram:
        """Either wire form (see :meth:`to_wire`); ValueError when it is malformed."""
        if not isinstance(data, list):
            return cls.from_json(data)
        if len(data) < 3 or not all(isinstance(v, int) for v in data):
            raise ValueError("a dense histogram is [scale, first index, counts...] of integers")
        scale, index = data[0], data[1]
        if scale not in _GROWTH or index < 0:
            raise ValueError(f"dense histogram {data[:3]}... is out of range")
        buckets: dict[int, int] = {}
        for n in data[2:]:
            if n < 0:  # a run of -n empty buckets
                index -= n
                continue
            if index > _MAX_BUCKET[scale]:
                raise ValueError(f"dense histogram {data[:3]}... runs past the last bucket")
            if n:
                buckets[index] = n
            index += 1
        return cls(buckets, scale)

    @classmethod
    def from_json(cls, data: Mapping[str, int]) -> LatencyHistogram:
        scale = data.get(SCALE_KEY, COARSE)
        if scale not in _GROWTH:
            raise ValueError(f"histogram scale {scale!r} is unknown")
        buckets: dict[int, int] = {}
        for key, n in data.items():
            if key == SCALE_KEY:
                continue
            index = int(key)
            if not 0 <= index <= _MAX_BUCKET[scale] or n < 0:
                raise ValueError(f"histogram bucket {key}={n} is out of range")
            buckets[index] = n
        return cls(buckets, scale)


def latency_bucket(latency_ms: float, scale: int = COARSE) -> int:
    if math.isnan(latency_ms) or latency_ms <= _LATENCY_BASE_MS:
        return 0
    if math.isinf(latency_ms):
        return _MAX_BUCKET[scale]
    return min(_MAX_BUCKET[scale], 1 + int(math.log(latency_ms / _LATENCY_BASE_MS) / _LOG[scale]))


def bucket_edges_ms(index: int, scale: int = COARSE) -> tuple[float, float]:
    """The latencies bucket ``index`` holds: (lower edge, upper edge]; the last bucket is open above."""
    if index == 0:
        return 0.0, _LATENCY_BASE_MS
    growth = _GROWTH[scale]
    low = _LATENCY_BASE_MS * growth ** (index - 1)
    return low, math.inf if index >= _MAX_BUCKET[scale] else low * growth


def bucket_middle_ms(index: int, scale: int = COARSE) -> float:
    if index == 0:
        return _LATENCY_BASE_MS
    low = _LATENCY_BASE_MS * _GROWTH[scale] ** (index - 1)
    return low * math.sqrt(_GROWTH[scale])


def _rebin(buckets: Mapping[int, int], source: int, target: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for index, n in buckets.items():
        moved = latency_bucket(bucket_middle_ms(index, source), target)
        out[moved] = out.get(moved, 0) + n
    return out


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
