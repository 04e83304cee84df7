"""The gate language as monitors use it: duration literals, drift from telemetry batches, silence beside a
cohort, and the monitor-only metric refused by rollouts."""

from __future__ import annotations

import pytest

from edgefleet.core.cohorts import CohortStats
from edgefleet.core.gates import parse_gate
from edgefleet.core.plan import make_plan
from edgefleet.errors import ConfigError
from edgefleet.learn.fielddata import label_stats
from edgefleet.learn.monitors import MonitorSpec, judge_fleet


@pytest.mark.parametrize(("text", "seconds"), [("silent_for > 15m", 900.0), ("silent_for > 30s", 30.0),
                                               ("silent_for >= 2h", 7200.0), ("silent_for > 1d", 86400.0),
                                               ("silent_for > 90", 90.0)])
def test_durations_are_seconds(text: str, seconds: float) -> None:
    assert judge_fleet(parse_gate(text), CohortStats(), seconds + 1).outcome == "fail"
    assert judge_fleet(parse_gate(text), CohortStats(), seconds - 1).outcome == "pass"


def test_silence_without_devices_is_unknown_and_combines_with_cohort_metrics() -> None:
    gate = parse_gate("silent_for > 15m OR error_rate > 50%")
    assert judge_fleet(gate, CohortStats(), None).outcome == "unknown"
    broken = CohortStats(windows=0, errors=40)
    assert judge_fleet(gate, broken, 10.0).outcome == "fail"  # every call failed: it trips at once


def test_drift_is_the_sample_weighted_mean_of_the_batches() -> None:
    stats = CohortStats()
    stats.add_batch({"windows": 5, "drift": {"n": 100, "psi": 0.1, "score": 0.5}})
    stats.add_batch({"windows": 5, "drift": {"n": 300, "psi": 0.5, "score": 1.5}})
    stats.add_batch({"windows": 5, "drift": {"n": 0, "psi": 9.0}})  # no samples: ignored
    stats.add_batch({"windows": 5, "drift": "garbage"})
    total = CohortStats()
    total.add(stats)
    result = judge_fleet(parse_gate("drift_psi > 0.2 AND drift_score > 1"), total, 0.0)
    assert result.outcome == "fail"
    assert result.values == {"drift_psi": pytest.approx(0.4), "drift_score": pytest.approx(1.25)}
    assert judge_fleet(parse_gate("drift_psi > 0.2"), CohortStats(windows=50), 0.0).outcome == "unknown"


def test_field_labels_count_as_labelled_windows_of_the_model_that_predicted() -> None:
    per_model = label_stats([("clf@1", "a", "a"), ("clf@1", "a", "b"), ("clf@2", "b", "b")])
    assert {m: (s.labelled, s.correct) for m, s in per_model.items()} == {"clf@1": (2, 1), "clf@2": (1, 1)}


def test_bad_monitor_specs_and_silence_in_a_rollout_are_refused() -> None:
    with pytest.raises(ConfigError, match="model NAME"):
        MonitorSpec("accuracy < 90%", "clf@1.0.0").check()
    with pytest.raises(ConfigError, match="unexpected"):
        MonitorSpec("silent_for > 15 m", "clf").check()
    with pytest.raises(ConfigError, match="monitors"):
        make_plan({"candidate": "clf@1.0.0", "gates": ["silent_for > 5m"]})
    assert make_plan({"candidate": "clf@1.0.0", "gates": ["drift_psi > 0.25"]}).gates[0].gate.metrics == {"drift_psi"}


def test_export_scales_windows_back_into_raw_readings_and_needs_a_label() -> None:
    import dataclasses
    import io
    from types import SimpleNamespace

    import numpy as np

    from edgefleet.agent.stats import encode_example
    from edgefleet.errors import DataError
    from edgefleet.learn.fielddata import export_dataset

    window = np.arange(12, dtype=np.float32).reshape(2, 6) / 10
    encoded = dataclasses.asdict(encode_example(window, "a", 0.3, 0.0, encoding="f16"))
    rows = [SimpleNamespace(id=i, label=label, label_source="operator",
                                **{k: encoded[k] for k in ("shape", "encoding", "data", "scale")})
            for i, label in enumerate(["b", None])]
    spec = {"kind": "sliding_window", "mean": [1.0, -1.0], "std": [2.0, 4.0], "sample_rate_hz": 50.0}
    data, counts = export_dataset(rows, ["a", "b"], spec)
    assert counts == {"examples": 2, "labelled": 1, "left_out": 0, "upstream_labelled": 0, "upstream_left_out": 0}
    arrays = np.load(io.BytesIO(data))
    raw = window * np.array([[2.0], [4.0]]) + np.array([[1.0], [-1.0]])
    assert np.allclose(arrays["calib_x"][0], raw, atol=0.02) and arrays["test_y"].tolist() == [1]
    assert float(arrays["sample_rate_hz"]) == 50.0
    with pytest.raises(DataError, match="no labelled hard examples"):
        export_dataset(rows[1:], ["a", "b"], spec)
