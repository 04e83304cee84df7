"""End to end with real processes: a deliberately less accurate model, rolled out through the CLI with an
accuracy gate, is stopped in its first wave and the device it reached goes back to the previous version; the
same model in shadow mode is stopped by its disagreement with the active model."""

from __future__ import annotations

import json

import pytest

from edgefleet.processes import wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.fleet import LocalFleet

pytestmark = pytest.mark.integration
DEVICES = [f"dev-{i}" for i in range(4)]


def _active(fleet: LocalFleet, device: str) -> str | None:
    assert fleet.api is not None
    return (fleet.api.device(device)["reported"] or {}).get("active")  # type: ignore[no-any-return]


def test_a_less_accurate_model_is_stopped_in_its_first_wave_and_rolled_back(fleet: LocalFleet) -> None:
    api = fleet.api
    assert api is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    # a sign error: the true class gets the lowest score, so the model is wrong on every labelled window
    # (each agent's shard holds one class, so a biased model would be right on one device: not a fair test)
    api.push_model(fleet.bundle("2.0.0", 2, synthetic.channel_mean_model(scale=-4.0)))
    for device in DEVICES:
        fleet.provision(device, tags={"site": "lab"})
    api.deploy("clf@1.0.0", DEVICES)
    for device in DEVICES:  # every device replays every class: whichever is moved first sees the damage
        fleet.start_agent(device, speed=20.0, duration_s=120,
                          telemetry_interval_s=0.5)
    wait_until(lambda: all(_active(fleet, d) == "clf@1.0.0" for d in DEVICES), 60, "version 1 everywhere")
    wait_until(lambda: all(api.telemetry(d)["batches"] > 0 for d in DEVICES), 30, "baseline telemetry")

    created = fleet.cli("rollout", "create", "clf@2.0.0", "--select", "site=lab", "--waves", "25%,100%",
                        "--gate", "accuracy_drop > 5%", "--window", "3", "--min-windows", "5",
                        "--install-timeout", "60", "--json")
    assert created.returncode == 0, created.stderr
    rollout = json.loads(created.stdout)
    assert rollout["targets"] == 4 and rollout["moved"] == 1
    (moved,) = rollout["decisions"][0]["devices"]

    def finished() -> bool:
        return str(api.rollout(rollout["id"])["phase"]) in ("aborted", "done", "paused")

    wait_until(finished, 90, "the rollout to stop")
    status = json.loads(fleet.cli("rollout", "status", rollout["id"], "--json").stdout)
    assert status["phase"] == "aborted", status["reason"]
    assert status["wave"] == 1 and status["moved"] == 1
    rollback = next(d for d in status["decisions"] if d["kind"] == "rollback")
    assert rollback["devices"] == [moved]
    assert rollback["values"]["metrics"]["accuracy_drop"] > 0.05
    assert "accuracy_drop" in rollback["reason"]

    wait_until(lambda: _active(fleet, moved) == "clf@1.0.0", 60, "the moved device back on version 1")
    for device in DEVICES:
        assert api.device(device)["desired"] == "clf@1.0.0"
        if device != moved:
            assert all(e["detail"].get("activated") != "clf@2.0.0" for e in api.events(device))
    human = fleet.cli("rollout", "status", rollout["id"])
    assert human.returncode == 0 and "aborted" in human.stdout and "rollback" in human.stdout


def test_a_shadow_candidate_that_disagrees_is_stopped_and_stops_shadowing(fleet: LocalFleet) -> None:
    api = fleet.api
    assert api is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    api.push_model(fleet.bundle("2.0.0", 2, synthetic.channel_mean_model(scale=-4.0)))
    devices = DEVICES[:2]
    for device in devices:
        fleet.provision(device, tags={"site": "lab"})
    api.deploy("clf@1.0.0", devices)
    for i, device in enumerate(devices):
        fleet.start_agent(device, shard=f"{i}/{len(devices)}", speed=20.0, duration_s=120, telemetry_interval_s=0.5)
    wait_until(lambda: all(_active(fleet, d) == "clf@1.0.0" for d in devices), 60, "version 1 everywhere")

    rollout = api.create_rollout("clf@2.0.0", mode="shadow", waves=["100%"], select={"site": "lab"}, window_s=3,
                                 gates=["shadow_disagreement > 20%"], min_windows=5, install_timeout_s=60)
    assert rollout["decisions"][0]["kind"] == "assign" and api.device(devices[0])["shadow"] == "clf@2.0.0"
    wait_until(lambda: api.rollout(rollout["id"])["phase"] in ("aborted", "done", "paused"), 90, "the verdict")
    status = api.rollout(rollout["id"])
    assert status["phase"] == "aborted", status["reason"]
    rollback = next(d for d in status["decisions"] if d["kind"] == "rollback")
    assert rollback["values"]["metrics"]["shadow_disagreement"] > 0.2
    for device in devices:
        assert api.device(device)["shadow"] is None and api.device(device)["desired"] == "clf@1.0.0"
    wait_until(lambda: all((api.device(d)["reported"] or {}).get("shadow") is None for d in devices), 60,
               "the agents to stop shadowing")
    assert all(_active(fleet, d) == "clf@1.0.0" for d in devices)  # shadow never touched the active model
