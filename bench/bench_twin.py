"""Twin benchmark: how many real-agent twins this machine runs at a 10 Hz sensor rate with the server and broker
on it too, a three-wave rollout to 1,000 twins gated on their real telemetry, whether a rehearsal catches a model
that is worse on drifting devices, and (when bench/dashboard_load.py is there) the dashboard's fleet page.

Run as ``python -m bench.bench_twin`` (``make bench-twin``). Mosquitto on a loopback port, ``edgefleet server``
(SQLite) and the twin host processes (:mod:`edgefleet.twin`) all share this machine. Every wait is bounded.

- ``twins``: twins are added in steps of ``EF_BENCH_TWIN_STEP`` (``EF_BENCH_TWIN_PER_PROCESS`` to a host) up to
  ``EF_BENCH_TWIN_MAX``; after each step the windows the server stores over ``EF_BENCH_TWIN_MEASURE_S`` are
  compared with what every twin's sensor yields at 10 Hz (one window a second: window 20, hop 10). The figure is
  the largest step that kept up (at least 90% of the windows), with the step that did not beside it.
- ``twin_rollout_s``: ``EF_BENCH_TWIN_ROLLOUT`` fresh twins on clf@1.0.0, then create -> done of clf@2.0.0 in
  waves 10%, 50%, 100% with ``accuracy_drop > 5%`` (window 0: each wave is judged once the candidate's cohort
  has ``min_windows`` of real telemetry).
- ``rehearsal_caught_bad_model``: the rehearsal of tests/integration/test_rehearsal.py on 10 twins.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import markdown_table, publish
from edgefleet.processes import wait_until
from edgefleet.testing.field import field_inputs, reads_drift_channel, report_as_device
from edgefleet.testing.fleet import LocalFleet
from edgefleet.testing.mosquitto import Mosquitto
from edgefleet.twin.fleet import TwinFleet
from edgefleet.twin.rehearsal import rehearse
from edgefleet.twin.scenario import parse_scenario

STEP = int(os.environ.get("EF_BENCH_TWIN_STEP", "250"))
MAX_TWINS = int(os.environ.get("EF_BENCH_TWIN_MAX", "1500"))
MEASURE_S = float(os.environ.get("EF_BENCH_TWIN_MEASURE_S", "30"))
ROLLOUT = int(os.environ.get("EF_BENCH_TWIN_ROLLOUT", "1000"))
PER_PROCESS = int(os.environ.get("EF_BENCH_TWIN_PER_PROCESS", "125"))
PARTS = os.environ.get("EF_BENCH_TWIN_PARTS", "capacity,rollout,rehearsal,ui").split(",")
RATE_HZ = 10.0
WINDOWS_PER_S = RATE_HZ / 10.0  # the synthetic preprocessing: window 20, hop 10


def log(text: str) -> None:
    print(f"[bench_twin {time.strftime('%H:%M:%S')}] {text}", flush=True)


def stored_windows(db: Path, prefix: str, since: float, until: float) -> int:
    """Windows in the telemetry batches the server stored from devices ``prefix*`` sent in [since, until) (each
    batch covers the telemetry period before it: the same length of sensing, one period earlier)."""
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        rows = conn.execute("SELECT payload FROM telemetry WHERE device LIKE ? AND ts >= ? AND ts < ?",
                            (f"{prefix}%", since, until))
        return sum(int(json.loads(p).get("windows", 0)) for (p,) in rows)


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def cpu_s(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            pass
    return total


def scenario(interval_s: float) -> Any:
    return parse_scenario({"rate_hz": RATE_HZ, "telemetry_interval_s": interval_s,
                           "synthetic": {"rows_per_class": 2, "length": 60},
                           "groups": [{"name": "bench", "model": "clf@1.0.0", "noise": 0.05,
                                       "tags": {"bench": "twin"}}]})


# -- 1: twins per machine ------------------------------------------------------------------------------------
def capacity(fleet: LocalFleet, work: Path) -> dict[str, Any]:
    api = fleet.api
    assert api is not None
    twins = TwinFleet(api, work / "capacity", scenario(5.0), per_process=PER_PROCESS)
    db = fleet.root / "server" / "edgefleet.db"
    steps: list[dict[str, Any]] = []
    kept_up = 0
    try:
        while len(twins.twins) < MAX_TWINS:
            provision_started = time.monotonic()
            twins.provision(STEP)
            provision_s = time.monotonic() - provision_started
            start_s = twins.start(timeout_s=600)
            total = len(twins.twins)
            running = twins.wait_running("clf@1.0.0", total, 300)
            time.sleep(10)  # past the start-up transient (installs, first batches)
            pids = [h.proc.pid for h in twins.hosts if h.proc is not None]
            server_pid = [fleet.server.proc.pid] if fleet.server and fleet.server.proc else []
            cpu0, scpu0, since = cpu_s(pids), cpu_s(server_pid), time.time()
            time.sleep(MEASURE_S)
            cpu1, scpu1, until = cpu_s(pids), cpu_s(server_pid), time.time()
            time.sleep(8)  # the batches of the measured interval arrive
            windows = stored_windows(db, f"twin-{twins.run_id}-", since, until)
            expected = running * WINDOWS_PER_S * MEASURE_S
            ratio = windows / expected if expected else 0.0
            step = {"twins": total, "running": running, "windows": windows, "expected": round(expected),
                    "ratio": round(ratio, 3), "hosts": len(pids), "host_cpu_cores": round((cpu1 - cpu0) / MEASURE_S, 2),
                    "server_cpu_cores": round((scpu1 - scpu0) / MEASURE_S, 2), "rss_mb": round(rss_mb(pids)),
                    "rss_mb_per_twin": round(rss_mb(pids) / total, 1), "provision_s": round(provision_s, 1),
                    "start_s": round(start_s, 1)}
            steps.append(step)
            log(f"{step}")
            if running < total or ratio < 0.9:
                break
            kept_up = total
    finally:
        twins.close()
    return {"twins": kept_up, "twins_steps": steps, "twins_rate_hz": RATE_HZ, "twins_measure_s": MEASURE_S}


# -- 2: a three-wave rollout to 1,000 twins -------------------------------------------------------------------
def rollout(fleet: LocalFleet, work: Path) -> dict[str, Any]:
    api = fleet.api
    assert api is not None
    twins = TwinFleet(api, work / "rollout", scenario(2.0), per_process=PER_PROCESS)
    try:
        started = time.monotonic()
        twins.provision(ROLLOUT)
        twins.start(timeout_s=600)
        running = twins.wait_running("clf@1.0.0", ROLLOUT, 600)
        log(f"{running}/{ROLLOUT} twins run clf@1.0.0 {time.monotonic() - started:.0f} s after provisioning")
        time.sleep(10)  # baseline telemetry
        started = time.monotonic()
        created = api.create_rollout("clf@2.0.0", waves=["10%", "50%", "100%"], select=twins.tag, window_s=0,
                                     gates=["accuracy_drop > 5%"], min_windows=50, install_timeout_s=600)
        wait_until(lambda: api.rollout(created["id"])["phase"] in ("done", "aborted", "paused"), 900,
                   "the rollout to finish", interval_s=0.25)
        rollout_s = time.monotonic() - started
        status = api.rollout(created["id"])
        installed = twins.running("clf@2.0.0")
        log(f"three-wave rollout to {installed}/{ROLLOUT} twins: {status['phase']} in {rollout_s:.1f} s")
        waves = [d for d in status["decisions"] if d["kind"] in ("assign", "done")]
        return {"twin_rollout_devices": installed, "twin_rollout_s": rollout_s,
                "twin_rollout_phase": status["phase"], "twin_rollout_targets": status["targets"],
                "twin_rollout_decisions": [d["reason"] for d in waves]}
    finally:
        twins.close()


# -- 3: rehearsal --------------------------------------------------------------------------------------------
def rehearsal(fleet: LocalFleet, work: Path) -> dict[str, Any]:
    api = fleet.api
    assert api is not None
    api.push_model(fleet.bundle("3.0.0", 3, reads_drift_channel(8.0)))
    api.push_model(fleet.bundle("3.1.0", 4, reads_drift_channel(0.0)))
    devices = {f"field-{i}": 3.0 if i % 2 else 0.0 for i in range(4)}
    for device, drift in devices.items():
        report_as_device(fleet.provision(device, tags={"site": "plant"}), field_inputs(drift))
    api.deploy("clf@1.0.0", list(devices))
    wait_until(lambda: all(p["input_mean"] for p in api.rehearsal_profiles({"site": "plant"}, since_s=600)), 60,
               "field telemetry")
    plan = parse_scenario({"rate_hz": 40, "telemetry_interval_s": 1,
                           "synthetic": {"rows_per_class": 2, "length": 40}})
    out = {}
    for model, key in (("clf@3.0.0", "bad"), ("clf@3.1.0", "good")):
        report = rehearse(api, {"model": model, "select": {"site": "plant"}, "waves": ["50%", "100%"],
                                "gates": [{"expr": "accuracy_drop > 20%", "action": "abort"}], "window_s": 4,
                                "min_windows": 10, "install_timeout_s": 120},
                          10, work / f"rehearsal-{key}", plan, warmup_s=3, timeout_s=300, say=log)
        log("\n".join(report.lines()))
        out[key] = report
    return {"rehearsal_caught_bad_model": not out["bad"].passed, "rehearsal_passed_good_model": out["good"].passed,
            "rehearsal_bad_s": out["bad"].seconds, "rehearsal_good_s": out["good"].seconds,
            "rehearsal_bad_phase": out["bad"].phase}


def ui() -> dict[str, Any]:
    try:
        from bench.dashboard_load import fleet_page_ms
    except ImportError:
        return {"ui_fleet_page_ms": None}
    return {"ui_fleet_page_ms": fleet_page_ms()}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ef-bench-twin-"))
    broker = Mosquitto(work / "mosquitto")
    endpoint = broker.start()
    fleet = LocalFleet(work / "fleet", mqtt_url=endpoint.url)
    result: dict[str, Any] = {}
    try:
        api = fleet.start_server()
        api.push_model(fleet.bundle("1.0.0", 1))
        api.push_model(fleet.bundle("2.0.0", 2))
        if "capacity" in PARTS:
            result.update(capacity(fleet, work))
        if "rollout" in PARTS:
            result.update(rollout(fleet, work))
        if "rehearsal" in PARTS:
            result.update(rehearsal(fleet, work))
    finally:
        fleet.close()
        broker.stop()
    if "ui" in PARTS:
        result.update(ui())
    if set(PARTS) != {"capacity", "rollout", "rehearsal", "ui"}:
        print(json.dumps(result, indent=1))  # a partial run is for looking at, not for the record
        return
    report(result)


def report(result: dict[str, Any]) -> None:
    steps = result["twins_steps"]
    table = markdown_table(["measure", "value", "target"], [
        ["real-agent twins at 10 Hz kept up (>= 90% of windows stored)", result["twins"], ">= 1,000"],
        ["three-wave rollout to twins (devices on the candidate)", result["twin_rollout_devices"], 1_000],
        ["create -> done, gates on the twins' telemetry (s)", round(result["twin_rollout_s"], 1), "<= 60"],
        ["rehearsal caught the model worse on drifting devices", result["rehearsal_caught_bad_model"], "true"],
        ["rehearsal passed the good model", result["rehearsal_passed_good_model"], "true"],
        ["dashboard fleet page, 10,000 devices (ms)", result["ui_fleet_page_ms"], "<= 1,000"],
    ])
    ladder = markdown_table(
        ["twins", "running", "windows stored / expected", "twin hosts CPU (cores)", "server CPU (cores)",
         "RSS MB (per twin)"],
        [[s["twins"], s["running"], f"{s['windows']} / {s['expected']} ({s['ratio']:.0%})", s["host_cpu_cores"],
          s["server_cpu_cores"], f"{s['rss_mb']} ({s['rss_mb_per_twin']})"] for s in steps])
    publish("twin", result, f"{table}\n\nTwins per machine, in steps of {STEP} ({PER_PROCESS} to a host process; "
            f"{MEASURE_S:g} s measured per step):\n\n{ladder}\n\nAll on one 2-core machine shared with other "
            "work: Mosquitto, the server (SQLite), and the twin hosts. Each twin is the agent's own code (updater, "
            "restore, inference pipeline, stats, outbox, its SQLite state) on a replayed synthetic sensor; its "
            "health check is shared per bundle within a host process (edgefleet.twin.host).")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_a: sys.exit(143))  # so that the finally blocks stop the services
    main()
