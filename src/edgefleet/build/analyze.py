"""Static analysis of an ONNX model: parameters, MACs per node, weight bytes, peak activation memory.

Pure graph analysis (onnx only, no ONNX Runtime): shapes come from ONNX shape inference at a fixed batch.
A QDQ model is analysed as a runtime that fuses QuantizeLinear/DequantizeLinear into integer kernels runs it
(ONNX Runtime does on CPU): a node whose activation inputs all come from DequantizeLinear is an int8 node,
its weights are stored in int8, and the Q/DQ pairs around it cost nothing and leave uint8 tensors behind.
Q/DQ that a runtime cannot fold (a float graph input being quantized, a dequantize feeding a float node)
remain as elementwise nodes. Operators of other domains (ONNX-ML's tree ensembles, SVMs, linear classifiers,
ZipMap, ...) have no MAC formula here: each counts 0 MACs, and the analysis notes which ones were not counted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgefleet.build.energy import EnergyEstimate, OpCounts, estimate_energy
from edgefleet.build.memory import ArenaPlan, plan_arena
from edgefleet.errors import ModelError

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
#: op type -> index of its weight input, for ops whose cost is a multiply-accumulate over the weight
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_MATMUL_A = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0, "Gemm": 0}
_INT_OPS = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul",
            "QGemm", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu"}
_ADD_LIKE = {"Add", "Sub", "Sum", "Max", "Min", "Relu", "Clip", "LeakyRelu", "Abs", "Neg", "QLinearAdd",
             "Greater", "Less", "Equal", "Where", "ArgMax"}
_MUL_LIKE = {"Mul", "Div", "QLinearMul", "Sqrt", "Reciprocal", "PRelu"}
_TRANSCENDENTAL = {"Sigmoid": 4, "Tanh": 4, "Exp": 4, "Log": 4, "Erf": 4, "HardSigmoid": 2, "HardSwish": 3,
                   "Softmax": 4, "LogSoftmax": 5, "QLinearSigmoid": 4}
_DTYPE_BYTES: dict[int, int] = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.DOUBLE: 8,
                onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT16: 2,
                onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4, onnx.TensorProto.INT64: 8,
                onnx.TensorProto.BOOL: 1}


@dataclass(frozen=True)
class NodeCost:
    """What one node of the deployed graph computes: MACs plus elementwise adds and multiplies."""

    name: str
    op_type: str
    precision: str  # "int8", "fp16", "fp32" or "other"
    macs: int
    adds: int
    mults: int


@dataclass(frozen=True)
class ModelAnalysis:
    """Static figures of one model at one batch size."""

    file_bytes: int
    params: int
    weight_bytes: int
    macs: int
    nodes: list[NodeCost]
    arena: ArenaPlan
    energy: EnergyEstimate
    float_compute_nodes: list[str] = field(default_factory=list)
    unknown_shapes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the figures leave out, in words (operators counted as 0 MACs)."""

    @property
    def int8_fraction(self) -> float:
        """Share of MACs that run in int8."""
        int8 = sum(n.macs for n in self.nodes if n.precision == "int8")
        return int8 / self.macs if self.macs else 0.0


@dataclass
class _Tensor:
    shape: list[int] | None
    dtype: int


@dataclass
class _Node:
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, object]
    int8: bool = False
    domain: str = ""


def load_model(model_bytes: bytes) -> onnx.ModelProto:
    """Parse and check serialized ONNX, or raise ModelError with one clear line."""
    try:
        model = onnx.load_from_string(model_bytes)
        onnx.checker.check_model(model)
    except Exception as exc:  # DecodeError, ValidationError, ...: all mean "not a model we can read"
        raise ModelError(f"not a valid ONNX model: {str(exc).splitlines()[0][:200] if str(exc) else exc!r}") from exc
    if not model.graph.node:
        raise ModelError("the ONNX model has no nodes")
    return model


def fix_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy whose graph inputs and outputs have every symbolic (or zero) leading dimension set to batch."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in [*fixed.graph.input, *fixed.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].Clear()
            dims[0].dim_value = batch
    return fixed


#: ONNX-ML operators with a cost formula below (any other operator outside the ONNX domain counts 0 MACs)
_COUNTED_ML = {"Scaler"}
#: ONNX-ML operators whose output has their input's shape (ONNX shape inference stops at them)
_SAME_SHAPE_ML = {"Scaler", "Normalizer", "Imputer", "Binarizer"}


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, carried across ONNX-ML operators that keep their input's shape."""
    current = model
    for _ in range(4):
        try:
            current = onnx.shape_inference.infer_shapes(current, strict_mode=False, data_prop=True)
        except Exception:  # contrib or ML ops onnx cannot infer: keep the shapes found so far
            return current
        shaped = {v.name: v for v in [*current.graph.input, *current.graph.value_info, *current.graph.output]
                  if v.type.tensor_type.HasField("shape")}
        added = False
        for node in current.graph.node:
            if node.op_type in _SAME_SHAPE_ML and node.input[0] in shaped and node.output[0] not in shaped:
                value = onnx.ValueInfoProto()
                value.CopyFrom(shaped[node.input[0]])
                value.name = node.output[0]
                value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
                kept = [v for v in current.graph.value_info if v.name != value.name]
                del current.graph.value_info[:]
                current.graph.value_info.extend([*kept, value])
                added = True
        if not added:
            break
    return current


def _tensors(model: onnx.ModelProto) -> dict[str, _Tensor]:
    inferred = _infer(model)
    out: dict[str, _Tensor] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        known = tensor.HasField("shape") and all(d > 0 for d in dims)
        out[value.name] = _Tensor(shape=dims if known else None, dtype=tensor.elem_type)
    for init in inferred.graph.initializer:
        out[init.name] = _Tensor(shape=list(init.dims), dtype=init.data_type)
    return out


def _nodes(model: onnx.ModelProto) -> list[_Node]:
    return [_Node(name=n.name or f"{n.op_type}_{i}", op_type=n.op_type, inputs=list(n.input),
                  outputs=list(n.output), attrs={a.name: helper.get_attribute_value(a) for a in n.attribute},
                  domain="" if n.domain == "ai.onnx" else n.domain)
            for i, n in enumerate(model.graph.node)]


def deployed_graph(model: onnx.ModelProto) -> tuple[list[_Node], set[str]]:
    """The nodes a fusing runtime executes, in topological order, and the folded (int8) weight names.

    Folded Q/DQ nodes disappear; tensors are renamed so that an int8 node reads and writes the quantized
    tensors directly.
    """
    nodes = _nodes(model)
    initializers = {t.name for t in model.graph.initializer}
    producer = {o: n for n in nodes for o in n.outputs}
    consumers: dict[str, list[_Node]] = defaultdict(list)
    for node in nodes:
        for name in node.inputs:
            consumers[name].append(node)
    outputs = {o.name for o in model.graph.output}

    def from_dq(name: str) -> bool:
        return name in producer and producer[name].op_type == _DQ

    float_weights = {t.name for t in model.graph.initializer
                     if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)}
    for node in nodes:
        if node.op_type in (_Q, _DQ):
            continue
        data = [x for x in node.inputs if x and x not in initializers]
        node.int8 = node.op_type in _INT_OPS or (
            bool(data) and all(from_dq(x) for x in data) and not any(x in float_weights for x in node.inputs))
    alias: dict[str, str] = {}
    folded: set[int] = set()
    weights: set[str] = set()
    for node in nodes:
        if node.op_type == _DQ:
            src = node.inputs[0]
            if src in initializers:
                alias[node.outputs[0]], weights = src, weights | {src}
                folded.add(id(node))
            elif consumers[node.outputs[0]] and all(c.int8 for c in consumers[node.outputs[0]]) \
                    and node.outputs[0] not in outputs:
                alias[node.outputs[0]] = src
                folded.add(id(node))
        elif node.op_type == _Q:
            src = node.inputs[0]
            up = producer.get(src)
            if up is not None and up.int8 and src not in outputs and all(c.op_type == _Q for c in consumers[src]):
                alias[src] = node.outputs[0]
                folded.add(id(node))

    def resolve(name: str) -> str:
        seen = 0
        while name in alias and seen < 8:
            name, seen = alias[name], seen + 1
        return name

    view = [
        _Node(n.name, n.op_type, [resolve(x) for x in n.inputs], [resolve(x) for x in n.outputs], n.attrs, n.int8,
              n.domain)
        for n in nodes if id(n) not in folded
    ]
    return view, {resolve(w) for w in weights}


def _numel(shape: list[int] | None) -> int:
    return int(np.prod(shape)) if shape is not None else 0


def _node_cost(node: _Node, tensors: dict[str, _Tensor]) -> NodeCost | None:
    """MACs/adds/mults of one node; None when a shape it needs is unknown."""

    def shape(i: int, outputs: bool = False) -> list[int] | None:
        names = node.outputs if outputs else node.inputs
        if i >= len(names) or not names[i] or names[i] not in tensors:
            return None
        return tensors[names[i]].shape

    out = shape(0, outputs=True)
    if out is None and node.op_type not in ("Shape", "Constant"):
        return None
    n_out = _numel(out)
    macs = adds = mults = 0
    op = node.op_type
    if op in _CONV_WEIGHT:
        w = shape(_CONV_WEIGHT[op])
        if w is None:
            return None
        macs = n_out * _numel(w[1:])
        adds = n_out if len(node.inputs) > (8 if op == "QLinearConv" else 2) else 0
    elif op == "ConvTranspose":
        x, w = shape(0), shape(1)
        if x is None or w is None:
            return None
        macs = _numel(x) * _numel(w[1:])
        adds = n_out if len(node.inputs) > 2 else 0
    elif op in _MATMUL_A or op == "QGemm":
        a = shape(0)
        if a is None:
            return None
        k = a[0] if op in ("Gemm", "QGemm") and node.attrs.get("transA", 0) else a[-1]
        macs = n_out * k
        adds = n_out if op == "Gemm" and len(node.inputs) > 2 else 0
    elif op in ("BatchNormalization", "Scaler"):
        adds, mults = n_out, n_out
    elif op in ("AveragePool", "GlobalAveragePool", "QLinearGlobalAveragePool", "QLinearAveragePool",
                "ReduceMean"):
        adds, mults = _numel(shape(0)), n_out
    elif op in ("MaxPool", "GlobalMaxPool", "ReduceMax"):
        adds = _numel(shape(0))
    elif op in (_Q, _DQ):
        adds, mults = n_out, n_out
    elif op in _ADD_LIKE:
        adds = n_out
    elif op in _MUL_LIKE:
        mults = n_out
    elif op in _TRANSCENDENTAL:
        mults = n_out * _TRANSCENDENTAL[op]
    return NodeCost(name=node.name, op_type=op, precision=_precision(node, tensors), macs=macs, adds=adds,
                    mults=mults)


def _precision(node: _Node, tensors: dict[str, _Tensor]) -> str:
    if node.int8:
        return "int8"
    types = {tensors[x].dtype for x in node.outputs if x in tensors}
    if onnx.TensorProto.FLOAT16 in types:
        return "fp16"
    if onnx.TensorProto.FLOAT in types or onnx.TensorProto.DOUBLE in types:
        return "fp32"
    if types & {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}:
        return "int8"
    return "other"


def _weights(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, bytes of all initializers). Parameters exclude Q/DQ scales, zero points and shapes."""
    params = weight_bytes = 0
    meta = {n.input[i] for n in model.graph.node if n.op_type in (_Q, _DQ) for i in (1, 2) if i < len(n.input)}
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        weight_bytes += array.nbytes
        if init.name not in meta and init.data_type != onnx.TensorProto.INT64:
            params += array.size
    return params, weight_bytes


def analyze(model_bytes: bytes, *, batch: int = 1, alignment: int = 16) -> ModelAnalysis:
    """Parameters, MACs per node and in total, weight bytes, activation arena and energy estimate at ``batch``."""
    model = load_model(model_bytes)
    fixed = fix_batch(model, batch)
    tensors = _tensors(fixed)
    view, _int8_weights = deployed_graph(fixed)
    initializers = {t.name for t in fixed.graph.initializer}
    costs: list[NodeCost] = []
    unknown: list[str] = []
    uncounted: dict[str, int] = {}
    for node in view:
        if node.domain not in ("", "com.microsoft") and node.op_type not in _COUNTED_ML:  # no MAC formula
            key = f"{node.op_type} ({node.domain})"
            uncounted[key] = uncounted.get(key, 0) + 1
            costs.append(NodeCost(name=node.name, op_type=node.op_type, precision=_precision(node, tensors),
                                  macs=0, adds=0, mults=0))
            continue
        cost = _node_cost(node, tensors)
        if cost is None:
            unknown.append(node.name)
        else:
            costs.append(cost)
    sizes = {name: _numel(t.shape) * _DTYPE_BYTES.get(t.dtype, 4) for name, t in tensors.items()
             if name not in initializers}
    steps = [([x for x in n.inputs if x and x not in initializers], [x for x in n.outputs if x]) for n in view]
    graph_inputs = [i.name for i in fixed.graph.input if i.name not in initializers]
    graph_outputs = [o.name for o in fixed.graph.output]
    arena = plan_arena(steps, sizes, graph_inputs, graph_outputs, alignment=alignment)
    params, weight_bytes = _weights(fixed)
    counts = _op_counts(costs)
    energy = estimate_energy(counts, weight_bytes=weight_bytes, activation_bytes=_activation_traffic(steps, sizes))
    float_compute = [c.name for c in costs if c.macs and c.precision in ("fp32", "fp16")]
    notes = [f"counted as 0 MACs (no formula for these operators): "
             f"{', '.join(f'{op} x{n}' if n > 1 else op for op, n in uncounted.items())}"] if uncounted else []
    return ModelAnalysis(file_bytes=len(model_bytes), params=params, weight_bytes=weight_bytes,
                         macs=sum(c.macs for c in costs), nodes=costs, arena=arena, energy=energy,
                         float_compute_nodes=float_compute, unknown_shapes=unknown, notes=notes)


def _op_counts(costs: list[NodeCost]) -> OpCounts:
    counts = OpCounts()
    for c in costs:
        counts.add(c.precision, macs=c.macs, adds=c.adds, mults=c.mults)
    return counts


def _activation_traffic(steps: list[tuple[list[str], list[str]]], sizes: dict[str, int]) -> int:
    """Bytes of activations read and written: each node reads its inputs once and writes its outputs once."""
    return sum(sizes.get(x, 0) for inputs, outputs in steps for x in (*inputs, *outputs))
