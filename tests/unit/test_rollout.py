"""The rollout state machine without I/O: waves, installs, windows, every gate, every action, pause/resume,
a device that never reports, the three modes, and the audit values on every decision."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest

from edgefleet.core.gates import CohortStats
from edgefleet.core.rollout import (
    Decision,
    DeviceView,
    Observation,
    RolloutPlan,
    RolloutState,
    Step,
    command,
    make_plan,
    parse_waves,
    select_targets,
    start,
    step,
    telemetry_since,
    wave_counts,
)
from edgefleet.core.telemetry import CONFIDENCE_BINS, LatencyHistogram
from edgefleet.errors import ConfigError

OLD, NEW = "clf@1.0.0", "clf@2.0.0"


def stats(windows: int = 100, accuracy: float | None = None, latency_ms: float = 1.0, confidence: float = 0.9,
          escalations: int | None = None, shadow_agree: int | None = None) -> CohortStats:
    hist = LatencyHistogram()
    for _ in range(windows):
        hist.add(latency_ms)
    bins = [0] * CONFIDENCE_BINS
    bins[min(CONFIDENCE_BINS - 1, int(confidence * CONFIDENCE_BINS))] = windows
    labelled = windows if accuracy is not None else 0
    return CohortStats(devices=1, windows=windows, labelled=labelled, correct=round(labelled * (accuracy or 0)),
                       latency=hist, confidence=bins, escalations=escalations,
                       shadow_windows=windows if shadow_agree is not None else None, shadow_agree=shadow_agree)


class Sim:
    """A fake fleet that installs what it is told (unless told otherwise) and reports given telemetry."""

    def __init__(self, plan: RolloutPlan, n: int = 10, **tags: str) -> None:
        self.plan = plan
        self.now = 1000.0
        self.devices = {f"d{i:02d}": DeviceView(f"d{i:02d}", tags={"site": "a", **tags}, profile="rpi",
                                                desired=OLD, active=OLD) for i in range(n)}
        self.refuse: set[str] = set()
        self.silent: set[str] = set()
        self.baseline = stats(accuracy=0.95)
        self.candidate = stats(accuracy=0.95)
        self.log: list[Decision] = []
        first = start(plan, "r1", self.devices, self.now)
        self.state = self.apply(first)

    def apply(self, result: Step) -> RolloutState:
        for d in result.decisions:
            self.log.append(d)
            if d.kind == "assign":
                for dev in d.devices:
                    view = self.devices[dev]
                    if d.role == "shadow":
                        shadow = None if dev in self.silent or dev in self.refuse else d.model
                        self.devices[dev] = dataclasses.replace(view, shadow=shadow)
                    elif dev in self.refuse:
                        self.devices[dev] = dataclasses.replace(view, desired=d.model, refused=frozenset({NEW}))
                    elif dev not in self.silent:
                        self.devices[dev] = dataclasses.replace(view, desired=d.model, active=d.model)
                    else:
                        self.devices[dev] = dataclasses.replace(view, desired=d.model)
            elif d.kind == "rollback":
                for dev, model in d.restore.items():
                    view = self.devices[dev]
                    self.devices[dev] = dataclasses.replace(view, shadow=None) if d.role == "shadow" else \
                        dataclasses.replace(view, desired=model, active=model if dev not in self.silent else
                                            view.active)
        self.state = result.state
        return result.state

    def observe(self) -> Observation:
        telemetry: dict[str, dict[str, CohortStats]] = {}
        shadow: dict[str, dict[str, CohortStats]] = {}
        for dev, view in self.devices.items():
            if dev in self.silent or view.active is None:
                continue
            telemetry[dev] = {OLD: self.baseline}  # history since before the rollout
            if view.active == NEW:
                telemetry[dev][NEW] = self.candidate
            if view.shadow == NEW:
                shadow[dev] = {NEW: self.candidate}
        return Observation(self.now, self.devices, telemetry, shadow)

    def tick(self, seconds: float) -> Step:
        self.now += seconds
        result = step(self.plan, self.state, self.observe())
        self.apply(result)
        return result

    def run(self, limit: int = 50, dt: float = 10.0) -> RolloutState:
        for _ in range(limit):
            if self.state.phase in ("done", "aborted", "paused"):
                break
            self.tick(dt)
        return self.state

    def kinds(self) -> list[str]:
        return [d.kind for d in self.log]

    def on(self, model: str) -> set[str]:
        return {d for d, v in self.devices.items() if v.active == model}


def plan(gates: list[str | dict[str, str]] | None = None, **kw: object) -> RolloutPlan:
    data: dict[str, object] = {"candidate": NEW, "waves": ["10%", "50%", "100%"], "window_s": 30,
                               "install_timeout_s": 60, "unknown_timeout_s": 120, "min_windows": 10,
                               "gates": gates if gates is not None else ["accuracy_drop > 5%"], **kw}
    return make_plan(data)


# -- plans, waves, targets -----------------------------------------------------------------------------------
def test_waves_parse_counts_and_percentages() -> None:
    assert [w.text() for w in parse_waves("10%, 50%,100%")] == ["10%", "50%", "100%"]
    assert [w.text() for w in parse_waves("1,5,100%")] == ["1", "5", "100%"]
    for bad in ("", "0", "-1", "101%", "1.5", "ten", "nan%", ",".join(["1"] * 101)):
        with pytest.raises(ConfigError):
            parse_waves(bad)


def test_wave_counts_are_cumulative_at_least_one_and_skip_empty_waves() -> None:
    assert wave_counts(plan(waves=["10%", "50%", "100%"]), 10) == [1, 5, 10]
    assert wave_counts(plan(waves=["1%", "10%", "100%"]), 5) == [1, 5]
    assert wave_counts(plan(waves=["2", "5", "100%"]), 3) == [2, 3]
    assert wave_counts(plan(waves=["50%"]), 3) == [2]


def test_plan_validation_and_json_round_trip() -> None:
    p = plan(gates=["accuracy_drop > 5%", {"expr": "latency_increase > 20%", "action": "pause"}],
             select={"site": "a"}, profile="rpi", mode="ab")
    again = make_plan(p.to_json())
    assert again == p
    assert p.gates[1].action == "pause"
    for bad in ({"candidate": "clf"}, {"mode": "blue"}, {"gates": ["speed > 1"]},
                {"gates": [{"expr": "error_rate > 1%", "action": "explode"}]}, {"window_s": -1},
                {"window_s": "soon"}, {"min_windows": True}):
        with pytest.raises(ConfigError):
            make_plan({**plan().to_json(), **bad})


def test_targets_by_tags_and_profile_exclude_revoked_in_a_stable_order() -> None:
    devices = [DeviceView("a", {"site": "x"}, "rpi"), DeviceView("b", {"site": "x"}, "mcu"),
               DeviceView("c", {"site": "y"}, "rpi"), DeviceView("d", {"site": "x"}, "rpi", revoked=True),
               DeviceView("e", {"site": "x", "floor": "2"}, "rpi")]
    p = plan(select={"site": "x"}, profile="rpi")
    assert sorted(select_targets(p, devices, "r1")) == ["a", "e"]
    assert select_targets(p, devices, "r1") == select_targets(p, list(reversed(devices)), "r1")
    assert sorted(select_targets(plan(select={"site": "x"}), devices, "r1")) == ["a", "b", "e"]
    with pytest.raises(ConfigError, match="no device matches"):
        start(plan(select={"site": "z"}), "r1", {d.id: d for d in devices}, 0.0)


# -- the happy path ------------------------------------------------------------------------------------------
def test_a_good_candidate_goes_through_every_wave() -> None:
    sim = Sim(plan())
    assert sim.log[0].kind == "assign" and len(sim.log[0].devices) == 1 and sim.log[0].model == NEW
    assert sim.state.wave == 0 and sim.state.phase == "installing"
    final = sim.run()
    assert final.phase == "done"
    assert sim.on(NEW) == set(sim.devices)
    assert sim.kinds() == ["assign", "wait", "assign", "wait", "assign", "wait", "done"]
    sizes = [len(d.devices) for d in sim.log if d.kind == "assign"]
    assert sizes == [1, 4, 5]
    passed = [d for d in sim.log if d.kind in ("assign", "done")][1:]
    for decision in passed:  # each step after the first carries the gate values that allowed it
        assert decision.values["gates"][0]["outcome"] == "pass"
        assert decision.values["metrics"]["accuracy_drop"] == pytest.approx(0.0)


def test_the_window_is_waited_out_before_the_next_wave() -> None:
    sim = Sim(plan(window_s=100))
    sim.tick(1)  # installs are done: observation starts
    assert sim.state.phase == "observing"
    wait = sim.log[-1]
    assert wait.kind == "wait" and wait.until == pytest.approx(sim.now + 100)
    result = sim.tick(50)
    assert result.decisions == () and result.wake_at == pytest.approx(sim.now + 50)
    sim.tick(50)
    assert sim.state.wave == 1


def test_zero_length_windows_move_on_at_the_next_step() -> None:
    sim = Sim(plan(window_s=0))
    sim.run(dt=0.001)
    assert sim.state.phase == "done"


# -- every gate trips ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("gate", "candidate"), [
    ("accuracy_drop > 5%", stats(accuracy=0.80)),
    ("latency_increase > 20%", stats(accuracy=0.95, latency_ms=2.0)),
    ("latency_p95_increase > 20%", stats(accuracy=0.95, latency_ms=2.0)),
    ("confidence_drop > 10%", stats(accuracy=0.95, confidence=0.5)),
    ("escalation_rate_increase > 5%", stats(accuracy=0.95, escalations=30)),
    ("error_rate > 1%", dataclasses.replace(stats(accuracy=0.95), errors=10)),
    ("latency_p95_ms > 1.5", stats(accuracy=0.95, latency_ms=2.0)),
])
def test_each_behaviour_gate_stops_a_bad_candidate_in_the_first_wave(gate: str, candidate: CohortStats) -> None:
    sim = Sim(plan([gate]))
    sim.baseline = stats(accuracy=0.95, escalations=0)
    sim.candidate = candidate
    final = sim.run()
    assert final.phase == "aborted" and final.wave == 0
    rollback = next(d for d in sim.log if d.kind == "rollback")
    assert rollback.restore == {d: OLD for d in rollback.devices} and len(rollback.devices) == 1
    assert sim.on(NEW) == set()
    assert sim.kinds()[-1] == "aborted"
    assert gate in rollback.reason and "tripped" in rollback.reason
    assert rollback.values["gates"][0]["outcome"] == "fail"
    assert rollback.values["candidate"]["windows"] == 100


def test_install_failure_rate_trips_on_refusals() -> None:
    sim_plan = plan(["install_failure_rate > 20%"], waves=["50%", "100%"])
    sim = Sim.__new__(Sim)
    Sim.__init__(sim, sim_plan)  # devices refuse after the fleet is built
    sim.refuse = set(sim.devices)
    sim.apply(step(sim_plan, sim.state, sim.observe()))  # nothing yet: refusals arrive with the next assign
    sim.devices = {d: dataclasses.replace(v, refused=frozenset({NEW}) if d in sim.state.moved else v.refused,
                                          active=OLD) for d, v in sim.devices.items()}
    final = sim.run()
    assert final.phase == "aborted"
    rollback = next(d for d in sim.log if d.kind == "rollback")
    assert rollback.values["metrics"]["install_failure_rate"] == 1.0
    assert rollback.values["installs"] == {"installed": 0, "failed": 5, "pending": 0}


def test_shadow_disagreement_gate_in_shadow_mode() -> None:
    sim = Sim(plan(["shadow_disagreement > 10%"], mode="shadow"))
    assert sim.log[0].role == "shadow"
    sim.candidate = stats(shadow_agree=50)
    final = sim.run()
    assert final.phase == "aborted"
    rollback = next(d for d in sim.log if d.kind == "rollback")
    assert rollback.role == "shadow" and rollback.restore == {d: None for d in rollback.devices}
    assert rollback.values["metrics"]["shadow_disagreement"] == pytest.approx(0.5)
    assert all(v.active == OLD and v.shadow is None for v in sim.devices.values())


def test_a_good_shadow_candidate_finishes_and_stops_shadowing() -> None:
    sim = Sim(plan(["shadow_disagreement > 10%"], mode="shadow"))
    sim.candidate = stats(shadow_agree=99)
    assert sim.run().phase == "shadow-passed"  # not "done": no device runs the candidate yet (E14)
    stop = [d for d in sim.log if d.kind == "assign" and d.model is None]
    assert stop and stop[0].role == "shadow" and set(stop[0].devices) == set(sim.devices)
    assert sim.on(NEW) == set()  # shadow never changes the active model


def test_ab_compares_the_treatment_half_with_the_control_half() -> None:
    sim = Sim(plan(["accuracy_drop > 5%"], mode="ab", waves=["100%"]))
    assert len(sim.state.targets) == 5 and len(sim.state.control) == 5
    assert not set(sim.state.targets) & set(sim.state.control)
    sim.candidate = stats(accuracy=0.5)
    final = sim.run()
    assert final.phase == "aborted"
    rollback = next(d for d in sim.log if d.kind == "rollback")
    assert rollback.values["baseline"]["devices"] == 5 and rollback.values["candidate"]["devices"] == 5
    assert sim.on(NEW) == set()


def test_ab_judges_latency_against_the_control_half_only() -> None:
    """The treatment devices' own history on the old model is not the baseline in A/B: only the control half,
    over the same period, is. Here that history is slow, which would hide a slower candidate."""

    class Split(Sim):
        def observe(self) -> Observation:
            obs = super().observe()
            telemetry = {dev: dict(models) for dev, models in obs.telemetry.items()}
            for dev in self.state.targets:  # the treatment half: slow on the old model, before it moved
                telemetry.setdefault(dev, {})[OLD] = stats(latency_ms=3.0)
            return dataclasses.replace(obs, telemetry=telemetry)

    sim = Split(plan(["latency_increase > 20%"], mode="ab", waves=["100%"]))
    sim.baseline, sim.candidate = stats(latency_ms=1.0), stats(latency_ms=1.5)
    assert sim.run().phase == "aborted"
    rollback = next(d for d in sim.log if d.kind == "rollback")
    assert set(rollback.devices) == set(sim.state.targets)
    assert rollback.values["baseline"]["devices"] == len(sim.state.control)
    assert rollback.values["metrics"]["latency_p95_increase"] > 0.2
    assert sim.on(NEW) == set() and sim.on(OLD) == set(sim.devices)


def test_ab_needs_two_devices_and_ends_with_control_untouched() -> None:
    with pytest.raises(ConfigError, match="at least two"):
        Sim(plan(mode="ab"), n=1)
    sim = Sim(plan(mode="ab", waves=["100%"]))
    assert sim.run().phase == "done"
    assert sim.on(NEW) == set(sim.state.targets)
    assert sim.on(OLD) == set(sim.state.control)
    assert telemetry_since(sim.plan, sim.state) == sim.state.created


def test_a_pause_gate_pauses_and_resume_overrides_it() -> None:
    sim = Sim(plan([{"expr": "latency_increase > 20%", "action": "pause"}]))
    sim.candidate = stats(latency_ms=3.0)
    assert sim.run().phase == "paused"
    assert sim.state.paused_by == "gate" and sim.kinds()[-1] == "pause"
    assert sim.tick(100).decisions == ()  # paused: nothing happens
    sim.apply(command(sim.plan, sim.state, "resume", sim.now, sim.devices, note="alice"))
    assert sim.kinds()[-2:] == ["resume", "assign"] and "alice" in sim.log[-2].reason
    assert sim.state.wave == 1


def test_abort_beats_pause_when_both_trip() -> None:
    sim = Sim(plan([{"expr": "latency_increase > 20%", "action": "pause"}, "accuracy_drop > 5%"]))
    sim.candidate = stats(accuracy=0.1, latency_ms=3.0)
    assert sim.run().phase == "aborted"


# -- missing data and silent devices -------------------------------------------------------------------------
def test_unavailable_metrics_hold_then_pause_with_the_reason() -> None:
    sim = Sim(plan(["accuracy_drop > 5%"]))
    sim.baseline, sim.candidate = stats(), stats()  # no labels anywhere
    sim.tick(1)
    sim.tick(30)
    hold = sim.log[-1]
    assert hold.kind == "hold" and "accuracy_drop" in hold.reason and "cannot pass yet" in hold.reason
    assert hold.until == pytest.approx(sim.now + 120)
    assert sim.tick(60).decisions == ()
    sim.tick(60)
    assert sim.state.phase == "paused" and sim.state.paused_by == "unknown"
    assert "still unavailable" in sim.log[-1].reason
    # labels arrive, the operator resumes: the window restarts and the gate passes
    sim.baseline, sim.candidate = stats(accuracy=0.9), stats(accuracy=0.9)
    sim.apply(command(sim.plan, sim.state, "resume", sim.now))
    assert sim.state.phase == "observing" and sim.state.deadline == pytest.approx(sim.now + 30)
    assert sim.run().phase == "done"


def test_too_few_windows_count_as_unavailable() -> None:
    sim = Sim(plan(["accuracy_drop > 5%"], min_windows=1000))
    sim.candidate = stats(accuracy=0.0)
    sim.run(limit=4)
    assert sim.kinds()[-1] == "hold"


def test_a_device_that_never_reports_times_out_and_counts_as_failed() -> None:
    sim = Sim.__new__(Sim)
    p = plan(["install_failure_rate > 50%"], waves=["2", "100%"])
    silent_plan_devices = {f"d{i:02d}" for i in range(10)}
    Sim.__init__(sim, p)
    first = sim.log[0].devices
    sim.silent = {first[0]}  # one of the two wave-1 devices goes quiet before installing
    sim.devices[first[0]] = dataclasses.replace(sim.devices[first[0]], active=OLD)
    assert sim.tick(10).wake_at == pytest.approx(sim.state.deadline)  # waits for the install deadline
    assert sim.state.phase == "installing"
    sim.tick(60)
    wait = next(d for d in sim.log if d.kind == "wait")
    assert wait.devices == (first[0],) and "did not install in time" in wait.reason
    assert sim.run().phase == "done"  # 1 of 2 failed: 50% is not > 50%
    assert silent_plan_devices - sim.on(NEW) == {first[0]}


def test_a_silent_wave_cannot_pass_its_behaviour_gates() -> None:
    p = plan(["accuracy_drop > 5%"], waves=["1", "100%"])
    sim = Sim(p)
    only = sim.log[0].devices[0]
    sim.silent = {only}
    sim.devices[only] = dataclasses.replace(sim.devices[only], active=OLD)
    sim.run()
    assert sim.state.phase == "paused" and sim.state.paused_by == "unknown"


# -- operator commands ---------------------------------------------------------------------------------------
def test_operator_pause_and_resume_while_installing_restart_the_deadline() -> None:
    sim = Sim(plan())
    sim.apply(command(sim.plan, sim.state, "pause", sim.now))
    assert sim.state.phase == "paused" and sim.state.resume_phase == "installing"
    assert sim.tick(1000).decisions == ()
    sim.apply(command(sim.plan, sim.state, "resume", sim.now))
    assert sim.state.phase == "installing" and sim.state.deadline == pytest.approx(sim.now + 60)
    assert sim.run().phase == "done"


def test_operator_abort_rolls_back_every_moved_device() -> None:
    sim = Sim(plan())
    sim.tick(1)
    sim.tick(30)  # wave 2 assigned
    assert len(sim.state.moved) == 5
    sim.apply(command(sim.plan, sim.state, "abort", sim.now, note="bob"))
    assert sim.state.phase == "aborted" and sim.kinds()[-2:] == ["rollback", "aborted"]
    assert sim.on(NEW) == set() and "bob" in sim.state.reason


def test_abort_before_anything_moved_has_nothing_to_roll_back() -> None:
    p = plan()
    state = RolloutState(id="r", phase="installing", created=0.0, targets=["a"])
    result = command(p, state, "abort", 1.0)
    assert [d.kind for d in result.decisions] == ["aborted"]


@pytest.mark.parametrize(("phase", "action"), [("done", "pause"), ("aborted", "resume"), ("aborted", "abort"),
                                               ("installing", "resume"), ("paused", "pause")])
def test_commands_that_make_no_sense_are_refused(phase: str, action: str) -> None:
    state = RolloutState(id="r", phase=phase, created=0.0, targets=["a"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        command(plan(), state, action, 1.0)  # type: ignore[arg-type]


def test_final_states_do_nothing_more() -> None:
    sim = Sim(plan())
    sim.run()
    assert sim.tick(10) == Step(sim.state, (), None)


# -- the record ----------------------------------------------------------------------------------------------
def test_state_and_decisions_survive_json() -> None:
    sim = Sim(plan())
    sim.tick(1)
    again = RolloutState.from_json(sim.state.to_json())
    assert again == sim.state
    for decision in sim.log:
        data = decision.to_json()
        assert isinstance(data["devices"], list) and data["kind"] in ("assign", "wait")


def test_rollback_restores_each_device_to_what_it_ran_before() -> None:
    sim = Sim(plan(waves=["100%"]))
    first = sim.log[0]
    assert first.kind == "assign"
    # pretend one device had been on another version
    state = sim.state
    odd = first.devices[0]
    state.moved[odd] = "clf@0.9.0"
    sim.candidate = stats(accuracy=0.1)
    sim.run()
    rollback = next(d for d in sim.log if d.kind == "rollback")
    restore: Mapping[str, str | None] = rollback.restore
    assert restore[odd] == "clf@0.9.0" and all(v == OLD for k, v in restore.items() if k != odd)


def test_every_deciding_step_gets_a_new_step_number() -> None:
    sim = Sim(plan(window_s=100, install_timeout_s=60))
    numbers = [sim.state.step_no]
    for dt in (1, 10, 100, 1, 100):
        result = sim.tick(dt)
        if result.decisions:
            numbers.append(result.state.step_no)
    sim.apply(command(sim.plan, sim.state, "pause", sim.now))
    numbers.append(sim.state.step_no)
    sim.apply(command(sim.plan, sim.state, "resume", sim.now))
    numbers.append(sim.state.step_no)
    assert numbers == sorted(set(numbers)) and len(numbers) >= 5
