"""Rescaling the channels between two consecutive linear layers without changing what the model computes.

Two layers form a *pair* when the first (Conv, Gemm or MatMul with constant weights) feeds the second directly
or through one positive-homogeneous activation (Relu, LeakyRelu: ``f(x / s) = f(x) / s`` for ``s > 0``), and
nothing else reads the tensor between them. Dividing the first layer's output channel ``i`` (its weights and
bias) by ``s_i`` and multiplying the second layer's input channel ``i`` by ``s_i`` leaves the model's function
unchanged; the passes built on this (cross-layer equalization, SmoothQuant-style smoothing) differ only in how
they choose ``s``. Clip (ReLU6) is not homogeneous, so a pair never crosses it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

_HOMOGENEOUS = ("Relu", "LeakyRelu")
_SCALE_LIMIT = 1e6


@dataclass(frozen=True)
class Layer:
    """One linear layer: its node, the weight and bias initializers and the axes of its channels."""

    node: onnx.NodeProto
    weight: str
    bias: str | None
    out_axis: int  # axis of the weight holding output channels
    in_axis: int  # axis of the weight holding input channels
    bias_scale: float  # Gemm's beta: the bias enters the output multiplied by it
    kind: str  # "conv": channels on axis 1 of the activations; "dense": on the last axis


@dataclass(frozen=True)
class Pair:
    """Two layers with nothing but an optional homogeneous activation between them."""

    first: Layer
    second: Layer
    between: str  # the tensor the second layer reads (after the activation, if any)


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i) if a.type == onnx.AttributeProto.INT else float(a.f)
    return default


def _layer(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> Layer | None:
    """The node as a linear layer with constant float weights, or None when it is not one we can rescale."""
    if len(node.input) < 2 or node.input[1] not in shapes:
        return None
    weight, shape = node.input[1], shapes[node.input[1]]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and bias not in shapes:
        return None
    if node.op_type == "Conv" and len(shape) >= 3:
        group = int(_attr(node, "group", 1))
        if group == 1:
            return Layer(node, weight, bias, 0, 1, 1.0, "conv")
        if shape[1] == 1 and group == shape[0]:  # depthwise: channel i in, channel i out
            return Layer(node, weight, bias, 0, 0, 1.0, "conv")
        return None
    if node.op_type == "Gemm" and len(shape) == 2:
        if _attr(node, "transA", 0) or float(_attr(node, "alpha", 1.0)) <= 0:
            return None
        beta = float(_attr(node, "beta", 1.0))
        out_axis = 0 if _attr(node, "transB", 0) else 1
        if bias is not None and (beta == 0 or shapes[bias] not in ((shape[out_axis],), (1, shape[out_axis]))):
            return None
        return Layer(node, weight, bias, out_axis, 1 - out_axis, beta, "dense")
    if node.op_type == "MatMul" and len(shape) == 2 and node.input[0] not in shapes:
        return Layer(node, weight, None, 1, 0, 1.0, "dense")
    return None


def find_pairs(model: onnx.ModelProto) -> list[Pair]:
    """Every pair of rescalable layers in the graph, in graph order."""
    graph = model.graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    uses = Counter(name for n in graph.node for name in n.input)
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in graph.output}

    def single(tensor: str) -> onnx.NodeProto | None:
        readers = consumers.get(tensor, [])
        return readers[0] if len(readers) == 1 and tensor not in outputs else None

    pairs: list[Pair] = []
    for node in graph.node:
        first = _layer(node, shapes)
        if first is None or not node.output:
            continue
        between, nxt = node.output[0], single(node.output[0])
        if nxt is not None and nxt.op_type in _HOMOGENEOUS and nxt.input[0] == between:
            between, nxt = nxt.output[0], single(nxt.output[0])
        if nxt is None or nxt.input[0] != between:
            continue
        second = _layer(nxt, shapes)
        if second is None or second.kind != first.kind:
            continue
        owned = [first.weight, second.weight, *([first.bias] if first.bias else [])]
        if any(uses[name] != 1 for name in owned):  # a shared initializer would change another layer too
            continue
        channels = shapes[first.weight][first.out_axis]
        if shapes[second.weight][second.in_axis] != channels:
            continue
        pairs.append(Pair(first, second, between))
    return pairs


def channel_range(weight: np.ndarray, axis: int) -> np.ndarray:
    """Largest absolute weight of every channel along ``axis``."""
    others = tuple(i for i in range(weight.ndim) if i != axis)
    return np.asarray(np.abs(weight).max(axis=others) if others else np.abs(weight))


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


class Weights:
    """The float initializers of a model as arrays, written back by :meth:`store`."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.arrays = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer
                       if t.data_type == onnx.TensorProto.FLOAT}
        self._changed: set[str] = set()

    def get(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def set(self, name: str, value: np.ndarray) -> None:
        self.arrays[name] = value
        self._changed.add(name)

    def store(self) -> None:
        """Write every changed array back into the model's initializers (float32)."""
        for tensor in self.model.graph.initializer:
            if tensor.name in self._changed:
                tensor.CopyFrom(numpy_helper.from_array(self.arrays[tensor.name].astype(np.float32), tensor.name))
        self._changed.clear()


def rescale(weights: Weights, pair: Pair, scale: np.ndarray) -> None:
    """Divide the first layer's output channels by ``scale`` and multiply the second's input channels by it."""
    scale = np.clip(np.where(np.isfinite(scale) & (scale > 0), scale, 1.0), 1 / _SCALE_LIMIT, _SCALE_LIMIT)
    first, second = pair.first, pair.second
    w1 = weights.get(first.weight)
    weights.set(first.weight, w1 / _along(scale, first.out_axis, w1.ndim))
    if first.bias is not None:
        b1 = weights.get(first.bias)
        weights.set(first.bias, b1 / scale.reshape(b1.shape))
    w2 = weights.get(second.weight)
    weights.set(second.weight, w2 * _along(scale, second.in_axis, w2.ndim))


def activation_axis(pair: Pair) -> int:
    """Axis of the channels in the tensor between the two layers (1 for convolutions, last for dense)."""
    return 1 if pair.first.kind == "conv" else -1


def prepare(model: bytes) -> bytes:
    """The model as the int8 pass quantizes it: ONNX Runtime's quantization pre-processing (BatchNorm folded
    into the convolutions before it, so they become rescalable pairs) and a name on every node."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import quant_pre_process

    from edgefleet.build.passes.static_int8 import name_nodes, quiet_quantizer
    from edgefleet.build.quantize import QUANTIZER_ERRORS
    from edgefleet.errors import ModelError

    with tempfile.TemporaryDirectory(prefix="edgefleet-scale-") as tmp:
        src, out = Path(tmp) / "float.onnx", Path(tmp) / "pre.onnx"
        src.write_bytes(model)
        try:
            with quiet_quantizer():
                quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
        except QUANTIZER_ERRORS as exc:
            raise ModelError(f"pre-processing for channel scaling failed: {str(exc).splitlines()[0][:300]}") from exc
        return name_nodes(out.read_bytes())


def channel_statistics(model: bytes, tensors: dict[str, int], x: np.ndarray, *, reduce: str = "absmax",
                       batch: int = 16) -> dict[str, np.ndarray]:
    """Per-channel ``absmax`` (largest absolute value) or ``mean`` of intermediate tensors over the inputs ``x``.

    ``tensors`` maps each tensor name to its channel axis. The model runs unoptimized (every Q/DQ as written)
    with the tensors exposed as outputs, ``batch`` rows at a time so that large activations never pile up.
    """
    import onnxruntime as ort

    from edgefleet.build.evaluate import ORT_ERRORS
    from edgefleet.errors import ModelError

    if not tensors:
        return {}
    probe = onnx.load_from_string(model)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    names = list(tensors)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        for start in range(0, len(x), batch):
            for name, value in zip(names, session.run(names, {feed: x[start:start + batch]}), strict=True):
                arr = np.asarray(value, dtype=np.float64)
                axis = tensors[name] % arr.ndim
                others = tuple(i for i in range(arr.ndim) if i != axis)
                if reduce == "absmax":
                    part = np.abs(arr).max(axis=others)
                    sums[name] = np.maximum(sums[name], part) if name in sums else part
                else:
                    part = arr.sum(axis=others)
                    sums[name] = sums[name] + part if name in sums else part
                    counts[name] += arr.size // arr.shape[axis]
    except ORT_ERRORS as exc:
        raise ModelError(f"cannot run the model to collect channel statistics: {exc}") from exc
    if reduce == "absmax":
        return sums
    return {name: sums[name] / max(counts[name], 1) for name in names}
