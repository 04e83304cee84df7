"""Rollout rehearsal on twins (``edgefleet rollout create --rehearse N``) against a real server and broker.

Two field devices have told the server (over MQTT, with their own logins) that they run clf@1.0.0 and what their
inputs look like; one drifts (a channel no class uses reads +3). A candidate that reads that channel is as good as
the old model on clean inputs and worse on drifting ones: its rehearsal, on twins that copy the devices' reported
inputs, trips the accuracy gate and the real rollout is not created. A candidate that ignores the channel passes
its rehearsal and the real rollout starts on the real devices only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.processes import wait_until
from edgefleet.testing.field import DRIFT_CHANNEL, field_inputs, reads_drift_channel, report_as_device
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport.mqtt_url import MqttEndpoint

pytestmark = pytest.mark.integration


@pytest.fixture
def fleet(tmp_path: Path, mosquitto_broker: MqttEndpoint) -> Iterator[LocalFleet]:
    """A real server on the session's Mosquitto (a device's session is taken over at once after a kill)."""
    local = LocalFleet(tmp_path, mqtt_url=mosquitto_broker.url)
    try:
        local.start_server()
        yield local
    finally:
        local.close()


@pytest.fixture
def field(fleet: LocalFleet) -> LocalFleet:
    """Two field devices on clf@1.0.0 that have reported to the server, one of them drifting."""
    api = fleet.api
    assert api is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    api.push_model(fleet.bundle("2.0.0", 2, reads_drift_channel(8.0)))  # worse under drift
    api.push_model(fleet.bundle("2.1.0", 3, reads_drift_channel(0.0)))  # as good as 1.0.0 everywhere
    for device, drift in {"field-clean": 0.0, "field-drift": 3.0}.items():
        report_as_device(fleet.provision(device, tags={"site": "plant"}), field_inputs(drift))
    api.deploy("clf@1.0.0", ["field-clean", "field-drift"])

    def stored() -> bool:
        profiles = api.rehearsal_profiles({"site": "plant"}, limit=10, since_s=600)
        return len(profiles) == 2 and all(p["input_mean"] is not None and p["windows"] == 120 for p in profiles)

    wait_until(stored, 30, "both field devices' telemetry")
    (fleet.root / "rehearsal.yaml").write_text(  # a row a second: a wave's window sees every class
        "rate_hz: 40\ntelemetry_interval_s: 1\nsynthetic: {rows_per_class: 2, length: 40}\n")
    return fleet


def _rehearse(fleet: LocalFleet, model: str) -> subprocess.Popen[str]:
    """``rollout create MODEL --rehearse 4`` against the field, started (both rehearsals run at once)."""
    assert fleet.server_url is not None
    env = {**os.environ, "EDGEFLEET_SERVER": fleet.server_url, "EDGEFLEET_TOKEN": fleet.operator_token or ""}
    return subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "rollout", "create", model, "--select", "site=plant",
         "--waves", "50%,100%", "--gate", "accuracy_drop > 20%", "--window", "4", "--min-windows", "10",
         "--install-timeout", "60", "--rehearse", "4", "--rehearse-warmup", "2", "--rehearse-timeout", "90",
         "--rehearse-scenario", str(fleet.root / "rehearsal.yaml"), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_rehearsals_stop_a_model_worse_on_drifting_devices_and_let_a_good_one_through(field: LocalFleet) -> None:
    api = field.api
    assert api is not None
    inputs = {p["device"]: p["input_mean"] for p in api.rehearsal_profiles({"site": "plant"}, since_s=600)}
    assert inputs["field-drift"][DRIFT_CHANNEL] - inputs["field-clean"][DRIFT_CHANNEL] > 2.0  # the drift, as seen

    bad, good = _rehearse(field, "clf@2.0.0"), _rehearse(field, "clf@2.1.0")
    try:
        out, err = bad.communicate(timeout=150)
        assert bad.returncode == 1, err
        error = err.strip().splitlines()[-1]
        assert "rollout was not created" in error and not out
        report = json.loads(error.split("error: ", 1)[1].rsplit("; the rollout", 1)[0])
        assert report["passed"] is False and report["phase"] in ("aborted", "paused")
        assert any("accuracy_drop" in (d["reason"] or "") for d in report["decisions"]), report["decisions"]
        assert not [r for r in api.rollouts() if r["candidate"] == "clf@2.0.0" and "twin" not in r["plan"]["select"]]

        out, err = good.communicate(timeout=150)
        assert good.returncode == 0, err
        rollout = json.loads(out)
        assert rollout["rehearsal"]["passed"] is True and rollout["rehearsal"]["twins"] == 4
        assert rollout["targets"] == 2 and rollout["plan"]["select"] == {"site": "plant"}  # no twin among them
        moved = set(rollout["decisions"][0]["devices"])
        assert moved <= {"field-clean", "field-drift"} and len(moved) == 1
        twins = [d for d in api.devices() if d["tags"].get("twin")]
        assert len(twins) == 8 and all(d["revoked"] for d in twins)  # both rehearsals' twins, cleaned up
        listed = field.cli("device", "list", "--json")
        assert {d["id"] for d in json.loads(listed.stdout)} == {"field-clean", "field-drift"}
    finally:
        for process in (bad, good):
            if process.poll() is None:
                process.kill()
                process.wait(10)
