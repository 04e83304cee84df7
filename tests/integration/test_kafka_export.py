"""The Kafka export against a real Kafka-compatible broker (Tansu) and real server processes: at least once
through a kill -9 and a broker outage, once in a deduplicating consumer's view, one replica at a time, older
schema versions exported with their version, an unreachable cluster neither fatal nor lossy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefleet.bundle.signing import PUBLIC_KEY_FILE, write_keypair
from edgefleet.processes import ManagedProcess, ProcessGroup, wait_until
from edgefleet.server.export.consumer import TailOptions, dedupe_view, tail
from edgefleet.server.export.settings import KafkaSettings
from edgefleet.server.store import Store, sqlite_url
from edgefleet.testing.kafka import KafkaBroker
from edgefleet.transport.messages import TelemetryBatch

pytestmark = pytest.mark.integration
TOKEN = "kafka-export-test-operator-token"


class Server:
    """``edgefleet server --kafka`` as a child process."""

    def __init__(self, root: Path, group: ProcessGroup, name: str, args: list[str]) -> None:
        self.data_dir = root / name
        keys = root / "keys"
        if not (keys / PUBLIC_KEY_FILE).exists():
            write_keypair(keys, overwrite=True)
        self.args = ["server", "--data-dir", str(self.data_dir), "--port", "0", "--replica", name,
                     "--trusted-key", str(keys / PUBLIC_KEY_FILE), *args]
        self.log = root / "logs" / f"{name}.log"
        self.group = group
        self.process: ManagedProcess | None = None
        self.url = ""

    def start(self, timeout_s: float = 60.0) -> Server:
        info = self.data_dir / "server.json"
        info.unlink(missing_ok=True)
        self.process = self.group.start(ManagedProcess.edgefleet(self.args, self.log,
                                                                 env={"EDGEFLEET_OPERATOR_TOKEN": TOKEN}))
        process = self.process

        def ready() -> bool:
            assert process.running, process.log_tail(10)
            return info.exists()

        wait_until(ready, timeout_s, "the server to start")
        self.url = json.loads(info.read_text())["api_url"]
        return self

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)

    def status(self) -> dict[str, Any]:
        response = self.get("/api/v1/export/status")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found


@pytest.fixture
def group() -> Iterator[ProcessGroup]:
    with ProcessGroup() as processes:
        yield processes


def batches(devices: int, per_device: int, first_seq: int = 0) -> list[TelemetryBatch]:
    return [TelemetryBatch(device=f"dev-{d:03d}", seq=first_seq + s, ts=time.time(), model="clf@1.0.0",
                           windows=10, classes={"a": 4, "b": 6})
            for s in range(per_device) for d in range(devices)]


def stored(store: Store, devices: int) -> dict[str, dict[str, Any]]:
    """The store's telemetry keyed as the export identifies it (``device/seq``)."""
    return {f"{b.device}/{b.seq}": b.model_dump(mode="json") for d in range(devices)
            for b in store.telemetry(f"dev-{d:03d}")}


def read_back(bootstrap: str, expected: int, idle_s: float = 1.0) -> list[dict[str, Any]]:
    """Every telemetry message in Kafka (duplicates included), read until ``expected`` distinct ids came."""
    messages: list[dict[str, Any]] = []
    seen: set[str] = set()
    deadline = time.monotonic() + 60

    def emit(message: dict[str, Any]) -> None:
        messages.append(message)
        seen.add(str(message["id"]))

    options = TailOptions(streams=("telemetry",), idle_exit_s=idle_s)
    while len(seen) < expected and time.monotonic() < deadline:
        messages.clear()
        seen.clear()
        tail(KafkaSettings(bootstrap), options, emit)
    return messages


def assert_view_equals_store(messages: list[dict[str, Any]], rows: dict[str, dict[str, Any]]) -> None:
    view = dedupe_view(messages)
    assert {ident for _, ident in view} == set(rows), "the deduplicated view holds exactly the stored batches"
    for (_, ident), message in view.items():
        assert message["version"] == 1 and message["conforms"] is True
        assert TelemetryBatch.model_validate(message["data"]).model_dump(mode="json") == rows[ident]


def wait_drained(store: Store, timeout_s: float = 60.0) -> None:
    wait_until(lambda: store.export_backlog().pending == 0, timeout_s, "the outbox to drain")


def test_kill_9_mid_export_then_restart_every_stored_batch_is_in_kafka(
        tmp_path: Path, group: ProcessGroup, kafka_broker: KafkaBroker) -> None:
    """A server killed with SIGKILL while rows are in flight loses none: after its restart every stored batch is
    in Kafka at least once and the deduplicated view equals the store."""
    server = Server(tmp_path, group, "exporter", ["--kafka", kafka_broker.bootstrap]).start()
    store = Store(sqlite_url(server.data_dir))
    try:
        for chunk in range(6):  # written while the export runs, 6,000 batches of 100 devices
            store.add_telemetry_many(batches(100, 10, first_seq=chunk * 10))
        wait_until(lambda: store.export_backlog().exported > 0, 30, "the export to start")
        before = store.export_backlog()
        assert server.process is not None
        server.process.kill()  # SIGKILL: no lease release, rows sent but not yet marked stay queued
        assert before.pending > 0, "killed mid-export (rows were still queued)"
        store.add_telemetry_many(batches(100, 3, first_seq=60))  # stored while no exporter runs: queued
        server.start()
        wait_drained(store)
        rows = stored(store, 100)
        assert len(rows) == 6_300
        messages = read_back(kafka_broker.bootstrap, len(rows))
        assert len(messages) >= len(rows)
        assert_view_equals_store(messages, rows)
    finally:
        store.close()


def test_broker_outage_export_lags_then_catches_up_with_nothing_lost(
        tmp_path: Path, group: ProcessGroup, kafka_broker: KafkaBroker, outage_s: float = 8.0) -> None:
    """While the broker is unreachable the export lags (``/metrics`` and the status endpoint say so) and rows
    stay queued; once it is back the export catches up and every batch is there. (The benchmark holds the
    outage for a minute.)"""
    server = Server(tmp_path, group, "exporter", ["--kafka", kafka_broker.bootstrap, "--kafka-timeout", "3"]).start()
    store = Store(sqlite_url(server.data_dir))
    try:
        store.add_telemetry_many(batches(20, 10))
        wait_drained(store)
        kafka_broker.down()
        started = time.monotonic()
        store.add_telemetry_many(batches(20, 10, first_seq=10))
        time.sleep(1.0)
        store.add_telemetry_many(batches(20, 10, first_seq=20))
        time.sleep(max(0.0, outage_s - (time.monotonic() - started)))
        status = server.status()
        assert status["pending"] == 400 and status["lag_s"] >= outage_s - 1.5
        assert status["broker_up"] is False or status["waiting_s"] >= outage_s - 2.5, "the stall shows"
        metrics = server.get("/metrics").text
        lag = next(float(line.split()[1]) for line in metrics.splitlines()
                   if line.startswith("edgefleet_export_lag_seconds "))
        assert lag >= outage_s - 1.5
        kafka_broker.up()
        wait_drained(store, timeout_s=30)
        after = server.status()
        assert after["broker_up"] is True and after["lag_s"] == 0 and after["last_error"] is None
        rows = stored(store, 20)
        assert_view_equals_store(read_back(kafka_broker.bootstrap, len(rows)), rows)
    finally:
        store.close()


def test_two_replicas_share_the_export_without_doubling(
        tmp_path: Path, group: ProcessGroup, kafka_broker: KafkaBroker, postgres_url: str) -> None:
    """Two replicas on one PostgreSQL database: one holds the lease and exports, the other stands by; each batch
    is exported once (the shared counter equals the rows), and the standby takes over when the holder stops."""
    args = ["--kafka", kafka_broker.bootstrap, "--db-url", postgres_url]
    first = Server(tmp_path, group, "replica-a", args).start()
    second = Server(tmp_path, group, "replica-b", args).start()
    store = Store(postgres_url)
    try:
        store.add_telemetry_many(batches(50, 20))
        wait_drained(store)
        held = [s for s in (first, second) if s.status()["lease_held"]]
        assert len(held) == 1, "exactly one replica exports"
        assert held[0].status()["replica_counts"]["exported"] == 1000
        assert store.export_backlog().exported == 1000, "nothing exported twice"
        assert held[0].process is not None
        held[0].process.stop()  # a clean stop gives the lease back
        standby = second if held[0] is first else first
        store.add_telemetry_many(batches(50, 4, first_seq=20))
        wait_drained(store)
        assert standby.status()["lease_held"] is True
        rows = stored(store, 50)
        messages = read_back(kafka_broker.bootstrap, len(rows))
        assert len(messages) == len(rows) == 1200, "each batch exported once"
        assert_view_equals_store(messages, rows)
    finally:
        store.close()


def test_older_schema_and_malformed_rows_are_exported_with_their_version(
        tmp_path: Path, kafka_broker: KafkaBroker) -> None:
    """A row queued under an older schema version, or not JSON at all, goes out as stored, with its version
    and ``conforms`` false; never dropped. Events and alerts take the same path on their own topics."""
    from edgefleet.server.export.exporter import KafkaExporter
    from edgefleet.transport.messages import Event

    store = Store(sqlite_url(tmp_path))
    exporter = KafkaExporter(store, KafkaSettings(kafka_broker.bootstrap), "solo")
    exporter.start()
    try:
        store.queue_export("telemetry", "old-device", 7, "old-device/7", 0, '{"device": "old-device", "n": 7}')
        store.queue_export("telemetry", "bad-device", 1, "bad-device/1", 1, "not json {")
        store.add_telemetry(batches(1, 1)[0])
        store.add_event(Event(device="dev-000", seq=3, kind="update", name="installed", detail={"model": "m@1"}))
        wait_drained(store)
        assert exporter.counts["nonconforming"] == 2
        found: list[dict[str, Any]] = []
        tail(KafkaSettings(kafka_broker.bootstrap), TailOptions(streams=("telemetry", "events"), idle_exit_s=2.0,
                                                                 max_messages=4), found.append)
        by_id = {m["id"]: m for m in found}
        assert by_id["old-device/7"]["version"] == 0 and by_id["old-device/7"]["conforms"] is False
        assert by_id["old-device/7"]["data"] == {"device": "old-device", "n": 7}
        assert by_id["bad-device/1"]["data"] is None and by_id["bad-device/1"]["raw"] == "not json {"
        assert by_id["dev-000/0"]["conforms"] is True
        event = next(m for m in found if m["schema"] == "edgefleet.events")
        assert event["data"]["detail"] == {"model": "m@1"} and event["key"] == "dev-000" and event["seq"] == 3
    finally:
        exporter.stop()
        store.close()


def test_unreachable_cluster_server_keeps_running_and_queuing_tail_fails_in_one_line(
        tmp_path: Path, group: ProcessGroup) -> None:
    """Decided: a server whose cluster does not answer still serves the fleet; its export retries with backoff,
    says why in the status, and loses nothing (rows stay queued). ``export tail`` against it exits non-zero
    with one line; a malformed bootstrap is refused at start in one line."""
    from edgefleet.transport.ports import free_port

    dead = f"127.0.0.1:{free_port()}"
    server = Server(tmp_path, group, "exporter", ["--kafka", dead]).start()
    store = Store(sqlite_url(server.data_dir))
    try:
        store.add_telemetry_many(batches(5, 4))
        wait_until(lambda: server.status()["last_error"] is not None, 30, "the export to report the failure")
        status = server.status()
        assert status["broker_up"] is False and status["pending"] == 20 and status["exported_total"] == 0
        assert server.get("/api/v1/health").status_code == 200
    finally:
        store.close()
    done = subprocess.run([sys.executable, "-m", "edgefleet", "export", "tail", "--kafka", dead, "--idle-exit", "1"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 6, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "cannot reach Kafka" in done.stderr
    refused = subprocess.run([sys.executable, "-m", "edgefleet", "server", "--data-dir", str(tmp_path / "x"),
                              "--kafka", "no-port-here"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "COLUMNS": "200"})
    assert refused.returncode == 2 and "is not HOST:PORT" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0
