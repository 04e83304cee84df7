"""E11 agent figures measured on real processes: resident memory after over-the-air updates, and the bytes the
agent's sockets move over an hour of the demo stream.

rss after updates: a real ``edgefleet server`` and a real agent process replaying the demo stream; three updates
of the demo model pushed and deployed one after the other (1.0.0 whole, 1.0.1 as a weight-level delta, 1.0.2);
after the third, the agent process's VmHWM and median VmRSS over 5 s (the image that runs after the update:
the agent executes itself again once an update is done, see ``edgefleet.agent.main``) against the bare ONNX
Runtime process of :func:`bench.bench_agent.measure_rss`. The same run with ``EDGEFLEET_AGENT_REEXEC=0`` shows
what the update path leaves resident otherwise.

uplink on the wire: the agent's own counters (:mod:`edgefleet.transport.wire`: every byte paho's socket sends
and receives, and each HTTP exchange as framed; checked against a counting proxy in
tests/integration/test_agent_field.py) over one hour of the demo stream replayed 60x faster, with telemetry
every 300 s of stream (the default; 5 s of wall time) and one update (a delta) half-way. Everything the agent
does is in it: connection set-up, subscription, the retained desired states, reported states, telemetry and
event PUBLISHes with their PUBACKs, the update's HTTP request and response, and the restart after the update.
Keepalives follow wall time, so the run holds fewer than an hour does: the figure adds 120 PINGREQs (2 bytes)
sent and 120 PINGRESPs received, an upper bound (paho pings only on an idle link). Not counted: TCP/IP headers.
The ratio is the bytes sent (the uplink) over the raw sensor bytes (float32 per channel value); bytes received
(the update, the desired states) are reported beside it. Then the same hour while a rollout observes the device
(telemetry every quarter of the default 60 s window: 15 s).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.agent import WIRE_KEY
from edgefleet.agent.state import AgentState
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.processes import ManagedProcess, wait_until
from edgefleet.testing.fleet import LocalFleet

DEVICE = "bench-dev"
NAME = "bench-demo"
SPEED = 60.0
DEFAULT_INTERVAL_S = 300.0
ROLLOUT_WINDOW_S = 60.0
KEEPALIVE_S = 30.0
RESTARTED = "restarting the agent process after an update"


def variant(model: bytes, scale: float) -> bytes:
    """The model with one float initializer scaled (a fine-tune of one tensor: the update a delta carries)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(model)
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1]
    tensor = floats[-1]
    values = numpy_helper.to_array(tensor) * np.float32(scale)
    tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))
    return bytes(proto.SerializeToString())


def _bundle(fleet: LocalFleet, model: bytes, version: str, release: int, spec: dict[str, Any],
            labels: list[str]) -> bytes:
    assert fleet.key is not None
    return pack_bundle(model, fleet.key, BundleSpec(name=NAME, version=version, release=release, labels=labels,
                                                    preprocess=spec))


def _agent(fleet: LocalFleet, npz: Path, *, interval_s: float, speed: float, duration_s: float | None,
           env: dict[str, str] | None = None) -> ManagedProcess:
    args = ["agent", "--credentials", str(fleet.root / "devices" / f"{DEVICE}.json"),
            "--data-dir", str(fleet.root / "agents" / DEVICE), "--source", f"npz:{npz}?speed={speed}&loop=1",
            "--telemetry-interval", str(interval_s)]
    if duration_s is not None:
        args += ["--duration", str(duration_s)]
    return fleet.group.start(ManagedProcess.edgefleet(args, fleet.root / "logs" / f"{DEVICE}.log", env=env))


def _reported(fleet: LocalFleet) -> dict[str, Any]:
    assert fleet.api is not None
    return dict(fleet.api.device(DEVICE)["reported"] or {})


def _status(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024.0 for k in ("VmRSS", "VmHWM")}


def rss_after_updates(model: bytes, spec: dict[str, Any], labels: list[str], npz: Path, work: Path,
                      reexec: bool) -> dict[str, Any]:
    """Three updates (one a delta) to a running agent; its memory afterwards."""
    fleet = LocalFleet(work / f"rss-updates-{'reexec' if reexec else 'inprocess'}")
    try:
        api = fleet.start_server()
        models = [model, variant(model, 1.01), variant(model, 0.99)]
        for n, m in enumerate(models, 1):
            api.push_model(_bundle(fleet, m, f"1.0.{n - 1}", n, spec, labels))
        fleet.provision(DEVICE)
        agent = _agent(fleet, npz, interval_s=DEFAULT_INTERVAL_S, speed=1.0, duration_s=None,
                       env=None if reexec else {"EDGEFLEET_AGENT_REEXEC": "0"})
        assert agent.proc is not None
        for n in range(len(models)):
            before = agent.log_path.read_text().count(RESTARTED) if agent.log_path.exists() else 0
            api.deploy(f"{NAME}@1.0.{n}", [DEVICE])
            wait_until(lambda n=n: _reported(fleet).get("active") == f"{NAME}@1.0.{n}", 120,  # type: ignore[misc]
                       f"update {n + 1}")
            if reexec:
                wait_until(lambda b=before: agent.log_path.read_text().count(RESTARTED) > b, 60,  # type: ignore[misc]
                           f"the restart after update {n + 1}")
        deltas = [e for e in api.events(DEVICE) if e["name"] == "delta_applied"]
        if reexec:  # the image that runs after the last update has reported
            since = time.time()
            wait_until(lambda: float(_reported(fleet).get("ts") or 0) > since, 60, "the agent's report")
        time.sleep(1.0)
        samples = []
        for _ in range(25):
            samples.append(_status(agent.proc.pid))
            time.sleep(0.2)
        agent.stop()
        return {"reexec": reexec, "updates": len(models), "deltas": len(deltas),
                "peak_mib": max(s["VmHWM"] for s in samples),
                "median_mib": statistics.median(s["VmRSS"] for s in samples)}
    finally:
        fleet.close()


def uplink_wire(model: bytes, spec: dict[str, Any], labels: list[str], npz: Path, work: Path, rate_hz: float,
                channels: int, *, interval_s: float, update: bool, label: str) -> dict[str, Any]:
    """One hour of the demo stream (replayed ``SPEED`` times faster) through a real agent and server."""
    from bench.bench_agent import seed_agent

    fleet = LocalFleet(work / f"wire-{label}")
    try:
        api = fleet.start_server()
        assert fleet.key is not None
        first = _bundle(fleet, model, "1.0.0", 1, spec, labels)
        api.push_model(first)
        api.push_model(_bundle(fleet, variant(model, 1.01), "1.0.1", 2, spec, labels))
        fleet.provision(DEVICE)
        api.deploy(f"{NAME}@1.0.0", [DEVICE])
        seed_agent(fleet.root / "agents" / DEVICE, first, fleet.key)  # the device runs 1.0.0 already
        wall_s = 3600.0 / SPEED
        agent = _agent(fleet, npz, interval_s=interval_s / SPEED, speed=SPEED, duration_s=wall_s)
        started = time.monotonic()
        if update:
            time.sleep(wall_s / 2)
            api.deploy(f"{NAME}@1.0.1", [DEVICE])
        code = agent.wait(wall_s + 120)
        assert code == 0, agent.log_tail()
        elapsed = time.monotonic() - started
        state = AgentState(fleet.root / "agents" / DEVICE)
        wire = state.get(WIRE_KEY)
        state.close()
        reported = _reported(fleet)
        batches = int(api.telemetry(DEVICE)["batches"])
        deltas = [e for e in api.events(DEVICE) if e["name"] == "delta_applied"]
    finally:
        fleet.close()
    pings = int(3600 / KEEPALIVE_S)
    sent = wire["mqtt"]["sent"] + wire["http"]["sent"] + 2 * pings
    received = wire["mqtt"]["received"] + wire["http"]["received"] + 2 * pings
    raw = int(3600 * rate_hz) * channels * 4
    return {"label": label, "stream_hours": 1.0, "wall_s": elapsed, "speed": SPEED,
            "telemetry_interval_s": interval_s, "batches": batches, "update": update,
            "updated_to": reported.get("active"), "delta_bytes": int(deltas[0]["detail"]["bytes"]) if deltas else None,
            "wire": wire, "keepalive_bytes_added": 2 * pings, "sent_bytes": sent, "received_bytes": received,
            "raw_bytes": raw, "ratio": sent / raw, "total_ratio": (sent + received) / raw}


def measure(demo_model: bytes, spec: dict[str, Any], labels: list[str], npz: Path, work: Path, rate_hz: float,
            channels: int, bare_peak_mib: float) -> dict[str, Any]:
    """Every E11 wire and memory figure; keys for bench/results/agent.json."""
    lean = rss_after_updates(demo_model, spec, labels, npz, work, reexec=True)
    kept = rss_after_updates(demo_model, spec, labels, npz, work, reexec=False)
    lean["ratio"], kept["ratio"] = lean["peak_mib"] / bare_peak_mib, kept["peak_mib"] / bare_peak_mib
    default = uplink_wire(demo_model, spec, labels, npz, work, rate_hz, channels, interval_s=DEFAULT_INTERVAL_S,
                          update=True, label="default")
    quiet = uplink_wire(demo_model, spec, labels, npz, work, rate_hz, channels, interval_s=DEFAULT_INTERVAL_S,
                        update=False, label="no-update")
    rollout = uplink_wire(demo_model, spec, labels, npz, work, rate_hz, channels,
                          interval_s=ROLLOUT_WINDOW_S / 4, update=False, label="rollout")
    return {"rss_ratio_after_updates": lean["ratio"], "uplink_wire_ratio": default["ratio"],
            "uplink_wire_ratio_no_update": quiet["ratio"], "rollout_telemetry_interval_s": ROLLOUT_WINDOW_S / 4,
            "rollout_uplink_wire_ratio": rollout["ratio"],
            "rss_after_updates": {"bare_peak_mib": bare_peak_mib, "reexec": lean, "without_reexec": kept},
            "uplink_wire": {"default": default, "no_update": quiet, "rollout": rollout}}


def section(result: dict[str, Any]) -> str:
    rss = result["rss_after_updates"]
    wire = result["uplink_wire"]
    lines = ["### After updates and on the wire (E11)", "",
             "| figure | value | target |", "|---|---|---|",
             f"| resident memory after 3 updates (one a delta) / bare ONNX Runtime | "
             f"{rss['reexec']['ratio']:.2f}x ({rss['reexec']['peak_mib']:.1f} / {rss['bare_peak_mib']:.1f} MiB) "
             f"| <= 1.25x |",
             f"| the same without the restart after an update | {rss['without_reexec']['ratio']:.2f}x "
             f"({rss['without_reexec']['peak_mib']:.1f} MiB) | |"]
    for key, name in (("default", "1 h of the demo stream, one update, telemetry every 300 s"),
                      ("no_update", "the same hour without the update"),
                      ("rollout", "1 h while a rollout observes the device (every 15 s)")):
        w = wire[key]
        lines.append(f"| {name}: bytes sent on the wire / raw sensor bytes | {w['ratio']:.2%} "
                     f"({w['sent_bytes']:,} B sent, {w['received_bytes']:,} B received) | "
                     f"{'<= 1%' if key == 'default' else ''} |")
    lines += ["", "The agent sends its messages in the compact form (edgefleet.transport.compact: JSON deflated "
              "against a dictionary generated from the schemas, reported states as changes after a full one); the "
              "server stores the same JSON. Measured on a 2-core machine shared with other work."]
    return "\n".join(lines)
