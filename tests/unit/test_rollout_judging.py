"""How the rollout machine judges (E14): sequential looks during the window, one fixed look at its end,
inconclusive as a state with its own timeout and action, gates refused where the mode cannot judge them,
shadow-passed, stable A/B halves, baselines without rolled-back models, decision roles; and what the agent
sends for it (shadow labels and paired latency, fine histograms that old ones merge with)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.stats import WindowStats
from edgefleet.core.gates import CohortStats
from edgefleet.core.rollout import DeviceView, Observation, RolloutPlan, Step, cohorts, make_plan, start, step
from edgefleet.core.telemetry import COARSE, FINE, LatencyHistogram, bucket_middle_ms
from edgefleet.errors import ConfigError
from edgefleet.server.orchestrator import rolled_back_models
from edgefleet.transport.messages import TelemetryBatch, parse

OLD, NEW, BAD = "clf@1.0.0", "clf@2.0.0", "clf@1.5.0"


def cohort(windows: int, correct: int, latency_ms: float = 1.0, seed: int = 0) -> CohortStats:
    rng = np.random.default_rng(seed)
    hist = LatencyHistogram()
    for v in (latency_ms * rng.lognormal(0.0, 0.2, windows)).tolist():
        hist.add(v)
    return CohortStats(devices=1, windows=windows, labelled=windows, correct=correct, latency=hist,
                       confidence=[0] * 19 + [windows])


def plan(gates: list[Any], **kw: Any) -> RolloutPlan:
    return make_plan({"candidate": NEW, "waves": ["1", "100%"], "window_s": 30, "install_timeout_s": 60,
                      "unknown_timeout_s": 120, "min_windows": 10, "gates": gates, **kw})


class Fleet:
    """Four devices on OLD that install what they are told; telemetry given per model."""

    def __init__(self, p: RolloutPlan, rollout_id: str = "r1") -> None:
        self.plan, self.now = p, 1000.0
        self.devices = {f"d{i}": DeviceView(f"d{i}", {}, None, OLD, OLD) for i in range(4)}
        self.stats: dict[str, CohortStats] = {OLD: cohort(400, 368)}
        self.rolled_back: frozenset[str] = frozenset()
        self.log: list[Any] = []
        self.state = self.apply(start(p, rollout_id, self.devices, self.now))

    def apply(self, result: Step) -> Any:
        for d in result.decisions:
            self.log.append(d)
            if d.kind == "assign" and d.model:
                for dev in d.devices:
                    view = self.devices[dev]
                    self.devices[dev] = dataclasses.replace(view, shadow=d.model) if d.role == "shadow" else \
                        dataclasses.replace(view, desired=d.model, active=d.model)
        self.state = result.state
        return result.state

    def observe(self) -> Observation:
        telemetry: dict[str, dict[str, CohortStats]] = {}
        shadow: dict[str, dict[str, CohortStats]] = {}
        for dev, view in self.devices.items():
            telemetry[dev] = {m: s for m, s in self.stats.items() if m != NEW}
            if view.active == NEW and NEW in self.stats:
                telemetry[dev][NEW] = self.stats[NEW]
            if view.shadow == NEW and NEW in self.stats:
                shadow[dev] = {NEW: self.stats[NEW]}
        return Observation(self.now, self.devices, telemetry, shadow, self.rolled_back)

    def tick(self, seconds: float) -> Step:
        self.now += seconds
        result = step(self.plan, self.state, self.observe())
        self.apply(result)
        return result


def test_a_handful_of_bad_windows_does_not_trip_during_the_window_but_a_clear_failure_does() -> None:
    fleet = Fleet(plan(["accuracy_drop > 5%"]))
    fleet.stats[NEW] = cohort(12, 9)  # 75% on 12 windows: bad-looking, not yet evidence
    fleet.tick(1)
    assert fleet.tick(5).decisions == () and fleet.state.phase == "observing"
    fleet.stats[NEW] = cohort(400, 100)  # 25%: evidence even for the sequential look
    result = fleet.tick(5)
    assert fleet.state.phase == "aborted" and fleet.now < 1000 + 1 + 30
    reason = result.decisions[-1].reason
    assert "tripped" in reason and "sequential look" in reason and "n=400 vs 1600" in reason
    assert result.decisions[-1].values["intervals"]["accuracy_drop"]["low"] > 0.05


@pytest.mark.parametrize(("action", "phase"), [("pause", "paused"), ("abort", "aborted"), ("proceed", "installing")])
def test_inconclusive_holds_until_its_own_timeout_then_takes_its_action(action: str, phase: str) -> None:
    fleet = Fleet(plan(["accuracy_drop > 5%"], inconclusive_timeout_s=300, on_inconclusive=action))
    fleet.stats[NEW] = cohort(60, 50)  # 83% vs 92%: worse than 5 points by the estimate, not by the evidence
    fleet.tick(1)
    fleet.tick(30)
    hold = fleet.log[-1]
    assert hold.kind == "hold" and "inconclusive at 95% confidence" in hold.reason
    assert hold.until == pytest.approx(fleet.now + 300)  # its own timeout, not unknown_timeout_s (120)
    assert fleet.tick(150).decisions == ()
    fleet.tick(160)
    assert fleet.state.phase == phase and "still inconclusive after 300 s" in fleet.log[-1 if action != "abort"
                                                                                       else -2].reason
    if action == "proceed":
        assert fleet.state.wave == 1


def test_inconclusive_resolves_when_more_data_comes() -> None:
    fleet = Fleet(plan(["accuracy_drop > 5%"]))
    fleet.stats[NEW] = cohort(60, 50)
    fleet.tick(1)
    fleet.tick(30)
    assert fleet.log[-1].kind == "hold"
    fleet.stats[NEW] = cohort(400, 366)  # the same accuracy as the baseline, on more windows
    fleet.tick(5)
    assert fleet.state.wave == 1 and fleet.log[-1].kind == "assign"


@pytest.mark.parametrize(("mode", "gate", "why"), [
    ("shadow", "confidence_drop > 5%", "no confidence histogram"),
    ("shadow", "escalation_rate_increase > 5%", "never escalates"),
    ("canary", "shadow_disagreement > 10%", "no shadow runs"),
    ("ab", "shadow_disagreement > 10%", "no shadow runs"),
])
def test_gates_a_mode_cannot_judge_are_refused_with_the_reason(mode: str, gate: str, why: str) -> None:
    with pytest.raises(ConfigError, match=f"cannot be judged in {mode} mode.*{why}"):
        plan([gate], mode=mode)


def test_an_accuracy_gate_in_shadow_mode_is_judged_on_the_shadows_labels() -> None:
    p = plan(["accuracy_drop > 5%"], mode="shadow")
    fleet = Fleet(p)
    shadow = CohortStats()
    shadow.add_batch({"shadow_windows": 400, "shadow_agree": 100, "shadow_labelled": 400, "shadow_correct": 90,
                      "shadow_latency_ms": {"500": 400, "s": 1}, "shadow_active_latency_ms": {"500": 400, "s": 1}},
                     shadow=True)
    fleet.stats[NEW] = shadow
    fleet.tick(1)
    fleet.tick(30)
    assert fleet.state.phase == "aborted"
    assert all(d.role == "shadow" for d in fleet.log)  # every decision says it concerns the shadow
    rollback = next(d for d in fleet.log if d.kind == "rollback")
    assert rollback.values["metrics"]["accuracy_drop"] == pytest.approx(0.92 - 0.225)
    assert rollback.values["metrics"]["latency_p95_increase"] == 0.0  # against the paired active timings


def test_a_passing_shadow_ends_shadow_passed_and_says_how_to_promote() -> None:
    fleet = Fleet(plan(["shadow_disagreement > 10%"], mode="shadow", waves=["100%"]))
    fleet.stats[NEW] = CohortStats(devices=1, windows=400, shadow_windows=400, shadow_agree=400)
    fleet.tick(1)
    fleet.tick(30)
    assert fleet.state.phase == "shadow-passed"
    assert "rollout promote r1" in fleet.state.reason
    assert fleet.tick(30).decisions == ()  # final


def test_the_ab_split_depends_on_the_devices_only() -> None:
    devices = {f"d{i}": DeviceView(f"d{i}") for i in range(10)}
    p = plan([], mode="ab")
    first, second = start(p, "r1", devices, 0.0).state, start(p, "r2", devices, 0.0).state
    assert set(first.control) == set(second.control) and len(first.control) == 5
    assert set(first.targets) == set(second.targets)


def test_baselines_leave_out_rolled_back_models_and_models_nobody_runs() -> None:
    fleet = Fleet(plan(["accuracy_drop > 5%"]))
    fleet.stats[BAD] = cohort(400, 40)  # a bad model that ran here in the last hour and was rolled back
    fleet.stats[NEW] = cohort(400, 368)
    fleet.tick(1)
    _, baseline = cohorts(fleet.plan, fleet.state, fleet.observe())
    assert baseline.windows == 4 * 400  # OLD only: BAD is not what any target runs
    fleet.devices["d3"] = dataclasses.replace(fleet.devices["d3"], active=BAD)
    fleet.rolled_back = frozenset({BAD})
    _, baseline = cohorts(fleet.plan, fleet.state, fleet.observe())
    assert baseline.windows == 4 * 400 and baseline.correct == 4 * 368


def test_rolled_back_models_are_those_of_aborted_rollouts_not_completed_later() -> None:
    def row(candidate: str, phase: str, created: float, mode: str = "canary") -> Any:
        return SimpleNamespace(candidate=candidate, phase=phase, created=created, plan={"mode": mode})

    rows = [row(BAD, "aborted", 1), row(NEW, "aborted", 2), row(NEW, "done", 3), row("x@1", "aborted", 4, "shadow")]
    assert rolled_back_models(rows) == frozenset({BAD})


def test_plan_settings_round_trip_and_bad_ones_are_refused() -> None:
    p = plan(["accuracy_drop > 5%"], confidence=0.99, inconclusive_timeout_s=50, on_inconclusive="proceed")
    assert make_plan(p.to_json()) == p and p.judge.confidence == 0.99
    for bad in ({"confidence": 1.0}, {"confidence": 0.3}, {"confidence": "high"}, {"on_inconclusive": "retry"},
                {"inconclusive_timeout_s": -1}):
        with pytest.raises(ConfigError):
            make_plan({**p.to_json(), **bad})


# -- what the agent sends ------------------------------------------------------------------------------------
def test_the_shadow_counts_labels_and_paired_latency_on_the_wire() -> None:
    stats = WindowStats("clf@1.0.0", shadow_model="clf@2.0.0")
    for truth, shadow in (("a", "a"), ("b", "a"), (None, "b")):
        stats.record("a", 0.9, 0.2, truth)
        stats.record_shadow(shadow, 0.21, truth, active_ms=0.2)
    report = stats.batch("d1", 0, 1.0, 0)
    batch = parse(TelemetryBatch, report.to_bytes())
    assert (batch.shadow_labelled, batch.shadow_correct, batch.shadow_agree) == (2, 1, 2)
    payload = json.loads(report.to_bytes())
    assert LatencyHistogram.from_wire(payload["shadow_active_latency_ms"]).scale == FINE
    cohort_ = CohortStats()
    cohort_.add_batch(payload, shadow=True)
    assert (cohort_.labelled, cohort_.correct, cohort_.paired.count, cohort_.shadow_agreement) == (2, 1, 3, 2 / 3)


def test_fine_histograms_bound_the_error_at_sub_millisecond_latencies_and_merge_with_old_ones() -> None:
    values = np.random.default_rng(5).lognormal(np.log(0.2), 0.1, 3000)
    fine = LatencyHistogram()
    for v in values.tolist():
        fine.add(v)
    for q in (0.5, 0.95):
        assert fine.quantile(q) == pytest.approx(float(np.quantile(values, q)), rel=0.012)
    assert fine.relative_error < 0.01
    old = LatencyHistogram.from_json({"100": 3})  # an old agent's batch: no scale key, 5% buckets
    assert old.scale == COARSE and old.quantile(0.5) == bucket_middle_ms(100)
    merged = LatencyHistogram.from_json(fine.to_json())
    merged.merge(old)
    assert merged.scale == FINE and merged.count == 3003
    assert LatencyHistogram.from_json(merged.to_json()).buckets == merged.buckets
    with pytest.raises(ValueError):
        LatencyHistogram.from_json({"s": 7, "1": 1})
