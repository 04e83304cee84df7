"""Trained torch models back to ONNX, under the original model's input and output names."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

from edgefleet.errors import ModelError

if TYPE_CHECKING:
    import torch

OPSET = 17


@dataclass(frozen=True)
class Signature:
    """What the exported model must look like to stand in for the original: names, sample shape, softmax."""

    input_name: str
    output_name: str
    sample_shape: tuple[int, ...]
    softmax_axis: int | None
    """Append a Softmax on this axis (the original ended in one that training left out)."""

    @classmethod
    def of(cls, model: bytes, sample_shape: tuple[int, ...], softmax_axis: int | None) -> Signature:
        """The signature of a serialized ONNX model."""
        graph = onnx.load_from_string(model).graph
        initializers = {t.name for t in graph.initializer}
        first = next(i.name for i in graph.input if i.name not in initializers)
        return cls(first, graph.output[0].name, sample_shape, softmax_axis)


def _with_softmax(model: torch.nn.Module, axis: int | None) -> torch.nn.Module:
    import torch

    return model if axis is None else torch.nn.Sequential(model, torch.nn.Softmax(dim=axis))


def export_float(model: torch.nn.Module, sig: Signature) -> bytes:
    """A float torch model as ONNX (TorchScript exporter, opset 17, dynamic batch)."""
    import torch

    wrapped = _with_softmax(model.eval(), sig.softmax_axis)
    buffer = io.BytesIO()
    try:
        with torch.no_grad():
            torch.onnx.export(wrapped, (torch.zeros(1, *sig.sample_shape),), buffer,  # type: ignore[arg-type]
                              dynamo=False, opset_version=OPSET, input_names=[sig.input_name],
                              output_names=[sig.output_name],
                              dynamic_axes={sig.input_name: {0: "batch"}, sig.output_name: {0: "batch"}})
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
        raise ModelError(f"ONNX export failed: {exc}".splitlines()[0]) from exc
    return buffer.getvalue()


def export_quantized(model: torch.nn.Module, sig: Signature) -> bytes:
    """A converted PT2E model (quantize/dequantize ops) as int8 QDQ ONNX: the dynamo exporter, weights inside
    the file (``external_data=False``: no ``.onnx.data`` sidecar)."""
    import torch

    wrapped = _with_softmax(model, sig.softmax_axis)
    wrapped.training = False  # the wrapper only: a converted PT2E model refuses train()/eval()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            program = torch.onnx.export(wrapped, (torch.zeros(2, *sig.sample_shape),), dynamo=True,
                                        external_data=False, input_names=[sig.input_name],
                                        output_names=[sig.output_name], dynamic_shapes=({0: "batch"},),
                                        verbose=False)
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
        raise ModelError(f"int8 ONNX export failed: {exc}".splitlines()[0]) from exc
    finally:
        quiet.setLevel(level)
    if program is None:
        raise ModelError("int8 ONNX export returned no model")
    proto = program.model_proto
    quantize_biases(proto)
    return strip_metadata(proto)


def quantize_biases(proto: onnx.ModelProto) -> int:
    """Store the float bias of each Conv/Gemm whose input and weight are dequantized as int32 with scale
    input_scale * weight_scale (how ONNX Runtime's quantizer writes QDQ models, and what it computes when it
    fuses the node); returns how many were rewritten."""
    import numpy as np
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def scale_of(name: str) -> np.ndarray | None:
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
            return None
        return np.asarray(numpy_helper.to_array(inits[dq.input[1]]), dtype=np.float64)

    added: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        bias_init = inits[node.input[2]]
        if bias_init.data_type != onnx.TensorProto.FLOAT:
            continue
        s_in, s_w = scale_of(node.input[0]), scale_of(node.input[1])
        bias = numpy_helper.to_array(bias_init).astype(np.float64)
        if s_in is None or s_w is None or s_in.size != 1 or s_w.size not in (1, bias.size):
            continue
        scale = (float(s_in.reshape(())) * s_w.reshape(-1)).astype(np.float32)
        if scale.size == 1:
            scale = np.full(bias.size, float(scale[0]), dtype=np.float32)
        q = np.clip(np.round(bias / scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        base = f"{node.input[2]}_int32"
        graph.initializer.extend([numpy_helper.from_array(q, base), numpy_helper.from_array(scale, f"{base}_scale"),
                                  numpy_helper.from_array(np.zeros(bias.size, np.int32), f"{base}_zero")])
        added.append(onnx.helper.make_node("DequantizeLinear", [base, f"{base}_scale", f"{base}_zero"],
                                           [f"{base}_dq"], axis=0))
        node.input[2] = f"{base}_dq"
    for dq in reversed(added):
        graph.node.insert(0, dq)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(added)


def strip_metadata(proto: onnx.ModelProto) -> bytes:
    """The model without the exporter's per-node metadata (source stack traces: larger than the weights of a
    small model) and shape annotations."""
    graph = proto.graph
    for item in [*graph.node, *graph.initializer, *graph.input, *graph.output]:
        del item.metadata_props[:]
    del graph.metadata_props[:]
    del graph.value_info[:]
    del proto.metadata_props[:]
    return bytes(proto.SerializeToString())
