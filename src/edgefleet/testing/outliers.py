"""Models with outlier channels, made without changing what a model computes (for tests and benchmarks).

Fine-tuning can leave one channel of an activation orders of magnitude larger than its neighbours while the
next layer divides it back; the model is as accurate as before, but a per-tensor int8 range for that
activation flattens every other channel. :func:`with_outlier_channels` reproduces this on any model with
consecutive linear layers; :func:`conv_model` is a small random convolutional model to apply it to.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.build.passes.channel_scaling import Weights, activation_axis, channel_statistics, find_pairs, prepare
from edgefleet.build.passes.channel_scaling import rescale as rescale_pair


def with_outlier_channels(model: bytes, factor: float = 1000.0, pairs: int = 2,
                          calib_x: np.ndarray | None = None) -> bytes:
    """Multiply one output channel of up to ``pairs`` layers by ``factor`` and divide the next layer's weights for
    it by the same: the function is unchanged (up to float rounding), the activation ranges are not.

    Pairs are spread over the graph (first, then evenly spaced); in each, the channel with the largest
    activation on ``calib_x`` (or the largest weights without it) becomes the outlier. BatchNorm is folded first.
    """
    proto = onnx.load_from_string(prepare(model))
    found = find_pairs(proto)
    if not found:
        raise ValueError("no pair of consecutive linear layers to put an outlier channel between")
    chosen = [found[int(i)] for i in np.unique(np.linspace(0, len(found) - 1, min(pairs, len(found))).round())]
    stats = (channel_statistics(proto.SerializeToString(), {p.between: activation_axis(p) for p in chosen}, calib_x)
             if calib_x is not None else {})
    weights = Weights(proto)
    for pair in chosen:
        w1 = weights.get(pair.first.weight)
        strength = stats.get(pair.between)
        if strength is None:
            strength = np.abs(np.moveaxis(w1, pair.first.out_axis, 0)).reshape(w1.shape[pair.first.out_axis], -1)
            strength = strength.max(axis=1)
        scale = np.ones(w1.shape[pair.first.out_axis])
        scale[int(np.argmax(strength))] = 1.0 / factor
        rescale_pair(weights, pair, scale)
    weights.store()
    return bytes(proto.SerializeToString())


def conv_model(seed: int = 0, channels: int = 4, size: int = 8, classes: int = 4) -> bytes:
    """x [N, channels, size, size] -> Conv 3x3 (16) -> Relu -> Conv 1x1 (16) -> Conv 1x1 (16) -> Relu ->
    Flatten -> Gemm (classes): random weights, two rescalable pairs (conv1-conv2 through Relu, conv2-conv3)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return np.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[1:])), dtype=np.float32)

    arrays = {"w1": w(16, channels, 3, 3), "b1": w(16) * 0.1, "w2": w(16, 16, 1, 1), "b2": w(16) * 0.1,
              "w3": w(16, 16, 1, 1), "b3": w(16) * 0.1, "wf": w(classes, 16 * size * size),
              "bf": np.zeros(classes, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Conv", ["c2", "w3", "b3"], ["c3"], name="conv3"),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("Flatten", ["r3"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "outlier_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(v, k) for k, v in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())
