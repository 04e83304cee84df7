"""Two ``edgefleet server`` replicas on one PostgreSQL and one (secured) Mosquitto serve one fleet: each
rollout step is taken exactly once, and no telemetry is lost or counted twice when one replica is killed
(SIGKILL) mid-stream and comes back under the same name."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.processes import wait_until
from edgefleet.server.mosquitto_secure import SecureMosquitto
from edgefleet.server.store import Store
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport.messages import DesiredState, ReportedState, TelemetryBatch, parse
from edgefleet.transport.mqtt_url import MqttEndpoint

pytestmark = pytest.mark.integration
GROUPS = ("g1", "g2", "g3")
PER_GROUP = 5
BATCHES = 60  # per device


class FakeDevices:
    """Devices reduced to their protocol: report whatever they are told to run, and send numbered telemetry."""

    def __init__(self, endpoint: MqttEndpoint) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fake-{uuid.uuid4().hex[:6]}")
        self.client.username_pw_set(endpoint.username, endpoint.password)
        self.client.max_inflight_messages_set(200)
        self.client.on_message = self._on_desired
        self.client.on_connect = lambda c, *_a: c.subscribe("ef/v1/+/desired", qos=1)
        self.client.connect(endpoint.host, endpoint.port)
        self.client.loop_start()

    def _on_desired(self, client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        desired = parse(DesiredState, bytes(msg.payload))
        active = desired.model.ref if desired.model else None
        state = ReportedState(device=desired.device, agent_version="0.1.0", active=active, running=active)
        client.publish(f"ef/v1/{desired.device}/reported", state.to_bytes(), qos=1, retain=True)

    def telemetry(self, devices: list[str], seqs: range, pause_s: float) -> None:
        for seq in seqs:
            infos = [self.client.publish(f"ef/v1/{d}/telemetry", TelemetryBatch(
                device=d, seq=seq, ts=time.time(), model="clf@1.0.0", windows=1, labelled=1, correct=1,
                latency_ms={"150": 1}).to_bytes(), qos=1) for d in devices]
            for info in infos:
                info.wait_for_publish(30)
            time.sleep(pause_s)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(mosquitto_binary: Path, tmp_path: Path) -> Iterator[SecureMosquitto]:
    mosquitto = SecureMosquitto(tmp_path / "mosquitto", "server-secret")
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


def test_two_replicas_take_each_step_once_and_lose_no_telemetry(tmp_path: Path, postgres_url: str,
                                                                 broker: SecureMosquitto) -> None:
    fleet = LocalFleet(tmp_path / "fleet")
    fake: FakeDevices | None = None
    try:
        kw = {"db_url": postgres_url, "mqtt_url": broker.server_url, "auth_dir": broker.auth_dir}
        a = fleet.start_replica("a", **kw)  # type: ignore[arg-type]
        b = fleet.start_replica("b", **kw)  # type: ignore[arg-type]
        a.push_model(fleet.bundle("1.0.0", 1))
        b.push_model(fleet.bundle("2.0.0", 2))
        devices = [f"{g}-{i}" for g in GROUPS for i in range(PER_GROUP)]
        for i, device in enumerate(devices):
            (a if i % 2 else b).add_device(device, {"group": device.split("-")[0]})
        fake = FakeDevices(broker.server_endpoint)
        a.deploy("clf@1.0.0", devices)
        wait_until(lambda: all((d["reported"] or {}).get("active") == "clf@1.0.0" for d in b.devices()), 30,
                   "version 1 reported by every device")

        half = BATCHES // 2
        stream = threading.Thread(target=fake.telemetry, args=(devices, range(half), 0.02))
        stream.start()
        ids = [(a if i % 2 else b).create_rollout("clf@2.0.0", waves=["1", "2", "3", "4", "100%"],
                                                  select={"group": g}, window_s=0, install_timeout_s=60)["id"]
               for i, g in enumerate(GROUPS)]
        time.sleep(0.5)
        fleet.replicas["a"].kill()  # SIGKILL in the middle of rollouts and of the telemetry stream
        stream.join(120)
        time.sleep(1.0)
        a = fleet.start_replica("a", **kw)  # type: ignore[arg-type]
        fake.telemetry(devices, range(half, BATCHES), 0.0)

        wait_until(lambda: all(b.rollout(r)["phase"] == "done" for r in ids), 90, "every rollout to finish")
        wait_until(lambda: all(a.telemetry(d)["batches"] == BATCHES for d in devices), 60, "all telemetry")

        store = Store(postgres_url)
        try:
            for rollout_id in ids:
                decisions = store.decisions(rollout_id)
                assigned = [dev for d in decisions if d.kind == "assign" for dev in d.detail["devices"]]
                assert sorted(assigned) == sorted(set(assigned)) and len(assigned) == PER_GROUP
                assert [d.kind for d in decisions].count("assign") == PER_GROUP
                assert [d.kind for d in decisions].count("done") == 1
                steps = [(d.step_no, d.idx) for d in decisions]
                assert len(steps) == len(set(steps))
            for device in devices:
                row = store.get_device(device)
                assert row is not None and row.desired_rev == 2  # the deployment and exactly one assignment
                assert store.sequence_gaps(device) == 0
            total, _ = store.model_stats("clf@1.0.0")
            assert total.windows == BATCHES * len(devices)  # none lost, none counted twice
        finally:
            store.close()
        assert all(d["desired"] == "clf@2.0.0" for d in b.devices())
        assert "edgefleet_ingest_messages_total" in b.metrics()
    finally:
        if fake is not None:
            fake.close()
        fleet.close()
