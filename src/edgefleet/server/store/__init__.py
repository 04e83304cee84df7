"""The server's store: one interface over SQLAlchemy, SQLite by default, PostgreSQL by URL.

``Store`` = devices and models (:mod:`.core`) + telemetry and events (:mod:`.telemetry`) + rollouts and their
audit trail (:mod:`.rollouts`) + the trust log (:mod:`.trust`) + monitors, alerts and field data (:mod:`.learn`)
+ the Kafka export's outbox and lease (:mod:`.export`); the schema is migrated on open (:mod:`.migrations`).
One contract test suite (tests/integration/test_store_contract.py) runs against both backends.
"""

from __future__ import annotations

from edgefleet.server.store.core import normalize_url, sqlite_url
from edgefleet.server.store.export import ExportStore
from edgefleet.server.store.learn import LearnStore
from edgefleet.server.store.rollouts import Advance, RolloutStore
from edgefleet.server.store.telemetry import TelemetryStore
from edgefleet.server.store.trust import TrustStore


class Store(RolloutStore, TelemetryStore, TrustStore, LearnStore, ExportStore):
    """Models, devices, telemetry, events, rollouts, the trust log, monitors and field data. Every method is one
    short transaction."""


__all__ = ["Advance", "Store", "normalize_url", "sqlite_url"]
