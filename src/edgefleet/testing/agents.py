"""An agent's update path without network or broker: for tests of updates, refusals and rollbacks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from edgefleet.agent.fetch import InMemoryFetcher
from edgefleet.agent.model import LoadedModel
from edgefleet.agent.state import AgentState
from edgefleet.agent.updater import HealthPolicy, Updater
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.update import TrustState
from edgefleet.testing.synthetic import LABELS, channel_mean_model, preprocess_spec
from edgefleet.transport.messages import ModelRef


def signed_bundle(key: SigningKey, version: str, release: int, model: bytes | None = None,
                  thresholds: dict[str, float] | None = None) -> bytes:
    """The synthetic classifier (or ``model``) as a bundle named ``clf``."""
    return pack_bundle(model or channel_mean_model(), key, BundleSpec(
        name="clf", version=version, release=release, labels=list(LABELS), preprocess=preprocess_spec(),
        thresholds=thresholds or {}))


def model_ref(data: bytes, version: str, release: int) -> ModelRef:
    digest = hashlib.sha256(data).hexdigest()
    return ModelRef(name="clf", version=version, release=release, sha256=digest, size=len(data),
                    url=f"/artifacts/{digest}")


class UpdaterHarness:
    """An Updater over a real AgentState and an in-memory fetcher, recording activations and events."""

    def __init__(self, data_dir: Path, key: SigningKey, health: HealthPolicy = HealthPolicy()) -> None:
        self.key = key
        self.state = AgentState(data_dir)
        self.fetcher = InMemoryFetcher()
        self.active: list[LoadedModel] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.updater = Updater(self.state, self.fetcher,
                               lambda: TrustState(keys={key.public.key_id: key.public},
                                                  highest_release=self.state.highest_releases()),
                               self.active.append, lambda name, detail: self.events.append((name, detail)),
                               lambda: None, health=health)

    def install(self, data: bytes, version: str, release: int) -> None:
        target = model_ref(data, version, release)
        self.fetcher.artifacts[target.url] = data
        self.updater.install(target)

    def active_ref(self) -> str | None:
        slot = self.state.slot("active")
        return slot.ref if slot else None

    def last_refusal(self) -> str | None:
        refusals = [detail.get("reason") for name, detail in self.events if name == "refused"]
        return refusals[-1] if refusals else None
