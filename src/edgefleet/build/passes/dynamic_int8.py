"""Dynamic int8 quantization: int8 weights, activation ranges computed at run time (no calibration).

Good for MatMul/Gemm-heavy models; convolutions become ConvInteger, which ONNX Runtime runs slowly on CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

from edgefleet.build.passes import Pass, PassConfig, PassResult, register
from edgefleet.build.passes.static_int8 import quiet_quantizer, unquantized_notes
from edgefleet.build.quantize import QUANTIZER_ERRORS, load_checked
from edgefleet.errors import ModelError


class DynamicInt8Config(PassConfig):
    """Granularity, weight type and which op types to quantize."""

    per_channel: bool = False
    weight_type: Literal["int8", "uint8"] = "int8"
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    nodes_to_exclude: tuple[str, ...] = ()


@register
class DynamicInt8(Pass):
    """ONNX Runtime's quantize_dynamic."""

    name = "dynamic_int8"
    config_type = DynamicInt8Config

    def apply(self, model: bytes, stats: Any, config: PassConfig) -> PassResult:
        assert isinstance(config, DynamicInt8Config)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        load_checked(model)
        with tempfile.TemporaryDirectory(prefix="edgefleet-dyn-") as tmp:
            src, out = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(model)
            try:
                with quiet_quantizer():
                    quantize_dynamic(str(src), str(out), op_types_to_quantize=list(config.op_types),
                                     per_channel=config.per_channel,
                                     weight_type=QuantType.QUInt8 if config.weight_type == "uint8" else QuantType.QInt8,
                                     nodes_to_exclude=list(config.nodes_to_exclude))
            except QUANTIZER_ERRORS as exc:
                raise ModelError(f"dynamic int8 quantization failed: {str(exc).splitlines()[0][:300]}") from exc
            result = out.read_bytes()
        return PassResult(model=result, notes=unquantized_notes(result))
