"""What every router of the REST API and the dashboard needs, wired once by ``server.main``."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgefleet.bundle.signing import PublicKey
from edgefleet.server.artifacts import ArtifactStore
from edgefleet.server.broker_auth import BrokerAccess
from edgefleet.server.broker_sync import BrokerSync
from edgefleet.server.limits import Limits
from edgefleet.server.metrics import Metrics
from edgefleet.server.model_keys import ModelKeys
from edgefleet.server.orchestrator import Orchestrator
from edgefleet.server.pki import FleetCA
from edgefleet.server.store import Store

__all__ = ["ServerContext"]


@dataclass
class ServerContext:
    """Everything the API needs, wired by ``server.main``."""

    store: Store
    artifacts: ArtifactStore
    trusted_keys: dict[str, PublicKey]
    operator_token: str
    public_url: str
    device_mqtt_url: str
    orchestrator: Orchestrator
    metrics: Metrics
    access: BrokerAccess | None = None
    limits: Limits = field(default_factory=Limits)
    model_keys: ModelKeys | None = None
    """Seals the keys of encrypted models pushed with one (None: encrypted bundles are refused)."""
    pki: FleetCA | None = None
    """With ``--tls``: the fleet CA that issues each device its certificate."""

    syncer: BrokerSync | None = field(default=None, repr=False)
    """Batches the rewrites of the broker's files (:mod:`edgefleet.server.broker_sync`); made on first use."""

    def sync_broker(self, *, soon: bool = False) -> None:
        """Rewrite the broker's password, ACL and CRL files from the store (new or revoked devices): waited for,
        or with ``soon`` (a new device) waited for only while syncs are cheap; adds made during a sync share the
        next one, so that adding N devices does not rewrite N lines N times."""
        access = self.access
        if access is None:
            return
        if self.syncer is None:
            self.syncer = BrokerSync(lambda: access.sync(
                (d.id, d.mqtt_password_hash, d.revoked) for d in self.store.list_devices()))
        if soon:
            self.syncer.sync_soon()
        else:
            self.syncer.sync()
