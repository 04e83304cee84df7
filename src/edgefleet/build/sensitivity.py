"""Rank the quantized tensors of a QDQ model by the error their quantization introduces.

For every activation quantized in the model (QuantizeLinear -> DequantizeLinear on a computed tensor) the
model is run with both ends exposed, and the relative error ||x - dq(q(x))||^2 / ||x||^2 is measured on a
few calibration samples; weights are compared with the float model's initializers. Keeping a tensor in float
means keeping every node that produces or consumes it in float (ONNX Runtime's ``nodes_to_exclude``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from edgefleet.build.evaluate import ORT_ERRORS
from edgefleet.errors import ModelError

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_QUANT_SUFFIX = "_quantized"


@dataclass(frozen=True)
class TensorError:
    """One quantized tensor, its relative error, and the nodes to keep in float to leave it in float."""

    tensor: str
    kind: str  # "activation" or "weight"
    relative_error: float
    nodes: tuple[str, ...]


def _relative(reference: np.ndarray, approx: np.ndarray, axis: int = 1) -> float:
    """Mean over channels (``axis``) of each channel's noise power over its signal power.

    Per channel, so that a tensor whose one large channel swamps the others' quantization steps scores high
    even though its total relative error is small.
    """
    ref = np.asarray(reference, dtype=np.float64)
    diff = ref - np.asarray(approx, dtype=np.float64)
    if ref.ndim < 2 or axis >= ref.ndim:
        ref, diff, axis = ref.reshape(1, -1), diff.reshape(1, -1), 0
    others = tuple(i for i in range(ref.ndim) if i != axis)
    power = np.sum(np.square(ref), axis=others)
    noise = np.sum(np.square(diff), axis=others)
    ratio = np.where(power > 0, noise / np.where(power > 0, power, 1.0), np.where(noise > 0, 1.0, 0.0))
    return float(np.mean(np.minimum(ratio, 1.0)))


def rank_tensors(qdq_model: bytes, float_model: bytes, x: np.ndarray) -> list[TensorError]:
    """Quantized tensors of ``qdq_model`` ordered from the largest relative error to the smallest."""
    proto = onnx.load_from_string(qdq_model)
    initializers = {t.name: t for t in proto.graph.initializer}
    float_weights = {t.name: t for t in onnx.load_from_string(float_model).graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in proto.graph.node:
        for name in node.input:
            consumers[name].append(node)

    def compute_nodes(names: list[str]) -> tuple[str, ...]:
        return tuple(sorted({n for n in names if n}))

    pairs: list[tuple[str, str, tuple[str, ...]]] = []  # (float tensor, dequantized tensor, nodes)
    weights: list[TensorError] = []
    for q in (n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in initializers):
        for dq in (c for c in consumers[q.output[0]] if c.op_type == "DequantizeLinear"):
            up = producer.get(q.input[0])
            names = [c.name for c in consumers[dq.output[0]] if c.op_type not in _QDQ]
            names += [c.name for c in consumers[q.input[0]] if c.op_type not in _QDQ]
            if up is not None and up.op_type not in _QDQ:
                names.append(up.name)
            pairs.append((q.input[0], dq.output[0], compute_nodes(names)))
    for dq in (n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers):
        original = float_weights.get(dq.input[0].removesuffix(_QUANT_SUFFIX))
        if original is None or len(dq.input) < 2 or dq.input[1] not in initializers:
            continue
        dequantized = _dequantize(dq, initializers)
        reference = numpy_helper.to_array(original).astype(np.float32)
        if dequantized is not None and dequantized.shape == reference.shape:
            names = [c.name for c in consumers[dq.output[0]] if c.op_type not in _QDQ]
            weights.append(TensorError(original.name, "weight", _relative(reference, dequantized, axis=0),
                                       compute_nodes(names)))
    activations = _activation_errors(proto, pairs, x)
    return sorted([*activations, *weights], key=lambda e: -e.relative_error)


def _dequantize(dq: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    q = numpy_helper.to_array(initializers[dq.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(initializers[dq.input[1]]).astype(np.float32)
    zero = (numpy_helper.to_array(initializers[dq.input[2]]).astype(np.float32)
            if len(dq.input) > 2 and dq.input[2] in initializers else np.zeros_like(scale))
    if scale.ndim == 0:
        return (q - zero) * scale
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q - zero.reshape(shape)) * scale.reshape(shape)


def _activation_errors(proto: onnx.ModelProto, pairs: list[tuple[str, str, tuple[str, ...]]],
                       x: np.ndarray) -> list[TensorError]:
    if not pairs:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    existing = {o.name for o in probe.graph.output}
    for name in {n for pair in pairs for n in pair[:2]} - existing:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run every Q/DQ as written
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(bytes(probe.SerializeToString()), options, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as exc:
        raise ModelError(f"cannot load the quantized model to rank its nodes: {exc}") from exc
    names = [o.name for o in session.get_outputs()]
    try:
        values = dict(zip(names, session.run(names, {session.get_inputs()[0].name: x}), strict=True))
    except ORT_ERRORS as exc:
        raise ModelError(f"cannot run the quantized model to rank its nodes: {exc}") from exc
    return [TensorError(tensor, "activation", _relative(values[tensor], values[dq]), nodes)
            for tensor, dq, nodes in pairs if nodes]
