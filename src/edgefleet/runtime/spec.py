"""A model's whole pipeline as the manifest describes it: the input step and the output step, checked together
against the model's own input and output signature.

``ModelPipeline.check`` is what makes a bundle the agent could not run fail at pack time with the reason, and
what the agent's health check repeats on the device: the input the pipeline makes must fit the model's first
input (rank, fixed sizes, element type), the outputs it reads must exist, and the number of class scores must
match the labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edgefleet.errors import BundleError
from edgefleet.runtime.inputs import ONNX_TO_DTYPE, InputStep, input_step
from edgefleet.runtime.outputs import ClassScores, LabelProbabilities, OutputStep, output_step


class TensorInfo(Protocol):
    """Name, ONNX element type name (``float``, ``int64``, ...) and shape (None: a free axis) of a model tensor."""

    name: str
    dtype: str
    shape: list[int | None]


@dataclass(frozen=True)
class ModelPipeline:
    """The input and output steps of one model."""

    inputs: InputStep
    outputs: OutputStep

    @classmethod
    def from_manifest(cls, preprocess: dict[str, Any], postprocess: dict[str, Any] | None) -> ModelPipeline:
        return cls(input_step(preprocess), output_step(postprocess))

    def check(self, model_inputs: Sequence[TensorInfo], model_outputs: Sequence[TensorInfo],
              labels: Sequence[str]) -> None:
        """Raise BundleError (reason ``incompatible``) when the pipeline cannot feed or read this model."""
        if not model_inputs:
            raise BundleError("the model has no inputs", reason="malformed")
        first = model_inputs[0]
        made = self.inputs.model_shape
        if len(first.shape) != len(made) or any(
                want is not None and want > 0 and want != have for want, have in zip(first.shape[1:], made[1:],
                                                                                      strict=True)):
            shown = [d if d is not None and d > 0 else "?" for d in first.shape]
            raise BundleError(f"the {self.inputs.kind} pipeline makes input {list(made)} but the model's input "
                              f"{first.name!r} is {shown}", reason="incompatible")
        wanted_type = ONNX_TO_DTYPE.get(first.dtype)
        if wanted_type is None or wanted_type != getattr(self.inputs, "dtype_name", "float32"):
            raise BundleError(f"the {self.inputs.kind} pipeline feeds {getattr(self.inputs, 'dtype_name', 'float32')}"
                              f" but the model's input {first.name!r} takes {first.dtype}", reason="incompatible")
        by_name = {o.name: o for o in model_outputs}
        if not model_outputs:
            raise BundleError("the model has no outputs", reason="malformed")
        for name in self.outputs.output_names:
            if name and name not in by_name:
                raise BundleError(f"the output spec reads {name!r}, which the model does not have "
                                  f"(it has {', '.join(by_name)})", reason="incompatible")
        classes = self._classes(model_outputs)
        if labels and classes is not None and classes != len(labels):
            raise BundleError(f"the model scores {classes} classes but the bundle names {len(labels)} labels",
                              reason="incompatible")

    def _classes(self, model_outputs: Sequence[TensorInfo]) -> int | None:
        """How many class scores the model gives, where its signature says (None when it does not)."""
        outputs = self.outputs
        if isinstance(outputs, LabelProbabilities) and outputs.zipmap:
            return len(outputs.classes)
        if not isinstance(outputs, ClassScores | LabelProbabilities):
            return None
        name = outputs.output_names[0] or model_outputs[0].name
        tensor = next((o for o in model_outputs if o.name == name), None)
        if tensor is None:
            return None
        if not tensor.shape or ONNX_TO_DTYPE.get(tensor.dtype, "").startswith("int"):
            raise BundleError(f"the output {name!r} ({tensor.dtype}, {tensor.shape}) holds no class scores: "
                              "give an output spec (label_probabilities, regression or anomaly_score)",
                              reason="incompatible")
        width = tensor.shape[-1] if len(tensor.shape) >= 2 else 1
        return width if width is not None and width > 0 else None
