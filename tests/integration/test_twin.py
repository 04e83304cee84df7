"""Digital twins (``edgefleet twin``, :mod:`edgefleet.twin`): the real agent code against a real server and broker.

A twin killed (SIGKILL of its host process) in the middle of an update resumes it when started again, as the real
agent does (tests/integration/test_agent_faults.py), and then runs and reports the new model; a malformed
scenario file is one line and exit code 2.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.processes import wait_until
from edgefleet.testing.agent_rig import read_agent_db
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport.mqtt_url import MqttEndpoint
from edgefleet.twin.fleet import TwinFleet
from edgefleet.twin.scenario import ScenarioError, load_scenario, parse_scenario

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


def _state(fleet: TwinFleet) -> dict[str, object]:
    db = read_agent_db(fleet.twins[0].data_dir)
    return {} if db is None else {**db[0], **db[1]}


def test_a_twin_killed_mid_update_resumes_it_like_a_real_agent(fleet: LocalFleet, tmp_path: Path) -> None:
    api = fleet.api
    assert api is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    api.push_model(fleet.bundle("2.0.0", 2))
    scenario = parse_scenario({"rate_hz": 20, "telemetry_interval_s": 1, "synthetic": {"rows_per_class": 1},
                               "groups": [{"name": "lab", "model": "clf@1.0.0", "noise": 0.05,
                                           "sensor": {"dropout": 0.01}}]})
    twins = TwinFleet(api, tmp_path / "twins", scenario)
    twins.provision(1)
    twins.start()
    assert twins.wait_running("clf@1.0.0", 1, 60) == 1
    twins.stop()

    twins.start(env={"EDGEFLEET_FAULT_PAUSE": "staged:60"})  # the updater holds once v2 is verified and staged
    api.deploy("clf@2.0.0", [twins.twins[0].device_id])
    wait_until(lambda: _state(twins).get("update_state") == "staged", 60, "the twin to stage version 2")
    twins.kill()
    killed = _state(twins)
    assert killed["active"] == "clf@1.0.0" and killed["pending_update"]["version"] == "2.0.0"

    twins.start()
    wait_until(lambda: _state(twins).get("active") == "clf@2.0.0" and _state(twins).get("update_state") == "idle",
               60, "the update to complete after the restart")
    state = _state(twins)
    assert state.get("previous") == "clf@1.0.0" and state.get("candidate") is None
    assert twins.wait_running("clf@2.0.0", 1, 30) == 1

    def reported_v2() -> bool:
        models = {m["model"]: m for m in api.telemetry(twins.twins[0].device_id)["models"]}
        return models.get("clf@2.0.0", {}).get("windows", 0) > 0

    wait_until(reported_v2, 30, "telemetry of version 2 from the resumed twin")
    twins.close()
    assert api.device(twins.twins[0].device_id)["revoked"]


MALFORMED = [
    ("groups: [{name: a, noise: -1}]", "groups.0.noise"),
    ("rate_hz: 10\ngroups:\n  - {faults: [{kind: meteor, at_s: 1}]}", "groups.0.faults.0"),
    ("groups: [{share: 0.5, count: 3}]", "give share or count"),
    ("rate_hz: [10", "not YAML at line"),
    ("- just\n- a list", "must be a mapping"),
    ("data: a.npz\nsynthetic: {channels: 6}", "give data or synthetic"),
    ("synthetic: {channels: 2, classes: 4}", "one channel per class"),
]


@pytest.mark.parametrize(("text", "expected"), MALFORMED)
def test_a_malformed_scenario_names_its_field_in_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    message = str(caught.value)
    assert expected in message and str(path) in message and "\n" not in message
    assert caught.value.exit_code == 2


def test_edgefleet_twin_with_a_malformed_scenario_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(MALFORMED[0][0])
    done = subprocess.run([sys.executable, "-m", "edgefleet", "twin", "--scenario", str(path), "--devices", "2",
                           "--server", "http://127.0.0.1:9", "--token", "unused"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "groups.0.noise" in lines[0] and str(path) in lines[0], done.stderr
