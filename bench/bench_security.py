"""The cost of security: devices provisioned through the API (each with its certificate and broker entry),
connected over mutual TLS, the desired state delivered to all of them after a rollout step, and telemetry
ingest over TLS; then the same run without TLS (password logins on plain MQTT) for the ratios.

Run as ``python -m bench.bench_security`` (``make bench-security``). Everything runs on this machine: Mosquitto
(``require_certificate``, ``use_identity_as_username``, the server's CRL and ACL; or its password file without
TLS), PostgreSQL 15 (a throwaway database), one ``edgefleet server --tls`` and the simulated devices in this
process. ``EF_BENCH_SECURITY_DEVICES`` (default 10,000) sets the fleet; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import mqtt_load
from bench.bench_fleet import telemetry_rows
from bench.common import markdown_table, publish
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import PUBLIC_KEY_FILE, write_keypair
from edgefleet.client import ControlPlane
from edgefleet.processes import ManagedProcess, ProcessGroup, wait_until
from edgefleet.server.mosquitto_secure import SecureMosquitto
from edgefleet.server.pki import FleetCA
from edgefleet.sim import SimDevice, SimFleet
from edgefleet.testing import synthetic
from edgefleet.testing.postgres import create_database, drop_database, start_postgres
from edgefleet.transport import topics
from edgefleet.transport.mqtt_url import MqttTls, tls_context

DEVICES = int(os.environ.get("EF_BENCH_SECURITY_DEVICES", "10000"))
WORKERS = int(os.environ.get("EF_BENCH_SECURITY_WORKERS", "8"))
RATES = [int(r) for r in os.environ.get("EF_BENCH_SECURITY_RATES", "10000,15000").split(",")]
STEP_S = float(os.environ.get("EF_BENCH_STEP_S", "6"))
PUBLISHERS = int(os.environ.get("EF_BENCH_PUBLISHERS", "8"))
BASELINE = os.environ.get("EF_BENCH_SECURITY_BASELINE", "1") != "0"
"""Also run without TLS, for the ratios."""


def log(text: str) -> None:
    print(f"[bench_security {time.strftime('%H:%M:%S')}] {text}", flush=True)


def provision(api_url: str, token: str, ca: Path | None, ids: list[str]) -> tuple[dict[str, dict[str, Any]], float]:
    """Add ``ids`` through the API from WORKERS clients at once; every device's credentials, and the seconds."""
    creds: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def worker(share: list[str]) -> None:
        api = ControlPlane(api_url, token, ca=ca)
        try:
            for device in share:
                got = api.add_device(device, {"group": "bench"})
                with lock:
                    creds[device] = got
        finally:
            api.close()

    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        for future in [pool.submit(worker, ids[i::WORKERS]) for i in range(WORKERS)]:
            future.result(timeout=3600)
    return creds, time.monotonic() - started


def device_tls(root: Path, device: str, cred: dict[str, Any]) -> MqttTls:
    """The device's certificate and key as files (what an agent keeps in DATA_DIR/tls)."""
    cert, key = root / f"{device}.pem", root / f"{device}.key"
    cert.write_text(cred["client_cert"])
    key.write_text(cred["client_key"])
    return MqttTls(root / "ca.pem", cert, key)


def run(tls: bool, n: int) -> dict[str, Any]:
    """One full run, with or without TLS; its measures."""
    mode = "tls" if tls else "plain"
    work = Path(tempfile.mkdtemp(prefix=f"ef-bench-security-{mode}-"))
    data_dir = work / "server"
    ca = FleetCA(data_dir / "pki") if tls else None  # the server's own CA directory, made first for the broker
    broker = SecureMosquitto(work / "mosquitto", secrets.token_urlsafe(16), ca=ca)
    broker.start()
    url = create_database(start_postgres())
    group = ProcessGroup()
    keys = write_keypair(work / "keys")
    try:
        args = ["server", "--data-dir", str(data_dir), "--port", "0", "--tick", "0.2", "--mqtt-url", broker.server_url,
                "--broker-auth-dir", str(broker.auth_dir), "--db-url", url,
                "--trusted-key", str(work / "keys" / PUBLIC_KEY_FILE)]
        server = group.start(ManagedProcess.edgefleet(args + (["--tls"] if tls else []), work / "server.log"))

        def ready() -> bool:
            if not server.running:
                raise RuntimeError(server.log_tail(30))
            return (data_dir / "server.json").exists()

        wait_until(ready, 120, "the server to start")
        api_url = json.loads((data_dir / "server.json").read_text())["api_url"]
        token = (data_dir / "operator.token").read_text().strip()
        ca_file = ca.ca_path if ca is not None else None
        api = ControlPlane(api_url, token, ca=ca_file)
        api.push_model(pack_bundle(synthetic.channel_mean_model(), keys, BundleSpec(
            name="clf", version="1.0.0", release=1, labels=list(synthetic.LABELS),
            preprocess=synthetic.preprocess_spec())))

        ids = [f"sec-{i:05d}" for i in range(n)]
        creds, provision_s = provision(api_url, token, ca_file, ids)
        log(f"[{mode}] {len(creds)} devices provisioned through the API in {provision_s:.1f} s "
            f"({len(creds) / provision_s:.0f}/s)")
        certs = work / "certs"
        certs.mkdir()
        if ca is not None:
            (certs / "ca.pem").write_text(ca.ca_pem)
        devices = [SimDevice(d, mqtt_username=None if tls else creds[d]["mqtt_username"],
                             mqtt_password=None if tls else creds[d]["mqtt_password"],
                             tls=device_tls(certs, d, creds[d]) if tls else None) for d in ids]
        endpoint = broker.endpoint
        sim = SimFleet(endpoint, devices, connect_concurrency=200)
        try:
            connect_s = sim.start(timeout_s=1800)
            log(f"[{mode}] {sim.connected} devices connected in {connect_s:.1f} s; errors {sim.errors[:2]}")
            started = time.monotonic()
            rollout = api.create_rollout("clf@1.0.0", waves=["100%"], select={"group": "bench"}, window_s=0,
                                         install_timeout_s=3600)
            log(f"[{mode}] rollout {json.dumps(rollout)[:300]}")
            wait_until(lambda: sim.count(lambda d: "clf@1.0.0" in d.desired_at) >= sim.connected,
                       float(os.environ.get("EF_BENCH_FANOUT_WAIT_S", "600")),
                       f"the desired state on every device ({sim.errors[:2]})", interval_s=0.05)
            last = max(d.desired_at["clf@1.0.0"] for d in sim.devices.values() if "clf@1.0.0" in d.desired_at)
            fanout_s = last - started
            log(f"[{mode}] desired state on {sim.connected} devices {fanout_s:.2f} s after the rollout step")
            api.rollout_command(rollout["id"], "abort", "benchmark done")
        finally:
            sim.stop()

        publishers = ids[:PUBLISHERS]
        logins = {d: mqtt_load.Login(tls=tls_context(device_tls(certs, d, creds[d]))) if tls else
                  mqtt_load.Login(creds[d]["mqtt_username"], creds[d]["mqtt_password"]) for d in publishers}
        ladder = ingest_ladder(url, endpoint.host, endpoint.port, publishers, logins, mode)
        clean = [r["stored_per_s"] for r in ladder if r["lost"] == 0]
        api.close()
        return {"devices_provisioned_api": len(creds), "provision_s": provision_s,
                "provision_per_s": len(creds) / provision_s, "devices_connected": sim.connected,
                "connect_s": connect_s, "fanout_s": fanout_s, "ingest_msgs_per_s": max(clean) if clean else 0.0,
                "lost": sum(r["lost"] for r in ladder), "ingest_ladder": ladder}
    finally:
        group.stop_all()
        broker.stop()
        drop_database(url.rsplit("/", 1)[1])


def _telemetry(device: str, seq: int) -> bytes:
    return json.dumps({"device": device, "seq": seq, "ts": time.time(), "model": "clf@1.0.0", "windows": 5,
                       "labelled": 5, "correct": 5, "latency_ms": {"150": 5}, "confidence": [0] * 19 + [5]}).encode()


def ingest_ladder(url: str, host: str, port: int, devices: list[str], logins: dict[str, mqtt_load.Login],
                  mode: str) -> list[dict[str, Any]]:
    rows, seq_base = [], 1_000_000
    for rate in RATES:
        before = telemetry_rows(url)
        per_device = int(rate * STEP_S) // len(devices)
        def payload(device: str, k: int, base: int = seq_base) -> bytes:
            return _telemetry(device, base + k)

        sent = mqtt_load.offer(host, port, devices, topics.telemetry, payload, rate, per_device, logins=logins)
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
        row = {"offered_per_s": rate, "sent": sent.sent, "acked": sent.acked, "stored": stored,
               "lost": sent.sent - stored, "stored_per_s": stored / max(elapsed, 1e-9)}
        log(f"[{mode}] ingest at {rate}/s: stored {stored}/{sent.sent} at {row['stored_per_s']:.0f}/s")
        rows.append(row)
    return rows


def main() -> None:
    secure = run(True, DEVICES)
    result: dict[str, Any] = {"devices_requested": DEVICES,
                              "devices_provisioned_api": secure["devices_provisioned_api"],
                              "provision_per_s": secure["provision_per_s"], "fanout_tls_s": secure["fanout_s"],
                              "ingest_tls_msgs_per_s": secure["ingest_msgs_per_s"], "lost": secure["lost"],
                              "tls": secure, "publishers": PUBLISHERS, "step_s": STEP_S, "workers": WORKERS}
    if BASELINE:
        plain = run(False, DEVICES)
        result["plain"] = plain
        result["ratios_tls_to_plain"] = {
            "provision_per_s": secure["provision_per_s"] / plain["provision_per_s"],
            "connect_s": secure["connect_s"] / max(plain["connect_s"], 1e-9),
            "fanout_s": secure["fanout_s"] / max(plain["fanout_s"], 1e-9),
            "ingest_msgs_per_s": secure["ingest_msgs_per_s"] / max(plain["ingest_msgs_per_s"], 1e-9)}
    report(result)


def report(result: dict[str, Any]) -> None:
    tls, plain = result["tls"], result.get("plain")

    def both(key: str) -> list[object]:
        return [tls[key], plain[key] if plain else "-",
                tls[key] / plain[key] if plain and plain[key] else "-"]

    n = result["devices_provisioned_api"]
    table = markdown_table(["measure", "TLS + device certificates", "plain (passwords)", "TLS / plain", "target"], [
        ["devices provisioned through the API (certificate, broker entry)", *both("devices_provisioned_api"),
         "10,000"],
        ["provisioning throughput (devices/s)", *both("provision_per_s"), ""],
        ["devices connected", *both("devices_connected"), ""],
        ["connect all (s)", *both("connect_s"), ""],
        ["desired state on all after a rollout step (s)", *both("fanout_s"), "<= 5"],
        ["telemetry ingest, best zero-loss step (msg/s)", *both("ingest_msgs_per_s"), ">= 10,000"],
        ["messages lost", *both("lost"), "0"],
    ])
    ladder = markdown_table(["mode", "offered/s", "stored/s", "lost"],
                            [["tls", r["offered_per_s"], r["stored_per_s"], r["lost"]] for r in tls["ingest_ladder"]]
                            + ([["plain", r["offered_per_s"], r["stored_per_s"], r["lost"]]
                                for r in plain["ingest_ladder"]] if plain else []))
    note = "" if n >= 10_000 else (f"\n\n**This run provisioned {n:,} devices, not the 10,000 of the target** "
                                   f"(EF_BENCH_SECURITY_DEVICES={result['devices_requested']}: the shared machine "
                                   "could not take the full run); the default is still 10,000.")
    publish("security", result, f"{table}{note}\n\nProvisioning: `POST /api/v1/devices` over HTTPS from "
            f"{result['workers']} clients at once, each answer with a fresh ECDSA P-256 certificate; the broker's "
            "password, ACL and CRL files are rewritten in batches (server/broker_sync.py). Devices: one MQTT "
            "connection each to Mosquitto with `require_certificate` (simulated in one process, edgefleet.sim). "
            f"Ingest ladder ({result['step_s']:g} s a step, QoS 1 telemetry from {result['publishers']} devices "
            "over TLS with their own certificates, bench/mqtt_load.py; lost: sent but not stored):\n\n"
            f"{ladder}\n\nAll on one 2-core machine shared with other work: broker, database, server, load "
            "generator and simulated devices share the cores.")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_a: sys.exit(143))
    main()
