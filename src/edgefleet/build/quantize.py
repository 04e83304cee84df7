"""Static int8 quantization with ONNX Runtime's quantizer (QDQ format), and the checks around it.

Activations are unsigned (QUInt8) and weights signed (QInt8), per channel by default: with signed
activations ONNX Runtime leaves many convolutions in float (see MEASURED.md). ``quantize_int8`` is the
one-call form of the ``static_int8`` pass (``edgefleet.build.passes.static_int8``).
"""

from __future__ import annotations

import numpy as np
import onnx

from edgefleet.build.evaluate import ORT_ERRORS
from edgefleet.errors import ConfigError, DataError, ModelError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
_INVALID_MODEL: tuple[type[Exception], ...] = (*ORT_ERRORS, onnx.checker.ValidationError)
QUANTIZER_ERRORS: tuple[type[Exception], ...] = (
    *_INVALID_MODEL, ValueError, RuntimeError, KeyError, IndexError, TypeError, AttributeError, NotImplementedError,
)


class ArrayReader:
    """Feeds a calibration array to ONNX Runtime's calibrator in small batches on one named input."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int) -> None:
        self._batches = iter([{input_name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def __iter__(self) -> ArrayReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def load_checked(model_bytes: bytes) -> onnx.ModelProto:
    """Parse and check serialized ONNX; ModelError if it is not a valid model."""
    try:
        model = onnx.load_from_string(model_bytes)
        onnx.checker.check_model(model)
    except _INVALID_MODEL as exc:
        raise ModelError(f"not a valid ONNX model: {exc}") from exc
    return model


def check_calibration(
    calib_x: np.ndarray, model: onnx.ModelProto, what: str = "calibration data"
) -> tuple[str, np.ndarray]:
    """Return the model's input name and the array as float32, or raise DataError."""
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise ModelError(f"expected a model with one input, got {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    try:
        raw = np.asarray(calib_x)
        if raw.dtype.kind not in "fiu":
            raise DataError(f"{what} must hold real numbers (float or integer), got dtype {raw.dtype}")
        x = np.ascontiguousarray(raw, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} is not numeric: {exc}") from exc
    if x.ndim != len(dims) or len(x) == 0:
        raise DataError(f"{what} must be a non-empty rank-{len(dims)} array, got shape {x.shape}")
    expected = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if any(e is not None and e != got for e, got in zip(expected[1:], x.shape[1:], strict=True)):
        shown = ["?" if e is None else str(e) for e in expected]
        raise DataError(f"{what} has shape {x.shape}; the model's input is [{', '.join(shown)}]")
    if not np.isfinite(x).all():
        raise DataError(f"{what} contains NaN or infinite values")
    return inputs[0].name, x


def quantize_int8(
    model_bytes: bytes,
    calib_x: np.ndarray,
    *,
    per_channel: bool = True,
    method: str = "minmax",
    batch: int = 8,
) -> bytes:
    """Quantize a float ONNX model to int8 (QDQ, uint8 activations, int8 weights) calibrated on calib_x.

    ``method`` is one of "minmax", "entropy", "percentile". Returns the serialized quantized model.
    """
    from edgefleet.build.passes.static_int8 import StaticInt8, StaticInt8Config

    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"unknown calibration method {method!r}; use one of {sorted(CALIBRATION_METHODS)}")
    config = StaticInt8Config(calibration=method, per_channel=per_channel, batch=batch)  # type: ignore[arg-type]
    return StaticInt8().run(model_bytes, calib_x, config).model
