"""The statistics behind gates and monitors (E14): intervals that cover, identical cohorts that do not trip at
the stated confidence however often they are looked at, and real regressions that trip within the documented
sample size (README, "Rollout modes"; bench/bench_gates.py measures the same on more seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgefleet.core.cohorts import CohortStats
from edgefleet.core.gates import evaluate, judge_cohorts, parse_gate
from edgefleet.core.stats import (
    Estimate,
    Judge,
    mixture_z,
    quantile,
    quantile_change,
    rate,
    rate_difference,
    wilson,
)
from edgefleet.core.telemetry import FINE, LatencyHistogram
from edgefleet.testing.cohort_sim import Effect, Scenario, first_trip

README_GATE = "accuracy_drop > 5% OR latency_increase > 20%"
SEQUENTIAL = Judge(0.95, 10, sequential=True)
# documented sample sizes (windows per cohort, looked at every 20 windows, sequential boundary at 95%):
ACCURACY_DROP_10PCT_WINDOWS = 3000  # accuracy_drop > 5% trips on a 10-point drop (accuracy 92% -> 82%)
LATENCY_30PCT_WINDOWS = 6000  # latency_increase > 20% trips on a candidate 30% slower (lognormal, sigma 0.25)


def histogram(values: np.ndarray) -> LatencyHistogram:
    hist = LatencyHistogram(scale=FINE)
    for v in values.tolist():
        hist.add(v)
    return hist


# -- intervals -----------------------------------------------------------------------------------------------
def test_wilson_intervals_stay_in_range_and_are_not_degenerate_at_zero() -> None:
    assert wilson(0, 50, 1.96)[0] == 0.0 and 0.0 < wilson(0, 50, 1.96)[1] < 0.1
    assert wilson(50, 50, 1.96)[1] == 1.0 and wilson(50, 50, 1.96)[0] > 0.9
    estimate = rate(9, 10, Judge())
    assert estimate.low < 0.9 < estimate.high and estimate.n == 10


def test_the_sequential_boundary_is_wider_than_one_look_and_grows_slowly() -> None:
    fixed = Judge(0.95).z(100)
    assert fixed == pytest.approx(1.96, abs=0.01)
    assert 2.5 < mixture_z(100, 0.05, 30) < 4.0
    assert mixture_z(100_000, 0.05, 30) < 1.5 * mixture_z(100, 0.05, 30)  # sqrt(log n): looks cost little
    with pytest.raises(ValueError):
        Judge(confidence=1.0)


@pytest.mark.parametrize("judge", [Judge(0.95), Judge(0.95, sequential=True)])
def test_intervals_cover_the_truth_at_least_as_often_as_stated(judge: Judge) -> None:
    rng = np.random.default_rng(7)
    misses = {"rate": 0, "difference": 0, "quantile": 0}
    trials = 300
    truth_q = math.exp(0.25 * 1.6449)  # p95 of lognormal(0, 0.25)
    for _ in range(trials):
        k1, k2 = int(rng.binomial(200, 0.9)), int(rng.binomial(300, 0.8))
        r = rate(k1, 200, judge)
        misses["rate"] += not r.low <= 0.9 <= r.high
        d = rate_difference(k1, 200, k2, 300, judge)
        misses["difference"] += not d.low <= 0.1 <= d.high
        q = quantile(histogram(rng.lognormal(0.0, 0.25, 300)).edges(), 0.95, judge)
        assert q is not None
        misses["quantile"] += not q.low <= truth_q <= q.high
    for name, missed in misses.items():
        assert missed / trials <= 0.05 + 0.03, (name, missed)  # 5% stated, binomial slack on 300 trials


def test_quantile_change_holds_the_bucket_error_and_the_truth() -> None:
    rng = np.random.default_rng(3)
    base = histogram(rng.lognormal(0.0, 0.25, 2000))
    slower = histogram(1.3 * rng.lognormal(0.0, 0.25, 2000))
    change = quantile_change(slower.edges(), base.edges(), 0.95, Judge())
    assert change is not None and change.low < 0.3 < change.high and change.low > 0.15
    same = quantile_change(base.edges(), base.edges(), 0.95, Judge())
    assert same is not None and same.value == 0.0 and same.low < 0.0 < same.high
    assert same.high - same.low >= 2 * base.relative_error  # never narrower than the buckets allow
    one_bucket = histogram(np.full(100, 2.0))
    assert quantile_change(one_bucket.edges(), histogram(np.full(100, 1.0)).edges(), 0.95, Judge()).low > 0.9  # type: ignore[union-attr]


def test_a_gate_trips_on_evidence_passes_on_the_estimate_and_waits_in_between() -> None:
    gate = parse_gate("accuracy_drop > 5%")
    assert evaluate(gate, {"accuracy_drop": Estimate(0.15, 0.08, 0.22, 400, 400)}).outcome == "fail"
    assert evaluate(gate, {"accuracy_drop": Estimate(0.01, -0.04, 0.07, 400, 400)}).outcome == "pass"
    waiting = evaluate(gate, {"accuracy_drop": Estimate(0.08, 0.01, 0.15, 40, 40)}, confidence=0.95)
    assert waiting.outcome == "inconclusive" and "95%" in waiting.explanation and "n=40 vs 40" in waiting.explanation
    # under NOT the roles swap: a NOT never turns a point estimate into a trip
    assert evaluate(parse_gate("NOT accuracy_drop <= 5%"),
                    {"accuracy_drop": Estimate(0.08, 0.01, 0.15, 40, 40)}).outcome == "inconclusive"
    # a clear failure beats an inconclusive part, an inconclusive part keeps an OR from passing
    both = {"accuracy_drop": Estimate(0.08, 0.01, 0.15, 40, 40), "error_rate": 0.5}
    assert evaluate(parse_gate("accuracy_drop > 5% OR error_rate > 10%"), both).outcome == "fail"
    assert evaluate(parse_gate("accuracy_drop > 5% OR error_rate > 90%"), both).outcome == "inconclusive"


def test_one_judging_call_serves_a_monitor_on_one_cohort() -> None:
    gate = parse_gate("accuracy < 90%")
    assert judge_cohorts(gate, CohortStats(devices=3, windows=500, labelled=500, correct=350)).outcome == "fail"
    assert judge_cohorts(gate, CohortStats(devices=3, windows=500, labelled=500, correct=480)).outcome == "pass"
    assert judge_cohorts(gate, CohortStats(devices=1, windows=12, labelled=12, correct=10)).outcome == "inconclusive"
    assert judge_cohorts(gate, CohortStats()).outcome == "unknown"


def test_pass_wording_says_what_was_decided() -> None:
    result = evaluate(parse_gate("shadow_disagreement > 10%"), {"shadow_disagreement": 0.0})
    assert result.explanation == "passed: shadow_disagreement=0%, not > 10%"


# -- error rates over many seeds -----------------------------------------------------------------------------
def test_identical_cohorts_do_not_trip_the_readme_gate_however_often_looked_at() -> None:
    scenario = Scenario(step=20, max_windows=1000)
    trips = sum(first_trip(README_GATE, Effect(), seed, judge=SEQUENTIAL, scenario=scenario) is not None
                for seed in range(100))
    naive = sum(first_trip(README_GATE, Effect(), seed, judge=None, scenario=scenario) is not None
                for seed in range(100))
    assert trips <= 1  # target: at most 1% false trips at the defaults
    assert naive >= 30  # the point-estimate rule of old trips on noise


@pytest.mark.parametrize("gate", ["accuracy_drop > 0%", "latency_p95_increase > 0%"])
def test_at_the_threshold_itself_false_trips_stay_within_the_stated_level(gate: str) -> None:
    """The hardest case: the truth sits exactly on the threshold. Looked at 50 times each, 200 identical pairs
    may trip at most as often as the one-sided error of 95% two-sided confidence (2.5%), plus slack."""
    scenario = Scenario(step=20, max_windows=1000)
    trips = sum(first_trip(gate, Effect(), seed, judge=SEQUENTIAL, scenario=scenario) is not None
                for seed in range(200))
    assert trips / 200 <= 0.025 + 0.025


@pytest.mark.parametrize(("gate", "effect", "budget"), [
    ("accuracy_drop > 5%", Effect(accuracy_drop=0.10), ACCURACY_DROP_10PCT_WINDOWS),
    ("latency_increase > 20%", Effect(latency_factor=1.3), LATENCY_30PCT_WINDOWS),
])
def test_a_real_regression_trips_within_the_documented_sample_size(gate: str, effect: Effect, budget: int) -> None:
    scenario = Scenario(step=50 if budget > 3000 else 20, max_windows=budget)
    found = [first_trip(gate, effect, seed, judge=SEQUENTIAL, scenario=scenario) for seed in range(30)]
    assert sum(n is not None for n in found) >= 27  # 90% of the cohorts within the documented windows
