"""Inference statistics collected between two telemetry batches."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgefleet.core.telemetry import CONFIDENCE_BINS, LatencyHistogram, confidence_bin
from edgefleet.transport.messages import TelemetryBatch


@dataclass
class WindowStats:
    """Counts, latency histogram and confidence bins for one model since the last flush."""

    model: str | None
    shadow_model: str | None = None
    windows: int = 0
    labelled: int = 0
    correct: int = 0
    errors: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    confidence: list[int] = field(default_factory=lambda: [0] * CONFIDENCE_BINS)
    shadow_windows: int = 0
    shadow_agree: int = 0
    shadow_errors: int = 0
    shadow_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    _last_predicted: str | None = None

    def record(self, predicted: str, confidence: float, latency_ms: float, truth: str | None) -> None:
        self.windows += 1
        self.classes[predicted] = self.classes.get(predicted, 0) + 1
        self.latency.add(latency_ms)
        self.confidence[confidence_bin(confidence)] += 1
        self._last_predicted = predicted
        if truth is not None:
            self.labelled += 1
            self.correct += int(truth == predicted)

    def record_shadow(self, predicted: str | None, latency_ms: float) -> None:
        """The shadow candidate's answer on the window just recorded (None when it failed)."""
        if predicted is None:
            self.shadow_errors += 1
            return
        self.shadow_windows += 1
        self.shadow_agree += int(predicted == self._last_predicted)
        self.shadow_latency.add(latency_ms)

    @property
    def empty(self) -> bool:
        return self.windows == 0 and self.errors == 0

    def batch(self, device: str, seq: int, ts: float, skipped: int) -> TelemetryBatch:
        return TelemetryBatch(device=device, seq=seq, ts=ts, model=self.model, windows=self.windows,
                              labelled=self.labelled, correct=self.correct, classes=self.classes,
                              latency_ms=self.latency.to_json(), confidence=self.confidence,
                              skipped=skipped, errors=self.errors, shadow_model=self.shadow_model,
                              shadow_windows=self.shadow_windows, shadow_agree=self.shadow_agree,
                              shadow_errors=self.shadow_errors, shadow_latency_ms=self.shadow_latency.to_json())
