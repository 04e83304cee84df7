"""The per-model inference pipeline: preprocess a reading stream, infer on each window, post-process, count.

One pipeline serves one active model (and optionally a shadow candidate that only reports). The agent builds a
new pipeline when the active model changes and takes a telemetry batch from it every interval.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from edgefleet.agent.model import LoadedModel
from edgefleet.agent.sources import Reading
from edgefleet.agent.stats import WindowStats
from edgefleet.errors import ModelError
from edgefleet.runtime.preprocess import StreamWindower
from edgefleet.transport.messages import TelemetryBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What happened to one window: a prediction, or a failure of the model."""

    predicted: str | None
    confidence: float
    latency_ms: float
    failed: bool = False


class InferencePipeline:
    """Windows -> model -> labels and statistics, for one active model and an optional shadow."""

    def __init__(self, model: LoadedModel, source_labels: tuple[str, ...] = (),
                 shadow: LoadedModel | None = None) -> None:
        self.model = model
        self.shadow = shadow
        self._truth_names = source_labels or tuple(model.manifest.labels)
        self._windower = StreamWindower(model.window)
        self.stats = WindowStats(model.ref)
        self.skipped = 0

    def push(self, reading: Reading) -> Outcome | None:
        """Feed one reading; returns the outcome when it completed a window."""
        if reading.values.shape != (self.model.window.channels,):
            self.skipped += 1
            return None
        window = self._windower.push(reading.values, reading.label)
        if window is None:
            return None
        truth = None
        if window.label is not None and 0 <= window.label < len(self._truth_names):
            truth = self._truth_names[window.label]
        outcome = self._run(self.model, window.x)
        if outcome.failed:
            self.stats.errors += 1
            return outcome
        assert outcome.predicted is not None
        self.stats.record(outcome.predicted, outcome.confidence, outcome.latency_ms, truth)
        if self.shadow is not None:
            shadow = self._run(self.shadow, window.x)
            self.stats.record_shadow(shadow.predicted if not shadow.failed else None, shadow.latency_ms)
        return outcome

    def take_batch(self, device: str, seq: int, ts: float, skipped_by_source: int) -> TelemetryBatch:
        """The statistics since the previous batch; the counters start again from zero."""
        batch = self.stats.batch(device, seq, ts, skipped_by_source + self.skipped)
        self.stats = WindowStats(self.model.ref, shadow_model=self.shadow.ref if self.shadow else None)
        self.skipped = 0
        return batch

    @property
    def has_data(self) -> bool:
        return not self.stats.empty or self.skipped > 0

    @staticmethod
    def _run(model: LoadedModel, x: np.ndarray) -> Outcome:
        started = time.perf_counter()
        try:
            probs = model.runner.run(x)[0]
        except ModelError as exc:
            log.warning("inference failed on %s: %s", model.ref, exc)
            return Outcome(None, 0.0, (time.perf_counter() - started) * 1000.0, failed=True)
        latency_ms = (time.perf_counter() - started) * 1000.0
        if not np.all(np.isfinite(probs)):
            return Outcome(None, 0.0, latency_ms, failed=True)
        best = int(probs.argmax())
        labels = model.manifest.labels
        return Outcome(labels[best] if best < len(labels) else str(best), float(probs[best]), latency_ms)
