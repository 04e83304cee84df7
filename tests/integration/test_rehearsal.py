"""Rollout rehearsal on twins (``edgefleet rollout create --rehearse N``) against a real server and broker. Two
field devices have told the server (over MQTT, with their own logins) that they run clf@1.0.0 and what their
inputs look like; one drifts (a channel no class uses reads +3). A candidate that
reads that channel is as good as the old model on clean inputs and worse on drifting ones: its rehearsal, on
twins that copy the devices' reported inputs, trips the accuracy gate and the real rollout is not created. A
candidate that ignores the channel passes its rehearsal and the real rollout starts on the real devices only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.processes import wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport import topics
from edgefleet.transport.link import MqttLink
from edgefleet.transport.mqtt_url import MqttEndpoint, parse_mqtt_url

pytestmark = pytest.mark.integration
DRIFT_CHANNEL = 4
"""A channel none of the synthetic classes raises (classes use channels 0-3)."""


def reads_drift_channel(weight: float) -> bytes:
    """The synthetic classifier, plus channel 4 voting for class 0 with ``weight`` (0: the plain classifier)."""
    weights = np.zeros((synthetic.CHANNELS, synthetic.CLASSES), dtype=np.float32)
    weights[np.arange(synthetic.CLASSES), np.arange(synthetic.CLASSES)] = 4.0
    weights[DRIFT_CHANNEL, 0] = weight
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=0),
         helper.make_node("MatMul", ["pooled", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=1)], "drift_reader",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, synthetic.CHANNELS, synthetic.WINDOW])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, synthetic.CLASSES])],
        [numpy_helper.from_array(np.array([2], dtype=np.int64), "axes"), numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return bytes(model.SerializeToString())


def _field_inputs(drift: float) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a field device's inputs: the synthetic recordings, channel 4 moved by ``drift``."""
    x = synthetic.recordings(per_class=4, length=60, seed=3).test_x.astype(np.float64)
    x[:, DRIFT_CHANNEL, :] += drift
    flat = x.transpose(1, 0, 2).reshape(synthetic.CHANNELS, -1)
    return [round(float(v), 3) for v in flat.mean(axis=1)], [round(float(v), 3) for v in flat.std(axis=1)]


def _report_as_device(credentials: Path, inputs: tuple[list[float], list[float]], batches: int = 6) -> None:
    """What a field device running clf@1.0.0 tells the server, over MQTT with its own login: its reported state
    and telemetry batches whose drift statistics are its inputs (the scaling of clf@1.0.0 is mean 0, std 1)."""
    creds = json.loads(credentials.read_text())
    endpoint = parse_mqtt_url(creds["mqtt_url"])
    endpoint = MqttEndpoint(endpoint.host, endpoint.port, creds["mqtt_username"], creds["mqtt_password"])
    device = creds["device_id"]
    link = MqttLink(endpoint, f"field-{device}")
    link.start(10.0)
    try:
        link.publish_and_wait(topics.reported(device), json.dumps({
            "device": device, "agent_version": "0.1.0", "active": "clf@1.0.0", "running": "clf@1.0.0",
            "update_state": "idle", "hardware": "generic"}).encode(), retain=True)
        mean, std = inputs
        for seq in range(batches):
            link.publish_and_wait(topics.telemetry(device), json.dumps({
                "device": device, "seq": seq, "ts": time.time(), "model": "clf@1.0.0", "windows": 20,
                "labelled": 20, "correct": 20, "latency_ms": {"150": 20}, "confidence": [0] * 19 + [20],
                "drift": {"n": 400, "mean_z": mean, "std_ratio": std, "score": max(abs(v) for v in mean)}}).encode())
    finally:
        link.stop()


@pytest.fixture
def field(fleet: LocalFleet) -> LocalFleet:
    """Two field devices on clf@1.0.0 that have reported to the server, one of them drifting."""
    api = fleet.api
    assert api is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    api.push_model(fleet.bundle("2.0.0", 2, reads_drift_channel(8.0)))  # worse under drift
    api.push_model(fleet.bundle("2.1.0", 3, reads_drift_channel(0.0)))  # as good as 1.0.0 everywhere
    for device, drift in {"field-clean": 0.0, "field-drift": 3.0}.items():
        _report_as_device(fleet.provision(device, tags={"site": "plant"}), _field_inputs(drift))
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
         "--install-timeout", "60", "--rehearse", "4", "--rehearse-warmup", "3", "--rehearse-timeout", "90",
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
