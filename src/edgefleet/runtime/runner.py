"""The inference runner port: one protocol, ONNX Runtime as the first backend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from edgefleet.errors import ModelError


class Runner(Protocol):
    """Runs a model on a batch: its first output (``run``), or the named ones as the runtime returns them."""

    input_name: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def run_outputs(self, batch: np.ndarray, names: Sequence[str]) -> list[Any]: ...


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
        self.output_names = tuple(o.name for o in self._session.get_outputs())
        self._output = self.output_names[0]

    def run(self, batch: np.ndarray) -> np.ndarray:
        try:
            (result,) = self._session.run([self._output], {self.input_name: batch})
        except Exception as exc:
            raise ModelError(f"inference failed: {str(exc).splitlines()[0][:200]}") from exc
        return np.asarray(result)

    def run_outputs(self, batch: np.ndarray, names: Sequence[str]) -> list[Any]:
        """The named outputs ('' = the first) as ONNX Runtime returns them (arrays, or lists of maps)."""
        wanted = [name or self._output for name in names]
        unknown = [name for name in wanted if name not in self.output_names]
        if unknown:
            raise ModelError(f"the model has no output {unknown[0]!r} (it has {', '.join(self.output_names)})")
        try:
            return list(self._session.run(wanted, {self.input_name: batch}))
        except Exception as exc:
            raise ModelError(f"inference failed: {str(exc).splitlines()[0][:200]}") from exc
