"""The Kafka export against a real Kafka-compatible broker (Tansu): at least once through a kill -9 of the server
and a broker outage, once in a deduplicating consumer's view, one replica at a time, older schema versions
exported with their version, an unreachable cluster neither fatal nor lossy. The README's Kafka commands are the
ones the kill test runs."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from edgefleet.bundle.signing import PUBLIC_KEY_FILE, write_keypair
from edgefleet.errors import TransportError
from edgefleet.processes import ManagedProcess, ProcessGroup, wait_until
from edgefleet.server.export.consumer import TailOptions, dedupe_view, tail
from edgefleet.server.export.exporter import KafkaExporter
from edgefleet.server.export.settings import KafkaSettings
from edgefleet.server.store import Store, sqlite_url
from edgefleet.testing.kafka import KafkaBroker
from edgefleet.transport.messages import Event, TelemetryBatch
from edgefleet.transport.ports import free_port

pytestmark = pytest.mark.integration
TOKEN = "kafka-export-test-operator-token"
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands(bootstrap: str, root: Path) -> list[list[str]]:
    """The README's Kafka block, each command as argv: its broker, data directory and key under this test's."""
    block = README.read_text().split("<!-- kafka -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        if line.strip():
            line = line.replace("127.0.0.1:9092", bootstrap).replace("--data-dir srv", f"--data-dir {root / 'srv'}")
            line = line.replace("keys/signing.pub", str(root / "keys" / PUBLIC_KEY_FILE))
            line = line.replace("--out telemetry.jsonl", f"--out {root / 'telemetry.jsonl'}")
            commands.append(shlex.split(line.rstrip(" &")))
    return commands


class Server:
    """``edgefleet server`` (a README command line) as a child process, on a free port."""

    def __init__(self, argv: list[str], data_dir: Path, group: ProcessGroup) -> None:
        assert argv[:2] == ["edgefleet", "server"]
        self.args, self.data_dir, self.group = [*argv[1:], "--port", "0"], data_dir, group
        self.process: ManagedProcess | None = None
        self.url = ""

    def start(self, timeout_s: float = 60.0) -> Server:
        info = self.data_dir / "server.json"
        info.unlink(missing_ok=True)
        process = self.process = self.group.start(ManagedProcess.edgefleet(
            self.args, self.data_dir.parent / "server.log", env={"EDGEFLEET_OPERATOR_TOKEN": TOKEN}))

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
def group(tmp_path: Path) -> Iterator[ProcessGroup]:
    write_keypair(tmp_path / "keys", overwrite=True)
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


def read_back(bootstrap: str) -> list[dict[str, Any]]:
    """Every telemetry message in Kafka, duplicates included."""
    messages: list[dict[str, Any]] = []
    tail(KafkaSettings(bootstrap), TailOptions(streams=("telemetry",), idle_exit_s=1.0), messages.append)
    return messages


def assert_view_equals_store(messages: list[dict[str, Any]], rows: dict[str, dict[str, Any]]) -> None:
    view = dedupe_view(messages)
    assert {ident for _, ident in view} == set(rows), "the deduplicated view holds exactly the stored batches"
    for (_, ident), message in view.items():
        assert message["version"] == 1 and message["conforms"] is True
        assert TelemetryBatch.model_validate(message["data"]).model_dump(mode="json") == rows[ident]


def assert_each_device_in_order(messages: list[dict[str, Any]]) -> None:
    """A device's batches arrive in the order it sent them (its key keeps them in one partition): the first copy
    of each, in the order the consumer read them, has rising sequence numbers."""
    firsts: dict[str, list[int]] = {}
    seen: set[str] = set()
    for message in messages:
        if message["id"] not in seen:
            seen.add(message["id"])
            firsts.setdefault(message["key"], []).append(message["seq"])
    assert firsts and all(seqs == sorted(seqs) for seqs in firsts.values()), firsts


def wait_drained(store: Store, timeout_s: float = 60.0) -> None:
    wait_until(lambda: store.export_backlog().pending == 0, timeout_s, "the outbox to drain")


def test_kill_9_mid_export_then_restart_every_stored_batch_is_in_kafka(
        tmp_path: Path, group: ProcessGroup, kafka_broker: KafkaBroker) -> None:
    """A server killed with SIGKILL while rows are in flight loses none: after its restart every stored batch is
    in Kafka at least once, and the README's ``export tail --dedupe`` writes exactly the store's batches."""
    server_argv, tail_argv = readme_commands(kafka_broker.bootstrap, tmp_path)
    server = Server(server_argv, tmp_path / "srv", group).start()
    store = Store(sqlite_url(server.data_dir))
    try:
        store.add_telemetry_many(batches(100, 60))  # 6,000 batches of 100 devices in one transaction: 3 rounds
        wait_until(lambda: store.export_backlog().exported > 0, 30, "the export to start", interval_s=0.02)
        assert server.process is not None
        server.process.kill()  # SIGKILL: no lease release; rows sent but not yet marked stay queued
        assert store.export_backlog().pending > 0, "killed mid-export (rows were still queued)"
        store.add_telemetry_many(batches(100, 3, first_seq=60))  # stored while no exporter runs: queued
        server.start()
        wait_drained(store)
        rows = stored(store, 100)
        assert len(rows) == 6_300
        done = subprocess.run([sys.executable, "-m", "edgefleet", *tail_argv[1:]], capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        written = [json.loads(line) for line in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
        assert len(written) == len(rows), "--dedupe wrote each batch once"
        emitted, duplicates = (int(n) for n in re.findall(r"\d+", done.stderr)[:2])
        assert emitted + duplicates >= len(rows), "at least once"
        assert_view_equals_store(written, rows)
        metrics = server.get("/metrics").text
        assert "edgefleet_export_lag_seconds 0.0" in metrics and 'edgefleet_export_messages_total{outcome=' in metrics
    finally:
        store.close()


def test_broker_outage_export_lags_then_catches_up_with_nothing_lost(
        tmp_path: Path, kafka_broker: KafkaBroker, outage_s: float = 6.0) -> None:
    """While the broker is unreachable the export lags and rows stay queued; once it is back the export catches up
    and every batch is there once in the deduplicated view. (The benchmark holds the outage for a minute.)"""
    store = Store(sqlite_url(tmp_path))
    exporter = KafkaExporter(store, KafkaSettings(kafka_broker.bootstrap, timeout_s=3.0), "solo")
    exporter.start()
    try:
        store.add_telemetry_many(batches(20, 10))
        wait_drained(store)
        kafka_broker.down()
        started = time.monotonic()
        store.add_telemetry_many(batches(20, 10, first_seq=10))
        time.sleep(1.0)
        store.add_telemetry_many(batches(20, 10, first_seq=20))
        time.sleep(max(0.0, outage_s - (time.monotonic() - started)))
        status = exporter.status()
        assert status["pending"] == 400 and status["lag_s"] >= outage_s - 1.5
        assert status["broker_up"] is False and status["last_error"], "the outage shows"
        assert exporter.figures()["lag_seconds"] >= outage_s - 1.5
        kafka_broker.up()
        wait_drained(store, timeout_s=30)
        wait_until(lambda: exporter.status()["broker_up"], 10, "the acknowledgement to be noted")
        after = exporter.status()
        assert after["broker_up"] is True and after["lag_s"] == 0 and after["last_error"] is None
        rows = stored(store, 20)
        messages = read_back(kafka_broker.bootstrap)
        assert_view_equals_store(messages, rows)
        assert_each_device_in_order(messages)
    finally:
        exporter.stop()
        store.close()


def test_two_replicas_share_the_export_without_doubling(kafka_broker: KafkaBroker, postgres_url: str) -> None:
    """Two replicas' exporters on one PostgreSQL database, each with its own connections: one holds the lease
    and exports, the other stands by; each batch goes out once (the shared counter equals the rows), and the
    standby takes over when the holder stops."""
    stores = [Store(postgres_url), Store(postgres_url)]
    exporters = [KafkaExporter(s, KafkaSettings(kafka_broker.bootstrap), f"replica-{n}") for n, s in
                 enumerate(stores)]
    for exporter in exporters:
        exporter.start()
    try:
        stores[0].add_telemetry_many(batches(50, 20))
        wait_drained(stores[0])
        holders = [e for e in exporters if e.holding]
        assert len(holders) == 1, "exactly one replica exports"
        holder = holders[0]
        standby = exporters[1 - exporters.index(holder)]
        assert holder.counts["exported"] == 1000 and standby.counts["exported"] == 0
        assert stores[1].export_backlog().exported == 1000, "nothing exported twice"
        holder.stop()  # a clean stop gives the lease back
        stores[1].add_telemetry_many(batches(50, 4, first_seq=20))
        wait_drained(stores[1])
        assert standby.holding and standby.counts["exported"] == 200
        rows = stored(stores[0], 50)
        messages = read_back(kafka_broker.bootstrap)
        assert len(messages) == len(rows) == 1200, "each batch exported once"
        assert_view_equals_store(messages, rows)
    finally:
        for exporter in exporters:
            exporter.stop()
        for store in stores:
            store.close()


def test_older_schema_and_malformed_rows_are_exported_with_their_version(
        tmp_path: Path, kafka_broker: KafkaBroker) -> None:
    """A row queued under an older schema version, or not JSON at all, goes out as stored, with its version
    and ``conforms`` false; never dropped. Events take the same path on their own topic."""
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


def test_unreachable_cluster_server_keeps_serving_and_queuing_and_tail_fails_in_one_line(
        tmp_path: Path, group: ProcessGroup) -> None:
    """Decided: a server whose cluster does not answer still serves the fleet; its export retries with backoff,
    says why (status, ``/metrics``) and loses nothing (rows stay queued). ``export tail`` against it fails with
    one TransportError line (exit 6); a malformed bootstrap is refused at start (ConfigError, exit 2)."""
    from edgefleet.cli import app

    dead = f"127.0.0.1:{free_port()}"
    server_argv = readme_commands(dead, tmp_path)[0]
    server = Server(server_argv, tmp_path / "srv", group).start()
    store = Store(sqlite_url(server.data_dir))
    try:
        store.add_telemetry_many(batches(5, 4))
        wait_until(lambda: server.status()["last_error"] is not None, 30, "the export to report the failure")
        status = server.status()
        assert status["broker_up"] is False and status["pending"] == 20 and status["exported_total"] == 0
        assert "cannot" in status["last_error"] or "Unable" in status["last_error"]
        metrics = server.get("/metrics").text
        assert "edgefleet_export_pending 20.0" in metrics and "edgefleet_export_broker_up 0.0" in metrics
        assert server.get("/api/v1/health").status_code == 200
    finally:
        store.close()
    runner = CliRunner()
    result = runner.invoke(app, ["export", "tail", "--kafka", dead, "--idle-exit", "1"])
    assert isinstance(result.exception, TransportError) and result.exception.exit_code == 6
    assert "cannot reach Kafka" in str(result.exception) and "\n" not in str(result.exception)
    result = runner.invoke(app, ["server", "--data-dir", str(tmp_path / "x"), "--kafka", "no-port-here"])
    assert result.exception is not None and result.exception.exit_code == 2  # type: ignore[attr-defined]
    assert "is not HOST:PORT" in str(result.exception)
