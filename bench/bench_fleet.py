"""Fleet benchmark: fan-out to 10,000 connections, a three-wave rollout to 1,000 real-agent twins, and telemetry
ingest at rising rates against Mosquitto's own C clients, with one and two server replicas.

Run as ``python -m bench.bench_fleet`` (``make bench-fleet``). Everything runs on this machine: Mosquitto on a
loopback port, PostgreSQL 15 (started if down, a throwaway database), ``edgefleet server`` processes, the light
devices in this process (:mod:`edgefleet.sim`) and the twins' host processes (:mod:`edgefleet.twin`). Every wait is
bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import kafka_load, mqtt_load
from bench.common import markdown_table, publish
from edgefleet.processes import wait_until
from edgefleet.server.schema import Device
from edgefleet.server.store import Store
from edgefleet.sim import SimDevice, SimFleet
from edgefleet.testing.fleet import LocalFleet
from edgefleet.testing.mosquitto import Mosquitto
from edgefleet.testing.postgres import create_database, drop_database, start_postgres
from edgefleet.transport import topics
from edgefleet.transport.mqtt_url import MqttEndpoint

LIGHT = int(os.environ.get("EF_BENCH_LIGHT", "10000"))
AGENTS = int(os.environ.get("EF_BENCH_AGENTS", "1000"))
RATES = [int(r) for r in os.environ.get("EF_BENCH_RATES", "5000,10000,15000,20000,25000").split(",")]
STEP_S = float(os.environ.get("EF_BENCH_STEP_S", "6"))
PUBLISHERS = int(os.environ.get("EF_BENCH_PUBLISHERS", "8"))
PARTS = os.environ.get("EF_BENCH_PARTS", "rollout,fanout,ingest,kafka").split(",")
C_MESSAGES = 100_000


def log(text: str) -> None:
    print(f"[bench_fleet {time.strftime('%H:%M:%S')}] {text}", flush=True)


def bulk_devices(url: str, ids: list[str], tags: dict[str, str]) -> None:
    """Insert many devices at once (light clients need no credentials on an anonymous broker)."""
    store = Store(url)
    with store.session() as s:
        s.add_all(Device(id=d, token_sha256=f"{d}".ljust(64, "0")[:64], mqtt_password_sha256="0" * 64,
                         tags=tags, created=time.time(), revoked=False) for d in ids)
    store.close()


_COUNTER: dict[str, Store] = {}


def telemetry_rows(url: str) -> int:
    from sqlalchemy import func, select

    from edgefleet.server.schema import TelemetryRow

    store = _COUNTER.setdefault(url, Store(url))
    with store.session() as s:
        return int(s.scalar(select(func.count()).select_from(TelemetryRow)) or 0)


# -- 1: fan-out ----------------------------------------------------------------------------------------------
def fanout(fleet: LocalFleet, url: str, endpoint: MqttEndpoint) -> dict[str, Any]:
    api = fleet.api
    assert api is not None
    ids = [f"light-{i:05d}" for i in range(LIGHT)]
    bulk_devices(url, ids, {"group": "light"})
    sim = SimFleet(endpoint, [SimDevice(d) for d in ids], connect_concurrency=500)
    sent_before = telemetry_rows(url)
    try:
        connect_s = sim.start(timeout_s=300)
        log(f"{sim.connected} light clients connected in {connect_s:.1f} s")
        sim.send_telemetry_all()  # every connection also sends telemetry; let the server take it in first
        stored, stable_since, deadline = -1, time.monotonic(), time.monotonic() + 120
        while time.monotonic() < deadline and time.monotonic() - stable_since < 5.0:
            now_stored = telemetry_rows(url) - sent_before
            if now_stored != stored:
                stored, stable_since = now_stored, time.monotonic()
            if stored >= sim.connected:
                break
            time.sleep(0.5)
        log(f"{stored} of {sim.connected} light clients' telemetry batches stored")
        started = time.monotonic()
        rollout = api.create_rollout("clf@1.0.0", waves=["100%"], select={"group": "light"}, window_s=0,
                                     install_timeout_s=3600)

        def arrived() -> bool:
            return sim.count(lambda d: "clf@1.0.0" in d.desired_at) >= sim.connected

        wait_until(arrived, 300, "the desired state on every light client", interval_s=0.05)
        last = max(d.desired_at["clf@1.0.0"] for d in sim.devices.values() if "clf@1.0.0" in d.desired_at)
        fanout_s = last - started
        log(f"desired state on {sim.connected} connections {fanout_s:.2f} s after the rollout step")
        api.rollout_command(rollout["id"], "abort", "benchmark done")
        return {"devices_connected": sim.connected, "connect_s": connect_s, "fanout_s": fanout_s,
                "light_telemetry_stored": stored}
    finally:
        sim.stop()


# -- 2: a three-wave rollout to real-agent twins --------------------------------------------------------------
def rollout(fleet: LocalFleet, endpoint: MqttEndpoint) -> dict[str, Any]:
    """``AGENTS`` twins (edgefleet.twin: the agent's own code on a 10 Hz synthetic sensor) on clf@1.0.0, then
    clf@2.0.0 in waves 10%, 50%, 100% gated on ``accuracy_drop > 5%`` over the twins' own telemetry (window 0:
    each wave is judged once the candidate's cohort has 50 windows)."""
    from edgefleet.twin.fleet import TwinFleet
    from edgefleet.twin.scenario import parse_scenario

    api = fleet.api
    assert api is not None
    plan = parse_scenario({"rate_hz": 10, "telemetry_interval_s": 2, "synthetic": {"rows_per_class": 2},
                           "groups": [{"name": "agents", "model": "clf@1.0.0", "noise": 0.05,
                                       "tags": {"group": "agents"}}]})
    twins = TwinFleet(api, fleet.root / "twins", plan)
    try:
        twins.provision(AGENTS)
        twins.start(timeout_s=600)
        running = twins.wait_running("clf@1.0.0", AGENTS, 600)
        log(f"{running}/{AGENTS} twins run clf@1.0.0")
        time.sleep(10)  # baseline telemetry
        started = time.monotonic()
        created = api.create_rollout("clf@2.0.0", waves=["10%", "50%", "100%"], select=twins.tag, window_s=0,
                                     gates=["accuracy_drop > 5%"], min_windows=50, install_timeout_s=600)
        wait_until(lambda: api.rollout(created["id"])["phase"] in ("done", "aborted", "paused"), 900,
                   "the rollout to finish", interval_s=0.1)
        rollout_s = time.monotonic() - started
        status = api.rollout(created["id"])
        installed = twins.running("clf@2.0.0")
        log(f"three-wave rollout to {installed}/{AGENTS} twins: {status['phase']} in {rollout_s:.1f} s")
        return {"rollout_devices": installed, "rollout_s": rollout_s, "rollout_phase": status["phase"],
                "rollout_errors": AGENTS - installed}
    finally:
        twins.close()


# -- 3: ingest -----------------------------------------------------------------------------------------------
def _drain(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait (bounded) for a client process; kill it past the deadline. True when it exited cleanly."""
    try:
        return proc.wait(timeout_s) == 0
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        return False


def mosquitto_c(endpoint: MqttEndpoint, publishers: int) -> float:
    """Messages per second from ``publishers`` concurrent ``mosquitto_pub --repeat`` processes (QoS 1, 200-byte
    payloads, each on its own topic) into one ``mosquitto_sub``: the ceiling of Mosquitto's own C clients."""
    base = ["-h", endpoint.host, "-p", str(endpoint.port), "-q", "1"]
    sub = subprocess.Popen(["mosquitto_sub", *base, "-t", "bench/c/#", "-C", str(C_MESSAGES)],
                           stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    started = time.monotonic()
    shares = [C_MESSAGES // publishers + (1 if i < C_MESSAGES % publishers else 0) for i in range(publishers)]
    pubs = [subprocess.Popen(["mosquitto_pub", *base, "-t", f"bench/c/{i}", "--repeat", str(share), "-m", "x" * 200],
                             stdout=subprocess.DEVNULL) for i, share in enumerate(shares)]
    ok = all(_drain(pub, 300) for pub in pubs)
    if not _drain(sub, 300) or not ok:
        raise RuntimeError(f"the C clients ({publishers} publishers) did not move {C_MESSAGES} messages")
    return C_MESSAGES / (time.monotonic() - started)


def _telemetry(device: str, seq: int) -> bytes:
    return json.dumps({"device": device, "seq": seq, "ts": time.time(), "model": "clf@1.0.0", "windows": 5,
                       "labelled": 5, "correct": 5, "latency_ms": {"150": 5}, "confidence": [0] * 19 + [5]}).encode()


def ingest_ladder(url: str, endpoint: MqttEndpoint, devices: list[str], seq_base: int) -> list[dict[str, Any]]:
    rows = []
    for rate in RATES:
        total = int(rate * STEP_S)
        before = telemetry_rows(url)
        per_device = total // len(devices)
        sent = mqtt_load.offer(endpoint.host, endpoint.port, devices, topics.telemetry,
                               lambda d, k, base=seq_base: _telemetry(d, base + k), rate, per_device)
        seq_base += per_device + 2
        count, stable_since, last_change = before, time.monotonic(), time.time()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and time.monotonic() - stable_since < 3.0:
            now_count = telemetry_rows(url)
            if now_count != count:
                count, stable_since, last_change = now_count, time.monotonic(), time.time()
            if count - before >= sent.acked:
                break
            time.sleep(0.05)
        stored = count - before
        elapsed = max(last_change, sent.finished_at) - sent.started_at
        row = {"offered_per_s": rate, "sent": sent.sent, "acked": sent.acked, "publish_s": sent.seconds,
               "stored": stored, "lost": sent.acked - stored, "stored_per_s": stored / max(elapsed, 1e-9)}
        log(f"ingest at {rate}/s: stored {stored}/{sent.acked} at {row['stored_per_s']:.0f}/s")
        rows.append(row)
    return rows


def best(rows: list[dict[str, Any]]) -> tuple[float, int]:
    """The highest stored rate among the steps with zero loss, and the total loss over the ladder."""
    clean = [r["stored_per_s"] for r in rows if r["lost"] == 0]
    return (max(clean) if clean else 0.0), sum(r["lost"] for r in rows)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ef-bench-fleet-"))
    cluster = start_postgres()
    url = create_database(cluster)
    broker = Mosquitto(work / "mosquitto")
    endpoint = broker.start()
    fleet = LocalFleet(work / "fleet")
    result: dict[str, Any] = {}
    try:
        api = fleet.start_replica("a", db_url=url, mqtt_url=endpoint.url, tick_s=0.2)
        api.push_model(fleet.bundle("1.0.0", 1))
        api.push_model(fleet.bundle("2.0.0", 2))
        if "rollout" in PARTS:
            result.update(rollout(fleet, endpoint))
        if "fanout" in PARTS:
            result.update(fanout(fleet, url, endpoint))
        if "ingest" in PARTS:
            result.update(ingest(fleet, url, endpoint))
        fleet.close()  # the Kafka part runs its own broker, database and servers (bench/kafka_load.py)
        if "kafka" in PARTS:
            result.update(kafka_load.run(work / "kafka", log))
    finally:
        fleet.close()
        broker.stop()
        drop_database(url.rsplit("/", 1)[1])
    if PARTS == ["kafka"] and os.environ.get("EF_BENCH_KAFKA_RECORD") == "1":
        result = kafka_load.merge_record(result)  # the Kafka rows alone into the record, dated apart
    elif set(PARTS) != {"rollout", "fanout", "ingest", "kafka"}:
        print(json.dumps(result, indent=1))  # a partial run is for looking at, not for the record
        return
    report(result)


def ingest(fleet: LocalFleet, url: str, endpoint: MqttEndpoint) -> dict[str, Any]:
    c_rate = mosquitto_c(endpoint, 1)
    c_many = mosquitto_c(endpoint, PUBLISHERS)
    log(f"mosquitto C clients: {c_rate:.0f} msg/s from one publisher, {c_many:.0f} from {PUBLISHERS}")
    devices = [f"ingest-{i:02d}" for i in range(PUBLISHERS)]
    bulk_devices(url, devices, {"group": "ingest"})
    one = ingest_ladder(url, endpoint, devices, 1_000_000)
    fleet.start_replica("b", db_url=url, mqtt_url=endpoint.url, tick_s=0.2)
    two = ingest_ladder(url, endpoint, devices, 5_000_000)
    rate1, lost1 = best(one)
    rate2, lost2 = best(two)
    return {"ingest_msgs_per_s": rate1, "mosquitto_c_msgs_per_s": c_rate, "ingest_ratio": rate1 / c_rate,
            "mosquitto_c_many_publishers_msgs_per_s": c_many, "lost": lost1,
            "ingest_msgs_per_s_2_replicas": rate2, "ingest_ratio_2_replicas": rate2 / c_rate,
            "lost_2_replicas": lost2, "ingest_ladder_1_replica": one, "ingest_ladder_2_replicas": two,
            "publishers": PUBLISHERS, "light_devices": LIGHT, "agents": AGENTS, "step_s": STEP_S}


def report(result: dict[str, Any]) -> None:
    one, two = result["ingest_ladder_1_replica"], result["ingest_ladder_2_replicas"]
    table = markdown_table(["measure", "value", "target"], [
        ["light connections held", result["devices_connected"], 10_000],
        ["desired state on all of them after a rollout step (s)", result["fanout_s"], "<= 5"],
        ["three-wave rollout, real-agent twins (edgefleet.twin)", result["rollout_devices"], 1_000],
        ["create -> 100%, gated on the twins' telemetry (s)", result["rollout_s"], "<= 60"],
        ["mosquitto_pub -> mosquitto_sub, QoS 1, 1 publisher (msg/s)", result["mosquitto_c_msgs_per_s"],
         "ceiling"],
        [f"the same, {PUBLISHERS} publishers (msg/s)", result["mosquitto_c_many_publishers_msgs_per_s"], ""],
        ["ingest into PostgreSQL, zero loss, 1 replica (msg/s)", result["ingest_msgs_per_s"], ">= 10,000"],
        ["ratio to the C clients, 1 replica", result["ingest_ratio"], "~0.45"],
        ["ingest, 2 replicas on a shared subscription (msg/s)", result["ingest_msgs_per_s_2_replicas"],
         ">= 10,000"],
        ["ratio to the C clients, 2 replicas", result["ingest_ratio_2_replicas"], "~0.45"],
        ["messages lost (1 replica / 2 replicas)", f"{result['lost']} / {result['lost_2_replicas']}", "0"],
        *kafka_load.report_rows(result),
    ])
    ladder = markdown_table(["replicas", "offered/s", "stored/s", "lost"],
                            [[1, r["offered_per_s"], r["stored_per_s"], r["lost"]] for r in one]
                            + [[2, r["offered_per_s"], r["stored_per_s"], r["lost"]] for r in two])
    publish("fleet", result, f"{table}\n\nIngest ladder ({STEP_S:g} s per step; QoS 1 telemetry batches of about "
            f"200 bytes from {PUBLISHERS} devices, one MQTT connection each, at most 1,000 unacknowledged per "
            "connection (bench/mqtt_load.py); stored/s from the first publish to the last row committed; lost: "
            f"acknowledged by the broker but not in the store; the ingest figure above is the best zero-loss "
            f"step):\n\n{ladder}\n\n{kafka_load.report_text(result)}\n\n"
            "All on one 2-core machine: broker, database, server(s), load generator and "
            "simulated devices share the cores.")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_a: sys.exit(143))  # so that the finally blocks stop the services
    main()
