"""Inference statistics collected between two telemetry batches, and the hard examples sampled with them.

The uplink carries aggregates only: counts per class, latency and confidence histograms, alert counts, input
drift, escalation counters, windows a trigger kept from the model, and a few hard (low-confidence) model
inputs sampled uniformly (reservoir sampling) among the batch's hard windows, capped in count and in bytes per
batch and in count per hour. A batch is a :class:`TelemetryReport` (the fields of ``TelemetryBatch``, no
pydantic) encoded by :func:`edgefleet.transport.messages.encode_telemetry`.
"""

from __future__ import annotations

import base64
import collections
import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edgefleet.core.drift import DriftSnapshot
from edgefleet.core.telemetry import CONFIDENCE_BINS, LatencyHistogram, confidence_bin
from edgefleet.transport.messages import encode_telemetry


@dataclass
class Example:
    """One hard model input as sent (the fields of ``HardExample``)."""

    predicted: str
    confidence: float
    shape: list[int]
    encoding: str
    data: str
    scale: float | None = None
    ts: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"predicted": self.predicted, "confidence": self.confidence, "shape": self.shape,
                               "encoding": self.encoding, "data": self.data}
        if self.scale is not None:
            out["scale"] = self.scale
        if self.ts:
            out["ts"] = self.ts
        return out


@dataclass
class TelemetryReport:
    """One telemetry batch, the fields of ``TelemetryBatch``; :meth:`to_bytes` is its compact wire form."""

    device: str
    seq: int
    ts: float
    model: str | None
    windows: int = 0
    labelled: int = 0
    correct: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, int] | list[int] = field(default_factory=dict)
    """The latency histogram in its wire form (:meth:`LatencyHistogram.to_wire`), as are the shadow ones."""
    confidence: list[int] = field(default_factory=list)
    skipped: int = 0
    errors: int = 0
    shadow_model: str | None = None
    shadow_windows: int = 0
    shadow_agree: int = 0
    shadow_errors: int = 0
    shadow_latency_ms: dict[str, int] | list[int] = field(default_factory=dict)
    shadow_labelled: int = 0
    shadow_correct: int = 0
    shadow_active_latency_ms: dict[str, int] | list[int] = field(default_factory=dict)
    outbox_dropped: int = 0
    imputed: int = 0
    incomplete: int = 0
    uncertain: int = 0
    alerts: dict[str, int] = field(default_factory=dict)
    drift: DriftSnapshot | None = None
    hard_examples: list[Example] = field(default_factory=list)
    hard_left_out: int = 0
    escalations: dict[str, int] = field(default_factory=dict)
    trigger_skipped: int = 0

    def to_bytes(self) -> bytes:
        fields = dict(self.__dict__)
        fields["ts"] = round(self.ts, 3)
        fields["drift"] = None if self.drift is None else _drift_wire(self.drift)
        fields["hard_examples"] = [e.to_wire() for e in self.hard_examples]
        return encode_telemetry(fields)

def _drift_wire(drift: DriftSnapshot) -> dict[str, Any]:
    """Drift on the wire: per-channel figures to 0.01 (training standard deviations), absent psi left out."""
    out: dict[str, Any] = {"n": drift.n, "mean_z": [round(v, 2) for v in drift.mean_z],
                           "std_ratio": [round(v, 2) for v in drift.std_ratio], "score": round(drift.score, 3)}
    if drift.psi is not None:
        out["psi"] = round(drift.psi, 4)
    return out


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
    trigger_skipped: int = 0
    """Windows the pipeline's trigger kept from the model (quiet: under its threshold)."""
    classes: dict[str, int] = field(default_factory=dict)
    alerts: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    confidence: list[int] = field(default_factory=lambda: [0] * CONFIDENCE_BINS)
    shadow_windows: int = 0
    shadow_agree: int = 0
    shadow_errors: int = 0
    shadow_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    shadow_labelled: int = 0
    shadow_correct: int = 0
    shadow_active_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
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
            self.correct += truth == predicted

    def record_alert(self, reason: str) -> None:
        self.alerts[reason] = self.alerts.get(reason, 0) + 1

    def record_shadow(self, predicted: str | None, latency_ms: float, truth: str | None = None,
                      active_ms: float | None = None) -> None:
        """The shadow candidate's answer on the window just recorded (None when it failed), the window's label
        (``truth``), and the active model's latency timed beside it on the same input (``active_ms``): the
        fair baseline of the shadow's latency."""
        if predicted is None:
            self.shadow_errors += 1
            return
        self.shadow_windows += 1
        self.shadow_agree += int(predicted == self._last_predicted)
        self.shadow_latency.add(latency_ms)
        if active_ms is not None:
            self.shadow_active_latency.add(active_ms)
        if truth is not None:
            self.shadow_labelled += 1
            self.shadow_correct += truth == predicted

    @property
    def empty(self) -> bool:
        return self.windows == 0 and self.errors == 0 and self.trigger_skipped == 0

    def batch(self, device: str, seq: int, ts: float, skipped: int, *, imputed: int = 0, incomplete: int = 0,
              drift: DriftSnapshot | None = None, hard_examples: list[Example] | None = None,
              hard_left_out: int = 0, escalations: dict[str, int] | None = None) -> TelemetryReport:
        return TelemetryReport(
            device=device, seq=seq, ts=ts, model=self.model, windows=self.windows, labelled=self.labelled,
            correct=self.correct, classes=self.classes, latency_ms=self.latency.to_wire(),
            confidence=self.confidence, skipped=skipped, errors=self.errors, shadow_model=self.shadow_model,
            shadow_windows=self.shadow_windows, shadow_agree=self.shadow_agree, shadow_errors=self.shadow_errors,
            shadow_latency_ms=self.shadow_latency.to_wire(), shadow_labelled=self.shadow_labelled,
            shadow_correct=self.shadow_correct, shadow_active_latency_ms=self.shadow_active_latency.to_wire(),
            imputed=imputed, incomplete=incomplete,
            uncertain=self.uncertain, alerts=self.alerts, drift=drift, hard_examples=hard_examples or [],
            hard_left_out=hard_left_out, escalations=escalations or {}, trigger_skipped=self.trigger_skipped)


@dataclass
class _Candidate:
    x: np.ndarray
    predicted: str
    confidence: float
    ts: float


class HardExampleSampler:
    """A uniform sample (reservoir, Algorithm R) of at most ``capacity`` hard windows per batch.

    Inputs are kept by reference (each window is a fresh array) and encoded only when the batch is taken (see
    :func:`encode_example`). Examples that would take the batch over ``max_bytes`` of encoded data, or the
    device over ``per_hour`` examples sent in the last hour (of the ``now`` given to :meth:`take`; None: no
    hourly limit), are left out and counted: ``left_out`` over the sampler's life, ``last_left_out`` in the
    latest batch.
    """

    def __init__(self, capacity: int = 2, max_bytes: int = 4096, seed: int | None = None, *,
                 per_hour: int | None = None, encoding: str = "i8") -> None:
        self.capacity = max(0, capacity)
        self.max_bytes = max(0, max_bytes)
        self.per_hour = None if per_hour is None else max(0, per_hour)
        self.encoding = encoding
        self.seen = 0
        self.left_out = 0
        self.last_left_out = 0
        self._kept: list[_Candidate] = []
        self._sent: collections.deque[float] = collections.deque()
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

    def take(self, now: float | None = None) -> list[Example]:
        """The encoded sample; the sampler starts again from empty. ``now``: seconds, for the hourly budget."""
        examples: list[Example] = []
        used = 0
        left_out = 0
        sent = self._sent
        if now is not None:
            while sent and sent[0] <= now - 3600.0:
                sent.popleft()
        for candidate in self._kept:
            if self.per_hour is not None and len(sent) >= self.per_hour:
                left_out += 1
                continue
            example = encode_example(candidate.x, candidate.predicted, candidate.confidence, candidate.ts,
                                     self.encoding)
            if used + len(example.data) > self.max_bytes:
                left_out += 1
                continue
            used += len(example.data)
            examples.append(example)
            sent.append(now if now is not None else 0.0)
        self.left_out += left_out
        self.last_left_out = left_out
        self._kept = []
        self.seen = 0
        return examples


class _Encoded(Protocol):
    @property
    def shape(self) -> list[int]: ...
    @property
    def encoding(self) -> str: ...
    @property
    def data(self) -> str: ...
    @property
    def scale(self) -> float | None: ...


def encode_example(x: np.ndarray, predicted: str, confidence: float, ts: float, encoding: str = "i8") -> Example:
    """One model input in base64: ``i8`` (int8 times one scale, max |x| / 127: about 0.4% of the largest value)
    or ``f16`` (float16), zlib-compressed when that is smaller."""
    scale: float | None = None
    if encoding == "i8":
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        scale = float(f"{peak / 127.0:.4g}") if peak > 0 and np.isfinite(peak) else 1.0
        raw = np.clip(np.rint(np.asarray(x, dtype=np.float32) / scale), -127, 127).astype(np.int8).tobytes()
    elif encoding == "f16":
        raw = np.ascontiguousarray(x, dtype="<f2").tobytes()
    else:
        raise ValueError(f"unknown hard example encoding {encoding!r}")
    packed = zlib.compress(raw, 9)
    compressed = len(packed) < len(raw)
    return Example(predicted=predicted, confidence=round(confidence, 3), shape=list(x.shape),
                   encoding=f"{encoding}+zlib" if compressed else encoding,
                   data=base64.b64encode(packed if compressed else raw).decode("ascii"), scale=scale,
                   ts=float(round(ts)))


def decode_example(example: _Encoded) -> np.ndarray:
    """The float32 array a hard example (``HardExample`` or :class:`Example`) carries."""
    kind, _, packing = example.encoding.partition("+")
    width = {"f16": 2, "i8": 1}.get(kind)
    if width is None or packing not in ("", "zlib"):
        raise ValueError(f"unknown hard example encoding {example.encoding!r}")
    expected = width * int(np.prod(example.shape))
    data = base64.b64decode(example.data)
    if packing == "zlib":
        data = zlib.decompressobj().decompress(data, expected)  # never inflate beyond what the shape holds
    if len(data) != expected:
        raise ValueError(f"hard example holds {len(data)} bytes, its shape {example.shape} needs {expected}")
    if kind == "f16":
        return np.frombuffer(data, dtype="<f2").astype(np.float32).reshape(example.shape)
    if example.scale is None:
        raise ValueError("an int8 hard example needs its scale")
    return (np.frombuffer(data, dtype=np.int8).astype(np.float32) * np.float32(example.scale)).reshape(example.shape)
