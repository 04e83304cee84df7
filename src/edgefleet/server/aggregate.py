"""Fold telemetry batches into per-model summaries: counts, accuracy, latency quantiles, confidence."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from edgefleet.core.telemetry import LatencyHistogram, add_bins, add_counts
from edgefleet.transport.messages import TelemetryBatch


@dataclass
class ModelSummary:
    """What one device reported about one model, summed over batches."""

    model: str | None
    batches: int = 0
    windows: int = 0
    labelled: int = 0
    correct: int = 0
    skipped: int = 0
    errors: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    classes: dict[str, int] = field(default_factory=dict)
    confidence: list[int] = field(default_factory=list)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def add(self, batch: TelemetryBatch) -> None:
        self.batches += 1
        self.windows += batch.windows
        self.labelled += batch.labelled
        self.correct += batch.correct
        self.skipped += batch.skipped
        self.errors += batch.errors
        self.first_seq = batch.seq if self.first_seq is None else min(self.first_seq, batch.seq)
        self.last_seq = batch.seq if self.last_seq is None else max(self.last_seq, batch.seq)
        add_counts(self.classes, batch.classes)
        self.confidence = add_bins(self.confidence, batch.confidence)
        self.latency.merge(LatencyHistogram.from_json(batch.latency_ms))

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def to_json(self) -> dict[str, object]:
        return {
            "model": self.model, "batches": self.batches, "windows": self.windows,
            "labelled": self.labelled, "correct": self.correct, "accuracy": self.accuracy,
            "skipped": self.skipped, "errors": self.errors, "classes": self.classes,
            "confidence_bins": self.confidence,
            "latency_ms": {"p50": self.latency.quantile(0.5), "p95": self.latency.quantile(0.95),
                           "p99": self.latency.quantile(0.99)},
        }


def summarize(batches: Iterable[TelemetryBatch]) -> dict[str | None, ModelSummary]:
    """Per model reference, the sum of every batch the device sent while running it."""
    result: dict[str | None, ModelSummary] = {}
    for batch in batches:
        result.setdefault(batch.model, ModelSummary(batch.model)).add(batch)
    return result


def sequence_gaps(seqs: Iterable[int]) -> int:
    """How many sequence numbers are missing between the lowest and highest seen."""
    ordered = sorted(set(seqs))
    if not ordered:
        return 0
    return ordered[-1] - ordered[0] + 1 - len(ordered)
