"""E11 in the field: the agent stays lean through updates (it executes itself again once an update is done), its
wire byte counters agree with what the broker and the server were sent, and a rollout that observes the device
shortens its telemetry interval to a quarter of the rollout's window, and the device goes back afterwards."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgefleet.agent.agent import WIRE_KEY
from edgefleet.agent.state import AgentState
from edgefleet.processes import ManagedProcess, wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.counting_proxy import CountingProxy
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport.mqtt_url import parse_mqtt_url

pytestmark = pytest.mark.integration

RESTARTED = "restarting the agent process after an update"  # also once at the first start (its key pair)
UPDATE_LIBRARIES = ("cryptography/hazmat/bindings", "onnx_cpp2py_export", "pydantic_core")


def _active(fleet: LocalFleet, device: str) -> str | None:
    assert fleet.api is not None
    return (fleet.api.device(device)["reported"] or {}).get("active")


def _vm(pid: int, field: str) -> float:
    """A /proc/PID/status field in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no {field} for {pid}")


def test_resident_memory_after_three_updates_one_a_delta_stays_that_of_a_fresh_agent(fleet: LocalFleet) -> None:
    api = fleet.api
    assert api is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    api.push_model(fleet.bundle("1.0.1", 2, synthetic.channel_mean_model(bias=[0.05, 0.0, 0.0, 0.0])))  # a delta
    api.push_model(fleet.bundle("1.0.2", 3, synthetic.channel_mean_model(scale=2.0)))
    fleet.provision("dev-m")
    agent = fleet.start_agent("dev-m", speed=5.0)
    assert agent.proc is not None
    pid = agent.proc.pid

    def restarts() -> int:
        return agent.log_path.read_text().count(RESTARTED)

    for version in ("1.0.0", "1.0.1", "1.0.2"):
        before = restarts()
        api.deploy(f"clf@{version}", ["dev-m"])
        wait_until(lambda v=version: _active(fleet, "dev-m") == f"clf@{v}", 60, f"version {version}")  # type: ignore[misc]
        wait_until(lambda b=before: restarts() > b, 30, f"a restart after {version}")  # type: ignore[misc]
    assert any(e["name"] == "delta_applied" for e in api.events("dev-m"))
    restarted = time.time()
    wait_until(lambda: float((api.device("dev-m")["reported"] or {}).get("ts") or 0) > restarted, 60,
               "the restarted image's report")  # it reports once it has started
    time.sleep(1.0)
    assert agent.running and agent.proc.pid == pid  # the same process, executed again
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert not [lib for lib in UPDATE_LIBRARIES if lib in maps], "update-only libraries still mapped"
    assert _vm(pid, "VmRSS") < 100.0, f"{_vm(pid, 'VmRSS'):.1f} MiB resident after 3 updates"  # ~120 without
    assert agent.stop() == 0


def test_the_wire_counter_agrees_with_the_bytes_the_broker_and_the_server_were_sent(fleet: LocalFleet) -> None:
    api = fleet.api
    assert api is not None and fleet.server_url is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    creds_path = fleet.provision("dev-w")
    creds = json.loads(creds_path.read_text())
    broker = parse_mqtt_url(creds["mqtt_url"])
    host, _, port = fleet.server_url.split("://", 1)[1].partition(":")
    with CountingProxy((broker.host, broker.port)) as mqtt_proxy, \
            CountingProxy((host, int(port.rstrip("/")))) as http_proxy:
        creds["mqtt_url"] = creds["mqtt_url"].replace(f":{broker.port}", f":{mqtt_proxy.port}")
        creds["server_url"] = f"http://127.0.0.1:{http_proxy.port}"
        creds_path.write_text(json.dumps(creds))
        api.deploy("clf@1.0.0", ["dev-w"])
        agent = fleet.start_agent("dev-w", speed=20.0, telemetry_interval_s=0.5,
                                  env={"EDGEFLEET_AGENT_REEXEC": "0"})  # one process: its counters are the run's
        wait_until(lambda: _active(fleet, "dev-w") == "clf@1.0.0", 60, "the update")
        wait_until(lambda: api.telemetry("dev-w")["batches"] >= 3, 30, "telemetry")
        assert agent.stop() == 0
        time.sleep(0.5)  # the proxies relay the last bytes (DISCONNECT)
        state = AgentState(fleet.root / "agents" / "dev-w")
        wire = state.get(WIRE_KEY)
        state.close()
        mqtt_up, mqtt_down = mqtt_proxy.counts()
        http_up, http_down = http_proxy.counts()
    assert wire["mqtt"]["sent"] == mqtt_up and wire["mqtt"]["received"] == mqtt_down, (wire, mqtt_up, mqtt_down)
    assert http_down > 1000 and http_up > 100  # the bundle came through the proxy
    assert abs(wire["http"]["sent"] - http_up) <= 0.02 * http_up, (wire["http"], http_up)
    assert abs(wire["http"]["received"] - http_down) <= 0.02 * http_down, (wire["http"], http_down)


def test_a_device_in_a_rollout_reports_every_quarter_window_then_goes_back_to_its_interval(
        fleet: LocalFleet) -> None:
    api = fleet.api
    assert api is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    api.push_model(fleet.bundle("2.0.0", 2, synthetic.channel_mean_model(scale=2.0)))
    fleet.provision("dev-t", tags={"site": "lab"})
    api.deploy("clf@1.0.0", ["dev-t"])
    agent: ManagedProcess = fleet.start_agent("dev-t", speed=5.0, telemetry_interval_s=120.0)
    wait_until(lambda: _active(fleet, "dev-t") == "clf@1.0.0", 60, "version 1")

    def batches() -> int:
        return int(api.telemetry("dev-t")["batches"])

    before = batches()
    rollout = api.create_rollout("clf@2.0.0", mode="shadow", waves=["100%"], select={"site": "lab"}, window_s=4,
                                 gates=["shadow_disagreement > 99%"], min_windows=10_000, install_timeout_s=60)
    wait_until(lambda: batches() >= before + 4, 40, "batches every second (a quarter of the 4 s window)")
    assert agent.running

    api.rollout_command(rollout["id"], "abort")
    wait_until(lambda: (api.device("dev-t")["reported"] or {}).get("shadow") is None, 60, "the shadow gone")
    time.sleep(3.0)  # the last short-interval batch and the shadow's final one land
    settled = batches()
    time.sleep(6.0)  # six short intervals: none at the device's own 120 s
    assert batches() <= settled + 1
    assert agent.stop() == 0
