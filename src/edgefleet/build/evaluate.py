"""Measure an ONNX classifier with ONNX Runtime on CPU: class scores (read through the manifest's output spec, as
the agent reads them), accuracy, size, batch-1 latency."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from edgefleet.errors import BundleError, DataError, ModelError
from edgefleet.runtime.inputs import DTYPES, ONNX_TO_DTYPE
from edgefleet.runtime.outputs import OutputStep, output_step

#: Exceptions ONNX Runtime and onnx raise for a model they cannot load, optimize or run; all derive
#: from Exception directly, so they are listed by name.
ORT_ERRORS: tuple[type[Exception], ...] = (
    DecodeError,
    *(
        getattr(_ort_state, name)
        for name in (
            "Fail",
            "InvalidArgument",
            "NoSuchFile",
            "NoModel",
            "EngineError",
            "RuntimeException",
            "InvalidProtobuf",
            "ModelLoaded",
            "NotImplemented",
            "InvalidGraph",
            "EPFail",
        )
        if hasattr(_ort_state, name)
    ),
)


def open_session(model_bytes: bytes, *, threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime CPU session on ``model_bytes``; ModelError if it cannot be loaded."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers on every quantized model
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as exc:
        raise ModelError(f"ONNX Runtime cannot load the model: {exc}") from exc


def output_reader(model_bytes: bytes, postprocess: dict[str, Any] | None = None) -> OutputStep:
    """The output step that reads the model's class scores: ``postprocess`` (a manifest's output spec), else the
    one the model's outputs imply (bundle.describe: float scores, or an ONNX-ML label + probabilities, ZipMap
    included). ModelError when it gives no class scores (a regression or anomaly model has no accuracy)."""
    from edgefleet.bundle.describe import default_postprocess
    from edgefleet.bundle.pack import model_schema

    try:
        spec = postprocess if postprocess else default_postprocess(model_bytes, model_schema(model_bytes)[1])
        step = output_step(spec)
    except BundleError as exc:
        raise ModelError(f"cannot read class scores from the model: {exc}") from exc
    if not step.classifies:
        raise ModelError(f"the model's output spec ({step.kind}) gives no class scores: the build measures "
                         "classification accuracy")
    return step


def _input_type(session: ort.InferenceSession) -> type[np.generic]:
    kind = str(session.get_inputs()[0].type).removeprefix("tensor(").removesuffix(")")
    return DTYPES.get(ONNX_TO_DTYPE.get(kind, "float32"), np.float32)


def predict(model_bytes: bytes, x: np.ndarray, batch: int = 64,
            postprocess: dict[str, Any] | None = None) -> np.ndarray:
    """Class scores [m, n_classes] for model inputs x [m, ...], run ``batch`` samples at a time and read through
    the output spec (``output_reader``), as the agent reads them."""
    session = open_session(model_bytes)
    name = session.get_inputs()[0].name
    step = output_reader(model_bytes, postprocess)
    first = session.get_outputs()[0].name
    outputs = [n or first for n in step.output_names]
    data = np.ascontiguousarray(x, dtype=_input_type(session))
    if len(data) == 0:
        raise DataError("no samples to predict")
    try:
        parts = [step.interpret(session.run(outputs, {name: data[i : i + batch]}))
                 for i in range(0, len(data), batch)]
    except ORT_ERRORS as exc:
        raise ModelError(f"inference failed on input {data.shape}: {exc}") from exc
    return np.concatenate(parts).astype(np.float32, copy=False)


def accuracy(model_bytes: bytes, x: np.ndarray, y: np.ndarray, postprocess: dict[str, Any] | None = None) -> float:
    """Fraction of samples whose most probable class equals the label, in [0, 1]."""
    labels = np.asarray(y)
    if labels.shape != (len(x),):
        raise DataError(f"labels shape {labels.shape} does not match {len(x)} samples")
    return float(np.mean(predict(model_bytes, x, postprocess=postprocess).argmax(axis=1) == labels))


def model_size(model_bytes: bytes) -> int:
    """Size of the serialized model in bytes."""
    return len(model_bytes)


@dataclass(frozen=True)
class BuildMetrics:
    """What a build measured for one model on the test windows."""

    accuracy: float
    size_bytes: int
    latency_ms_p50: float


def latency_ms_p50(model_bytes: bytes, sample: np.ndarray, *, warmup: int = 20, runs: int = 200) -> float:
    """Median batch-1 latency in milliseconds of one thread, after ``warmup`` runs."""
    session = open_session(model_bytes)
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(sample[None], dtype=np.float32)}
    times = []
    try:
        for i in range(warmup + runs):
            start = time.perf_counter()
            session.run(None, feed)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    except ORT_ERRORS as exc:
        raise ModelError(f"inference failed: {exc}") from exc
    return float(np.median(times) * 1e3)


def measure(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> BuildMetrics:
    """Accuracy on (x, y), serialized size and batch-1 latency (on x[0]) of one model."""
    return BuildMetrics(
        accuracy=accuracy(model_bytes, x, y),
        size_bytes=model_size(model_bytes),
        latency_ms_p50=latency_ms_p50(model_bytes, np.asarray(x)[0]),
    )
