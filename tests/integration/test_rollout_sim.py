"""A three-wave rollout to simulated agents that really download (HTTP, own token), verify (the device's
trust decision) and report (MQTT): a good candidate reaches every device, a worse one stops in wave one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.bundle.signing import PublicKey
from edgefleet.processes import wait_until
from edgefleet.sim import SimDevice, SimFleet
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport.mqtt_url import parse_mqtt_url

pytestmark = pytest.mark.integration
N = 20


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[LocalFleet, SimFleet]]:
    fleet = LocalFleet(tmp_path)
    sim: SimFleet | None = None
    try:
        api = fleet.start_server()
        api.push_model(fleet.bundle("1.0.0", 1))
        api.push_model(fleet.bundle("2.0.0", 2))
        api.push_model(fleet.bundle("2.1.0", 3))
        devices = []
        for i in range(N):
            creds = api.add_device(f"sim-{i:03d}", {"site": "x"})
            devices.append(SimDevice(creds["device_id"], creds["mqtt_username"], creds["mqtt_password"],
                                     creds["token"], full=True))
        keys = {k: PublicKey.from_text(v) for k, v in creds["trusted_keys"].items()}
        accuracy = {"clf@1.0.0": 0.95, "clf@2.0.0": 0.95, "clf@2.1.0": 0.5}
        sim = SimFleet(parse_mqtt_url(creds["mqtt_url"]), devices, server_url=creds["server_url"],
                       trusted_keys=keys, accuracy=lambda m: accuracy.get(m, 0.0))
        sim.start()
        assert sim.connected == N, sim.errors[:3]
        api.deploy("clf@1.0.0", [d.id for d in devices])
        wait_until(lambda: sim.count(lambda d: d.active == "clf@1.0.0") == N, 60, "version 1 on every device")
        yield fleet, sim
    finally:
        if sim is not None:
            sim.stop()
        fleet.close()


def test_three_waves_reach_every_simulated_agent_and_a_worse_model_stops(
        setup: tuple[LocalFleet, SimFleet]) -> None:
    fleet, sim = setup
    api = fleet.api
    assert api is not None
    good = api.create_rollout("clf@2.0.0", waves=["10%", "50%", "100%"], select={"site": "x"}, window_s=0,
                              gates=["accuracy_drop > 5%"], min_windows=1)
    wait_until(lambda: api.rollout(good["id"])["phase"] != "installing" and
               api.rollout(good["id"])["phase"] in ("done", "aborted", "paused"), 90, "the good rollout to end")
    assert api.rollout(good["id"])["phase"] == "done"
    assert sim.count(lambda d: d.active == "clf@2.0.0") == N and not sim.errors

    bad = api.create_rollout("clf@2.1.0", waves=["10%", "50%", "100%"], select={"site": "x"}, window_s=0,
                             gates=["accuracy_drop > 5%"], min_windows=1)
    wait_until(lambda: api.rollout(bad["id"])["phase"] in ("done", "aborted", "paused"), 90, "the bad rollout")
    status = api.rollout(bad["id"])
    assert status["phase"] == "aborted" and status["wave"] == 1 and status["moved"] == 2
    wait_until(lambda: sim.count(lambda d: d.active == "clf@2.0.0") == N, 60, "the first wave rolled back")
