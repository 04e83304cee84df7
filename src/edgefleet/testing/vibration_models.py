"""Small ONNX models on the vibration source's windows (agent.sensors.vibration), for tests and benchmarks of
trigger-gated inference and local action: no torch, no training.

``peak_model``: ``normal`` / ``fault`` from the window's peak |x| (a bearing fault's impacts raise it past about
1 g; a healthy machine stays near 0.8 g). ``conv_model``: a small 1D CNN with fixed random weights, about the
cost of a real vibration classifier, for CPU figures (its answers mean nothing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey

LABELS = ("normal", "fault")
RATE_HZ = 2000.0
WINDOW = 256
FAULT_PEAK_G = 1.0


def _model(nodes: list[onnx.NodeProto], window: int, inits: list[onnx.TensorProto]) -> bytes:
    graph = helper.make_graph(nodes, "vibration", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [None, 1, window])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, len(LABELS)])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="edgefleet-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def peak_model(window: int = WINDOW, peak_g: float = FAULT_PEAK_G, gain: float = 8.0) -> bytes:
    """x [N, 1, window] -> peak |x| -> softmax([gain (peak_g - p), gain (p - peak_g)])."""
    return _model([helper.make_node("Abs", ["x"], ["a"]),
                   helper.make_node("ReduceMax", ["a", "axes"], ["p"], keepdims=0),
                   helper.make_node("MatMul", ["p", "W"], ["s"]),
                   helper.make_node("Add", ["s", "b"], ["logits"]),
                   helper.make_node("Softmax", ["logits"], ["probs"], axis=1)], window,
                  [numpy_helper.from_array(np.array([2], dtype=np.int64), "axes"),
                   numpy_helper.from_array(np.array([[-gain, gain]], dtype=np.float32), "W"),
                   numpy_helper.from_array(np.array([gain * peak_g, -gain * peak_g], dtype=np.float32), "b")])


def conv_model(window: int = WINDOW, seed: int = 0) -> bytes:
    """A 1D CNN (16 then 32 filters, strides 4 and 2, global average, linear, softmax), random weights."""
    rng = np.random.default_rng(seed)

    def weights(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    return _model([helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], strides=[4], pads=[6, 6]),
                   helper.make_node("Relu", ["c1"], ["r1"]),
                   helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2], pads=[3, 4]),
                   helper.make_node("Relu", ["c2"], ["r2"]),
                   helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
                   helper.make_node("Flatten", ["g"], ["f"]),
                   helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"]),
                   helper.make_node("Softmax", ["logits"], ["probs"], axis=1)], window,
                  [weights("w1", 16, 1, 16), weights("b1", 16), weights("w2", 32, 16, 8), weights("b2", 32),
                   weights("w3", 32, len(LABELS)), weights("b3", len(LABELS))])


def preprocess(window: int = WINDOW, trigger: dict[str, Any] | None = None) -> dict[str, Any]:
    """One channel at :data:`RATE_HZ`, non-overlapping windows, no scaling; with ``trigger`` when given."""
    spec: dict[str, Any] = {"kind": "sliding_window", "channels": 1, "window": window, "hop": window,
                            "sample_rate_hz": RATE_HZ, "mean": [0.0], "std": [1.0]}
    if trigger is not None:
        spec["trigger"] = trigger
    return spec


def vibration_bundle(key: SigningKey, *, model: bytes | None = None, trigger: dict[str, Any] | None = None,
                     thresholds: dict[str, float] | None = None, window: int = WINDOW) -> bytes:
    """``model`` (default: :func:`peak_model`) as a signed bundle ``vib@1.0.0`` labelled normal/fault."""
    return pack_bundle(model or peak_model(window), key, BundleSpec(
        name="vib", version="1.0.0", labels=list(LABELS), preprocess=preprocess(window, trigger),
        thresholds=thresholds or {}))
