"""Fleet benchmark: fan-out to 10,000 connections, a three-wave rollout to 1,000 simulated agents, and telemetry
ingest at rising rates against Mosquitto's own C clients, with one and two server replicas.

Run as ``python -m bench.bench_fleet`` (``make bench-fleet``). Everything runs on this machine: Mosquitto on a
loopback port, PostgreSQL 15 (started if down, a throwaway database), ``edgefleet server`` processes, and the
simulated devices in this process (:mod:`edgefleet.sim`). Every wait is bounded.
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

from bench.common import markdown_table, publish
from edgefleet.bundle.signing import PublicKey
from edgefleet.processes import wait_until
from edgefleet.server.schema import Device
from edgefleet.server.store import Store
from edgefleet.sim import SimDevice, SimFleet
from edgefleet.testing.fleet import LocalFleet
from edgefleet.testing.mosquitto import Mosquitto
from edgefleet.testing.postgres import create_database, drop_database, start_postgres
from edgefleet.transport.mqtt_url import MqttEndpoint

LIGHT = int(os.environ.get("EF_BENCH_LIGHT", "10000"))
AGENTS = int(os.environ.get("EF_BENCH_AGENTS", "1000"))
RATES = [int(r) for r in os.environ.get("EF_BENCH_RATES", "2000,5000,10000,15000").split(",")]
STEP_S = float(os.environ.get("EF_BENCH_STEP_S", "4"))
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


# -- 2: a three-wave rollout to simulated agents -------------------------------------------------------------
def rollout(fleet: LocalFleet, endpoint: MqttEndpoint) -> dict[str, Any]:
    api = fleet.api
    assert api is not None
    devices = []
    creds: dict[str, Any] = {}
    for i in range(AGENTS):
        creds = api.add_device(f"agent-{i:04d}", {"group": "agents"})
        devices.append(SimDevice(creds["device_id"], token=creds["token"], full=True))
    keys = {k: PublicKey.from_text(v) for k, v in creds["trusted_keys"].items()}
    sim = SimFleet(endpoint, devices, server_url=creds["server_url"], trusted_keys=keys,
                   accuracy=lambda _m: 0.95)
    try:
        sim.start(timeout_s=300)
        api.deploy("clf@1.0.0", [d.id for d in devices])
        _progress(sim, "clf@1.0.0", AGENTS, 600)
        started = time.monotonic()
        created = api.create_rollout("clf@2.0.0", waves=["10%", "50%", "100%"], select={"group": "agents"},
                                     window_s=0, gates=["accuracy_drop > 5%"], min_windows=1)
        wait_until(lambda: api.rollout(created["id"])["phase"] in ("done", "aborted", "paused"), 600,
                   "the rollout to finish", interval_s=0.1)
        rollout_s = time.monotonic() - started
        status = api.rollout(created["id"])
        installed = sim.count(lambda d: d.active == "clf@2.0.0")
        log(f"three-wave rollout to {installed}/{AGENTS} agents: {status['phase']} in {rollout_s:.1f} s")
        return {"rollout_devices": installed, "rollout_s": rollout_s, "rollout_phase": status["phase"],
                "rollout_errors": len(sim.errors)}
    finally:
        sim.stop()


def _progress(sim: SimFleet, model: str, wanted: int, timeout_s: float) -> None:
    """Wait (bounded) until ``wanted`` simulated agents run ``model``, logging progress and errors."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = sim.count(lambda d: d.active == model)
        if done >= wanted:
            return
        log(f"{done}/{wanted} agents run {model}; {len(sim.errors)} errors {sim.errors[:2]}")
        time.sleep(5)
    raise TimeoutError(f"only {sim.count(lambda d: d.active == model)}/{wanted} agents run {model}")


# -- 3: ingest -----------------------------------------------------------------------------------------------
def mosquitto_c(endpoint: MqttEndpoint) -> float:
    """Messages per second from mosquitto_pub to mosquitto_sub, QoS 1, 200-byte payloads."""
    base = ["-h", endpoint.host, "-p", str(endpoint.port), "-q", "1", "-t", "bench/c"]
    sub = subprocess.Popen(["mosquitto_sub", *base, "-C", str(C_MESSAGES)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    started = time.monotonic()
    subprocess.run(["mosquitto_pub", *base, "--repeat", str(C_MESSAGES), "-m", "x" * 200], check=True,
                   timeout=300)
    try:
        sub.wait(300)
    except subprocess.TimeoutExpired:
        sub.kill()
        raise
    return C_MESSAGES / (time.monotonic() - started)


def ingest_ladder(url: str, endpoint: MqttEndpoint, devices: list[str], seq_base: int) -> list[dict[str, Any]]:
    rows = []
    for rate in RATES:
        total = int(rate * STEP_S)
        before = telemetry_rows(url)
        gen = subprocess.run([sys.executable, "-m", "bench.bench_fleet", "loadgen", endpoint.host,
                              str(endpoint.port), str(rate), str(total), str(seq_base), ",".join(devices)],
                             capture_output=True, text=True, timeout=600, check=True)
        sent = json.loads(gen.stdout.strip().splitlines()[-1])
        seq_base += total // len(devices) + 2
        count, stable_since, last_change = before, time.monotonic(), time.time()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and time.monotonic() - stable_since < 3.0:
            now_count = telemetry_rows(url)
            if now_count != count:
                count, stable_since, last_change = now_count, time.monotonic(), time.time()
            if count - before >= sent["acked"]:
                break
            time.sleep(0.05)
        stored = count - before
        elapsed = max(last_change, sent["finished_at"]) - sent["started_at"]
        row = {"offered_per_s": rate, "offered": sent["acked"], "publish_s": sent["seconds"], "stored": stored,
               "lost": sent["acked"] - stored, "stored_per_s": stored / max(elapsed, 1e-9)}
        log(f"ingest at {rate}/s: stored {stored}/{sent['acked']} at {row['stored_per_s']:.0f}/s")
        rows.append(row)
    return rows


def best(rows: list[dict[str, Any]]) -> tuple[float, int]:
    """The highest stored rate among the steps with zero loss, and the total loss over the ladder."""
    clean = [r["stored_per_s"] for r in rows if r["lost"] == 0]
    return (max(clean) if clean else 0.0), sum(r["lost"] for r in rows)


def loadgen(host: str, port: int, rate: int, total: int, seq_base: int, devices: list[str]) -> None:
    """Child process: publish ``total`` telemetry batches at ``rate`` per second (QoS 1) and print counts."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    window = 2000
    acked_count = [0]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"loadgen-{os.getpid()}")
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.on_publish = lambda *_args: acked_count.__setitem__(0, acked_count[0] + 1)
    client.connect(host, port)
    client.loop_start()
    n = len(devices)
    payloads = [(f"ef/v1/{devices[i % n]}/telemetry", json.dumps({
        "device": devices[i % n], "seq": seq_base + i // n, "ts": time.time(), "model": "clf@1.0.0", "windows": 5,
        "labelled": 5, "correct": 5, "latency_ms": {"150": 5}, "confidence": [0] * 19 + [5]}).encode())
        for i in range(total)]
    started, started_at = time.monotonic(), time.time()
    infos = []
    for i, (topic, payload) in enumerate(payloads):
        due = started + i / rate
        delay = due - time.monotonic()
        if delay > 0.002:
            time.sleep(delay)
        limit = time.monotonic() + 60
        while i - acked_count[0] >= window and time.monotonic() < limit:  # never queue past the window
            time.sleep(0.0005)
        infos.append(client.publish(topic, payload, qos=1))
    deadline = time.monotonic() + 120
    for info in infos:
        info.wait_for_publish(max(0.01, deadline - time.monotonic()))
    acked = sum(1 for info in infos if info.is_published())
    print(json.dumps({"sent": total, "acked": acked, "seconds": time.monotonic() - started,
                      "started_at": started_at, "finished_at": started_at + (time.monotonic() - started)}))
    client.disconnect()
    client.loop_stop()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ef-bench-fleet-"))
    cluster = start_postgres()
    url = create_database(cluster)
    broker = Mosquitto(work / "mosquitto")
    endpoint = broker.start()
    fleet = LocalFleet(work / "fleet")
    try:
        api = fleet.start_replica("a", db_url=url, mqtt_url=endpoint.url, tick_s=0.2)
        api.push_model(fleet.bundle("1.0.0", 1))
        api.push_model(fleet.bundle("2.0.0", 2))
        result: dict[str, Any] = {}
        result.update(rollout(fleet, endpoint))
        result.update(fanout(fleet, url, endpoint))
        c_rate = mosquitto_c(endpoint)
        log(f"mosquitto C clients: {c_rate:.0f} msg/s")
        devices = [f"agent-{i:04d}" for i in range(min(AGENTS, 200))]
        one = ingest_ladder(url, endpoint, devices, 1_000_000)
        fleet.start_replica("b", db_url=url, mqtt_url=endpoint.url, tick_s=0.2)
        two = ingest_ladder(url, endpoint, devices, 5_000_000)
        rate1, lost1 = best(one)
        rate2, lost2 = best(two)
        result.update({"ingest_msgs_per_s": rate1, "mosquitto_c_msgs_per_s": c_rate, "ingest_ratio": rate1 / c_rate,
                       "lost": lost1, "ingest_msgs_per_s_2_replicas": rate2, "ingest_ratio_2_replicas": rate2 / c_rate,
                       "lost_2_replicas": lost2, "ingest_ladder_1_replica": one, "ingest_ladder_2_replicas": two,
                       "light_devices": LIGHT, "agents": AGENTS, "step_s": STEP_S})
    finally:
        fleet.close()
        broker.stop()
        drop_database(url.rsplit("/", 1)[1])
    table = markdown_table(["measure", "value", "target"], [
        ["light connections held", result["devices_connected"], 10_000],
        ["desired state on all of them after a rollout step (s)", result["fanout_s"], "<= 5"],
        ["three-wave rollout, simulated agents (download, verify, report)", result["rollout_devices"], 1_000],
        ["create -> 100% with zero-length windows (s)", result["rollout_s"], "<= 60"],
        ["mosquitto_pub -> mosquitto_sub, QoS 1 (msg/s)", c_rate, "ceiling"],
        ["ingest into PostgreSQL, zero loss, 1 replica (msg/s)", rate1, ">= 10,000"],
        ["ratio to the C clients, 1 replica", result["ingest_ratio"], "~0.45"],
        ["ingest, 2 replicas on a shared subscription (msg/s)", rate2, ">= 10,000"],
        ["messages lost (1 replica / 2 replicas)", f"{lost1} / {lost2}", "0"],
    ])
    ladder = markdown_table(["replicas", "offered/s", "stored/s", "lost"],
                            [[1, r["offered_per_s"], r["stored_per_s"], r["lost"]] for r in one]
                            + [[2, r["offered_per_s"], r["stored_per_s"], r["lost"]] for r in two])
    publish("fleet", result, f"{table}\n\nIngest ladder ({STEP_S:g} s per step, QoS 1 publishes from one paho "
            f"process, 200-byte telemetry batches; stored/s from the first publish to the last row committed; the "
            f"ingest figure above is the best zero-loss step):\n\n{ladder}\n\nAll on one 2-core machine: broker, "
            "database, server(s), load generator and simulated devices share the cores (and other jobs ran beside).")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "loadgen":
        loadgen(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]),
                sys.argv[7].split(","))
    else:
        signal.signal(signal.SIGTERM, lambda *_a: sys.exit(143))  # so that the finally blocks stop the services
        main()
