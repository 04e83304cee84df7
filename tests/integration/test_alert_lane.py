"""The outbox's alert lane: alerts are sent before queued telemetry and never dropped while telemetry can be;
after a reconnect, a subscriber on a real Mosquitto receives the alert raised offline before the backlog."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.sources import Block, Reading, SensorSource
from edgefleet.agent.state import PRIORITY_ALERT, AgentState, Slot
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.update import TrustState, decide
from edgefleet.processes import wait_until
from edgefleet.testing.agents import signed_bundle
from edgefleet.testing.mosquitto import Mosquitto
from edgefleet.testing.synthetic import CHANNELS
from edgefleet.transport import compact, topics

pytestmark = pytest.mark.integration
KEY = SigningKey.generate()
DEVICE = "lane-dev"


def test_alerts_are_sent_first_and_telemetry_is_dropped_first(tmp_path: Path) -> None:
    state = AgentState(tmp_path, outbox_max_bytes=1000)
    state.enqueue("t", "telemetry", lambda seq: b"T%d" % seq + b"." * 198)
    state.enqueue("e", "events", lambda seq: b"A%d" % seq + b"." * 198, priority=PRIORITY_ALERT)
    for _ in range(3):
        state.enqueue("t", "telemetry", lambda seq: b"T%d" % seq + b"." * 198)
    assert [item.payload[:2] for item in state.pending()] == [b"A0", b"T0", b"T1", b"T2", b"T3"]
    for _ in range(4):  # over the cap: telemetry goes, oldest first, the alerts stay
        state.enqueue("e", "events", lambda seq: b"A%d" % seq + b"." * 198, priority=PRIORITY_ALERT)
    assert [item.payload[:2] for item in state.pending()] == [b"A0", b"A1", b"A2", b"A3", b"A4"]
    assert state.counter("outbox_dropped") == 4
    state.enqueue("t", "telemetry", lambda seq: b"T%d" % seq + b"." * 198)  # only alerts left: the newcomer goes
    assert [item.payload[:2] for item in state.pending()] == [b"A0", b"A1", b"A2", b"A3", b"A4"]
    state.close()


def test_a_state_from_before_the_alert_lane_is_migrated(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "agent.db") as db:
        db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
                   "payload BLOB NOT NULL, created REAL NOT NULL)")
        db.execute("INSERT INTO outbox (topic, payload, created) VALUES ('t', x'01', 0)")
    state = AgentState(tmp_path)
    state.enqueue("e", "events", lambda seq: b"alert", priority=PRIORITY_ALERT)
    assert [item.topic for item in state.pending()] == ["e", "t"]
    state.close()


class Phases(SensorSource):
    """Quiet (class alpha) samples in small blocks, a pause after each so that telemetry batches pile up, then
    the alerting class (gamma)."""

    def __init__(self, quiet_blocks: int) -> None:
        super().__init__()
        self.quiet_blocks = quiet_blocks

    def _raw(self) -> Iterator[Reading | None]:
        return iter(())

    def _raw_blocks(self) -> Iterator[Block]:
        for klass, blocks in ((0, self.quiet_blocks), (2, 3)):
            values = np.zeros((20, CHANNELS), dtype=np.float32)
            values[:, klass] = 3.0
            for _ in range(blocks):
                yield Block(values.copy(), np.full(20, klass, dtype=np.int64))
                time.sleep(0.03)


class Subscriber:
    """A persistent-session subscriber to the device's events and telemetry, recording the arrival order."""

    def __init__(self, broker: Mosquitto) -> None:
        self.arrived: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.broker = broker
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="lane-sub", clean_session=False)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_args: subscribed.set()
        self.client.connect(broker.host, broker.endpoint.port)
        self.client.loop_start()
        self.client.subscribe([(topics.events(DEVICE), 1), (topics.telemetry(DEVICE), 1)])
        assert subscribed.wait(10)

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            channel = message.topic.rsplit("/", 1)[-1]
            self.arrived.append((channel, compact.loads(channel, message.payload)))

    def reconnect(self) -> None:
        self.client.connect(self.broker.host, self.broker.endpoint.port)
        self.client.loop_start()

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path, mosquitto_binary: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "mosquitto") as running:
        yield running


def test_an_alert_raised_offline_arrives_before_the_telemetry_backlog(tmp_path: Path, broker: Mosquitto) -> None:
    subscriber = Subscriber(broker)  # its session (and subscriptions) outlive its connection and the restart
    subscriber.disconnect()
    data = signed_bundle(KEY, "1.0.0", 1, thresholds={"alert:gamma": 0.5})
    accepted = decide(data, TrustState(keys={KEY.public.key_id: KEY.public}))
    seed = AgentState(tmp_path / "agent")
    seed.save_bundle(accepted.sha256, data)
    seed.stage(Slot(accepted.sha256, accepted.manifest.ref))
    seed.activate_candidate(accepted.manifest.name, accepted.manifest.release)
    seed.close()
    endpoint = broker.endpoint
    broker.stop()  # the device is offline
    agent = Agent(AgentConfig(device_id=DEVICE, server_url="http://127.0.0.1:9", mqtt=endpoint, token="t",
                              trusted_keys={KEY.public.key_id: KEY.public}, data_dir=tmp_path / "agent",
                              telemetry_interval_s=0.05))
    try:
        agent.start(connect_timeout_s=0.2)
        agent.run(Phases(quiet_blocks=30))  # ~1 s of quiet telemetry, then the alert
        pending = agent.state.pending(limit=1000)
        telemetry = [item for item in pending if item.topic == topics.telemetry(DEVICE)]
        assert len(telemetry) >= 10 and any(b'"kind":"alert"' in item.payload for item in pending)
        broker.start()  # the network comes back: the agent reconnects and drains its outbox
        wait_until(lambda: agent.state.pending_count() == 0, 30, "the outbox to drain after the reconnect")
        subscriber.reconnect()
        wait_until(lambda: sum(1 for kind, _ in subscriber.arrived if kind == "telemetry") >= len(telemetry),
                   30, "the backlog at the subscriber")
    finally:
        agent.stop()
        subscriber.disconnect()
    with subscriber.lock:
        arrived = list(subscriber.arrived)
    alert_at = next(i for i, (kind, m) in enumerate(arrived) if kind == "events" and m["kind"] == "alert")
    first_telemetry = next(i for i, (kind, _) in enumerate(arrived) if kind == "telemetry")
    assert alert_at < first_telemetry, "the alert waited behind the telemetry queued before it"
    seqs = [m["seq"] for kind, m in arrived if kind == "telemetry"]
    assert seqs[: len(telemetry)] == sorted(seqs[: len(telemetry)])  # the backlog itself stays in order
