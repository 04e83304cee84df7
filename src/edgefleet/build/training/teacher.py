"""The model training starts from: the ONNX model converted to PyTorch, or the user's own torch model
(``--factory``), checked against the ONNX model's outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgefleet.errors import ConfigError

if TYPE_CHECKING:
    import torch

FACTORY_ATOL = 1e-3
"""How far the factory model's scores may lie from the ONNX model's on calibration rows."""


@dataclass(frozen=True)
class Teacher:
    """A torch model returning logits (the ONNX model without a final Softmax), and how to export like it."""

    module: torch.nn.Module
    softmax_axis: int | None
    sample_shape: tuple[int, ...]
    source: str
    """"converted from ONNX" or "--factory"."""


def final_softmax_axis(model: bytes) -> int | None:
    """The axis of the Softmax that computes the ONNX model's first output, None if it ends otherwise."""
    graph = onnx.load_from_string(model).graph
    out = graph.output[0].name
    for node in graph.node:
        if node.op_type == "Softmax" and node.output[0] == out:
            return next((int(a.i) for a in node.attribute if a.name == "axis"), -1)
    return None


def from_model(model: bytes, torch_model: Any = None) -> Teacher:
    """The ONNX model converted (ConversionError naming the operator it cannot convert), or ``torch_model``."""
    if torch_model is not None:
        shape = tuple(int(d.dim_value) for d in onnx.load_from_string(model).graph.input[0].type.tensor_type
                      .shape.dim[1:])
        return Teacher(torch_model.eval(), final_softmax_axis(model), shape, "--factory")
    from edgefleet.build.torch_bridge import to_torch

    converted = to_torch(model, logits=True)
    return Teacher(converted.module, converted.softmax_axis, converted.input_shape, "converted from ONNX")


def check_factory(model: bytes, torch_model: Any, x: np.ndarray, spec: str) -> None:
    """ConfigError unless ``torch_model`` (softmax applied where the ONNX model ends in one) computes the ONNX
    model's first output on rows ``x``."""
    import onnxruntime as ort
    import torch

    if not isinstance(torch_model, torch.nn.Module):
        raise ConfigError(f"--factory {spec} must return a torch.nn.Module, got {type(torch_model).__name__}")
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    rows = np.ascontiguousarray(x[:16], dtype=np.float32)
    want = session.run(None, {session.get_inputs()[0].name: rows})[0]
    try:
        with torch.no_grad():
            got = torch_model.eval()(torch.from_numpy(rows))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"--factory {spec}: the model fails on calibration rows: {exc}".splitlines()[0]) from exc
    axis = final_softmax_axis(model)
    if axis is not None:
        got = torch.softmax(got, dim=axis)
    got_np = got.numpy()
    if got_np.shape != want.shape or not np.allclose(got_np, want, atol=FACTORY_ATOL, rtol=FACTORY_ATOL):
        diff = float(np.abs(got_np - want).max()) if got_np.shape == want.shape else float("inf")
        raise ConfigError(f"--factory {spec} does not compute the ONNX model: outputs {tuple(got_np.shape)} differ "
                          f"by up to {diff:.3g} (tolerance {FACTORY_ATOL:g})")
