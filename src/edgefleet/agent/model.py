"""A verified bundle made ready to run: manifest, runner and preprocessing, with its health check."""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.core.manifest import Manifest
from edgefleet.core.update import AcceptedBundle
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
