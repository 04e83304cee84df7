"""Fault injection on a real agent process against a real Mosquitto.

- kill -9 at each update step: after a restart the agent runs the old or the new model, never neither, and
  the update completes;
- the broker restarted while QoS 1 telemetry is in flight: no sequence gaps;
- an hour of sensor data (replayed 3600x faster) produced offline: all of it delivered after reconnect, in order.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.fetch import ArtifactFetcher
from edgefleet.bundle.signing import SigningKey
from edgefleet.data.basicmotions import Recordings, save_npz
from edgefleet.processes import ManagedProcess, wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.agent_rig import read_agent_db
from edgefleet.testing.agents import model_ref, signed_bundle
from edgefleet.testing.artifacts import ArtifactServer
from edgefleet.testing.mosquitto import Mosquitto
from edgefleet.transport import compact, topics
from edgefleet.transport.messages import DesiredState, ModelRef
from edgefleet.transport.mqtt_url import MqttEndpoint

pytestmark = pytest.mark.integration
KEY = SigningKey.generate()
V1, V2 = signed_bundle(KEY, "1.0.0", 1), signed_bundle(KEY, "2.0.0", 2)


@dataclass
class Collector:
    """A persistent-session subscriber that records the telemetry sequence numbers it receives."""

    endpoint: MqttEndpoint
    device: str
    seqs: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"collector-{self.device}",
                                  clean_session=False)
        self.client.on_connect = lambda c, *_: c.subscribe(topics.telemetry(self.device), qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=1)

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.seqs.append(int(compact.loads(message.topic.rsplit("/", 1)[-1], message.payload)["seq"]))

    def connect(self) -> None:
        self.client.connect(self.endpoint.host, self.endpoint.port)
        self.client.loop_start()

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def unique(self) -> list[int]:
        with self.lock:
            return sorted(set(self.seqs))


class AgentRig:
    """One device: credentials, an artifact server, a broker, and the agent process (restartable)."""

    def __init__(self, root: Path, broker: MqttEndpoint, artifacts: ArtifactServer, device: str,
                 recordings: Recordings | None = None) -> None:
        self.root, self.broker, self.device = root, broker, device
        self.data_dir = root / device
        self.credentials = root / f"{device}.json"
        self.credentials.write_text(json.dumps({
            "device_id": device, "server_url": artifacts.url, "mqtt_url": broker.url, "token": artifacts.token,
            "trusted_keys": {KEY.public.key_id: KEY.public.to_text()}}))
        self.recordings = root / f"{device}.npz"
        save_npz(recordings or synthetic.recordings(per_class=2, length=60), self.recordings)
        self.process: ManagedProcess | None = None

    def start(self, *, speed: float = 20.0, interval_s: float = 0.2, env: dict[str, str] | None = None,
              loop: bool = True) -> ManagedProcess:
        source = f"npz:{self.recordings}?speed={speed}&loop={int(loop)}"
        self.process = ManagedProcess.edgefleet(
            ["agent", "--credentials", str(self.credentials), "--data-dir", str(self.data_dir), "--source", source,
             "--telemetry-interval", str(interval_s)], self.root / f"{self.device}.log", env=env).start()
        return self.process

    def state(self) -> dict[str, object]:
        """The agent's slots and update state, read straight from its database (read-only)."""
        db = read_agent_db(self.data_dir)
        return {} if db is None else {**db[0], **db[1]}

    def desire(self, target: ModelRef) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"operator-{self.device}")
        client.connect(self.broker.host, self.broker.port)
        client.loop_start()
        payload = DesiredState(device=self.device, model=target).to_bytes()
        client.publish(topics.desired(self.device), payload, qos=1, retain=True).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def artifacts() -> Iterator[ArtifactServer]:
    with ArtifactServer({model_ref(V1, "1.0.0", 1).url: V1, model_ref(V2, "2.0.0", 2).url: V2}) as server:
        yield server


@pytest.fixture
def broker(tmp_path: Path, mosquitto_binary: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "mosquitto") as running:
        yield running


@pytest.mark.parametrize("step", ["downloading", "verifying", "staged", "health_checking", "activating"])
def test_kill_9_at_each_update_step_leaves_a_runnable_model_and_resumes(
        step: str, tmp_path: Path, broker: Mosquitto, artifacts: ArtifactServer) -> None:
    rig = AgentRig(tmp_path, broker.endpoint, artifacts, f"kill-{step.replace('_', '-')}")
    rig.desire(model_ref(V1, "1.0.0", 1))
    first = rig.start()
    wait_until(lambda: rig.state().get("active") == "clf@1.0.0", 30, "version 1 to become active")
    first.stop()

    paused = rig.start(env={"EDGEFLEET_FAULT_PAUSE": f"{step}:60"})
    rig.desire(model_ref(V2, "2.0.0", 2))
    wait_until(lambda: rig.state().get("update_state") == step, 30, f"the agent to reach {step}")
    paused.kill()  # SIGKILL in the middle of the step
    assert rig.state().get("active") in ("clf@1.0.0", "clf@2.0.0")

    resumed = rig.start()
    wait_until(lambda: rig.state().get("active") == "clf@2.0.0" and rig.state().get("update_state") == "idle", 30,
               "the update to complete after restart")
    state = rig.state()
    assert state.get("candidate") is None and state.get("update_state") == "idle"
    assert state.get("previous") == "clf@1.0.0"
    assert resumed.running
    resumed.stop()
    assert resumed.wait(5) == 0


def test_broker_restart_with_telemetry_in_flight_leaves_no_sequence_gap(
        tmp_path: Path, broker: Mosquitto, artifacts: ArtifactServer) -> None:
    rig = AgentRig(tmp_path, broker.endpoint, artifacts, "restart-dev")
    collector = Collector(broker.endpoint, rig.device)
    collector.connect()
    rig.desire(model_ref(V1, "1.0.0", 1))
    agent = rig.start(speed=40.0, interval_s=0.05)
    wait_until(lambda: len(collector.unique()) > 20, 30, "telemetry before the restart")
    for _ in range(2):
        broker.restart()
        time.sleep(1.0)
    before_stop = len(collector.unique())
    wait_until(lambda: len(collector.unique()) > before_stop + 20, 30, "telemetry after the restarts")
    agent.stop()
    assert agent.wait(10) == 0
    time.sleep(0.5)
    collector.disconnect()
    seqs = collector.unique()
    assert seqs == list(range(seqs[-1] + 1)), "a telemetry batch was lost across the broker restarts"


def test_an_hour_offline_is_delivered_in_order_after_reconnect(
        tmp_path: Path, broker: Mosquitto, artifacts: ArtifactServer) -> None:
    hour = synthetic.recordings(per_class=10, length=900)  # 40 recordings x 900 samples = 1 h at 10 Hz
    rig = AgentRig(tmp_path, broker.endpoint, artifacts, "offline-dev", hour)
    collector = Collector(broker.endpoint, rig.device)
    collector.connect()  # registers the persistent session, then goes away like any consumer might
    collector.disconnect()
    rig.desire(model_ref(V1, "1.0.0", 1))
    agent = rig.start(speed=1.0)
    wait_until(lambda: rig.state().get("active") == "clf@1.0.0", 30, "version 1 to become active")
    agent.stop()

    broker.stop()
    offline = rig.start(speed=360.0, interval_s=0.05, loop=False)  # one hour of 10 Hz data in ~10 s
    wait_until(lambda: offline.wait(0) is not None, 60, "the hour of offline data to be processed")
    queued = _queued(rig)
    assert queued > 100
    offline = rig.start(speed=1.0, interval_s=1.0)  # the device reboots and the network comes back
    broker.start()
    collector.connect()
    wait_until(lambda: _queued(rig) == 0, 60, "the outbox to drain after reconnect")
    wait_until(lambda: len(collector.unique()) >= queued, 30, "every queued batch at the subscriber")
    offline.stop()
    collector.disconnect()
    with collector.lock:
        received = list(collector.seqs)
    firsts = list(dict.fromkeys(received))
    assert firsts == sorted(firsts), "batches arrived out of order"
    assert collector.unique() == list(range(max(received) + 1))


def _queued(rig: AgentRig) -> int:
    path = rig.data_dir / "agent.db"
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def test_an_interrupted_download_resumes_with_a_range_request(tmp_path: Path, artifacts: ArtifactServer) -> None:
    target = model_ref(V2, "2.0.0", 2)
    part = tmp_path / "v2.part"
    part.write_bytes(V2[:1000])  # what arrived before the link dropped
    data = ArtifactFetcher(artifacts.url, artifacts.token).fetch(target.url, part, target.size).path.read_bytes()
    assert data == V2
    assert artifacts.requests[-1] == (target.url, "bytes=1000-")
    assert np.frombuffer(data, dtype=np.uint8).size == target.size
