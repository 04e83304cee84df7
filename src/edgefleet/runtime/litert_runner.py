"""LiteRT (the TFLite interpreter, ``ai-edge-litert``) behind the runner port, for ``.tflite`` models.

A fully int8 model takes and gives int8 tensors: the runner quantizes a float batch with the input's scale and
zero point and dequantizes the outputs, so callers hand it the same float batch as the ONNX model and get
float scores back. A model exported for batch 1 is resized to the batch given; where the graph cannot be
resized, the rows run one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgefleet.errors import ModelError
from edgefleet.runtime.runner import BaseRunner, _first_line

TFLITE_IDENTIFIER = b"TFL3"
"""The flatbuffer file identifier of a TFLite model (bytes 4-8)."""


def is_tflite(model: bytes) -> bool:
    """Whether ``model`` carries the TFLite flatbuffer identifier."""
    return len(model) >= 8 and model[4:8] == TFLITE_IDENTIFIER


class LiteRtRunner(BaseRunner):
    """A ``.tflite`` model in the LiteRT interpreter, from bytes already verified by the caller."""

    runtime = "litert"

    def __init__(self, model: bytes, *, threads: int = 1) -> None:
        if not is_tflite(model):
            raise ModelError("LiteRT cannot load the model: not a TFLite flatbuffer")
        from ai_edge_litert.interpreter import Interpreter

        try:
            self._interpreter = Interpreter(model_content=bytes(model), num_threads=threads)
            self._interpreter.allocate_tensors()
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError: the model is unusable
            raise ModelError(f"LiteRT cannot load the model: {_first_line(exc)}") from exc
        self._input = self._interpreter.get_input_details()[0]
        self._outputs = {str(d["name"]): d for d in self._interpreter.get_output_details()}
        self._shape = tuple(int(d) for d in self._input["shape"])
        self._resizable = True
        self.input_name = str(self._input["name"])
        self.output_names = tuple(self._outputs)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape the interpreter is allocated for now."""
        return self._shape

    def tensor_details(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The interpreter's details (name, dtype, shape, quantization) of the first input and of every output."""
        return [self._input], list(self._outputs.values())

    @property
    def quantized_input(self) -> bool:
        """Whether the model takes integer tensors that the runner quantizes from floats."""
        return np.dtype(self._input["dtype"]).kind in "iu"

    def _run(self, batch: np.ndarray, names: Sequence[str]) -> list[Any]:
        batch = np.asarray(batch)
        if batch.shape != self._shape and not self._resize(batch.shape):
            if batch.ndim != len(self._shape) or batch.shape[1:] != self._shape[1:]:
                raise ModelError(f"input shape {batch.shape} does not fit the model's {self._shape}")
            rows = [self._invoke(batch[i : i + self._shape[0]], names) for i in range(0, len(batch), self._shape[0])]
            return [np.concatenate([row[k] for row in rows]) for k in range(len(names))]
        return self._invoke(batch, names)

    def _resize(self, shape: tuple[int, ...]) -> bool:
        if not self._resizable or len(shape) != len(self._shape) or shape[1:] != self._shape[1:]:
            return False
        try:
            self._interpreter.resize_tensor_input(self._input["index"], list(shape), strict=False)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError):
            self._resizable = False
            self._interpreter.resize_tensor_input(self._input["index"], list(self._shape), strict=False)
            self._interpreter.allocate_tensors()
            return False
        self._shape = shape
        return True

    def _invoke(self, batch: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        self._interpreter.set_tensor(self._input["index"], _quantize(batch, self._input))
        self._interpreter.invoke()
        return [_dequantize(self._interpreter.get_tensor(self._outputs[name]["index"]), self._outputs[name])
                for name in names]


def _quantize(batch: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail["quantization"]
    if dtype.kind not in "iu" or not scale or batch.dtype.kind in "iu":
        return np.ascontiguousarray(batch, dtype=dtype)
    info = np.iinfo(dtype)
    quantized: np.ndarray = np.clip(np.rint(batch / scale) + zero, info.min, info.max).astype(dtype)
    return quantized


def _dequantize(values: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero = detail["quantization"]
    if np.dtype(detail["dtype"]).kind not in "iu" or not scale:
        return np.array(values)
    result: np.ndarray = ((values.astype(np.float32) - np.float32(zero)) * np.float32(scale)).astype(np.float32)
    return result
