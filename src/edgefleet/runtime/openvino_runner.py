"""OpenVINO on CPU behind the runner port: it reads the same ONNX model (float or int8 QDQ) directly.

Compiled for latency (one stream, ``threads`` inference threads) and at float32 precision, so its outputs are
ONNX Runtime's within float rounding (OpenVINO would otherwise pick bf16 on CPUs that have it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgefleet.errors import ModelError
from edgefleet.runtime.runner import BaseRunner, _first_line


class OpenVinoRunner(BaseRunner):
    """A model compiled by OpenVINO for the CPU, from ONNX bytes already verified by the caller."""

    runtime = "openvino"

    def __init__(self, model: bytes, *, threads: int = 1) -> None:
        import openvino as ov

        try:
            core = ov.Core()
            graph = core.read_model(model)
            self._compiled = core.compile_model(graph, "CPU", {
                "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32"})
        except Exception as exc:  # OpenVINO raises RuntimeError/its own types: all mean the model is unusable
            raise ModelError(f"OpenVINO cannot load the model: {_first_line(exc)}") from exc
        self._request = self._compiled.create_infer_request()
        self._input_shape = self._compiled.inputs[0].get_partial_shape()
        self.input_name = self._compiled.inputs[0].get_any_name()
        self._outputs = {port.get_any_name(): port for port in self._compiled.outputs}
        self.output_names = tuple(self._outputs)

    def _run(self, batch: np.ndarray, names: Sequence[str]) -> list[Any]:
        import openvino as ov

        if not self._input_shape.compatible(ov.PartialShape(list(batch.shape))):
            raise ModelError(f"input shape {batch.shape} does not fit the model's {self._input_shape}")
        result = self._request.infer({0: batch})
        return [np.array(result[self._outputs[name]]) for name in names]
