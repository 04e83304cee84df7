"""Cohorts of fleet telemetry and the metrics judged on them, each an :class:`~edgefleet.core.stats.Estimate`.

A cohort is the summed telemetry of a group of devices for one model (or for a shadow candidate). The metrics
of the gate language compare a candidate cohort with a baseline cohort, or (for monitors) describe one cohort
alone; every one carries its sample size and an interval from :mod:`edgefleet.core.stats`. Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet.core.stats import Estimate, Judge, mean_difference, quantile, quantile_change, rate, rate_difference
from edgefleet.core.telemetry import CONFIDENCE_BINS, LatencyHistogram, add_bins

METRICS: dict[str, str] = {
    "install_failure_rate": "share of the wave's devices whose install failed or timed out (0..1)",
    "latency_p95_increase": "relative change of p95 latency, candidate vs baseline ((c - b) / b)",
    "confidence_drop": "mean top-class confidence, baseline minus candidate (absolute, 0..1)",
    "escalation_rate_increase": "escalations per window, candidate minus baseline (absolute)",
    "shadow_disagreement": "share of shadow windows whose class differed from the active model's",
    "accuracy_drop": "accuracy on labelled windows, baseline minus candidate (absolute, 0..1)",
    "error_rate": "share of the candidate's inference calls that failed",
    "latency_p95_ms": "the candidate's p95 latency in milliseconds",
    "accuracy": "the candidate's accuracy on labelled windows (0..1)",
    "drift_psi": "population stability index of the inputs against training, mean over samples (0: unchanged)",
    "drift_score": "largest per-channel input shift against training, in training stds, mean over samples",
    "silent_for": "monitors only: seconds since the quietest device last reported (15m, 30s, 2h)",
}
"""Every metric a gate (or a monitor) may name, with what it measures."""

ABSOLUTE = frozenset({"latency_p95_ms", "drift_psi", "drift_score", "silent_for"})
"""Metrics in their own unit; every other one is a fraction (shown as a percentage)."""


@dataclass
class CohortStats:
    """Telemetry of a group of devices for one model, summed; optional agent fields stay None if unreported.

    ``paired`` is only filled for a shadow cohort: the active model's latency timed beside the shadow on the
    same inputs (the fair baseline of the shadow's latency)."""

    devices: int = 0
    windows: int = 0
    labelled: int = 0
    correct: int = 0
    errors: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    confidence: list[int] = field(default_factory=list)
    escalations: int | None = None
    shadow_windows: int | None = None
    shadow_agree: int | None = None
    paired: LatencyHistogram = field(default_factory=LatencyHistogram)
    drift_n: int = 0
    drift_psi_sum: float = 0.0
    drift_psi_n: int = 0
    drift_score_sum: float = 0.0

    def add(self, other: CohortStats) -> None:
        """Add another cohort (or one device's stats) into this one."""
        self.devices += other.devices
        self.windows += other.windows
        self.labelled += other.labelled
        self.correct += other.correct
        self.errors += other.errors
        self.latency.merge(other.latency)
        self.paired.merge(other.paired)
        self.confidence = add_bins(self.confidence, other.confidence)
        self.escalations = _add_optional(self.escalations, other.escalations)
        self.shadow_windows = _add_optional(self.shadow_windows, other.shadow_windows)
        self.shadow_agree = _add_optional(self.shadow_agree, other.shadow_agree)
        self.drift_n += other.drift_n
        self.drift_psi_sum += other.drift_psi_sum
        self.drift_psi_n += other.drift_psi_n
        self.drift_score_sum += other.drift_score_sum

    def add_batch(self, payload: Mapping[str, Any], *, shadow: bool = False) -> None:
        """Add one telemetry batch (its JSON form); reads optional fields defensively.

        With ``shadow`` the batch's shadow figures are the ones counted (the candidate ran beside).
        """
        if shadow:
            self.windows += _int(payload.get("shadow_windows"))
            self.errors += _int(payload.get("shadow_errors"))
            self.labelled += _int(payload.get("shadow_labelled"))
            self.correct += _int(payload.get("shadow_correct"))
            self.latency.merge(_histogram(payload.get("shadow_latency_ms")))
            self.paired.merge(_histogram(payload.get("shadow_active_latency_ms")))
            self.shadow_windows = _add_optional(self.shadow_windows, _opt_int(payload.get("shadow_windows")))
            self.shadow_agree = _add_optional(self.shadow_agree, _opt_int(payload.get("shadow_agree")))
            return
        self.windows += _int(payload.get("windows"))
        self.labelled += _int(payload.get("labelled"))
        self.correct += _int(payload.get("correct"))
        self.errors += _int(payload.get("errors"))
        self.latency.merge(_histogram(payload.get("latency_ms")))
        bins = payload.get("confidence")
        if isinstance(bins, list):
            self.confidence = add_bins(self.confidence, [_int(b) for b in bins])
        self.escalations = _add_optional(self.escalations, _escalated(payload.get("escalations")))
        self._add_drift(payload.get("drift"))

    def _add_drift(self, drift: object) -> None:
        """A batch's drift statistics, weighted by the samples they cover."""
        if not isinstance(drift, Mapping) or not _int(drift.get("n")):
            return
        n = _int(drift.get("n"))
        score, psi = drift.get("score"), drift.get("psi")
        if isinstance(score, int | float) and math.isfinite(score):
            self.drift_n += n
            self.drift_score_sum += float(score) * n
        if isinstance(psi, int | float) and math.isfinite(psi):
            self.drift_psi_n += n
            self.drift_psi_sum += float(psi) * n

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def shadow_agreement(self) -> float | None:
        """Share of shadow windows where the shadow agreed with the active model."""
        if not self.shadow_windows or self.shadow_agree is None:
            return None
        return self.shadow_agree / self.shadow_windows

    @property
    def mean_confidence(self) -> float | None:
        moments = self._confidence_moments()
        return None if moments is None else moments[0]

    def _confidence_moments(self) -> tuple[float, float, int] | None:
        """Mean, variance and count of the top-class confidence, from its bins (each at its middle)."""
        total = sum(self.confidence)
        if not total:
            return None
        width = 1.0 / max(len(self.confidence), CONFIDENCE_BINS)
        mean = sum(n * (i + 0.5) * width for i, n in enumerate(self.confidence)) / total
        var = sum(n * ((i + 0.5) * width - mean) ** 2 for i, n in enumerate(self.confidence)) / max(total - 1, 1)
        return mean, var, total

    def to_json(self) -> dict[str, Any]:
        return {"devices": self.devices, "windows": self.windows, "labelled": self.labelled, "correct": self.correct,
                "accuracy": self.accuracy, "errors": self.errors, "latency_p95_ms": self.latency.quantile(0.95),
                "mean_confidence": self.mean_confidence, "escalations": self.escalations,
                "shadow_windows": self.shadow_windows, "shadow_agree": self.shadow_agree,
                "shadow_agreement": self.shadow_agreement}


def estimates(candidate: CohortStats, baseline: CohortStats, judge: Judge, *, installs_done: int = 0,
              installs_failed: int = 0) -> dict[str, Estimate | None]:
    """Every metric with its interval for a candidate cohort against its baseline; None where data is missing
    or a cohort has fewer than ``judge.min_sample`` observations (too few to judge).

    A shadow cohort's latency is compared with the active model's latency timed beside it (``paired``) when
    the agents report it, not with the active model's own (differently warmed) timings."""
    least = max(judge.min_sample, 1)
    out: dict[str, Estimate | None] = dict.fromkeys(METRICS)
    finished = installs_done + installs_failed
    if finished:
        out["install_failure_rate"] = Estimate.exact(installs_failed / finished, finished)
    c_hist = candidate.latency
    b_hist = candidate.paired if candidate.paired.count else baseline.latency
    if c_hist.count >= least:
        out["latency_p95_ms"] = quantile(c_hist.edges(), 0.95, judge)
        if b_hist.count >= least:
            out["latency_p95_increase"] = quantile_change(c_hist.edges(), b_hist.edges(), 0.95, judge)
    enough = candidate.windows >= least and baseline.windows >= least
    conf_c, conf_b = candidate._confidence_moments(), baseline._confidence_moments()
    if enough and conf_c is not None and conf_b is not None:
        out["confidence_drop"] = mean_difference(conf_b[0], conf_b[1], conf_b[2], conf_c[0], conf_c[1], conf_c[2],
                                                 judge)
        out["confidence_drop"] = _swap_sizes(out["confidence_drop"])
    if enough and candidate.escalations is not None and baseline.escalations is not None:
        out["escalation_rate_increase"] = rate_difference(candidate.escalations, candidate.windows,
                                                          baseline.escalations, baseline.windows, judge)
    if candidate.shadow_windows and candidate.shadow_windows >= least and candidate.shadow_agree is not None:
        out["shadow_disagreement"] = rate(candidate.shadow_windows - candidate.shadow_agree,
                                          candidate.shadow_windows, judge)
    if candidate.labelled >= least:
        out["accuracy"] = rate(candidate.correct, candidate.labelled, judge)
        if baseline.labelled >= least:
            out["accuracy_drop"] = rate_difference(baseline.correct, baseline.labelled, candidate.correct,
                                                   candidate.labelled, judge)
            out["accuracy_drop"] = _swap_sizes(out["accuracy_drop"])
    if candidate.drift_psi_n:
        out["drift_psi"] = Estimate.exact(candidate.drift_psi_sum / candidate.drift_psi_n, candidate.drift_psi_n)
    if candidate.drift_n:
        out["drift_score"] = Estimate.exact(candidate.drift_score_sum / candidate.drift_n, candidate.drift_n)
    calls = candidate.windows + candidate.errors
    if calls >= least:
        out["error_rate"] = rate(candidate.errors, calls, judge)
    return out


def metrics(candidate: CohortStats, baseline: CohortStats, *, installs_done: int = 0, installs_failed: int = 0,
            min_windows: int = 1) -> dict[str, float | None]:
    """Every metric's point value for a candidate cohort against its baseline; None where data is missing."""
    found = estimates(candidate, baseline, Judge(min_sample=min_windows), installs_done=installs_done,
                      installs_failed=installs_failed)
    return {name: None if e is None else e.value for name, e in found.items()}


def _swap_sizes(estimate: Estimate | None) -> Estimate | None:
    """A baseline-minus-candidate estimate built baseline first: put the candidate's size first again."""
    if estimate is None or estimate.n_baseline is None:
        return estimate
    return Estimate(estimate.value, estimate.low, estimate.high, estimate.n_baseline, estimate.n)


def _add_optional(a: int | None, b: int | None) -> int | None:
    return b if a is None else (a if b is None else a + b)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _escalated(value: object) -> int | None:
    """Windows sent upstream: a count, or the agent's counter mapping (its ``sent`` entry)."""
    if isinstance(value, Mapping):
        return _int(value.get("sent", 0))
    return _opt_int(value)


def _histogram(value: object) -> LatencyHistogram:
    """A stored or wire histogram (either form, see ``LatencyHistogram.to_wire``); empty when malformed."""
    try:
        if isinstance(value, list):
            return LatencyHistogram.from_wire(value)
        if isinstance(value, Mapping):
            return LatencyHistogram.from_json({str(k): int(v) for k, v in value.items()})
    except (TypeError, ValueError):
        pass
    return LatencyHistogram()


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
