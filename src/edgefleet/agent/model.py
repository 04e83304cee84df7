"""A verified bundle made ready to run: what the loop needs of its manifest, its runner and preprocessing.

The agent keeps a :class:`ModelInfo` (the manifest fields inference uses, read from the verified canonical
manifest bytes) rather than the pydantic ``Manifest``, so the running agent does not load pydantic.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgefleet.errors import BundleError
from edgefleet.runtime.inputs import SeriesInput
from edgefleet.runtime.outputs import Scorer
from edgefleet.runtime.preprocess import WindowSpec
from edgefleet.runtime.runner import Runner, make_runner
from edgefleet.runtime.spec import ModelPipeline

if TYPE_CHECKING:
    from edgefleet.core.update import AcceptedBundle


@dataclass(frozen=True)
class ModelInfo:
    """The manifest fields the inference loop reads (a verified manifest's, never parsed before verification)."""

    name: str
    version: str
    release: int
    labels: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=dict)
    postprocess: dict[str, Any] | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    runtime: str | None = None
    """The runtime the bundle names (None: ONNX Runtime)."""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def from_bytes(cls, manifest: bytes) -> ModelInfo:
        """From the canonical manifest JSON that the signature covered."""
        try:
            data = json.loads(manifest)
            return cls(name=str(data["name"]), version=str(data["version"]), release=int(data["release"]),
                       labels=[str(label) for label in data.get("labels", [])],
                       preprocess=dict(data.get("preprocess", {})),
                       postprocess=dict(data["postprocess"]) if data.get("postprocess") else None,
                       thresholds={str(k): float(v) for k, v in dict(data.get("thresholds", {})).items()},
                       runtime=str(data["runtime"]) if data.get("runtime") else None)
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"manifest is malformed: {exc}", reason="malformed") from exc


@dataclass(frozen=True)
class LoadedModel:
    """The model the inference loop runs."""

    manifest: ModelInfo
    sha256: str
    runner: Runner
    pipeline: ModelPipeline
    score: Scorer
    """Model input -> float32 scores [n, K] (class scores, values, or one anomaly score), per the output spec."""

    @property
    def ref(self) -> str:
        return self.manifest.ref

    @property
    def window(self) -> WindowSpec | None:
        """The sliding-window spec of a streamed time-series model; None for images, vectors and tensors."""
        inputs = self.pipeline.inputs
        return inputs.window if isinstance(inputs, SeriesInput) else None


def load_model(accepted: AcceptedBundle, providers: Sequence[str] = ()) -> LoadedModel:
    """Build the runner and preprocessing for an accepted bundle (the model bytes are already verified)."""
    return make_model(ModelInfo.from_bytes(accepted.manifest.canonical_bytes()), accepted.sha256, accepted.model,
                      providers)


def make_model(info: ModelInfo, sha256: str, model: bytes, providers: Sequence[str] = ()) -> LoadedModel:
    """Build the runner and the input and output pipeline for verified model bytes and their manifest, on the
    manifest's runtime (ONNX Runtime with ``providers`` first where it has them)."""
    pipeline = ModelPipeline.from_manifest(info.preprocess, info.postprocess)
    runner = make_runner(model, info.runtime, providers=providers)
    return LoadedModel(info, sha256, runner, pipeline, pipeline.outputs.scorer(runner))
