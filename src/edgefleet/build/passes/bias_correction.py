"""Empirical bias correction (Nagel et al. 2019, AIMET): remove the mean output shift that int8 rounding adds.

Quantized weights and inputs shift each layer's output by a small per-channel amount on average, and the
shifts add up through the network. On calibration inputs the float model's per-channel output means of every
Conv/Gemm are measured once; then, layer by layer in graph order, the quantized model runs with the biases
corrected so far, and the layer's bias is lowered by its remaining mean shift (so a layer sees its inputs as
the corrected layers before it produce them). Biases are fed as inputs while correcting, so the quantized model
is never re-quantized; the result is written back into its int32 (or float) bias initializers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgefleet.build.evaluate import ORT_ERRORS
from edgefleet.build.passes.channel_scaling import channel_statistics
from edgefleet.errors import ModelError


@dataclass(frozen=True)
class _Layer:
    node: str
    axis: int  # channel axis of the output activations
    bias: str  # the bias initializer: int32 behind a DequantizeLinear, or float
    scale: str | None  # the DequantizeLinear's scale initializer (None: a float bias)
    feed: str  # the name the probe model reads the float bias from


def _layers(model: onnx.ModelProto) -> list[_Layer]:
    init = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    layers: list[_Layer] = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2] or not node.name:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("beta", 1.0) != 1.0):
            continue
        axis = 1 if node.op_type == "Conv" else -1
        source = node.input[2]
        dq = producer.get(source)
        feed = f"{node.name}__bias_correction"
        if source in init and init[source].data_type == onnx.TensorProto.FLOAT:
            layers.append(_Layer(node.name, axis, source, None, feed))
        elif (dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in init
              and init[dq.input[0]].data_type == onnx.TensorProto.INT32 and len(dq.input) > 1 and dq.input[1] in init):
            layers.append(_Layer(node.name, axis, dq.input[0], dq.input[1], feed))
    return layers


def correct_biases(quantized: bytes, float_model: bytes, x: np.ndarray) -> tuple[bytes, list[str]]:
    """``quantized`` with every Conv/Gemm bias corrected for its mean shift against ``float_model`` on ``x``;
    layers are matched by node name. Returns the corrected model and a note."""
    proto = onnx.load_from_string(quantized)
    float_outputs = {n.name: n.output[0] for n in onnx.load_from_string(float_model).graph.node if n.name}
    layers = [layer for layer in _layers(proto) if layer.node in float_outputs]
    if not layers:
        return quantized, ["bias correction: no Conv/Gemm layer with a bias to correct"]
    reference = channel_statistics(float_model, {float_outputs[la.node]: la.axis for la in layers}, x, reduce="mean")
    init = {t.name: t for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    biases: dict[str, np.ndarray] = {}
    for layer in layers:
        value = numpy_helper.to_array(init[layer.bias]).astype(np.float64)
        if layer.scale is not None:
            value = value * numpy_helper.to_array(init[layer.scale]).astype(np.float64)
        biases[layer.feed] = value.reshape(-1)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe_nodes = {n.name: n for n in probe.graph.node}
    for layer in layers:
        probe_nodes[layer.node].input[2] = layer.feed
        probe.graph.input.append(onnx.helper.make_tensor_value_info(layer.feed, onnx.TensorProto.FLOAT,
                                                                    [len(biases[layer.feed])]))
    session, feed_name = _session(probe, [nodes[la.node].output[0] for la in layers])
    largest = 0.0
    for layer in layers:
        output = nodes[layer.node].output[0]
        feeds = {feed_name: x, **{k: v.astype(np.float32) for k, v in biases.items()}}
        try:
            value = np.asarray(session.run([output], feeds)[0], dtype=np.float64)
        except ORT_ERRORS as exc:
            raise ModelError(f"bias correction could not run the quantized model: {str(exc)[:300]}") from exc
        others = tuple(i for i in range(value.ndim) if i != layer.axis % value.ndim)
        delta = value.mean(axis=others) - reference[float_outputs[layer.node]]
        if delta.shape == biases[layer.feed].shape and np.isfinite(delta).all():
            biases[layer.feed] = biases[layer.feed] - delta
            largest = max(largest, float(np.abs(delta).max()))
    for layer in layers:
        tensor = init[layer.bias]
        shape = tuple(tensor.dims)
        value = biases[layer.feed]
        if layer.scale is not None:
            scale = numpy_helper.to_array(init[layer.scale]).astype(np.float64).reshape(-1)
            step = np.where(scale != 0, scale, 1.0)
            stored = np.clip(np.round(value / step), -(2**31), 2**31 - 1).astype(np.int32)
        else:
            stored = value.astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(stored.reshape(shape), layer.bias))
    note = (f"bias correction: {len(layers)} layer(s) over {len(x)} calibration input(s), largest mean shift "
            f"removed {largest:.3g}")
    return bytes(proto.SerializeToString()), [note]


def _session(probe: onnx.ModelProto, outputs: list[str]) -> tuple[Any, str]:
    import onnxruntime as ort

    existing = {o.name for o in probe.graph.output}
    for name in outputs:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as exc:
        raise ModelError(f"bias correction could not load the quantized model: {str(exc)[:300]}") from exc
    return session, session.get_inputs()[0].name
