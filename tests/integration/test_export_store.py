"""The store's side of the Kafka export, one contract on SQLite and on PostgreSQL: the triggers queue every
exported table's new rows (only while the export is enabled), the lease is a compare-and-set that expires, and
rows leave the outbox only by id."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.core.rollout import Decision
from edgefleet.server.store import Advance, Store
from edgefleet.server.store.learn_tables import HardExampleRow, MonitorRow
from edgefleet.transport.messages import Event, TelemetryBatch

pytestmark = pytest.mark.integration


def batch(device: str, seq: int) -> TelemetryBatch:
    return TelemetryBatch(device=device, seq=seq, ts=time.time(), model="clf@1.0.0", windows=5)


class ExportStoreContract:
    @pytest.fixture
    def url(self) -> str:
        raise NotImplementedError

    @pytest.fixture
    def store(self, url: str) -> Iterator[Store]:
        store = Store(url)
        yield store
        store.close()

    def test_rows_are_queued_while_enabled_and_leave_by_id_once_acknowledged(self, store: Store) -> None:
        store.add_telemetry(batch("d1", 1))
        assert store.export_backlog().pending == 0 and not store.export_backlog().enabled
        store.enable_export()
        store.add_telemetry_many([batch("d1", 1), batch("d1", 2), batch("d1", 2)])  # a redelivery and a new one
        backlog = store.export_backlog()
        assert backlog.enabled and backlog.pending == 1, "a duplicate the store ignored is not queued"
        assert backlog.lag_s(time.time() + 5) >= 5
        store.add_telemetry_many([batch("d1", n) for n in range(3, 7)])
        rows = store.pending_exports(limit=3)
        assert [r.seq for r in rows] == [2, 3, 4]
        assert store.mark_exported([rows[0].id, rows[2].id]) == 2
        assert store.mark_exported([rows[0].id]) == 0, "marking twice (another replica first) counts nothing"
        assert [r.seq for r in store.pending_exports()] == [3, 5, 6], "rows leave by id, never by range"
        assert store.export_backlog().exported == 2
        store.enable_export(False)
        assert store.export_backlog().pending == 0

    def test_every_exported_table_queues_its_rows_with_key_seq_and_id(self, store: Store) -> None:
        store.enable_export()
        store.add_telemetry(batch("d1", 4))
        store.add_event(Event(device="d1", seq=9, kind="agent", name="started", detail={"pid": 1}))
        monitor = store.add_monitor(MonitorRow(id="mon-1", expr="accuracy < 0.9", model="clf", select={},
                                               webhook=None, pause_rollouts=False, window_s=60.0, state="ok",
                                               changed=1.0, checked=None, explanation="", values={}, created=1.0))
        alert = store.raise_alert(monitor, "accuracy 0.5 < 0.9", {"accuracy": 0.5}, now=2.0)
        store.clear_alerts("mon-1", now=3.0)
        with store.session() as s:
            s.add(HardExampleRow(name="clf", model="clf@1.0.0", device="d1", ts=1.0, predicted="a", confidence=0.4,
                                 shape=[2], encoding="f16", data="AAAA", scale=None, received=1.0))
        store.create_rollout("ro-1", "clf@1.0.0", {"waves": []}, Advance(
            state={}, phase="waiting", step_no=0, wake_at=None,
            decisions=[Decision(kind="hold", at=1.0, wave=0, reason="created")]), actor="test")
        queued = {(r.topic, r.msg_id): r for r in store.pending_exports()}
        assert set(queued) == {("telemetry", "d1/4"), ("events", "d1/9"), ("alerts", f"{alert.id}/raised"),
                               ("alerts", f"{alert.id}/cleared"), ("hard_examples", "1"),
                               ("decisions", "ro-1/0/0")}
        event = queued[("events", "d1/9")]
        assert (event.key, event.seq, event.version) == ("d1", 9, 1)
        assert json.loads(event.data)["detail"] == {"pid": 1}
        cleared = json.loads(queued[("alerts", f"{alert.id}/cleared")].data)
        assert cleared["cleared"] == 3.0 and queued[("alerts", f"{alert.id}/cleared")].key == "clf"
        assert json.loads(queued[("telemetry", "d1/4")].data)["windows"] == 5
        assert queued[("decisions", "ro-1/0/0")].key == "ro-1"
        ids = [r.id for r in store.pending_exports()]
        assert ids == sorted(ids)

    def test_the_lease_is_held_by_one_replica_until_it_expires_or_is_released(self, store: Store) -> None:
        assert not store.claim_export("a", 10), "no lease while the export is disabled"
        store.enable_export()
        now = time.time()
        assert store.claim_export("a", 10, now=now)
        assert not store.claim_export("b", 10, now=now + 5)
        assert store.claim_export("a", 10, now=now + 5), "the holder renews"
        assert store.claim_export("b", 10, now=now + 16), "an expired lease is taken over"
        assert not store.claim_export("a", 10, now=now + 17)
        store.release_export("b")
        assert store.claim_export("a", 10, now=now + 18)
        assert store.export_backlog().holder == "a"


class TestSqliteExportStore(ExportStoreContract):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'edgefleet.db'}"


class TestPostgresExportStore(ExportStoreContract):
    @pytest.fixture
    def url(self, postgres_url: str) -> str:
        return postgres_url


def test_a_replica_without_kafka_shows_the_shared_backlog_on_the_status_endpoint(tmp_path: Path) -> None:
    """``GET /api/v1/export/status`` on a replica that exports nothing itself: the store's shared state."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from edgefleet.server.export.api import export_router

    store = Store(f"sqlite:///{tmp_path / 'edgefleet.db'}")
    try:
        app = FastAPI()
        app.include_router(export_router(store, None))
        client = TestClient(app)
        assert client.get("/api/v1/export/status").json()["enabled"] is False
        store.enable_export()
        store.add_telemetry(batch("d1", 1))
        assert store.claim_export("replica-a", 30)
        status = client.get("/api/v1/export/status").json()
        assert (status["enabled"], status["pending"], status["holder"], status["lease_held"]) == \
            (True, 1, "replica-a", False)
    finally:
        store.close()
