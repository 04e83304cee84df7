"""Drift of a device's inputs against the bundle's training statistics: small, mergeable, cheap to update.

The preprocessing spec stores each channel's training mean and std, and the device scales every sample with
them, so without drift the scaled samples ``z`` have mean 0 and std 1 in every channel. Per channel the
device keeps ``n``, the sum of ``z`` and the sum of ``z**2`` over the samples new in each window, and sends:

    mean_z     sum(z) / n                          shift of the mean, in training standard deviations
    std_ratio  sqrt(sum(z**2) / n - mean_z**2)     spread against training (1 = unchanged)
    score      max over channels of max(|mean_z|, |ln std_ratio|)   one number to gate or alert on

When the spec carries a reference histogram of the training data (``"drift_reference": {"edges": [...],
"fractions": [[...] per channel]}``, edges in z units, made by :func:`reference_histogram`), the device also
counts z in those bins and sends ``psi``, the population stability index summed over the bins and averaged
over channels (rule of thumb: < 0.1 stable, 0.1 to 0.25 moderate, > 0.25 large shift).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PSI_FLOOR = 1e-4  # fraction given to an empty bin, so ln(o/e) stays finite
PENDING_BYTES = 1 << 20  # windows kept by reference before their fresh samples are folded in
DEFAULT_EDGES = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class DriftSnapshot:
    """What one telemetry batch carries about its inputs (see the module docstring)."""

    n: int
    mean_z: list[float]
    std_ratio: list[float]
    score: float
    psi: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "mean_z": [round(v, 3) for v in self.mean_z],
                "std_ratio": [round(v, 3) for v in self.std_ratio], "score": round(self.score, 3),
                "psi": None if self.psi is None else round(self.psi, 4)}


@dataclass(frozen=True)
class Reference:
    """Training histogram in z units: bin edges (interior) and per-channel fractions (len(edges) + 1 each)."""

    edges: np.ndarray
    fractions: np.ndarray

    @classmethod
    def from_spec(cls, spec: Any, channels: int) -> Reference | None:
        """The spec's ``drift_reference`` or None when absent or unusable."""
        if not isinstance(spec, dict):
            return None
        try:
            edges = np.asarray(spec["edges"], dtype=np.float64)
            fractions = np.asarray(spec["fractions"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            return None
        if (edges.ndim != 1 or fractions.shape != (channels, len(edges) + 1) or np.any(np.diff(edges) <= 0)
                or np.any(fractions < 0)):
            return None
        return cls(edges, np.maximum(fractions / fractions.sum(axis=1, keepdims=True), PSI_FLOOR))


def reference_histogram(scaled: np.ndarray, edges: Sequence[float] = DEFAULT_EDGES) -> dict[str, Any]:
    """A ``drift_reference`` for the spec from scaled training samples [n, channels, length] or [channels, n]."""
    data = np.asarray(scaled, dtype=np.float64)
    per_channel = data.transpose(1, 0, 2).reshape(data.shape[1], -1) if data.ndim == 3 else data
    cuts = np.asarray(edges, dtype=np.float64)
    counts = np.stack([np.bincount(np.searchsorted(cuts, row), minlength=len(cuts) + 1) for row in per_channel])
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return {"edges": [float(e) for e in cuts], "fractions": [[round(float(f), 6) for f in row] for row in fractions]}


class DriftTracker:
    """Accumulates z statistics of fresh samples between two snapshots.

    ``update`` only copies the samples into a buffer; the sums are taken when it fills or at ``snapshot``, so
    the per-window cost is one array copy.
    """

    def __init__(self, channels: int, reference: Reference | None = None, buffer_samples: int = 4096) -> None:
        self.channels = channels
        self.reference = reference
        self._buffer = np.empty((channels, buffer_samples), dtype=np.float32)
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self._used = 0
        self._pending: list[tuple[np.ndarray, int]] = []
        self._pending_bytes = 0
        self._sum = np.zeros(self.channels)
        self._sum_sq = np.zeros(self.channels)
        self._bins = None if self.reference is None else np.zeros((self.channels, len(self.reference.edges) + 1))

    def update_window(self, samples: np.ndarray, fresh: int) -> None:
        """Add the newest ``fresh`` samples of a scaled window [channels, width]; kept by reference and folded in
        groups, so the per-window cost is a list append."""
        self._pending.append((samples, fresh))
        self._pending_bytes += samples.nbytes
        if self._pending_bytes > PENDING_BYTES:
            self._fold_pending()

    def _fold_pending(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        groups: dict[tuple[tuple[int, ...], int], list[np.ndarray]] = {}
        for samples, fresh in pending:
            groups.setdefault((samples.shape, fresh), []).append(samples)
        for (shape, fresh), windows in groups.items():
            newest = np.stack(windows)[:, :, shape[1] - min(fresh, shape[1]):]  # [n, channels, fresh]
            self.update(newest.transpose(1, 0, 2).reshape(self.channels, -1))

    def update(self, z: np.ndarray) -> None:
        """Add scaled samples [channels, k] (the ones not seen in a previous window)."""
        k = z.shape[1]
        if self._used + k > self._buffer.shape[1]:
            self._fold()
            if k > self._buffer.shape[1]:
                self._add(z)
                return
        self._buffer[:, self._used : self._used + k] = z
        self._used += k

    def _fold(self) -> None:
        if self._used:
            self._add(self._buffer[:, : self._used])
            self._used = 0

    def _add(self, z: np.ndarray) -> None:
        z = z.astype(np.float64)
        self.n += z.shape[1]
        self._sum += z.sum(axis=1)
        self._sum_sq += np.einsum("ij,ij->i", z, z)
        if self._bins is not None and self.reference is not None:
            index = np.searchsorted(self.reference.edges, z)
            width = self._bins.shape[1]
            offsets = (np.arange(self.channels) * width)[:, None]
            self._bins += np.bincount((index + offsets).ravel(), minlength=self.channels * width).reshape(
                self.channels, width)

    def snapshot(self) -> DriftSnapshot | None:
        """The statistics since the last reset; None when no sample arrived."""
        self._fold_pending()
        self._fold()
        if self.n == 0:
            return None
        mean = self._sum / self.n
        std = np.sqrt(np.maximum(self._sum_sq / self.n - mean**2, 0.0))
        log_ratio = np.abs(np.log(np.maximum(std, 1e-12)))
        score = float(np.max(np.maximum(np.abs(mean), np.minimum(log_ratio, 50.0))))
        return DriftSnapshot(self.n, [float(v) for v in mean], [float(v) for v in std], score, self._psi())

    def _psi(self) -> float | None:
        if self._bins is None or self.reference is None:
            return None
        observed = np.maximum(self._bins / np.maximum(self._bins.sum(axis=1, keepdims=True), 1), PSI_FLOOR)
        expected = self.reference.fractions
        per_channel = np.sum((observed - expected) * np.log(observed / expected), axis=1)
        value = float(per_channel.mean())
        return value if math.isfinite(value) else None
