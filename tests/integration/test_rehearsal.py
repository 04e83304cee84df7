"""Rollout rehearsal on twins (``edgefleet rollout create --rehearse N``) and ``edgefleet twin``, as the README's
commands run them, against a real server and Mosquitto.

Two field devices have told the server (over MQTT, with their own logins) that they run model@1.0.0 and what their
inputs look like; one drifts (a channel no class uses reads +3). model@1.2.0 reads that channel: as good as 1.0.0
on clean inputs, worse on drifting ones. Its rehearsal, on twins that copy the devices' reported inputs, trips the
accuracy gate and the real rollout is not created. model@1.1.0 ignores the channel: the README's rehearsal passes
and the real rollout starts on the two real devices only, while the README's ``edgefleet twin`` runs twins tagged
like them at the same time (twins are in no real rollout and no device list, and are revoked at the end).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.data.basicmotions import save_npz
from edgefleet.processes import wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.field import (
    DRIFT_CHANNEL,
    field_bundle,
    field_inputs,
    readme_block,
    reads_drift_channel,
    report_as_device,
)
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport.mqtt_url import MqttEndpoint

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"
FIELD = {"field-clean": 0.0, "field-drift": 3.0}


@pytest.fixture
def fleet(tmp_path: Path, mosquitto_broker: MqttEndpoint) -> Iterator[LocalFleet]:
    """A real server on the session's Mosquitto."""
    local = LocalFleet(tmp_path, mqtt_url=mosquitto_broker.url)
    try:
        local.start_server()
        yield local
    finally:
        local.close()


@pytest.fixture
def field(fleet: LocalFleet) -> LocalFleet:
    """The field devices on model@1.0.0, reported to the server; the README's scenario file and its data file."""
    api = fleet.api
    assert api is not None and fleet.key is not None
    api.push_model(field_bundle(fleet.key, "1.0.0", 1, reads_drift_channel(0.0)))
    api.push_model(field_bundle(fleet.key, "1.1.0", 2, reads_drift_channel(0.0)))  # as good everywhere
    api.push_model(field_bundle(fleet.key, "1.2.0", 3, reads_drift_channel(8.0)))  # worse under drift
    for device, drift in FIELD.items():
        report_as_device(fleet.provision(device, tags={"site": "berlin"}), field_inputs(drift), model="model@1.0.0")
    api.deploy("model@1.0.0", list(FIELD))

    def stored() -> bool:
        profiles = api.rehearsal_profiles({"site": "berlin"}, limit=10, since_s=600)
        return len(profiles) == 2 and all(p["input_mean"] is not None and p["windows"] == 120 for p in profiles)

    wait_until(stored, 30, "both field devices' telemetry")
    (fleet.root / "scenario.yaml").write_text(readme_block(README, "twin-scenario"))
    save_npz(synthetic.recordings(per_class=2, length=40), fleet.root / "data.npz")  # a row a second at 40 Hz
    return fleet


def _start(fleet: LocalFleet, command: str) -> subprocess.Popen[str]:
    """A README command (``edgefleet ...``), started in the fleet's directory against its server."""
    assert fleet.server_url is not None
    env = {**os.environ, "EDGEFLEET_SERVER": fleet.server_url, "EDGEFLEET_TOKEN": fleet.operator_token or ""}
    args = shlex.split(command.replace("\\\n", " "), comments=True)
    assert args[0] == "edgefleet"
    return subprocess.Popen([sys.executable, "-m", "edgefleet", *args[1:]], cwd=fleet.root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_rehearsals_stop_a_model_worse_on_drifting_devices_and_let_a_good_one_through(field: LocalFleet) -> None:
    api = field.api
    assert api is not None
    inputs = {p["device"]: p["input_mean"] for p in api.rehearsal_profiles({"site": "berlin"}, since_s=600)}
    assert inputs["field-drift"][DRIFT_CHANNEL] - inputs["field-clean"][DRIFT_CHANNEL] > 2.0  # the drift, as seen
    twin_command, rehearse_command = readme_block(README, "twin").replace("\\\n", " ").strip().splitlines()
    assert "model@1.1.0" in rehearse_command
    bad_command = rehearse_command.replace("model@1.1.0", "model@1.2.0") + " --json"
    processes = [_start(field, c) for c in (bad_command, rehearse_command, twin_command)]
    try:
        bad, good, twins = processes
        out, err = bad.communicate(timeout=150)
        assert bad.returncode == 1, err
        error = err.strip().splitlines()[-1]
        assert "rollout was not created" in error and not out
        report = json.loads(error.split("error: ", 1)[1].rsplit("; the rollout", 1)[0])
        assert report["passed"] is False and report["phase"] in ("aborted", "paused")
        assert any("accuracy_drop" in (d["reason"] or "") for d in report["decisions"]), report["decisions"]

        out, err = good.communicate(timeout=150)
        assert good.returncode == 0, err
        assert "passed" in err and "to 2 device(s)" in out
        (real,) = [r for r in api.rollouts() if r["candidate"] == "model@1.1.0" and "twin" not in r["plan"]["select"]]
        assert real["targets"] == 2  # the field devices, not the twins tagged like them
        assert not [r for r in api.rollouts() if r["candidate"] == "model@1.2.0" and "twin" not in r["plan"]["select"]]

        out, err = twins.communicate(timeout=120)
        assert twins.returncode == 0, err
        summary = json.loads(out)
        assert summary["twins"] == 4 and summary["revoked"] is True
        ran = [d for d in api.devices() if d["tags"].get("twin") == summary["run"]]
        assert len(ran) == 4 and all(d["reported"] and d["last_seen"] for d in ran)  # they connected as devices
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    twin_devices = [d for d in api.devices() if "twin" in d["tags"]]
    assert len(twin_devices) == 12 and all(d["revoked"] for d in twin_devices)  # 4 + 4 + 4, all cleaned up
    listed = field.cli("device", "list", "--json")
    assert {d["id"] for d in json.loads(listed.stdout)} == set(FIELD)
