"""A verified bundle made ready to run: manifest, runner and preprocessing, with its health check."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgefleet.core.manifest import Manifest
from edgefleet.core.update import AcceptedBundle
from edgefleet.errors import ModelError
from edgefleet.runtime.preprocess import WindowSpec
from edgefleet.runtime.runner import OnnxRuntimeRunner, Runner


@dataclass(frozen=True)
class LoadedModel:
    """The model the inference loop runs."""

    manifest: Manifest
    sha256: str
    runner: Runner
    window: WindowSpec

    @property
    def ref(self) -> str:
        return self.manifest.ref


def load_model(accepted: AcceptedBundle) -> LoadedModel:
    """Build the runner and preprocessing for an accepted bundle (the model bytes are already verified)."""
    window = WindowSpec.from_manifest(accepted.manifest.preprocess)
    return LoadedModel(accepted.manifest, accepted.sha256, OnnxRuntimeRunner(accepted.model), window)


def health_check(model: LoadedModel) -> None:
    """Run the model on a neutral input; raise ModelError unless it returns one finite distribution."""
    spec = model.window
    probe = np.zeros((1, spec.channels, spec.window), dtype=np.float32)
    output = model.runner.run(probe)
    labels = model.manifest.labels
    if output.ndim != 2 or output.shape[0] != 1 or (labels and output.shape[1] != len(labels)):
        raise ModelError(f"health check: output shape {output.shape} does not match {len(labels)} labels")
    if not np.all(np.isfinite(output)):
        raise ModelError("health check: the model returned NaN or Inf")
