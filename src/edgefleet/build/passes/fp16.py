"""Half precision: float16 weights and arithmetic, float32 inputs and outputs kept for the caller.

Uses onnxconverter-common's float16 converter (the ``build`` extra); ops it cannot convert stay in float32.
"""

from __future__ import annotations

import warnings
from typing import Any

from edgefleet.build.evaluate import open_session
from edgefleet.build.passes import Pass, PassConfig, PassResult, register
from edgefleet.build.quantize import QUANTIZER_ERRORS, load_checked
from edgefleet.errors import ConfigError, ModelError


class Fp16Config(PassConfig):
    """Keep float32 model inputs/outputs, and op types to leave in float32."""

    keep_io_types: bool = True
    op_block_list: tuple[str, ...] | None = None


@register
class Fp16(Pass):
    """Convert weights and arithmetic to float16."""

    name = "fp16"
    config_type = Fp16Config

    def apply(self, model: bytes, stats: Any, config: PassConfig) -> PassResult:
        assert isinstance(config, Fp16Config)
        try:
            from onnxconverter_common import float16
        except ImportError as exc:
            raise ConfigError("the fp16 pass needs onnxconverter-common: pip install 'edgefleet[build]'") from exc
        proto = load_checked(model)  # a fresh copy: the converter changes its argument in place
        default = float16.DEFAULT_OP_BLOCK_LIST
        blocked = list(config.op_block_list) if config.op_block_list is not None else list(default)
        try:
            with warnings.catch_warnings(record=True) as caught:  # one warning per value out of fp16 range
                warnings.simplefilter("always")
                converted = float16.convert_float_to_float16(proto, keep_io_types=config.keep_io_types,
                                                             op_block_list=blocked)
        except QUANTIZER_ERRORS as exc:
            raise ModelError(f"fp16 conversion failed: {str(exc).splitlines()[0][:300]}") from exc
        kept = sorted({n.op_type for n in proto.graph.node if n.op_type in set(blocked)})
        if kept and all(n.op_type in set(blocked) for n in proto.graph.node):
            raise ModelError(f"fp16: nothing to convert, every operator stays float32 ({', '.join(kept)})")
        result = bytes(converted.SerializeToString())
        try:
            open_session(result)
        except ModelError as exc:
            raise ModelError(f"fp16 conversion produced a model ONNX Runtime rejects: {exc}") from exc
        notes = [f"left in float32 (no float16 kernel): {', '.join(kept)}"] if kept else []
        clipped = sum("truncated" in str(w.message) for w in caught)
        if clipped:
            notes.append(f"{clipped} weight value(s) outside the float16 range were clamped")
        return PassResult(model=result, notes=notes)
