"""Static int8 quantization (QDQ) with ONNX Runtime's quantizer, statistics collected once per method.

``collect`` pre-processes the model (shape inference and ONNX Runtime's basic graph optimizations) and runs
the calibrator (MinMax, Entropy or Percentile) over the calibration inputs; ``apply`` quantizes per tensor or
per channel, optionally keeping named nodes in float, from those ranges.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from edgefleet.build.passes import Pass, PassConfig, PassResult, register
from edgefleet.build.quantize import QUANTIZER_ERRORS, ArrayReader, check_calibration, load_checked
from edgefleet.errors import ModelError


class StaticInt8Config(PassConfig):
    """Calibration method, granularity and types of a static int8 quantization.

    ``float_stem`` keeps the convolutions that read the model input in float: with few input channels an int8
    kernel gains little, and ONNX Runtime's float path (NCHWc) is fast there, so the int8 model gets faster.
    """

    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    percentile: float = 99.999
    preprocess: bool = True
    reduce_range: bool = False
    keep_removable_activations: bool = False
    float_stem: bool = False
    nodes_to_exclude: tuple[str, ...] = ()
    batch: int = 8


@dataclass(frozen=True)
class StaticStats:
    """The model the ranges were collected on, and the ranges (ONNX Runtime's calibration cache JSON)."""

    model: bytes
    ranges_json: str
    method: str


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """Keep ONNX Runtime's quantizer from printing: calibrator progress (stdout) and advice (root logger)."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _op_types() -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


@register
class StaticInt8(Pass):
    """QDQ int8 with calibrated activation ranges."""

    name = "static_int8"
    config_type = StaticInt8Config

    def stats_key(self, config: PassConfig) -> Hashable:
        assert isinstance(config, StaticInt8Config)
        return (config.calibration, config.percentile, config.preprocess)

    def collect(self, model: bytes, calib_x: np.ndarray, config: PassConfig) -> StaticStats:
        assert isinstance(config, StaticInt8Config)
        from onnxruntime.quantization import quant_pre_process
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

        proto = load_checked(model)
        input_name, x = check_calibration(calib_x, proto)
        quantizable = set(_op_types())
        if not any(n.op_type in quantizable and n.domain in ("", "ai.onnx") for n in proto.graph.node):
            ops = sorted({f"{n.op_type} ({n.domain or 'ai.onnx'})" for n in proto.graph.node})
            raise ModelError(f"nothing to quantize: no operator here is one ONNX Runtime's int8 quantizer handles "
                             f"({', '.join(ops)}); left in float")
        with tempfile.TemporaryDirectory(prefix="edgefleet-calib-") as tmp:
            src, pre, cache = (Path(tmp) / n for n in ("float.onnx", "pre.onnx", "ranges.json"))
            src.write_bytes(model)
            try:  # the histogram calibrators print progress to stdout: keep it out of the CLI's
                with quiet_quantizer():
                    if config.preprocess:
                        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
                    else:
                        pre.write_bytes(model)
                    pre.write_bytes(complete_types(name_nodes(pre.read_bytes())))
                    extra = {"percentile": config.percentile} if config.calibration == "percentile" else {}
                    calibrator = create_calibrator(pre, _op_types(), str(Path(tmp) / "augmented.onnx"),
                                                   calibrate_method=_method(config.calibration), extra_options=extra)
                    calibrator.collect_data(ArrayReader(input_name, x, config.batch))
                    save_tensors_data(calibrator.compute_data(), cache)
            except QUANTIZER_ERRORS as exc:
                raise ModelError(f"int8 calibration ({config.calibration}) failed: {_first_line(exc)}") from exc
            return StaticStats(model=pre.read_bytes(), ranges_json=cache.read_text(), method=config.calibration)

    def apply(self, model: bytes, stats: Any, config: PassConfig) -> PassResult:
        assert isinstance(config, StaticInt8Config) and isinstance(stats, StaticStats)
        from onnxruntime.quantization import QuantFormat, quantize_static

        with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
            pre, cache, out = (Path(tmp) / n for n in ("pre.onnx", "ranges.json", "int8.onnx"))
            pre.write_bytes(stats.model)
            cache.write_text(stats.ranges_json)
            excluded = list(config.nodes_to_exclude)
            if config.float_stem:
                excluded += [n for n in stem_nodes(stats.model) if n not in excluded]
            try:
                with quiet_quantizer():
                    quantize_static(
                        str(pre), str(out), None, quant_format=QuantFormat.QDQ, per_channel=config.per_channel,
                        reduce_range=config.reduce_range, activation_type=_qtype(config.activation_type),
                        weight_type=_qtype(config.weight_type), calibrate_method=_method(stats.method),
                        nodes_to_exclude=excluded, calibration_cache_path=str(cache),
                        extra_options={"QDQKeepRemovableActivations": config.keep_removable_activations},
                    )
            except QUANTIZER_ERRORS as exc:
                raise ModelError(f"int8 quantization failed: {_first_line(exc)}") from exc
            result = out.read_bytes()
        notes = [f"kept in float on request: {', '.join(excluded)}"] if excluded else []
        return PassResult(model=result, notes=notes + unquantized_notes(result))


def stem_nodes(model: bytes) -> list[str]:
    """Names of the Conv/ConvTranspose/Gemm/MatMul nodes that read a graph input directly."""
    proto = onnx.load_from_string(model)
    inputs = {i.name for i in proto.graph.input} - {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.input and n.input[0] in inputs]


def complete_types(model: bytes) -> bytes:
    """Declare the element type of every node output that shape inference left untyped.

    ONNX shape inference stops at operators it does not know (e.g. ai.onnx.ml's Scaler) and the quantizer
    needs a type for each tensor it quantizes: ONNX Runtime, which does know them, supplies the types.
    """
    import onnxruntime as ort

    proto = onnx.load_from_string(model)
    graph = proto.graph
    known = {v.name for v in [*graph.value_info, *graph.input, *graph.output]} | {t.name for t in graph.initializer}
    missing = [o for n in graph.node for o in n.output if o and o not in known]
    if not missing:
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in missing)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    types = {o.name: o.type for o in session.get_outputs()}
    for name in missing:
        elem = _ELEM_TYPES.get(types.get(name, ""))
        if elem is not None:
            graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return bytes(proto.SerializeToString())


_ELEM_TYPES = {"tensor(float)": onnx.TensorProto.FLOAT, "tensor(float16)": onnx.TensorProto.FLOAT16,
               "tensor(int64)": onnx.TensorProto.INT64, "tensor(int32)": onnx.TensorProto.INT32,
               "tensor(double)": onnx.TensorProto.DOUBLE, "tensor(uint8)": onnx.TensorProto.UINT8,
               "tensor(int8)": onnx.TensorProto.INT8, "tensor(bool)": onnx.TensorProto.BOOL,
               "tensor(string)": onnx.TensorProto.STRING}


def name_nodes(model: bytes) -> bytes:
    """Give every unnamed node a unique name (``Op_i``), so that nodes can be kept in float by name."""
    proto = onnx.load_from_string(model)
    taken = {n.name for n in proto.graph.node if n.name}
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return bytes(proto.SerializeToString())


def unquantized_notes(model: bytes) -> list[str]:
    """One note listing the nodes with float arithmetic left in a quantized model, if any."""
    proto = onnx.load_from_string(model)
    made_by_dq = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    initializers = {t.name for t in proto.graph.initializer}
    skip = {"QuantizeLinear", "DequantizeLinear", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
            "Concat", "Shape", "Gather", "Identity", "Cast", "Constant", "Slice", "Softmax", "ZipMap"}
    left = [f"{n.name or n.op_type} ({n.op_type}{', ' + n.domain if n.domain else ''})" for n in proto.graph.node
            if n.op_type not in skip
            and not all(x in made_by_dq for x in n.input if x and x not in initializers)]
    return [f"left in float ({len(left)}): {', '.join(left[:12])}{' ...' if len(left) > 12 else ''}"] if left else []


def ranges_summary(stats: StaticStats) -> dict[str, Any]:
    """The collected ranges as a dict (for debugging and tests)."""
    return dict(json.loads(stats.ranges_json))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
