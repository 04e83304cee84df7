"""The Kafka part of ``make bench-fleet``: MQTT ingest -> store (PostgreSQL) -> Kafka, at rising rates, with zero
loss; and a minute with the broker unreachable under a steady load.

The anchor is measured in the same run: the same offered load into a server without ``--kafka`` (ingest into
the store only). Then a server with ``--kafka`` takes the same ladder on a fresh database: per step, stored/s,
exported/s (from the first publish to the last acknowledged export), loss (acknowledged by the MQTT broker but
not in Kafka, after deduplication by id), and the lag of each message from its scheduled MQTT publish to its
Kafka record timestamp (the producer's send time). Everything shares the 2 cores: Mosquitto, PostgreSQL, the
server, Tansu (in memory, behind the test relay that can take it down), the load generator and the consumer.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import mqtt_load
from edgefleet.bundle.signing import PUBLIC_KEY_FILE, write_keypair
from edgefleet.errors import EdgefleetError
from edgefleet.processes import ManagedProcess, ProcessGroup, wait_until
from edgefleet.server.schema import Device, TelemetryRow
from edgefleet.server.store import Store
from edgefleet.testing.kafka import KafkaBroker
from edgefleet.testing.mosquitto import Mosquitto
from edgefleet.testing.postgres import create_database, drop_database, start_postgres
from edgefleet.transport import topics
from edgefleet.transport.mqtt_url import MqttEndpoint

RATES = [int(r) for r in os.environ.get("EF_BENCH_KAFKA_RATES", "5000,10000,15000").split(",")]
STEP_S = float(os.environ.get("EF_BENCH_KAFKA_STEP_S", "6"))
OUTAGE_S = float(os.environ.get("EF_BENCH_KAFKA_OUTAGE_S", "60"))
OUTAGE_RATE = int(os.environ.get("EF_BENCH_KAFKA_OUTAGE_RATE", "1000"))
DEVICES = [f"kafka-{i:02d}" for i in range(int(os.environ.get("EF_BENCH_PUBLISHERS", "8")))]
TOKEN = "bench-kafka-operator-token"
Log = Callable[[str], None]


def _telemetry(device: str, seq: int) -> bytes:
    return json.dumps({"device": device, "seq": seq, "ts": time.time(), "model": "clf@1.0.0", "windows": 5,
                       "labelled": 5, "correct": 5, "latency_ms": {"150": 5}, "confidence": [0] * 19 + [5]}).encode()


class _Run:
    """One server on one fresh database, fed by the load generator."""

    def __init__(self, work: Path, name: str, mqtt: MqttEndpoint, kafka: str | None, log: Log) -> None:
        self.port = mqtt.port
        self.url = create_database(start_postgres())
        self.store = Store(self.url)
        with self.store.session() as s:
            s.add_all(Device(id=d, token_sha256=d.ljust(64, "0")[:64], mqtt_password_sha256="0" * 64, tags={},
                             created=time.time(), revoked=False) for d in DEVICES)
        data_dir = work / name
        args = ["server", "--data-dir", str(data_dir), "--port", "0", "--replica", name, "--mqtt-url", mqtt.url,
                "--db-url", self.url, "--trusted-key", str(work / "keys" / PUBLIC_KEY_FILE)]
        if kafka:
            args += ["--kafka", kafka]
        self.group = ProcessGroup()
        self.server = self.group.start(ManagedProcess.edgefleet(args, work / f"{name}.log",
                                                                env={"EDGEFLEET_OPERATOR_TOKEN": TOKEN}))
        wait_until(lambda: (data_dir / "server.json").exists() or not self.server.running, 120, f"server {name}")
        if not self.server.running:
            raise RuntimeError(f"server {name} exited: {self.server.log_tail(10)}")
        self.kafka = kafka is not None
        self.log = log

    def counts(self) -> tuple[int, int]:
        """Telemetry rows stored, messages Kafka acknowledged."""
        from sqlalchemy import func, select

        with self.store.session() as s:
            stored = int(s.scalar(select(func.count()).select_from(TelemetryRow)) or 0)
        return stored, self.store.export_backlog().exported if self.kafka else 0

    def step(self, rate: int, seconds: float, seq_base: int, *, during: Callable[[], None] | None = None,
             settle_s: float = 180.0) -> dict[str, Any]:
        """Offer ``rate`` msg/s for ``seconds``, wait (bounded) until stored (and exported); the step's figures."""
        per_device = int(rate * seconds) // len(DEVICES)
        stored0, exported0 = self.counts()
        offered: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: offered.update(sent=mqtt_load.offer(
            "127.0.0.1", self.port, DEVICES, topics.telemetry, lambda d, k: _telemetry(d, seq_base + k), rate,
            per_device, timeout_s=seconds + 240)))
        thread.start()
        if during is not None:
            during()
        thread.join(seconds + 300)
        sent = offered["sent"]
        last = (stored0, exported0)
        changed = {"stored": time.time(), "exported": time.time()}
        deadline = time.monotonic() + settle_s
        stable = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - stable < 5.0:
            now = self.counts()
            if now[0] != last[0]:
                changed["stored"], stable = time.time(), time.monotonic()
            if now[1] != last[1]:
                changed["exported"], stable = time.time(), time.monotonic()
            last = now
            if now[0] - stored0 >= sent.acked and (not self.kafka or now[1] - exported0 >= sent.acked):
                break
            time.sleep(0.05)
        stored, exported = last[0] - stored0, last[1] - exported0
        row = {"offered_per_s": rate, "sent": sent.sent, "acked": sent.acked, "stored": stored,
               "stored_per_s": stored / max(max(changed["stored"], sent.finished_at) - sent.started_at, 1e-9),
               "lost_to_store": sent.acked - stored, "started_at": sent.started_at, "seq_base": seq_base,
               "per_device": per_device, "per_device_s": rate / len(DEVICES)}
        if self.kafka:
            row.update(exported=exported, kafka_per_s=exported / max(
                max(changed["exported"], sent.finished_at) - sent.started_at, 1e-9))
        self.log(f"kafka part, {'--kafka' if self.kafka else 'anchor'} at {rate}/s: stored {stored}/{sent.acked} "
                 f"at {row['stored_per_s']:.0f}/s" + (f", exported {exported} at {row['kafka_per_s']:.0f}/s"
                                                      if self.kafka else ""))
        return row

    def close(self) -> None:
        self.group.stop_all()
        self.store.close()
        drop_database(self.url.rsplit("/", 1)[1])


def _kafka_messages(bootstrap: str) -> list[tuple[dict[str, Any], float]]:
    """Every telemetry message in Kafka with its record timestamp (s)."""
    import asyncio

    from aiokafka import AIOKafkaConsumer

    async def read() -> list[tuple[dict[str, Any], float]]:
        consumer = AIOKafkaConsumer("edgefleet.telemetry", bootstrap_servers=bootstrap, group_id=None,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        out: list[tuple[dict[str, Any], float]] = []
        idle = time.monotonic()
        try:
            while time.monotonic() - idle < 3.0:
                batch = await consumer.getmany(timeout_ms=500, max_records=20_000)
                for records in batch.values():
                    out += [(json.loads(r.value), r.timestamp / 1000) for r in records]
                    idle = time.monotonic()
        finally:
            await consumer.stop()
        return out

    return asyncio.run(read())


def _score(row: dict[str, Any], messages: list[tuple[dict[str, Any], float]]) -> None:
    """Loss after deduplication and lag percentiles of one step's messages."""
    base, n, per_s = row["seq_base"], row["per_device"], row["per_device_s"]
    lags: dict[str, float] = {}
    for message, stamp in messages:
        k = message["seq"] - base
        if 0 <= k < n and message["id"] not in lags:
            lags[message["id"]] = stamp - (row["started_at"] + k / per_s)
    ordered = sorted(lags.values())
    row["kafka_distinct"] = len(ordered)
    row["kafka_lost"] = row["acked"] - len(ordered)
    row["kafka_copies"] = sum(1 for m, _ in messages if 0 <= m["seq"] - base < n) - len(ordered)
    for p in (50, 99):
        row[f"kafka_lag_p{p}_s"] = ordered[min(len(ordered) - 1, len(ordered) * p // 100)] if ordered else None
    row["kafka_lag_max_s"] = ordered[-1] if ordered else None


def run(work: Path, log: Log) -> dict[str, Any]:
    """The Kafka figures for bench/results/fleet.json."""
    work.mkdir(parents=True, exist_ok=True)
    write_keypair(work / "keys", overwrite=True)
    mosquitto = Mosquitto(work / "mosquitto")
    endpoint = mosquitto.start()
    broker = KafkaBroker(work / "tansu").start()
    runs: list[_Run] = []
    try:
        anchor = _Run(work, "anchor", endpoint, None, log)
        runs.append(anchor)
        anchor_rows = [anchor.step(rate, STEP_S, 1_000_000 * (i + 1)) for i, rate in enumerate(RATES)]
        anchor.close()
        runs.remove(anchor)
        exporting = _Run(work, "exporter", endpoint, broker.bootstrap, log)
        runs.append(exporting)
        cpu0, t0 = broker.cpu_s, time.monotonic()
        rows = [exporting.step(rate, STEP_S, 1_000_000 * (i + 1)) for i, rate in enumerate(RATES)]
        broker_cpu = (broker.cpu_s - cpu0) / (time.monotonic() - t0)
        outage_figures: dict[str, Any] = {}

        def outage() -> None:
            time.sleep(5)
            broker.down()
            down_at, peak = time.monotonic(), 0.0
            while time.monotonic() - down_at < OUTAGE_S:
                peak = max(peak, exporting.store.export_backlog().lag_s(time.time()))
                time.sleep(1.0)
            broker.up()
            up_at = time.monotonic()
            outage_figures.update(kafka_outage_lag_peak_s=peak, kafka_outage_catch_up_s=None)
            try:  # the offered load still runs: caught up = nothing queued (bounded; None when not within it)
                wait_until(lambda: exporting.store.export_backlog().pending == 0, 300, "the export to catch up", 0.2)
                outage_figures["kafka_outage_catch_up_s"] = time.monotonic() - up_at
            except EdgefleetError:
                log("kafka part: the export did not catch up within 300 s of the broker's return")

        log(f"kafka part: {OUTAGE_RATE}/s with the broker unreachable for {OUTAGE_S:g} s")
        outage_row = exporting.step(OUTAGE_RATE, OUTAGE_S + 20, 90_000_000, during=outage, settle_s=300)
        messages = _kafka_messages(broker.bootstrap)
        for row in [*rows, outage_row]:
            _score(row, messages)
    finally:
        for each in runs:
            each.close()
        broker.stop()
        mosquitto.stop()
    clean = [r for r in rows if r["kafka_lost"] == 0 and r["lost_to_store"] == 0]
    best = max(clean, key=lambda r: r["kafka_per_s"]) if clean else None
    anchor_best = max((r["stored_per_s"] for r in anchor_rows if r["lost_to_store"] == 0), default=0.0)
    return {"kafka_msgs_per_s": best["kafka_per_s"] if best else 0.0,
            "kafka_lost": sum(r["kafka_lost"] for r in [*rows, outage_row]),
            "kafka_lag_p99_s": best["kafka_lag_p99_s"] if best else None,
            "kafka_at_offered_per_s": best["offered_per_s"] if best else None,
            "kafka_anchor_store_msgs_per_s": anchor_best,
            "kafka_ratio_to_store_anchor": (best["kafka_per_s"] / anchor_best) if best and anchor_best else None,
            "kafka_broker_cpu_cores": broker_cpu,
            "kafka_outage_s": OUTAGE_S, "kafka_outage_rate": OUTAGE_RATE, "kafka_outage_lost": outage_row["kafka_lost"],
            **outage_figures, "kafka_outage_step": _public(outage_row),
            "kafka_ladder": [_public(r) for r in rows], "kafka_anchor_ladder": [_public(r) for r in anchor_rows]}


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("started_at", "seq_base", "per_device", "per_device_s")}


def report_rows(result: dict[str, Any]) -> list[list[object]]:
    """Rows for the fleet table (none when the Kafka part did not run)."""
    if "kafka_msgs_per_s" not in result:
        return []
    at = result["kafka_at_offered_per_s"]
    return [
        ["ingest into the store, no export: the anchor of the Kafka rows (msg/s)",
         result["kafka_anchor_store_msgs_per_s"], "anchor"],
        [f"MQTT -> store -> Kafka, zero loss, best step (offered {at}/s) (msg/s)", result["kafka_msgs_per_s"],
         ">= 10,000"],
        ["ratio to the anchor", result["kafka_ratio_to_store_anchor"], "~1"],
        ["MQTT publish -> Kafka lag p99 at that step (s)", result["kafka_lag_p99_s"], ""],
        ["messages lost on the way to Kafka (every step and the outage)", result["kafka_lost"], "0"],
        [f"broker unreachable {result['kafka_outage_s']:g} s at {result['kafka_outage_rate']}/s: peak lag / "
         "catch-up after (s)",
         f"{result.get('kafka_outage_lag_peak_s') or 0:.1f} / "
         + (f"{catch_up:.1f}" if (catch_up := result.get("kafka_outage_catch_up_s")) is not None
            else "not within 300"), ""],
    ]


def report_text(result: dict[str, Any]) -> str:
    """The Kafka ladder under the fleet table."""
    if "kafka_ladder" not in result:
        return ""
    from bench.common import markdown_table

    anchor = {r["offered_per_s"]: r["stored_per_s"] for r in result["kafka_anchor_ladder"]}
    ladder = markdown_table(
        ["offered/s", "anchor stored/s", "stored/s", "exported/s", "lost", "copies", "lag p50 (s)", "lag p99 (s)"],
        [[r["offered_per_s"], anchor.get(r["offered_per_s"]), r["stored_per_s"], r["kafka_per_s"], r["kafka_lost"],
          r["kafka_copies"], r["kafka_lag_p50_s"], r["kafka_lag_p99_s"]]
         for r in [*result["kafka_ladder"], result["kafka_outage_step"]]])
    return (f"Kafka ladder ({STEP_S:g} s per step, {len(DEVICES)} devices; `edgefleet server --kafka` on PostgreSQL "
            "with Mosquitto and Tansu in memory behind the test relay, bench/kafka_load.py; the anchor is the same "
            "load into a server without `--kafka` in the same run; exported/s from the first publish to the last "
            "acknowledged export; lost: acknowledged by Mosquitto but not in Kafka after deduplication by id; "
            "lag: scheduled MQTT publish to the Kafka record's timestamp; the last row holds the broker outage "
            f"({result['kafka_outage_s']:g} s unreachable within it)):\n\n{ladder}{_dates(result)}")


def _dates(result: dict[str, Any]) -> str:
    parts = result.get("parts_measured")
    if not parts:
        return ""
    return "\n\nMeasured apart: " + "; ".join(
        f"{name} on {p['date']} (commit {p['commit']}, load average {p['load_avg']:.1f})"
        for name, p in parts.items()) + "."


def merge_record(kafka: dict[str, Any]) -> dict[str, Any]:
    """The fleet record (bench/results/fleet.json) with this run's Kafka figures in place of its own, for
    ``EF_BENCH_PARTS=kafka EF_BENCH_KAFKA_RECORD=1``: the other parts keep their figures, and the record says
    when each was measured (``parts_measured``)."""
    from bench.common import RESULTS, machine

    record = json.loads((RESULTS / "fleet.json").read_text())
    earlier = record.get("parts_measured") or {
        "rollout, fanout, ingest": {"date": record.get("date"), "commit": record.get("commit"),
                                    "load_avg": record.get("machine", {}).get("load_avg")}}
    earlier = {k: v for k, v in earlier.items() if k != "kafka"}
    kept = {k: v for k, v in record.items() if not k.startswith("kafka_")
            and k not in ("benchmark", "command", "machine", "date", "commit", "parts_measured")}
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    return {**kept, **kafka, "parts_measured": {**earlier, "kafka": {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
        "load_avg": machine()["load_avg"]}}}
