"""Inference statistics collected between two telemetry batches, and the hard examples sampled with them.

The uplink carries aggregates only: counts per class, latency and confidence histograms, alert counts, input
drift, escalation counters, and a few hard (low-confidence) model inputs sampled uniformly (reservoir sampling)
among the batch's hard windows, capped in count and in bytes.
"""

from __future__ import annotations

import base64
import random
import zlib
from dataclasses import dataclass, field

import numpy as np

from edgefleet.core.drift import DriftSnapshot
from edgefleet.core.telemetry import CONFIDENCE_BINS, LatencyHistogram, confidence_bin
from edgefleet.transport.messages import DriftStats, HardExample, TelemetryBatch


@dataclass
class WindowStats:
    """Counts, latency histogram and confidence bins for one model since the last flush."""

    model: str | None
    shadow_model: str | None = None
    windows: int = 0
    labelled: int = 0
    correct: int = 0
    errors: int = 0
    uncertain: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    alerts: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    confidence: list[int] = field(default_factory=lambda: [0] * CONFIDENCE_BINS)
    shadow_windows: int = 0
    shadow_agree: int = 0
    shadow_errors: int = 0
    shadow_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    _last_predicted: str | None = None

    def record(self, predicted: str, confidence: float, latency_ms: float, truth: str | None) -> None:
        self.windows += 1
        classes = self.classes
        classes[predicted] = classes.get(predicted, 0) + 1
        self.latency.add(latency_ms)
        if 0.0 <= confidence < 1.0:  # the common case of confidence_bin, inline: this runs for every window
            self.confidence[int(confidence * CONFIDENCE_BINS)] += 1
        else:
            self.confidence[confidence_bin(confidence)] += 1
        self._last_predicted = predicted
        if truth is not None:
            self.labelled += 1
            self.correct += int(truth == predicted)

    def record_alert(self, reason: str) -> None:
        self.alerts[reason] = self.alerts.get(reason, 0) + 1

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

    def batch(self, device: str, seq: int, ts: float, skipped: int, *, imputed: int = 0, incomplete: int = 0,
              drift: DriftSnapshot | None = None, hard_examples: list[HardExample] | None = None,
              escalations: dict[str, int] | None = None) -> TelemetryBatch:
        return TelemetryBatch(device=device, seq=seq, ts=ts, model=self.model, windows=self.windows,
                              labelled=self.labelled, correct=self.correct, classes=self.classes,
                              latency_ms=self.latency.to_json(), confidence=self.confidence,
                              skipped=skipped, errors=self.errors, shadow_model=self.shadow_model,
                              shadow_windows=self.shadow_windows, shadow_agree=self.shadow_agree,
                              shadow_errors=self.shadow_errors, shadow_latency_ms=self.shadow_latency.to_json(),
                              imputed=imputed, incomplete=incomplete, uncertain=self.uncertain,
                              alerts=self.alerts, drift=None if drift is None else DriftStats(**drift.to_json()),
                              hard_examples=hard_examples or [], escalations=escalations or {})


@dataclass
class _Candidate:
    x: np.ndarray
    predicted: str
    confidence: float
    ts: float


class HardExampleSampler:
    """A uniform sample (reservoir, Algorithm R) of at most ``capacity`` hard windows per batch.

    Inputs are kept by reference (each window is a fresh array) and encoded only when the batch is taken: float16
    bytes, zlib-compressed when that is smaller, base64. Examples that would take the batch over ``max_bytes`` of
    encoded data are left out and counted in ``left_out``.
    """

    def __init__(self, capacity: int = 2, max_bytes: int = 4096, seed: int | None = None) -> None:
        self.capacity = max(0, capacity)
        self.max_bytes = max(0, max_bytes)
        self.seen = 0
        self.left_out = 0
        self._kept: list[_Candidate] = []
        self._rng = random.Random(seed)

    def offer(self, x: np.ndarray, predicted: str, confidence: float, ts: float) -> None:
        """Consider one hard window."""
        self.seen += 1
        if len(self._kept) < self.capacity:
            self._kept.append(_Candidate(x, predicted, confidence, ts))
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.capacity:
            self._kept[slot] = _Candidate(x, predicted, confidence, ts)

    def take(self) -> list[HardExample]:
        """The encoded sample; the sampler starts again from empty."""
        examples: list[HardExample] = []
        used = 0
        for candidate in self._kept:
            example = encode_example(candidate.x, candidate.predicted, candidate.confidence, candidate.ts)
            if used + len(example.data) > self.max_bytes:
                self.left_out += 1
                continue
            used += len(example.data)
            examples.append(example)
        self._kept = []
        self.seen = 0
        return examples


def encode_example(x: np.ndarray, predicted: str, confidence: float, ts: float) -> HardExample:
    """One model input as float16, zlib-compressed when that is smaller, in base64."""
    raw = np.ascontiguousarray(x, dtype="<f2").tobytes()
    packed = zlib.compress(raw, 6)
    compressed = len(packed) < len(raw)
    return HardExample(predicted=predicted, confidence=round(confidence, 4), shape=list(x.shape),
                       encoding="f16+zlib" if compressed else "f16",
                       data=base64.b64encode(packed if compressed else raw).decode("ascii"), ts=round(ts, 3))


def decode_example(example: HardExample) -> np.ndarray:
    """The float32 array a :class:`HardExample` carries."""
    expected = 2 * int(np.prod(example.shape))
    data = base64.b64decode(example.data)
    if example.encoding == "f16+zlib":
        data = zlib.decompressobj().decompress(data, expected)  # never inflate beyond what the shape holds
    if len(data) != expected:
        raise ValueError(f"hard example holds {len(data)} bytes, its shape {example.shape} needs {expected}")
    return np.frombuffer(data, dtype="<f2").astype(np.float32).reshape(example.shape)
