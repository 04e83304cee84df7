"""The inference runner port: one protocol, ONNX Runtime as the first backend."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgefleet.errors import ModelError


class Runner(Protocol):
    """Runs a model on a batch and returns its first output."""

    input_name: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...


class OnnxRuntimeRunner:
    """A CPU ONNX Runtime session over model bytes already verified by the caller."""

    def __init__(self, model: bytes, *, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/...: all mean the model is unusable
            raise ModelError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0][:200]}") from exc
        self.input_name = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        try:
            (result,) = self._session.run([self._output], {self.input_name: batch})
        except Exception as exc:
            raise ModelError(f"inference failed: {str(exc).splitlines()[0][:200]}") from exc
        return np.asarray(result)
