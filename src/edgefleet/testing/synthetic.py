"""Small, fully known models and recordings for tests and benchmarks (no torch, no downloads).

The recordings have one class per channel: class k raises channel k by ``offset``. The model averages each
channel over the window and maps channel k to class k, so its accuracy on clean data is exactly 100%.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.data.basicmotions import Recordings

CHANNELS = 6
CLASSES = 4
WINDOW = 20
HOP = 10
LABELS = ("alpha", "beta", "gamma", "delta")


def recordings(per_class: int = 2, length: int = 60, offset: float = 3.0, seed: int = 0,
               rate_hz: float = 10.0) -> Recordings:
    """Train and test recordings [n, CHANNELS, length] whose class shows as a shifted channel."""
    rng = np.random.default_rng(seed)

    def split() -> tuple[np.ndarray, np.ndarray]:
        y = np.tile(np.arange(CLASSES), per_class)  # neighbours differ in class
        x = rng.normal(0.0, 0.3, size=(len(y), CHANNELS, length)).astype(np.float32)
        x[np.arange(len(y)), y, :] += offset
        return x, y.astype(np.int64)

    train_x, train_y = split()
    test_x, test_y = split()
    return Recordings(train_x, train_y, test_x, test_y, LABELS, rate_hz, "synthetic")


def preprocess_spec(window: int = WINDOW, hop: int = HOP, rate_hz: float = 10.0) -> dict[str, Any]:
    return {"kind": "sliding_window", "channels": CHANNELS, "window": window, "hop": hop,
            "sample_rate_hz": rate_hz, "mean": [0.0] * CHANNELS, "std": [1.0] * CHANNELS}


def channel_mean_model(window: int = WINDOW, scale: float = 4.0, bias: list[float] | None = None) -> bytes:
    """x [N, CHANNELS, window] -> mean over time -> channel k scores class k -> softmax ``probs`` [N, CLASSES]."""
    weights = np.zeros((CHANNELS, CLASSES), dtype=np.float32)
    weights[np.arange(CLASSES), np.arange(CLASSES)] = scale
    bias_values = np.asarray(bias if bias is not None else [0.0] * CLASSES, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=0),
         helper.make_node("MatMul", ["pooled", "W"], ["scores"]),
         helper.make_node("Add", ["scores", "b"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=1)],
        "channel_mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, CHANNELS, window])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, CLASSES])],
        [numpy_helper.from_array(np.array([2], dtype=np.int64), "axes"),
         numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias_values, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="edgefleet-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data
