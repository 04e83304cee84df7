"""Simulated cohorts with known effects, looked at as a rollout or a monitor looks at them: the candidate and
the baseline grow by a few windows between looks and a gate is judged at every look. Shared by the statistics
tests and ``bench/bench_gates.py``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgefleet.core.cohorts import CohortStats, estimates
from edgefleet.core.gates import evaluate, parse_gate
from edgefleet.core.stats import Judge
from edgefleet.core.telemetry import FINE, LatencyHistogram, latency_bucket


@dataclass(frozen=True)
class Effect:
    """What the candidate does differently: accuracy lower by ``accuracy_drop`` (absolute), latency slower by
    the factor ``latency_factor``."""

    accuracy_drop: float = 0.0
    latency_factor: float = 1.0


@dataclass(frozen=True)
class Scenario:
    accuracy: float = 0.92
    latency_ms: float = 0.2
    latency_sigma: float = 0.25  # lognormal spread of one window's latency
    step: int = 10  # windows each cohort adds between two looks
    max_windows: int = 4000  # per cohort: the look budget


def _add_latencies(hist: LatencyHistogram, values: np.ndarray) -> None:
    for v in values.tolist():
        index = latency_bucket(v, FINE)
        hist.buckets[index] = hist.buckets.get(index, 0) + 1
    hist.count += len(values)


def first_trip(gate: str, effect: Effect, seed: int, *, scenario: Scenario = Scenario(),
               judge: Judge | None = None) -> int | None:
    """Windows per cohort at the first look where ``gate`` trips (None: never within the budget). ``judge``
    None: the naive rule of old, a trip whenever the point estimates cross the threshold (after 10 windows)."""
    parsed = parse_gate(gate)
    rng = np.random.default_rng(seed)
    least = judge.min_sample if judge is not None else 10
    rule = judge or Judge(min_sample=least)
    cohorts = [(CohortStats(devices=1, latency=LatencyHistogram(scale=FINE)), scenario.accuracy - effect.accuracy_drop,
                effect.latency_factor),
               (CohortStats(devices=1, latency=LatencyHistogram(scale=FINE)), scenario.accuracy, 1.0)]
    k = scenario.step
    n = 0
    while n < scenario.max_windows:
        n += k
        for cohort, accuracy, factor in cohorts:
            cohort.windows += k
            cohort.labelled += k
            cohort.correct += int(rng.binomial(k, accuracy))
            _add_latencies(cohort.latency, scenario.latency_ms * factor * rng.lognormal(0.0, scenario.latency_sigma, k))
        if n < least:
            continue
        values = estimates(cohorts[0][0], cohorts[1][0], rule)
        if judge is None:
            points = {m: None if e is None else e.value for m, e in values.items()}
            tripped = evaluate(parsed, points).outcome == "fail"
        else:
            tripped = evaluate(parsed, values).outcome == "fail"
        if tripped:
            return n
    return None
