"""The per-model inference pipeline: preprocess a reading stream, infer on each window, post-process, count.

One pipeline serves one active model (and optionally a shadow candidate that only reports). The agent builds a
new pipeline when the active model changes and takes a telemetry batch from it every interval.

Post-processing follows the manifest's ``thresholds`` (all optional):

    min_confidence           a window under it is counted ``uncertain`` and raises no class alert
    alert:<label>            alert when <label> is predicted with at least this confidence
    anomaly_score            alert when the window's anomaly score reaches this: the model's output when it
                             emits one value per window (an anomaly detector), otherwise the RMS of the scaled
                             window (input energy in training standard deviations, about 1 on training data)
    escalate_below           a window is hard when its confidence is under this (default 0.6) ...
    escalate_margin_below    ... or its top-two probability margin is under this ...
    escalate_entropy_above   ... or its normalized entropy (0 to 1) is over this

Hard windows feed the hard-example sample and, with an escalator (tiered inference), go upstream; an upstream
answer that comes in time is the window's decision. Telemetry describes the local model's behaviour (its
classes, confidence and latency); alerts follow the decision. Alerts are counted per window and reported as
events at most once per ``alert_cooldown_s`` per reason: drain them with :meth:`InferencePipeline.take_alerts`.

A time-series pipeline with a ``trigger`` (runtime.trigger) runs the model only on the windows that fire; the
others are counted (``trigger_skipped``) and give no outcome. With a ``sink`` (agent.local_action) every outcome
and every alert event is also handed to it as it happens, for a consumer on the device itself.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from edgefleet.agent.model import LoadedModel
from edgefleet.agent.sources import NO_LABEL, Block, Reading, SensorSource
from edgefleet.agent.stats import HardExampleSampler, TelemetryReport, WindowStats
from edgefleet.core.drift import DriftTracker, Reference
from edgefleet.errors import ModelError
from edgefleet.runtime.inputs import InputStep, VectorInput
from edgefleet.runtime.outputs import AnomalyScore
from edgefleet.runtime.preprocess import StreamWindower, Window
from edgefleet.runtime.trigger import TriggerGate

if TYPE_CHECKING:
    from edgefleet.agent.escalation import Escalator

log = logging.getLogger(__name__)

DEFAULT_HARD_BELOW = 0.6
AlertDetail = dict[str, str | int | float | None]


class Outcome(NamedTuple):
    """What happened to one window: a prediction (local, or upstream's when it came in time), or a failure."""

    predicted: str | None
    confidence: float
    latency_ms: float
    failed: bool = False
    upstream: bool = False
    alert: str | None = None


class OutcomeSink(Protocol):
    """Where each window's outcome and each alert event go as they happen (agent.local_action); neither call
    may block the sensor loop."""

    def outcome(self, model: str, outcome: Outcome) -> None: ...

    def alert(self, detail: AlertDetail) -> None: ...


@dataclass(frozen=True)
class PipelineOptions:
    """Agent-side knobs of post-processing and edge filtering."""

    hard_examples: int = 1
    """Hard (low-confidence) model inputs sampled per telemetry batch: each costs about its input's size in
    bytes (int8), base64, less what zlib saves: about 300 B for the demo's model ([1, 6, 40])."""
    hard_example_bytes: int = 4096
    """Encoded bytes of hard examples one batch may carry at most."""
    hard_examples_per_hour: int | None = 2
    """Hard examples sent per hour at most (None: no hourly limit); those left out are counted in the batch's
    ``hard_left_out``."""
    hard_example_encoding: str = "i8"
    """``i8`` (int8 with one scale) or ``f16`` (float16)."""
    alert_cooldown_s: float = 60.0
    clock: Callable[[], float] = time.monotonic


@dataclass(frozen=True)
class Thresholds:
    """The manifest's post-processing thresholds, parsed (see the module docstring)."""

    min_confidence: float | None = None
    class_alerts: Mapping[str, float] = field(default_factory=dict)
    anomaly_score: float | None = None
    hard_below: float = DEFAULT_HARD_BELOW
    margin_below: float | None = None
    entropy_above: float | None = None

    @classmethod
    def from_manifest(cls, thresholds: Mapping[str, float], escalate_below: float | None = None) -> Thresholds:
        return cls(min_confidence=thresholds.get("min_confidence"),
                   class_alerts={k[len("alert:"):]: v for k, v in thresholds.items() if k.startswith("alert:")},
                   anomaly_score=thresholds.get("anomaly_score"),
                   hard_below=escalate_below if escalate_below is not None
                   else thresholds.get("escalate_below", DEFAULT_HARD_BELOW),
                   margin_below=thresholds.get("escalate_margin_below"),
                   entropy_above=thresholds.get("escalate_entropy_above"))

    def is_hard(self, confidence: float, probs: np.ndarray) -> bool:
        if confidence < self.hard_below:
            return True
        if self.margin_below is not None and len(probs) > 1:
            top_two = np.partition(probs, len(probs) - 2)[-2:]
            if float(top_two[1] - top_two[0]) < self.margin_below:
                return True
        if self.entropy_above is not None and len(probs) > 1:
            p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
            if float(-(p * np.log(p)).sum() / math.log(len(p))) > self.entropy_above:
                return True
        return False


class InferencePipeline:
    """Windows -> model -> labels, alerts, statistics; for one active model and an optional shadow."""

    def __init__(self, model: LoadedModel, source_labels: tuple[str, ...] = (),
                 shadow: LoadedModel | None = None, *, escalator: Escalator | None = None,
                 source: SensorSource | None = None, options: PipelineOptions = PipelineOptions(),
                 sink: OutcomeSink | None = None) -> None:
        """``source``: the stream this pipeline reads; its labels name the truth and it is told whether to pass
        readings with missing values on (when the model's preprocessing imputes them). ``sink``: where every
        outcome and alert event is handed as it happens (None: nowhere)."""
        self.model = model
        self.shadow = shadow
        self.escalator = escalator
        self.options = options
        self._truth_names = source_labels or (source.labels if source else ()) or tuple(model.manifest.labels)
        self._input = model.pipeline.inputs
        window = model.window
        self._windower = StreamWindower(window) if window is not None else None
        self._rows = RowFeeder(self._input) if window is None else None
        self._shape = (window.channels,) if window is not None else None
        self._imputes = window is not None and window.imputes
        self._window_push = self._windower.push if self._windower is not None else None
        self._gate = TriggerGate(window.trigger, window.std) if window is not None and window.trigger else None
        self._sink = sink
        self._labels = list(model.manifest.labels)
        self.thresholds = Thresholds.from_manifest(model.manifest.thresholds,
                                                   escalator.escalate_below if escalator else None)
        self._run = model.score
        self._classifies = model.pipeline.outputs.classifies
        self._anomaly_output = isinstance(model.pipeline.outputs, AnomalyScore)
        self._hard_below = self.thresholds.hard_below
        self._hard_extra = self.thresholds.margin_below is not None or self.thresholds.entropy_above is not None
        self._alerting = bool(self.thresholds.class_alerts) or self.thresholds.anomaly_score is not None
        drift_channels = window.channels if window is not None else self._rows.drift_channels if self._rows else 0
        self._drift = DriftTracker(drift_channels, Reference.from_spec(
            model.manifest.preprocess.get("drift_reference"), drift_channels)) if drift_channels else None
        self._hard = HardExampleSampler(options.hard_examples, options.hard_example_bytes,
                                        per_hour=options.hard_examples_per_hour,
                                        encoding=options.hard_example_encoding)
        self.stats = WindowStats(model.ref, shadow_model=shadow.ref if shadow else None)
        self.skipped = 0
        self.alerts: list[AlertDetail] = []
        """Alert events not yet sent: drain with :meth:`take_alerts`."""
        self._alert_last: dict[str, float] = {}
        self._alert_since: dict[str, int] = {}
        self._reported_imputed = 0
        self._reported_incomplete = 0
        if source is not None:
            source.allow_missing = self.imputes

    @property
    def imputes(self) -> bool:
        """Whether the model's preprocessing fills in missing values (the source should pass them on)."""
        return self._imputes

    def push(self, reading: Reading) -> Outcome | None:
        """Feed one reading; returns the outcome when it completed a window."""
        values = reading.values
        missing = reading.missing
        if self._window_push is None:  # one reading, one model input
            labels = None if reading.label is None else np.array([reading.label], dtype=np.int64)
            outcomes = self._push_rows(values[np.newaxis], labels, np.ones(1, dtype=bool) if missing else None)
            return outcomes[0] if outcomes else None
        if values.shape != self._shape or (missing and not self._imputes):
            self.skipped += 1
            return None
        window = self._window_push(values, reading.label, missing)
        if window is None or (self._gate is not None and not self._fires(window, True)):
            return None
        outcome = self._infer(window)
        if self._sink is not None:
            self._sink.outcome(self.model.ref, outcome)
        return outcome


    def push_block(self, block: Block) -> list[Outcome]:
        """Feed consecutive readings at once; the outcomes of the windows they completed, in order."""
        values, labels, missing = block.values, block.labels, block.missing
        if self._rows is not None:
            return self._push_rows(values, labels, missing)
        if values.shape[1:] != self._shape:
            self.skipped += len(values)
            return []
        if missing is not None and not self._imputes:
            keep = ~missing
            self.skipped += len(values) - int(keep.sum())
            values, labels, missing = values[keep], None if labels is None else labels[keep], None
        windower = self._windower
        assert windower is not None
        windows = windower.push_block(values, labels, missing, NO_LABEL)
        if not windows:
            return []
        infer = self._infer
        fresh = windower.block_fresh
        drift = fresh is None or self._drift is None
        if not drift:
            assert self._drift is not None and fresh is not None
            self._drift.update(fresh)  # the block's new samples at once (copied: no window is kept for drift)
        if self._gate is not None:
            windows = [window for window in windows if self._fires(window, drift)]
        outcomes = [infer(window, drift) for window in windows]
        if self._sink is not None:
            self._deliver(outcomes)
        return outcomes

    def _push_rows(self, values: np.ndarray, labels: np.ndarray | None,
                   missing: np.ndarray | None) -> list[Outcome]:
        """Images, vectors and tensors: every reading is one model input."""
        rows = self._rows
        assert rows is not None
        if not self._input.accepts(tuple(values.shape[1:])):
            self.skipped += len(values)
            return []
        if missing is not None:  # nothing fills in a missing pixel or feature: skip those readings
            keep = ~missing
            self.skipped += len(values) - int(keep.sum())
            values, labels = values[keep], None if labels is None else labels[keep]
        windows = rows.windows(values, labels)
        infer = self._infer
        outcomes = [infer(window) for window in windows]
        if self._sink is not None:
            self._deliver(outcomes)
        return outcomes

    def _fires(self, window: Window, drift: bool) -> bool:
        """Whether the trigger lets the model run on ``window``; a window it holds back is counted and still
        feeds drift (``drift``: per window, as :meth:`_infer` would)."""
        assert self._gate is not None and window.samples is not None
        if self._gate.fires(window.samples):
            return True
        self.stats.trigger_skipped += 1
        if drift and window.fresh and self._drift is not None:
            self._drift.update_window(window.samples, window.fresh)
        return False

    def _deliver(self, outcomes: list[Outcome]) -> None:
        sink, ref = self._sink, self.model.ref
        assert sink is not None
        for outcome in outcomes:
            sink.outcome(ref, outcome)

    def take_alerts(self) -> list[AlertDetail]:
        """The alert events raised since the last call, for ``Agent.event("alert", detail)``."""
        alerts, self.alerts = self.alerts, []
        return alerts

    def take_batch(self, device: str, seq: int, ts: float, skipped_by_source: int) -> TelemetryReport:
        """The statistics since the previous batch; the counters start again from zero. ``ts``: seconds since
        the epoch (it also paces the hourly hard-example budget)."""
        imputed, dropped = self._filled()
        hard = self._hard.take(ts)
        batch = self.stats.batch(
            device, seq, ts, skipped_by_source + self.skipped,
            imputed=imputed - self._reported_imputed,
            incomplete=dropped - self._reported_incomplete,
            drift=self._drift.snapshot() if self._drift is not None else None, hard_examples=hard,
            hard_left_out=self._hard.last_left_out,
            escalations=self.escalator.take_counts() if self.escalator else None)
        self._reported_imputed, self._reported_incomplete = imputed, dropped
        self.stats = WindowStats(self.model.ref, shadow_model=self.shadow.ref if self.shadow else None)
        if self._drift is not None:
            self._drift.reset()
        self.skipped = 0
        return batch

    def _filled(self) -> tuple[int, int]:
        """Values imputed and windows dropped as incomplete, over the pipeline's life."""
        windower = self._windower
        return (windower.imputed, windower.dropped) if windower is not None else (0, 0)

    @property
    def has_data(self) -> bool:
        return (not self.stats.empty or self.skipped > 0 or self._filled()[1] != self._reported_incomplete
                or bool(self.stats.alerts))

    # one window ---------------------------------------------------------------------------------
    def _infer(self, window: Window, drift: bool = True) -> Outcome:
        x = window.x
        if drift and window.fresh and window.samples is not None and self._drift is not None:
            self._drift.update_window(window.samples, window.fresh)
        clock = time.perf_counter
        started = clock()
        try:
            output = self._run(x)
        except ModelError as exc:
            log.warning("inference failed on %s: %s", self.model.ref, exc)
            self.stats.errors += 1
            return Outcome(None, 0.0, (clock() - started) * 1000.0, failed=True)
        latency_ms = (clock() - started) * 1000.0
        probs = output[0]
        best, top, finite = _top(probs)
        if not finite:
            self.stats.errors += 1
            return Outcome(None, 0.0, latency_ms, failed=True)
        thresholds = self.thresholds
        score: float | None = None
        if not self._classifies and not self._anomaly_output:  # regression: the value, no classes
            self.stats.record("value", 1.0, latency_ms, None)
            return Outcome("value", 1.0, latency_ms)
        if probs.size == 1:  # an anomaly detector: its output is the score
            anomalous = thresholds.anomaly_score is not None and top >= thresholds.anomaly_score
            score = top
            predicted, confidence, hard = ("anomaly" if anomalous else "normal"), 1.0, False
        else:
            labels = self._labels
            predicted = labels[best] if best < len(labels) else str(best)
            confidence = top
            hard = confidence < self._hard_below or (self._hard_extra and thresholds.is_hard(confidence, probs))
        label = window.label
        truth = self._truth_names[label] if label is not None and 0 <= label < len(self._truth_names) else None
        stats = self.stats
        stats.record(predicted, confidence, latency_ms, truth)
        min_confidence = thresholds.min_confidence
        if min_confidence is not None and confidence < min_confidence:
            stats.uncertain += 1
        if not (hard or self.shadow is not None or self._alerting):  # the common case: nothing more to do
            return Outcome(predicted, confidence, latency_ms)
        decision, decided_confidence, upstream = predicted, confidence, False
        if hard:
            self._hard.offer(x, predicted, confidence, time.time())
            if self.escalator is not None:
                answer = self.escalator.resolve(x, self.model.ref, predicted, confidence)
                if answer is not None:
                    decision, decided_confidence, upstream = answer.label, answer.confidence, True
        if self.shadow is not None:
            self._run_shadow(x, truth)
        alert = self._check_alert(window, decision, decided_confidence, score) if self._alerting else None
        return Outcome(decision, decided_confidence, latency_ms, upstream=upstream, alert=alert)

    def _check_alert(self, window: Window, decision: str, confidence: float, score: float | None) -> str | None:
        thresholds = self.thresholds
        if not thresholds.class_alerts and thresholds.anomaly_score is None:
            return None
        reason: str | None = None
        limit: float | None = None
        if thresholds.class_alerts:
            limit = thresholds.class_alerts.get(decision)
            floor = max(limit, thresholds.min_confidence or 0.0) if limit is not None else None
            if floor is not None and confidence >= floor:
                reason = f"class:{decision}"
        if reason is None and thresholds.anomaly_score is not None:
            if score is None and window.samples is not None:
                samples = window.samples
                score = math.sqrt(float(np.vdot(samples, samples)) / samples.size)
            if score is not None and score >= thresholds.anomaly_score:
                reason, limit = "anomaly_score", thresholds.anomaly_score
        if reason is None:
            return None
        self.stats.record_alert(reason)
        self._alert_since[reason] = self._alert_since.get(reason, 0) + 1
        now = self.options.clock()
        last = self._alert_last.get(reason)
        if last is None or now - last >= self.options.alert_cooldown_s:
            self._alert_last[reason] = now
            detail: AlertDetail = {"reason": reason, "model": self.model.ref, "label": decision,
                                   "confidence": round(confidence, 4),
                                   "score": None if score is None else round(score, 4),
                                   "threshold": limit, "windows": self._alert_since.pop(reason)}
            self.alerts.append(detail)
            if self._sink is not None:
                self._sink.alert(detail)
        return reason

    def _run_shadow(self, x: np.ndarray, truth: str | None = None) -> None:
        """Run the shadow on the window (its answer counts for agreement and accuracy), then time both models
        fairly on the same input: after that first (warming) run of the shadow, as the window's main run warmed
        the active model, each runs twice in alternating order, active-shadow-shadow-active, so neither holds a
        favoured position, and the lesser of its two times is kept, which filters out the scheduler and other
        threads. The active model's time here is the shadow's baseline (``shadow_active_latency_ms``): an
        identical shadow measures ~0% latency change. Cost: three more runs of the shadow and two of the active
        model per window, while a shadow is evaluated."""
        assert self.shadow is not None
        clock = time.perf_counter
        shadow_score, active_score = self.shadow.score, self._run
        try:
            probs = shadow_score(x)[0]
            timed = []
            for run in (active_score, shadow_score, shadow_score, active_score):  # ABBA: no position favours one
                started = clock()
                run(x)
                timed.append((clock() - started) * 1000.0)
            active_ms: float | None = min(timed[0], timed[3])  # the least of two: interference filtered out
            latency_ms = min(timed[1], timed[2])
        except ModelError as exc:
            log.warning("shadow inference failed on %s: %s", self.shadow.ref, exc)
            self.stats.record_shadow(None, 0.0)
            return
        if not np.all(np.isfinite(probs)):
            self.stats.record_shadow(None, latency_ms)
            return
        best = int(probs.argmax())
        labels = self.shadow.manifest.labels
        self.stats.record_shadow(labels[best] if best < len(labels) else str(best), latency_ms, truth, active_ms)


def _top(scores: np.ndarray) -> tuple[int, float, bool]:
    """Index and value of the largest score, and whether every score is finite (pure Python for short outputs)."""
    if scores.size <= 64:
        values = scores.ravel().tolist()
        if not math.isfinite(sum(values)):  # a NaN or an infinity anywhere
            return 0, math.nan, False
        top = max(values)
        return values.index(top), top, True
    best = int(scores.argmax())
    return best, float(scores.ravel()[best]), bool(np.isfinite(scores).all())


class RowFeeder:
    """Readings that are whole model inputs (images, vectors, tensors) -> one :class:`Window` each, the block
    transformed by the input step in one pass. Vectors with training statistics feed drift per feature."""

    def __init__(self, step: InputStep) -> None:
        self.step = step
        self.drift_channels = step.features if isinstance(step, VectorInput) and step.mean is not None else 0

    def windows(self, values: np.ndarray, labels: np.ndarray | None) -> list[Window]:
        if not len(values):
            return []
        x = self.step.apply(values)
        label_list = [None if v == NO_LABEL else int(v) for v in labels.tolist()] if labels is not None \
            else [None] * len(values)
        drift = self.drift_channels
        return [Window(x[i : i + 1], label_list[i], x[i].reshape(-1, 1).astype(np.float32, copy=False)
                       if drift else None, 1 if drift else 0, 0) for i in range(len(x))]
