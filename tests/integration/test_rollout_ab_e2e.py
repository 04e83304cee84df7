"""A/B rollouts end to end with real processes: the selected devices are split into a control half that keeps
the current model and a treatment half that gets the candidate in waves; the gates compare the two halves'
telemetry over the same period. A less accurate candidate is stopped in its first wave and its device goes
back to the current version; a good one reaches the whole treatment half and leaves the control half alone."""

from __future__ import annotations

import json

import pytest

from edgefleet.processes import wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.fleet import LocalFleet

pytestmark = pytest.mark.integration
DEVICES = [f"dev-{i}" for i in range(4)]
OLD, NEW = "clf@1.0.0", "clf@2.0.0"


def _active(fleet: LocalFleet, device: str) -> str | None:
    assert fleet.api is not None
    return (fleet.api.device(device)["reported"] or {}).get("active")  # type: ignore[no-any-return]


def _fleet_on_version_1(fleet: LocalFleet, candidate: bytes) -> None:
    """Four devices on version 1, each replaying every class (so both halves see the same data)."""
    api = fleet.api
    assert api is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    api.push_model(fleet.bundle("2.0.0", 2, candidate))
    for device in DEVICES:
        fleet.provision(device, tags={"site": "lab"})
    api.deploy(OLD, DEVICES)
    for device in DEVICES:
        fleet.start_agent(device, speed=20.0, duration_s=120, telemetry_interval_s=0.5)
    wait_until(lambda: all(_active(fleet, d) == OLD for d in DEVICES), 60, "version 1 everywhere")


def _stopped(fleet: LocalFleet, rollout_id: str) -> bool:
    assert fleet.api is not None
    return str(fleet.api.rollout(rollout_id)["phase"]) in ("aborted", "done", "paused")


def test_ab_a_less_accurate_candidate_is_stopped_and_its_devices_returned(fleet: LocalFleet) -> None:
    api = fleet.api
    assert api is not None
    # a sign error: the true class gets the lowest score, so the candidate is wrong on every labelled window
    _fleet_on_version_1(fleet, synthetic.channel_mean_model(scale=-4.0))

    created = fleet.cli("rollout", "create", NEW, "--select", "site=lab", "--mode", "ab", "--waves", "50%,100%",
                        "--gate", "accuracy_drop > 5%", "--window", "3", "--min-windows", "5",
                        "--install-timeout", "60", "--json")
    assert created.returncode == 0, created.stderr
    rollout = json.loads(created.stdout)
    assert rollout["mode"] == "ab" and rollout["targets"] == 2 and rollout["control"] == 2
    assert rollout["moved"] == 1  # 50% of the treatment half
    (moved,) = rollout["decisions"][0]["devices"]
    assert api.device(moved)["desired"] == NEW
    assert sum(api.device(d)["desired"] == NEW for d in DEVICES) == 1

    wait_until(lambda: _stopped(fleet, rollout["id"]), 90, "the rollout to stop")
    status = json.loads(fleet.cli("rollout", "status", rollout["id"], "--json").stdout)
    assert status["phase"] == "aborted", status["reason"]
    assert status["wave"] == 1 and status["moved"] == 1
    rollback = next(d for d in status["decisions"] if d["kind"] == "rollback")
    assert rollback["devices"] == [moved] and "accuracy_drop" in rollback["reason"]
    values = rollback["values"]
    assert values["metrics"]["accuracy_drop"] > 0.05
    # the candidate cohort is the moved device; the baseline is the control half, not the treatment half
    assert values["candidate"]["devices"] == 1 and values["candidate"]["accuracy"] < 0.5
    assert values["baseline"]["devices"] == 2 and values["baseline"]["accuracy"] > 0.9

    wait_until(lambda: _active(fleet, moved) == OLD, 60, "the moved device back on version 1")
    for device in DEVICES:
        assert api.device(device)["desired"] == OLD
        if device != moved:
            assert all(e["detail"].get("activated") != NEW for e in api.events(device))


def test_ab_a_good_candidate_reaches_the_treatment_half_and_leaves_the_control_half(fleet: LocalFleet) -> None:
    api = fleet.api
    assert api is not None
    _fleet_on_version_1(fleet, synthetic.channel_mean_model(scale=5.0))  # as accurate, a little more confident

    rollout = api.create_rollout(NEW, mode="ab", waves=["50%", "100%"], select={"site": "lab"}, window_s=3,
                                 gates=["accuracy_drop > 5%"], min_windows=5, install_timeout_s=60)
    assert rollout["targets"] == 2 and rollout["control"] == 2
    wait_until(lambda: _stopped(fleet, rollout["id"]), 120, "the rollout to finish")
    status = api.rollout(rollout["id"])
    assert status["phase"] == "done", status["reason"]
    assigns = [d for d in status["decisions"] if d["kind"] == "assign"]
    assert [len(a["devices"]) for a in assigns] == [1, 1]
    treatment = sorted(d for a in assigns for d in a["devices"])
    control = sorted(set(DEVICES) - set(treatment))
    assert len(control) == 2
    # each wave was judged against the control half's telemetry of the same period
    for decision in (assigns[1], next(d for d in status["decisions"] if d["kind"] == "done")):
        values = decision["values"]
        assert values["baseline"]["devices"] == 2 and values["metrics"]["accuracy_drop"] <= 0.05
        assert values["gates"][0]["outcome"] == "pass"
    wait_until(lambda: all(_active(fleet, d) == NEW for d in treatment), 60, "the treatment half on version 2")
    for device in control:
        assert api.device(device)["desired"] == OLD and _active(fleet, device) == OLD
        assert all(e["detail"].get("activated") != NEW for e in api.events(device))
