"""One contract for the server's store, run on SQLite and on PostgreSQL (Flower's linkstate_test pattern):
migrations, models, devices, idempotent telemetry, aggregates, retention, rollouts taken exactly once."""

from __future__ import annotations

import base64
import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from edgefleet.bundle.manifest import Manifest
from edgefleet.bundle.pack import BundleSpec, pack_bundle, peek_manifest
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.rollout import Decision
from edgefleet.core.telemetry import bucket_middle_ms
from edgefleet.errors import BundleError, StoreError
from edgefleet.server.schema import Device, RolloutRow, TrustRecord
from edgefleet.server.store import Advance, Store
from edgefleet.server.store.migrations import LATEST, current_version
from edgefleet.testing import synthetic
from edgefleet.transport.messages import Event, TelemetryBatch

pytestmark = pytest.mark.integration


@functools.cache
def manifest(version: str = "1.0.0", release: int = 1) -> Manifest:
    key = SigningKey.generate()
    return peek_manifest(pack_bundle(synthetic.channel_mean_model(), key, BundleSpec(
        name="clf", version=version, release=release, labels=list(synthetic.LABELS),
        preprocess=synthetic.preprocess_spec())))


def device(device_id: str, **tags: str) -> Device:
    return Device(id=device_id, token_sha256=f"t-{device_id}".ljust(64, "0"), mqtt_password_sha256="p" * 64,
                  tags=tags, profile="rpi", created=time.time(), revoked=False)


def batch(device_id: str, seq: int, model: str = "clf@1.0.0", ts: float | None = None, **kw: object
          ) -> TelemetryBatch:
    fields = {"windows": 10, "labelled": 10, "correct": 9, "latency_ms": {"150": 10}, "confidence": [0] * 19 + [10],
              **kw}
    return TelemetryBatch(device=device_id, seq=seq, ts=time.time() if ts is None else ts, model=model,
                          **fields)  # type: ignore[arg-type]


SKELETON_DDL = [
    "CREATE TABLE model_versions (id INTEGER PRIMARY KEY, name VARCHAR(64), version VARCHAR(64), release INTEGER, "
    "sha256 VARCHAR(64) UNIQUE, size BIGINT, key_id VARCHAR(32), manifest JSON, created FLOAT)",
    "CREATE TABLE devices (id VARCHAR(64) PRIMARY KEY, token_sha256 VARCHAR(64), mqtt_password_sha256 VARCHAR(64), "
    "tags JSON, profile VARCHAR(64), created FLOAT, revoked BOOLEAN, desired_model_id INTEGER REFERENCES "
    "model_versions(id), reported JSON, last_seen FLOAT)",
    "CREATE TABLE telemetry (device VARCHAR(64), seq BIGINT, ts FLOAT, model VARCHAR(140), payload JSON, "
    "received FLOAT, PRIMARY KEY (device, seq))",
    "CREATE TABLE events (device VARCHAR(64), seq BIGINT, ts FLOAT, kind VARCHAR(16), name VARCHAR(64), "
    "detail JSON, PRIMARY KEY (device, seq))",
    "INSERT INTO devices VALUES ('old', 't', 'p', '{}', NULL, 1.0, false, NULL, NULL, NULL)",
]


class StoreContract:
    """Every backend must pass these; subclasses say how to open the store."""

    @pytest.fixture
    def url(self) -> str:
        raise NotImplementedError

    @pytest.fixture
    def store(self, url: str) -> Iterator[Store]:
        store = Store(url)
        yield store
        store.close()

    # migrations ------------------------------------------------------------------------------
    def test_fresh_database_is_at_the_latest_version_and_reopening_is_a_no_op(self, url: str) -> None:
        first = Store(url)
        assert first.migrated_from == 0
        second = Store(url)
        assert second.migrated_from == LATEST
        with second.engine.connect() as conn:
            assert current_version(conn) == LATEST
        first.close()
        second.close()

    def test_a_skeleton_database_is_migrated_in_place(self, url: str) -> None:
        from sqlalchemy import create_engine

        from edgefleet.server.store import normalize_url

        engine = create_engine(normalize_url(url))
        with engine.begin() as conn:  # the walking skeleton's schema (version 1): no version table
            for ddl in SKELETON_DDL:
                conn.execute(text(ddl))
        engine.dispose()
        migrated = Store(url)
        assert migrated.migrated_from == 1
        columns = {c["name"] for c in inspect(migrated.engine).get_columns("devices")}
        assert {"desired_shadow_id", "desired_rev", "published_rev", "mqtt_password_hash", "hardware"} <= columns
        assert "public_key" in columns  # version 4: encrypted models
        assert "model_key_sealed" in {c["name"] for c in inspect(migrated.engine).get_columns("model_versions")}
        again = migrated.get_device("old")
        assert again is not None and again.desired_rev == 0
        migrated.close()

    # models and devices ------------------------------------------------------------------------
    def test_models_are_unique_by_name_version_and_by_hash(self, store: Store) -> None:
        store.add_model(manifest(), "a" * 64, 10, "k")
        with pytest.raises(StoreError, match="already registered"):
            store.add_model(manifest(), "b" * 64, 10, "k")
        with pytest.raises(StoreError):
            store.add_model(manifest("2.0.0", 2), "a" * 64, 10, "k")
        store.add_model(manifest("2.0.0", 2), "c" * 64, 10, "k")
        assert [m.version for m in store.list_models()] == ["1.0.0", "2.0.0"]
        found = store.model_by_ref("clf@2.0.0")
        assert found is not None and found.sha256 == "c" * 64
        assert store.model_by_sha("a" * 64) is not None and store.model_by_ref("clf@9.9.9") is None

    def test_devices_desired_revisions_and_publication(self, store: Store) -> None:
        model = store.add_model(manifest(), "a" * 64, 10, "k")
        store.add_device(device("d1", site="x"))
        store.add_device(device("d2"))
        with pytest.raises(StoreError, match="already exists"):
            store.add_device(device("d1"))
        assert store.desired_unpublished() == []
        store.set_desired(["d1", "d2"], model.id)
        store.set_desired(["d1"], model.id, shadow=True)
        pending = {d.id: d.desired_rev for d in store.desired_unpublished()}
        assert pending == {"d1": 2, "d2": 1}
        store.mark_published("d1", 2)
        store.mark_published("d2", 0)  # an older publication never lowers the mark
        assert [d.id for d in store.desired_unpublished()] == ["d2"]
        d1 = store.get_device("d1")
        assert d1 is not None and d1.desired_shadow_id == model.id and d1.tags == {"site": "x"}
        with pytest.raises(StoreError, match="unknown device"):
            store.set_desired(["nope"], model.id)
        store.set_revoked("d2")
        assert store.device_by_token("t-d2".ljust(64, "0")).revoked  # type: ignore[union-attr]
        assert store.record_reported("d1", {"active": "clf@1.0.0"}) and not store.record_reported("x", {})

    def test_a_model_key_is_kept_sealed_and_a_reported_public_key_republishes_the_desired_state(
            self, store: Store) -> None:
        """Encrypted models (E7): the model row keeps only the sealed key; a device's new public key is stored
        and, when it has a model desired, makes its desired state unpublished (it goes out with a key wrapped
        for it); a revoked device's key is not taken."""
        sealed = store.add_model(manifest(), "a" * 64, 10, "k", model_key_sealed="sealed-text")
        assert store.model_by_sha("a" * 64).model_key_sealed == "sealed-text"  # type: ignore[union-attr]
        for name in ("d1", "d2", "idle"):
            store.add_device(device(name))
        store.set_desired(["d1", "d2"], sealed.id)
        store.mark_published_many([("d1", 1), ("d2", 1)])
        store.set_revoked("d2")
        for name in ("d1", "d2", "idle"):
            assert store.record_reported(name, {"public_key": f"key-{name}"})
        keys = {d.id: d.public_key for d in store.list_devices()}
        assert keys == {"d1": "key-d1", "d2": None, "idle": "key-idle"}
        assert [(d.id, d.public_key) for d in store.desired_unpublished()] == [("d1", "key-d1")]
        store.mark_published("d1", 2)
        assert store.record_reported("d1", {"public_key": "key-d1"}) and store.desired_unpublished() == []

    def test_a_device_keeps_the_hardware_id_it_was_provisioned_with(self, store: Store) -> None:
        """Rollouts read it (with the profile) to skip devices a hardware-restricted bundle does not fit."""
        pi = device("pi")
        pi.hardware = "rpi4"
        store.add_device(pi)
        store.add_device(device("plain"))
        views = {d.id: (d.hardware, d.profile) for d in store.device_views()}
        assert views == {"pi": ("rpi4", "rpi"), "plain": (None, "rpi")}
        found = store.get_device("pi")
        assert found is not None and found.hardware == "rpi4"

    # telemetry -------------------------------------------------------------------------------
    def test_telemetry_is_stored_once_per_device_and_seq(self, store: Store) -> None:
        store.add_device(device("d1"))
        flags = store.add_telemetry_many([batch("d1", 0), batch("d1", 1), batch("d1", 1), batch("d2", 0)])
        assert flags == [True, True, False, True]
        assert store.add_telemetry(batch("d1", 0)) is False
        assert store.add_telemetry(batch("d1", 5)) is True
        assert [b.seq for b in store.telemetry("d1")] == [0, 1, 5]
        assert store.sequence_gaps("d1") == 3
        assert store.sequence_gaps("nobody") == 0
        seen = store.get_device("d1")
        assert seen is not None and seen.last_seen is not None

    def test_events_are_stored_once_and_refusals_are_found(self, store: Store) -> None:
        refused = Event(device="d1", seq=0, kind="update", name="refused", detail={"refused": "clf@2.0.0"})
        assert store.add_event(refused) and not store.add_event(refused)
        store.add_event(Event(device="d1", seq=1, kind="update", name="activated", detail={"activated": "x"}))
        assert [e.name for e in store.events("d1")] == ["refused", "activated"]
        assert store.refused_models(["d1", "d2"]) == {"d1": {"clf@2.0.0"}}

    def test_aggregates_per_device_and_model_including_shadow(self, store: Store) -> None:
        store.add_telemetry_many([batch("d1", 0), batch("d1", 1, model="clf@2.0.0"), batch("d2", 0),
                                  batch("d2", 1, shadow_model="clf@2.0.0", shadow_windows=10, shadow_agree=8)])
        primary, shadow = store.device_model_stats(["d1", "d2"])
        assert primary["d1"]["clf@1.0.0"].windows == 10 and primary["d1"]["clf@2.0.0"].windows == 10
        assert primary["d2"]["clf@1.0.0"].windows == 20 and primary["d2"]["clf@1.0.0"].accuracy == 0.9
        assert shadow == {"d2": {"clf@2.0.0": shadow["d2"]["clf@2.0.0"]}}
        assert shadow["d2"]["clf@2.0.0"].shadow_agree == 8
        total, devices = store.model_stats("clf@1.0.0")
        assert (total.windows, devices) == (30, 2)
        later, _ = store.device_model_stats(["d1"], since_ts=time.time() + 3600)
        assert later == {}

    def test_compaction_downsamples_without_changing_aggregates_or_gaps(self, store: Store) -> None:
        old = time.time() - 3 * 86400
        store.add_telemetry_many([batch("d1", i, ts=old + i) for i in range(5)] + [batch("d1", 7)])
        before, _ = store.device_model_stats(["d1"], since_ts=old - 3600)
        assert store.compact_telemetry(time.time() - 86400) == 5
        assert store.compact_telemetry(time.time() - 86400) == 0
        after, _ = store.device_model_stats(["d1"], since_ts=old - 3600)
        assert after["d1"]["clf@1.0.0"].windows == before["d1"]["clf@1.0.0"].windows == 60
        assert after["d1"]["clf@1.0.0"].latency.count == 60
        assert store.sequence_gaps("d1") == 2
        assert [b.seq for b in store.telemetry("d1")] == [7]
        assert store.purge_telemetry(time.time() - 86400) >= 1
        purged, _ = store.device_model_stats(["d1"], since_ts=0)
        assert purged["d1"]["clf@1.0.0"].windows == 10

    def test_device_totals_sum_each_model_version_over_raw_rows_and_rollups(self, store: Store) -> None:
        """One device's telemetry summed per NAME@VERSION: counts added, latency histograms merged (so p50/p99
        come from every batch), rolled-up batches counted like raw ones; None for a device the store lacks."""
        store.add_device(device("d1"))
        store.add_device(device("idle"))
        old = time.time() - 3 * 86400
        store.add_telemetry_many([
            batch("d1", 0, ts=old, latency_ms={"100": 9, "200": 1}),
            batch("d1", 1, latency_ms={"100": 1, "200": 9}),
            batch("d1", 2, model="clf@2.0.0", labelled=0, correct=0, shadow_model="clf@3.0.0", shadow_windows=4),
            batch("d1", 4, model="clf@2.0.0", latency_ms={}),
            batch("other", 0)])
        assert store.compact_telemetry(time.time() - 86400) == 1  # seq 0 now lives in an hourly roll-up
        totals = store.device_totals("d1")
        assert totals is not None
        assert (totals.batches, totals.gaps) == (3, 1)
        assert sorted(totals.models) == ["clf@1.0.0", "clf@2.0.0"]
        v1, v2 = totals.models["clf@1.0.0"], totals.models["clf@2.0.0"]
        assert (v1.windows, v1.labelled, v1.correct, v1.accuracy) == (20, 20, 18, 0.9)
        assert (v2.windows, v2.labelled, v2.correct) == (20, 10, 9)
        assert v1.latency.count == 20
        assert v1.latency.quantile(0.5) == bucket_middle_ms(100) and v1.latency.quantile(0.99) == bucket_middle_ms(200)
        assert v2.latency.quantile(0.5) == bucket_middle_ms(150)
        assert totals.shadow["clf@3.0.0"].windows == 4
        assert store.device_totals("d1", since_ts=time.time() + 3600) == type(totals)(0, 1, {}, {})
        assert store.device_totals("idle") == type(totals)(0, 0, {}, {})
        assert store.device_totals("other") is None  # telemetry alone does not make a device known
        assert store.device_totals("nobody") is None

    # rollouts --------------------------------------------------------------------------------
    def _rollout(self, store: Store) -> None:
        store.add_model(manifest(), "a" * 64, 10, "k")
        store.add_model(manifest("2.0.0", 2), "b" * 64, 10, "k")
        for name in ("d1", "d2"):
            store.add_device(device(name))
        store.set_desired(["d1", "d2"], store.model_by_ref("clf@1.0.0").id)  # type: ignore[union-attr]
        first = Advance({"n": 0}, "installing", 1, 5.0, [
            Decision("assign", 1.0, 0, "wave 1", devices=("d1",), model="clf@2.0.0")])
        store.create_rollout("r1", "clf@2.0.0", {"candidate": "clf@2.0.0"}, first, "test")

    def test_create_records_decisions_waves_and_assignments(self, store: Store) -> None:
        self._rollout(store)
        with pytest.raises(StoreError, match="already exists"):
            store.create_rollout("r1", "clf@2.0.0", {}, Advance({}, "installing", 1, None, []), "test")
        row = store.get_rollout("r1")
        assert row is not None and row.phase == "installing" and row.wake_at == 5.0
        assert [d.kind for d in store.decisions("r1")] == ["assign"]
        assert store.decisions("r1")[0].detail["devices"] == ["d1"]
        assert [(w.wave, w.devices) for w in store.waves("r1")] == [(0, ["d1"])]
        d1 = store.get_device("d1")
        assert d1 is not None and d1.desired_model_id == store.model_by_ref("clf@2.0.0").id  # type: ignore[union-attr]
        assert [r.id for r in store.active_rollouts()] == ["r1"]

    def test_rollback_restores_each_device_and_final_rollouts_do_not_move(self, store: Store) -> None:
        self._rollout(store)
        abort = Advance({"n": 1}, "aborted", 2, None, [
            Decision("rollback", 2.0, 0, "bad", devices=("d1",), restore={"d1": "clf@1.0.0"},
                     values={"x": float("nan")}),
            Decision("aborted", 2.0, 0, "bad")])
        assert store.advance_rollout("r1", lambda _row: abort, "test") == abort
        d1 = store.get_device("d1")
        assert d1 is not None and d1.desired_model_id == store.model_by_ref("clf@1.0.0").id  # type: ignore[union-attr]
        assert store.decisions("r1")[1].detail["values"] == {"x": None}
        assert store.advance_rollout("r1", lambda _row: abort, "test") is None
        assert store.active_rollouts() == []

    def test_a_decision_naming_an_unknown_model_changes_nothing(self, store: Store) -> None:
        self._rollout(store)
        bad = Advance({"n": 1}, "installing", 2, None, [
            Decision("assign", 2.0, 1, "w2", devices=("d2",), model="clf@9.9.9")])
        with pytest.raises(StoreError, match="unknown model"):
            store.advance_rollout("r1", lambda _row: bad, "test")
        assert len(store.decisions("r1")) == 1

    def test_concurrent_replicas_take_each_step_once(self, url: str) -> None:
        setup = Store(url)
        self._rollout(setup)
        replicas = [Store(url) for _ in range(3)]
        barrier = threading.Barrier(3, timeout=20)
        outcomes: list[object] = []

        def compute(row: RolloutRow) -> Advance:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()  # on SQLite every replica reads the same state; on PostgreSQL only one gets here
            return Advance({"n": row.state["n"] + 1}, "installing", 2, None, [
                Decision("assign", 3.0, 1, "wave 2", devices=("d2",), model="clf@2.0.0")])

        def replica(store: Store) -> None:
            outcomes.append(store.advance_rollout("r1", compute, "replica"))

        if setup.dialect == "postgresql":
            barrier = threading.Barrier(1, timeout=20)
        threads = [threading.Thread(target=replica, args=(s,)) for s in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sum(o is not None for o in outcomes) >= 1
        row = setup.get_rollout("r1")
        assert row is not None and row.state["n"] in (1, 2, 3)
        steps = [d for d in setup.decisions("r1") if d.kind == "assign" and d.wave == 1]
        d2 = setup.get_device("d2")
        assert d2 is not None
        # every successful advance moved the state by one: the count of wave-2 records equals the steps taken
        assert len(steps) == sum(o is not None for o in outcomes) == row.state["n"]
        assert d2.desired_rev == 1 + row.state["n"]
        for s in (setup, *replicas):
            s.close()

    # trust log -------------------------------------------------------------------------------
    def test_the_trust_log_keeps_order_once_per_bytes_and_republishes_every_device(self, store: Store) -> None:
        store.add_device(device("d1"))
        store.add_device(device("d2"))
        assert "trust_log" in inspect(store.engine).get_table_names()
        assert store.pin_keys([("k1", "pub-1")]) == 1 and store.pin_keys([("k1", "pub-1")]) == 0
        seen: list[list[str]] = []

        def check(log: list[TrustRecord]) -> bool:
            seen.append([r.kind for r in log])
            return True

        assert store.add_trust_record("rotate", "k2", b'{"a": 1}', check=check, signer="k1", fan_out=True)
        assert seen == [["pin"]]  # the check sees the log as it is, in the same transaction
        assert {d.id: d.desired_rev for d in store.desired_unpublished()} == {"d1": 1, "d2": 1}
        assert not store.add_trust_record("rotate", "k2", b'{"a": 1}', check=check)  # the same bytes: once
        assert not store.add_trust_record("revoke", "k1", b'{"b": 2}', check=lambda _log: False)  # a no-op

        def refuse(_log: list[TrustRecord]) -> bool:
            raise BundleError("bad", reason="bad_signature")

        with pytest.raises(BundleError):
            store.add_trust_record("revoke", "k1", b'{"c": 3}', check=refuse, fan_out=True)
        assert {d.id: d.desired_rev for d in store.desired_unpublished()} == {"d1": 1, "d2": 1}  # nothing moved
        assert store.add_trust_record("rollback", "clf", b'{"o": 1}', check=check, release=1)
        log = store.trust_log()
        assert [(r.kind, r.subject, r.release) for r in log] == [("pin", "k1", None), ("rotate", "k2", None),
                                                                  ("rollback", "clf", 1)]
        assert base64.b64decode(log[1].body) == b'{"a": 1}' and log[1].signer == "k1"
        store.remove_trust_record(b'{"o": 1}')
        assert [r.kind for r in store.trust_log()] == ["pin", "rotate"]

    def test_replicas_adding_the_same_statement_at_once_store_it_once(self, url: str) -> None:
        replicas = [Store(url) for _ in range(3)]
        results: list[bool] = []
        threads = [threading.Thread(target=lambda s=s: results.append(  # type: ignore[misc]
            s.add_trust_record("revoke", "k9", b'{"same": true}', check=lambda _log: True))) for s in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == [False, False, True]
        assert [r.subject for r in replicas[0].trust_log()] == ["k9"]
        for s in replicas:
            s.close()

    # monitors, alerts and field data (schema 6) ---------------------------------------------------------------
    def test_monitor_states_change_once_alerts_open_and_clear_and_hard_examples_are_bounded_and_labelled(
            self, store: Store) -> None:
        from edgefleet.server.store.learn_tables import MonitorRow

        assert {"monitors", "alerts", "hard_examples"} <= set(inspect(store.engine).get_table_names())
        now = time.time()
        monitor = store.add_monitor(MonitorRow(id="m1", expr="silent_for > 60", model="clf", select={},
                                               webhook=None, pause_rollouts=False, window_s=60.0, state="unknown",
                                               changed=now, checked=None, explanation="", values={}, created=now))
        assert store.transition_monitor("m1", "unknown", "firing", "tripped", {"silent_for": 61.0}, now)
        assert not store.transition_monitor("m1", "unknown", "ok", "late replica", {}, now)  # moved first: once
        alert = store.raise_alert(monitor, "tripped", {"silent_for": 61.0}, now)
        assert [a.id for a in store.list_alerts(active=True)] == [alert.id]
        assert store.clear_alerts("m1", now + 1) == 1 and store.list_alerts(active=True) == []
        assert store.list_alerts()[0].cleared == now + 1
        store.delete_monitor("m1")
        with pytest.raises(StoreError, match="unknown monitor"):
            store.delete_monitor("m1")

        store.hard_examples_per_model = 3
        rows = [{"name": "clf", "model": "clf@1.0.0", "device": "d1", "ts": 100.0 + i, "predicted": "alpha",
                 "confidence": 0.4, "shape": [6, 20], "encoding": "i8", "data": "AA==", "scale": 1.0}
                for i in range(5)]
        assert store.add_hard_examples(rows) == 5
        kept = store.hard_examples("clf")
        assert [r.ts for r in kept] == [102.0, 103.0, 104.0]  # the oldest went first
        store.label_example(kept[0].id, "alpha")
        with pytest.raises(StoreError, match="unknown hard example"):
            store.label_example(10**9, "alpha")
        assert store.label_range("d1", 103.5, 200.0, "beta", name="clf") == 1
        assert sorted(store.field_labels("clf")) == [("clf@1.0.0", "alpha", "alpha"), ("clf@1.0.0", "alpha", "beta")]
        assert [r.ts for r in store.hard_examples("clf", labelled=False)] == [103.0]
        assert store.field_labels("clf", ["d2"]) == []
        assert store.device_field_labels(["d1", "d2"], 103.5) == [("d1", "clf@1.0.0", "alpha", "beta")]


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'store.db'}"


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def url(self, postgres_url: str) -> str:
        return postgres_url
