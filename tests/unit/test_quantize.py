"""Unit tests for edgefleet.build.quantize: ONNX Runtime static int8 quantization, on a hand-built model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.build.evaluate import predict
from edgefleet.build.quantize import quantize_int8
from edgefleet.errors import ConfigError, DataError, ModelError

CHANNELS, LENGTH, CLASSES = 3, 16, 4


def _tiny_cnn() -> bytes:
    """Conv(3->8, k3) + Relu + global average pool + Gemm(8->4) + Softmax, random weights, dynamic batch."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(size=(8, CHANNELS, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(size=(CLASSES, 8)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(size=CLASSES).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", CHANNELS, LENGTH])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, CHANNELS, LENGTH)).astype(np.float32)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantized_model_runs_and_agrees_with_float(method: str, per_channel: bool) -> None:
    """Every calibration method gives a QDQ model that ORT loads and that picks the float model's class
    on at least 90% of unseen inputs."""
    float_model = _tiny_cnn()
    int8_model = quantize_int8(float_model, _inputs(64, seed=1), per_channel=per_channel, method=method)
    ops = {node.op_type for node in onnx.load_from_string(int8_model).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = _inputs(200, seed=2)
    agree = predict(float_model, x).argmax(axis=1) == predict(int8_model, x).argmax(axis=1)
    assert agree.mean() >= 0.9


def test_activations_are_unsigned() -> None:
    """Activations are quantized to uint8 (zero points of type UINT8), which lets ORT fuse the convs."""
    model = onnx.load_from_string(quantize_int8(_tiny_cnn(), _inputs(16, seed=1)))
    initializers = {t.name: t for t in model.graph.initializer}
    first_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert initializers[first_q.input[2]].data_type == TensorProto.UINT8


@pytest.mark.parametrize(
    "calib",
    [
        np.full((4, CHANNELS, LENGTH), np.nan, dtype=np.float32),
        np.full((4, CHANNELS, LENGTH), np.inf, dtype=np.float32),
        np.zeros((CHANNELS, LENGTH), dtype=np.float32),
        np.zeros((0, CHANNELS, LENGTH), dtype=np.float32),
        np.array([["a", "b"]]),
    ],
    ids=["nan", "inf", "wrong-rank", "empty", "strings"],
)
def test_bad_calibration_raises_data_error(calib: np.ndarray) -> None:
    """Calibration data with NaN/Inf, the wrong rank, no samples or no numbers is a DataError."""
    with pytest.raises(DataError):
        quantize_int8(_tiny_cnn(), calib)


def test_garbage_model_raises_model_error() -> None:
    """Bytes that are not an ONNX model are a ModelError, not a protobuf or ORT traceback."""
    with pytest.raises(ModelError):
        quantize_int8(b"\x00\x01 not a model \xff" * 10, _inputs(4, seed=1))


def test_unknown_method_raises_config_error() -> None:
    """An unknown calibration method is refused before any work."""
    with pytest.raises(ConfigError, match="minmax"):
        quantize_int8(_tiny_cnn(), _inputs(4, seed=1), method="magic")
