"""A small field for rehearsal tests and benchmarks: devices that report (over MQTT, with their own logins) that
they run the synthetic classifier and what their inputs look like, some of them drifting on a channel no class
uses; and a candidate model that reads that channel (worse under drift) or ignores it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.testing import synthetic
from edgefleet.transport import topics
from edgefleet.transport.link import MqttLink
from edgefleet.transport.mqtt_url import MqttEndpoint, parse_mqtt_url

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


def field_inputs(drift: float) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a field device's inputs: the synthetic recordings, channel 4 moved by ``drift``."""
    x = synthetic.recordings(per_class=4, length=60, seed=3).test_x.astype(np.float64)
    x[:, DRIFT_CHANNEL, :] += drift
    flat = x.transpose(1, 0, 2).reshape(synthetic.CHANNELS, -1)
    return [round(float(v), 3) for v in flat.mean(axis=1)], [round(float(v), 3) for v in flat.std(axis=1)]


def report_as_device(credentials: Path, inputs: tuple[list[float], list[float]], *, model: str = "clf@1.0.0",
                     batches: int = 6) -> None:
    """What a field device running ``model`` tells the server: its reported state, and telemetry batches of 20
    windows (all right) whose drift statistics are ``inputs`` (the synthetic scaling is mean 0, std 1)."""
    creds = json.loads(credentials.read_text())
    endpoint = parse_mqtt_url(creds["mqtt_url"])
    endpoint = MqttEndpoint(endpoint.host, endpoint.port, creds["mqtt_username"], creds["mqtt_password"])
    device = creds["device_id"]
    link = MqttLink(endpoint, f"field-{device}")
    link.start(10.0)
    try:
        link.publish_and_wait(topics.reported(device), json.dumps({
            "device": device, "agent_version": "0.1.0", "active": model, "running": model,
            "update_state": "idle", "hardware": "generic"}).encode(), retain=True)
        mean, std = inputs
        for seq in range(batches):
            link.publish_and_wait(topics.telemetry(device), json.dumps({
                "device": device, "seq": seq, "ts": time.time(), "model": model, "windows": 20,
                "labelled": 20, "correct": 20, "latency_ms": {"150": 20}, "confidence": [0] * 19 + [20],
                "drift": {"n": 400, "mean_z": mean, "std_ratio": std, "score": max(abs(v) for v in mean)}}).encode())
    finally:
        link.stop()


def field_bundle(key: SigningKey, version: str, release: int, model: bytes, name: str = "model") -> bytes:
    """A signed bundle ``NAME@VERSION`` of ``model`` with the synthetic preprocessing and labels."""
    return pack_bundle(model, key, BundleSpec(name=name, version=version, release=release,
                                              labels=list(synthetic.LABELS), preprocess=synthetic.preprocess_spec()))


def readme_block(readme: Path, marker: str) -> str:
    """The fenced block after ``<!-- MARKER -->`` in the README."""
    return readme.read_text().split(f"<!-- {marker} -->", 1)[1].split("```", 2)[1].split("\n", 1)[1]
