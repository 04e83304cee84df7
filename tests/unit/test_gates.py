"""Gate expressions: parsing (every operator, precedence, errors), three-valued evaluation, metrics."""

from __future__ import annotations

import itertools

import pytest

from edgefleet.core.gates import (
    ALIASES,
    METRICS,
    CohortStats,
    Compare,
    evaluate,
    metrics,
    parse_gate,
)
from edgefleet.core.telemetry import CONFIDENCE_BINS, LatencyHistogram
from edgefleet.errors import ConfigError


def outcome(text: str, **values: float | None) -> str:
    return evaluate(parse_gate(text), values).outcome


# -- parsing -------------------------------------------------------------------------------------------------
def test_percent_literals_are_fractions_and_aliases_resolve() -> None:
    gate = parse_gate("accuracy_drop > 5% OR latency_increase > 20%")
    assert gate.metrics == {"accuracy_drop", "latency_p95_increase"}
    assert outcome("accuracy_drop > 5%", accuracy_drop=0.051) == "fail"
    assert outcome("accuracy_drop > 5%", accuracy_drop=0.05) == "pass"
    assert outcome("accuracy_drop > 0.05", accuracy_drop=0.06) == "fail"
    assert outcome("latency_p95_ms >= 12.5", latency_p95_ms=12.5) == "fail"


@pytest.mark.parametrize(("op", "left", "expected"), [
    (">", 0.2, True), (">", 0.1, False), (">=", 0.1, True), ("<", 0.05, True), ("<", 0.1, False),
    ("<=", 0.1, True), ("==", 0.1, True), ("==", 0.2, False), ("!=", 0.2, True), ("!=", 0.1, False),
])
def test_every_comparison(op: str, left: float, expected: bool) -> None:
    assert outcome(f"confidence_drop {op} 10%", confidence_drop=left) == ("fail" if expected else "pass")


def test_number_on_the_left_and_case_insensitive_keywords() -> None:
    assert outcome("5% < accuracy_drop", accuracy_drop=0.1) == "fail"
    assert outcome("accuracy_drop > 5% or not error_rate < 1%", accuracy_drop=0.0, error_rate=0.5) == "fail"
    assert outcome("ACCURACY_DROP > 5%", accuracy_drop=0.1) == "fail"


def test_and_binds_tighter_than_or_and_parentheses_override() -> None:
    v = {"accuracy_drop": 0.1, "error_rate": 0.0, "confidence_drop": 0.0}
    # a OR (b AND c): true through a
    assert evaluate(parse_gate("accuracy_drop > 5% OR error_rate > 1% AND confidence_drop > 1%"), v).outcome \
        == "fail"
    # (a OR b) AND c: false through c
    assert evaluate(parse_gate("(accuracy_drop > 5% OR error_rate > 1%) AND confidence_drop > 1%"), v).outcome \
        == "pass"
    assert evaluate(parse_gate("NOT NOT (accuracy_drop > 5%)"), v).outcome == "fail"
    tree = parse_gate("((error_rate > 1%))").tree
    assert isinstance(tree, Compare)


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("   ", "empty"),
    ("accuracy_fall > 5%", "unknown metric 'accuracy_fall'"),
    ("accuracy_drop >", "unexpected end"),
    ("accuracy_drop 5%", "expected a comparison"),
    ("(accuracy_drop > 5%", "missing ')'"),
    ("accuracy_drop > 5%)", "unexpected ')'"),
    ("accuracy_drop > 5% AND", "unexpected end"),
    ("5% > 3%", "compares no metric"),
    ("accuracy_drop > 5% $", "cannot read"),
    ("accuracy_drop > OR", "expected a metric or a number"),
    ("accuracy_drop = 5%", "cannot read"),
    ("x" * 3000, "longer than"),
])
def test_bad_expressions_are_config_errors_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        parse_gate(text)


def test_unknown_metric_error_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_gate("speed > 1")
    for name in [*METRICS, *ALIASES]:
        assert name in str(info.value)


def test_every_metric_and_alias_parses() -> None:
    for name in [*METRICS, *ALIASES]:
        assert parse_gate(f"{name} > 1%").metrics <= set(METRICS)


# -- three-valued logic --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("a", "b"), list(itertools.product([True, False, None], repeat=2)))
def test_kleene_truth_tables(a: bool | None, b: bool | None) -> None:
    def val(x: bool | None) -> float | None:
        return None if x is None else (1.0 if x else 0.0)

    values = {"accuracy_drop": val(a), "error_rate": val(b)}

    def kleene_or(x: bool | None, y: bool | None) -> bool | None:
        if x is True or y is True:
            return True
        return None if x is None or y is None else False

    def kleene_and(x: bool | None, y: bool | None) -> bool | None:
        if x is False or y is False:
            return False
        return None if x is None or y is None else True

    def expected(x: bool | None) -> str:
        return "unknown" if x is None else ("fail" if x else "pass")

    assert evaluate(parse_gate("accuracy_drop > 0.5 OR error_rate > 0.5"), values).outcome == expected(
        kleene_or(a, b))
    assert evaluate(parse_gate("accuracy_drop > 0.5 AND error_rate > 0.5"), values).outcome == expected(
        kleene_and(a, b))
    assert evaluate(parse_gate("NOT accuracy_drop > 0.5"), values).outcome == expected(
        None if a is None else not a)


def test_unavailable_metric_cannot_pass_and_the_explanation_says_which() -> None:
    result = evaluate(parse_gate("accuracy_drop > 5% OR latency_increase > 20%"),
                      {"latency_p95_increase": 0.01})
    assert result.outcome == "unknown"
    assert result.missing == ("accuracy_drop",)
    assert "accuracy_drop" in result.explanation and "cannot pass yet" in result.explanation
    assert result.values == {"accuracy_drop": None, "latency_p95_increase": 0.01}


def test_a_clear_failure_acts_even_when_another_metric_is_missing() -> None:
    result = evaluate(parse_gate("accuracy_drop > 5% OR latency_increase > 20%"), {"latency_p95_increase": 0.5})
    assert result.outcome == "fail"
    assert "latency_p95_increase=50%" in result.explanation


def test_nan_and_infinite_values_count_as_unavailable() -> None:
    assert outcome("error_rate > 1%", error_rate=float("nan")) == "unknown"
    assert outcome("error_rate > 1%", error_rate=float("inf")) == "unknown"


def test_explanations_carry_the_values() -> None:
    result = evaluate(parse_gate("accuracy_drop > 5%"), {"accuracy_drop": 0.125})
    assert result.explanation == "tripped: accuracy_drop=12.5% > 5%"
    assert evaluate(parse_gate("accuracy_drop > 5%"), {"accuracy_drop": 0.0}).explanation.startswith("passed")


# -- metrics -------------------------------------------------------------------------------------------------
def cohort(windows: int = 100, labelled: int = 0, correct: int = 0, latency_ms: float = 1.0,
           confidence: float = 0.9, **kw: int | None) -> CohortStats:
    hist = LatencyHistogram()
    for _ in range(windows):
        hist.add(latency_ms)
    bins = [0] * CONFIDENCE_BINS
    bins[min(CONFIDENCE_BINS - 1, int(confidence * CONFIDENCE_BINS))] = windows
    return CohortStats(devices=1, windows=windows, labelled=labelled, correct=correct, latency=hist,
                       confidence=bins, **kw)  # type: ignore[arg-type]


def test_metrics_compare_candidate_with_baseline() -> None:
    base = cohort(labelled=100, correct=95, latency_ms=1.0, confidence=0.9, escalations=5)
    cand = cohort(labelled=100, correct=80, latency_ms=1.5, confidence=0.6, escalations=20,
                  shadow_windows=None)
    values = metrics(cand, base, installs_done=3, installs_failed=1)
    assert values["accuracy_drop"] == pytest.approx(0.15)
    assert values["latency_p95_increase"] == pytest.approx(0.5, abs=0.06)
    assert values["confidence_drop"] == pytest.approx(0.3, abs=0.051)
    assert values["escalation_rate_increase"] == pytest.approx(0.15)
    assert values["install_failure_rate"] == pytest.approx(0.25)
    assert values["error_rate"] == 0.0
    assert values["shadow_disagreement"] is None
    assert set(values) == set(METRICS)


def test_metrics_are_unavailable_without_data() -> None:
    values = metrics(CohortStats(), CohortStats())
    assert all(v is None for v in values.values())
    # no labels: no accuracy; no escalation field from the agent: no escalation metric
    values = metrics(cohort(), cohort())
    assert values["accuracy_drop"] is None
    assert values["escalation_rate_increase"] is None
    assert values["latency_p95_increase"] == 0.0
    # too few windows to judge
    assert metrics(cohort(windows=5), cohort(), min_windows=10)["latency_p95_increase"] is None


def test_shadow_disagreement_from_shadow_counts() -> None:
    cand = CohortStats()
    cand.add_batch({"windows": 10, "shadow_windows": 10, "shadow_agree": 7, "shadow_errors": 0,
                    "shadow_latency_ms": {"50": 10}}, shadow=True)
    assert metrics(cand, CohortStats())["shadow_disagreement"] == pytest.approx(0.3)
    assert cand.windows == 10 and cand.latency.count == 10


def test_add_batch_reads_optional_fields_defensively() -> None:
    stats = CohortStats()
    stats.add_batch({"windows": 4, "labelled": 4, "correct": 3, "latency_ms": {"100": 4},
                     "confidence": [0, 4], "errors": 1})
    stats.add_batch({"windows": "many", "latency_ms": {"x": 1}, "confidence": "bad", "escalations": -1})
    stats.add_batch({"windows": 2, "escalations": {"sent": 2, "answered": 1}, "latency_ms": "bad"})
    assert (stats.windows, stats.labelled, stats.correct, stats.errors) == (6, 4, 3, 1)
    assert stats.escalations == 2
    assert stats.accuracy == 0.75
    assert stats.mean_confidence == pytest.approx(0.075)
    merged = CohortStats()
    merged.add(stats)
    merged.add(stats)
    assert merged.windows == 12 and merged.escalations == 4 and merged.latency.count == 8
    assert merged.to_json()["accuracy"] == 0.75
