"""ONNX -> PyTorch for training-time compression: a ``torch.fx.GraphModule`` built of real layers.

Weighted operators become ``nn.Module`` layers (so torch-pruning's dependency graph can remove their channels
and torch.export can trace them for quantization-aware training); the rest become torch functions. Supported
(opset 11-21, one float input):

* Conv (1D/2D, grouped and depthwise, symmetric pads), Gemm, MatMul with a constant 2-D weight (an Add of a
  constant after it becomes the bias), BatchNormalization;
* Relu, Clip, Sigmoid, Tanh, HardSwish, HardSigmoid, LeakyRelu, Softmax, Add/Sub/Mul/Div (tensors or
  constants);
* MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, ReduceMean;
* Flatten, Reshape (to [batch, -1] it becomes a flatten), Concat, Transpose, Squeeze, Unsqueeze, Identity,
  Dropout, Constant.

Anything else raises :class:`ConversionError` naming the first operator it cannot convert. torch is imported
inside the functions only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgefleet.errors import ModelError

if TYPE_CHECKING:
    import torch

SUPPORTED_OPS = ("Conv", "Gemm", "MatMul", "BatchNormalization", "Relu", "Clip", "Sigmoid", "Tanh", "HardSwish",
                 "HardSigmoid", "LeakyRelu", "Softmax", "Add", "Sub", "Mul", "Div", "MaxPool", "AveragePool",
                 "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "Flatten", "Reshape", "Concat", "Transpose",
                 "Squeeze", "Unsqueeze", "Identity", "Dropout", "Constant")


class ConversionError(ModelError):
    """An ONNX model outside the converter's operator set (or its supported attributes)."""


@dataclass
class Converted:
    """The torch model and what the conversion left out."""

    module: torch.nn.Module
    """A GraphModule taking the ONNX model's input and returning its (first) output, or the logits."""
    softmax_axis: int | None
    """The axis of a final Softmax left out (``logits=True``): export appends it again; None if none was."""
    input_shape: tuple[int, ...]
    """The model input's shape without the batch axis."""


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _unsupported(node: onnx.NodeProto, why: str) -> ConversionError:
    return ConversionError(f"cannot convert the ONNX model to PyTorch: {node.op_type} node {node.name or '?'!r} "
                           f"{why}")


class _Builder:
    """Walks the ONNX graph in order, emitting fx nodes into ``graph`` and layers into ``root``."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        import torch
        from torch import fx

        self.torch, self.fx = torch, fx
        self.proto = proto
        self.root = torch.nn.Module()
        self.graph = fx.Graph()
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        self.values: dict[str, Any] = {}
        self.ranks: dict[str, int] = {}
        for vi in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                self.ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in proto.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.skip: set[int] = set()
        self.count = 0

    # -- helpers ---------------------------------------------------------------------------------------------
    def layer(self, module: torch.nn.Module, kind: str) -> str:
        name = f"{kind}_{self.count}"
        self.count += 1
        self.root.add_module(name, module)
        return name

    def const(self, name: str) -> Any:
        """An fx value for an initializer or Constant output (a buffer, registered once)."""
        if name not in self.values:
            attr = f"const_{self.count}"
            self.count += 1
            self.root.register_buffer(attr, self.torch.from_numpy(np.array(self.consts[name])))
            self.values[name] = self.graph.get_attr(attr)
        return self.values[name]

    def value(self, name: str) -> Any:
        return self.values[name] if name in self.values else self.const(name)

    def rank(self, node: onnx.NodeProto) -> int:
        rank = self.ranks.get(node.input[0])
        if rank is None:
            raise _unsupported(node, "has an input of unknown rank")
        return rank

    def weight(self, node: onnx.NodeProto, index: int) -> np.ndarray:
        if len(node.input) <= index or node.input[index] not in self.consts:
            raise _unsupported(node, f"needs a constant input {index}")
        return np.array(self.consts[node.input[index]], dtype=np.float32)

    def call(self, module_name: str, *args: Any) -> Any:
        return self.graph.call_module(module_name, args)

    def fn(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.graph.call_function(func, args, kwargs)

    # -- operators -------------------------------------------------------------------------------------------
    def convert(self, node: onnx.NodeProto) -> Any:
        torch, nn = self.torch, self.torch.nn
        op, a = node.op_type, _attrs(node)

        def x() -> Any:
            return self.value(node.input[0])

        if op == "Conv":
            return self._conv(node, a)
        if op == "Gemm":
            w = self.weight(node, 1)
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise _unsupported(node, "has transA, alpha or beta other than the defaults")
            w = w if a.get("transB", 0) else w.T
            bias = self.weight(node, 2) if len(node.input) > 2 and node.input[2] else None
            return self.call(self._linear(w, bias), x())
        if op == "MatMul":
            if node.input[1] not in self.consts or self.consts[node.input[1]].ndim != 2:
                raise _unsupported(node, "multiplies by something other than a constant matrix")
            w = self.weight(node, 1).T
            bias, users = None, self.consumers.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type == "Add":
                other = [i for i in users[0].input if i != node.output[0]]
                if len(other) == 1 and other[0] in self.consts and self.consts[other[0]].shape == (w.shape[0],):
                    bias = np.asarray(self.consts[other[0]], dtype=np.float32)
                    self.skip.add(id(users[0]))
                    out = self.call(self._linear(w, bias), x())
                    self.values[users[0].output[0]] = out
                    return out
            return self.call(self._linear(w, bias), x())
        if op == "BatchNormalization":
            rank = self.rank(node)
            cls = nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d if rank in (2, 3) else None
            if cls is None:
                raise _unsupported(node, f"has a rank-{rank} input")
            scale, bias, mean, var = (self.weight(node, i) for i in range(1, 5))
            bn = cls(len(scale), eps=float(a.get("epsilon", 1e-5)))
            with torch.no_grad():
                bn.weight.copy_(torch.from_numpy(scale))
                bn.bias.copy_(torch.from_numpy(bias))
                bn.running_mean.copy_(torch.from_numpy(mean))
                bn.running_var.copy_(torch.from_numpy(var))
            return self.call(self.layer(bn, "bn"), x())
        simple: dict[str, Callable[[], Any]] = {
            "Relu": nn.ReLU, "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh, "HardSwish": nn.Hardswish}
        if op in simple:
            return self.call(self.layer(simple[op](), op.lower()), x())
        if op == "LeakyRelu":
            return self.call(self.layer(nn.LeakyReLU(float(a.get("alpha", 0.01))), "leakyrelu"), x())
        if op == "HardSigmoid":
            if abs(a.get("alpha", 0.2) - 1 / 6) > 1e-6 or abs(a.get("beta", 0.5) - 0.5) > 1e-6:
                raise _unsupported(node, "has alpha/beta other than 1/6 and 0.5")
            return self.call(self.layer(nn.Hardsigmoid(), "hardsigmoid"), x())
        if op == "Clip":
            low, high = self._clip_bounds(node, a)
            module = nn.ReLU6() if (low, high) == (0.0, 6.0) else nn.Hardtanh(low, high)
            return self.call(self.layer(module, "clip"), x())
        if op == "Softmax":
            axis = int(a.get("axis", -1))
            return self.call(self.layer(nn.Softmax(dim=axis), "softmax"), x())
        binary = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}
        if op in binary:
            return self.fn(binary[op], self.value(node.input[0]), self.value(node.input[1]))
        if op in ("MaxPool", "AveragePool"):
            return self._pool(node, a)
        if op in ("GlobalAveragePool", "GlobalMaxPool"):
            rank = self.rank(node)
            if rank not in (3, 4):
                raise _unsupported(node, f"has a rank-{rank} input")
            avg = op == "GlobalAveragePool"
            cls = (nn.AdaptiveAvgPool2d if avg else nn.AdaptiveMaxPool2d) if rank == 4 else \
                (nn.AdaptiveAvgPool1d if avg else nn.AdaptiveMaxPool1d)
            return self.call(self.layer(cls(1), "gpool"), x())
        if op == "ReduceMean":
            axes = a.get("axes") or (list(self.consts[node.input[1]]) if len(node.input) > 1 else None)
            if not axes:
                raise _unsupported(node, "reduces over every axis")
            return self.fn(torch.mean, x(), dim=[int(v) for v in axes], keepdim=bool(a.get("keepdims", 1)))
        if op == "Flatten":
            axis = int(a.get("axis", 1))
            if axis != 1:
                raise _unsupported(node, f"flattens from axis {axis} (only 1)")
            return self.fn(torch.flatten, x(), 1)
        if op == "Reshape":
            shape = [int(v) for v in self.consts.get(node.input[1], np.array([], dtype=np.int64)).tolist()]
            if node.input[1] not in self.consts:
                raise _unsupported(node, "has a shape computed at run time")
            if len(shape) == 2 and shape[1] == -1 and shape[0] in (0, 1, -1):
                return self.fn(torch.flatten, x(), 1)
            return self.fn(_reshape, x(), tuple(shape))
        if op == "Concat":
            return self.fn(torch.cat, [self.value(i) for i in node.input], dim=int(a["axis"]))
        if op == "Transpose":
            perm = a.get("perm")
            if perm is None:
                raise _unsupported(node, "has no perm")
            return self.fn(torch.permute, x(), tuple(int(v) for v in perm))
        if op in ("Squeeze", "Unsqueeze"):
            axes = a.get("axes") or (list(self.consts[node.input[1]]) if len(node.input) > 1 else None)
            if not axes:
                raise _unsupported(node, "has no axes")
            func = torch.squeeze if op == "Squeeze" else torch.unsqueeze
            out = x()
            for axis in sorted(int(v) for v in axes) if op == "Unsqueeze" else \
                    sorted((int(v) for v in axes), reverse=True):
                out = self.fn(func, out, axis)
            return out
        if op in ("Identity", "Dropout"):
            return x()
        raise _unsupported(node, f"is not in the supported set ({', '.join(SUPPORTED_OPS)})")

    def _clip_bounds(self, node: onnx.NodeProto, a: dict[str, Any]) -> tuple[float, float]:
        if "min" in a or "max" in a:
            return float(a.get("min", -np.inf)), float(a.get("max", np.inf))
        bounds = []
        for i, default in ((1, -np.inf), (2, np.inf)):
            name = node.input[i] if len(node.input) > i else ""
            if name and name not in self.consts:
                raise _unsupported(node, "has bounds computed at run time")
            bounds.append(float(self.consts[name]) if name else default)
        return bounds[0], bounds[1]

    def _linear(self, w: np.ndarray, bias: np.ndarray | None) -> str:
        torch = self.torch
        out_f, in_f = w.shape
        linear = torch.nn.Linear(in_f, out_f, bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            if bias is not None:
                linear.bias.copy_(torch.from_numpy(bias))  # type: ignore[union-attr]
        return self.layer(linear, "linear")

    def _conv(self, node: onnx.NodeProto, a: dict[str, Any]) -> Any:
        torch = self.torch
        w = self.weight(node, 1)
        dims = w.ndim - 2
        if dims not in (1, 2):
            raise _unsupported(node, f"is a {dims}-D convolution (1-D and 2-D only)")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            raise _unsupported(node, "uses auto_pad SAME (give explicit pads)")
        pads = list(a.get("pads", [0] * 2 * dims))
        if pads[:dims] != pads[dims:]:
            raise _unsupported(node, f"has asymmetric pads {pads}")
        groups = int(a.get("group", 1))
        cls = torch.nn.Conv2d if dims == 2 else torch.nn.Conv1d
        bias = self.weight(node, 2) if len(node.input) > 2 and node.input[2] else None
        conv = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(a.get("strides", [1] * dims)),
                   padding=tuple(pads[:dims]), dilation=tuple(a.get("dilations", [1] * dims)), groups=groups,
                   bias=bias is not None)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(w))
            if bias is not None:
                conv.bias.copy_(torch.from_numpy(bias))  # type: ignore[union-attr]
        return self.call(self.layer(conv, "conv"), self.value(node.input[0]))

    def _pool(self, node: onnx.NodeProto, a: dict[str, Any]) -> Any:
        nn = self.torch.nn
        kernel = list(a["kernel_shape"])
        dims = len(kernel)
        if dims not in (1, 2):
            raise _unsupported(node, f"pools over {dims} axes (1 or 2 only)")
        pads = list(a.get("pads", [0] * 2 * dims))
        if pads[:dims] != pads[dims:] or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID"):
            raise _unsupported(node, "has asymmetric or automatic pads")
        stride = tuple(a.get("strides", [1] * dims))
        ceil = bool(a.get("ceil_mode", 0))
        if node.op_type == "MaxPool":
            if any(d != 1 for d in a.get("dilations", [1] * dims)) or len(node.output) > 1:
                raise _unsupported(node, "has dilations or an indices output")
            cls: Any = nn.MaxPool2d if dims == 2 else nn.MaxPool1d
            module = cls(tuple(kernel), stride, tuple(pads[:dims]), ceil_mode=ceil)
        else:
            cls = nn.AvgPool2d if dims == 2 else nn.AvgPool1d
            module = cls(tuple(kernel), stride, tuple(pads[:dims]), ceil_mode=ceil,
                         count_include_pad=bool(a.get("count_include_pad", 0)))
        return self.call(self.layer(module, "pool"), self.value(node.input[0]))


def _reshape(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """ONNX Reshape: 0 copies the input's size on that axis, -1 is inferred."""
    return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


def to_torch(model: bytes, *, logits: bool = False) -> Converted:
    """Convert a serialized float ONNX model; ``logits=True`` leaves out a final Softmax (recorded in the result).

    ConversionError (one line) when the model has more than one input or an operator outside the set.
    """
    try:
        proto = onnx.shape_inference.infer_shapes(onnx.load_from_string(model))
    except (onnx.onnx_cpp2py_export.checker.ValidationError, onnx.onnx_cpp2py_export.shape_inference.InferenceError,
            ValueError) as exc:
        raise ConversionError(f"cannot convert the ONNX model to PyTorch: {exc}".splitlines()[0]) from exc
    graph = proto.graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ConversionError("cannot convert the ONNX model to PyTorch: it needs exactly one float32 input")
    dims = inputs[0].type.tensor_type.shape.dim
    if any(not d.HasField("dim_value") for d in dims[1:]):
        raise ConversionError("cannot convert the ONNX model to PyTorch: its input has symbolic sizes beyond the "
                              "batch axis")
    builder = _Builder(proto)
    for node in graph.node:
        if node.op_type == "Constant":
            attrs = _attrs(node)
            if "value" not in attrs:
                raise _unsupported(node, "holds something other than a tensor")
            builder.consts[node.output[0]] = numpy_helper.to_array(attrs["value"])
        elif node.op_type == "Identity" and node.input[0] in builder.consts:  # a shared constant
            builder.consts[node.output[0]] = builder.consts[node.input[0]]
            builder.skip.add(id(node))
    builder.values[inputs[0].name] = builder.graph.placeholder("x")
    softmax_axis: int | None = None
    out_name = graph.output[0].name
    for node in graph.node:
        if node.op_type == "Constant" or id(node) in builder.skip:
            continue
        if logits and node.op_type == "Softmax" and node.output[0] == out_name:
            softmax_axis = int(_attrs(node).get("axis", -1))
            builder.values[out_name] = builder.value(node.input[0])
            continue
        result = builder.convert(node)
        builder.values[node.output[0]] = result
    outputs = [builder.value(o.name) for o in graph.output]
    builder.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    module = builder.fx.GraphModule(builder.root, builder.graph)
    return Converted(module=module.eval(), softmax_axis=softmax_axis,
                     input_shape=tuple(int(d.dim_value) for d in dims[1:]))
