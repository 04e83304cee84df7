"""One device for process-level agent tests: its credentials, data directory and agent process (restartable),
and a watcher on its MQTT topics (reported state, events, telemetry) that also publishes its desired state."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.bundle.signing import PublicKey
from edgefleet.data.basicmotions import save_npz
from edgefleet.processes import ManagedProcess
from edgefleet.testing import synthetic
from edgefleet.transport import compact, topics
from edgefleet.transport.messages import DesiredState, ModelRef
from edgefleet.transport.mqtt_url import MqttEndpoint


class Watcher:
    """Subscribes to one device's reported state, events and telemetry; publishes its (retained) desired state."""

    def __init__(self, broker: MqttEndpoint, device: str) -> None:
        self.device = device
        self.events: list[dict[str, Any]] = []
        self.telemetry: list[dict[str, Any]] = []
        self.reported: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watcher-{device}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_args: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe([(topics.reported(device), 1), (topics.events(device), 1),
                               (topics.telemetry(device), 1)])
        if not subscribed.wait(10):
            raise AssertionError("the watcher could not subscribe")

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return
        payload = compact.loads(message.topic.rsplit("/", 1)[-1], bytes(message.payload))
        with self._lock:
            if message.topic == topics.events(self.device):
                self.events.append(payload)
            elif message.topic == topics.telemetry(self.device):
                self.telemetry.append(payload)
            elif compact.is_changes(payload):  # a report of changes: applied to the last whole one
                self.reported = compact.merge_changes(self.reported, payload) or self.reported
            else:
                self.reported = payload

    def named(self, name: str) -> list[dict[str, Any]]:
        """The details of the events called ``name``, in arrival order."""
        with self._lock:
            return [e["detail"] for e in self.events if e["name"] == name]

    def batches(self, model: str | None = None) -> int:
        """Telemetry batches received (from ``model`` only, when given) with at least one window."""
        with self._lock:
            return sum(1 for t in self.telemetry if t.get("windows") and (model is None or t.get("model") == model))

    def desire(self, target: ModelRef | None, statements: Sequence[bytes] = ()) -> None:
        """Publish the device's retained desired state (with signed key statements, when given)."""
        payload = DesiredState(device=self.device, model=target,
                               statements=[base64.b64encode(st).decode() for st in statements]).to_bytes()
        self.client.publish(topics.desired(self.device), payload, qos=1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        self.client.publish(topics.desired(self.device), b"", qos=1, retain=True).wait_for_publish(10)
        self.client.disconnect()
        self.client.loop_stop()


class DeviceRig:
    """A device trusting ``key``, with its server at ``server_url`` and its agent process (restartable)."""

    def __init__(self, root: Path, broker: MqttEndpoint, server_url: str, token: str, name: str, key: PublicKey,
                 data_dir: Path | None = None) -> None:
        self.root, self.name = root, name
        self.data_dir = data_dir or root / name
        self.credentials = root / f"{name}.json"
        self.credentials.write_text(json.dumps({
            "device_id": name, "server_url": server_url, "mqtt_url": broker.url, "token": token,
            "trusted_keys": {key.key_id: key.to_text()}}))
        self.recordings = root / f"{name}.npz"
        save_npz(synthetic.recordings(per_class=2, length=60), self.recordings)
        self.processes: list[ManagedProcess] = []

    def start(self, env: dict[str, str] | None = None, *, interval_s: float = 0.3) -> ManagedProcess:
        process = ManagedProcess.edgefleet(
            ["agent", "--credentials", str(self.credentials), "--data-dir", str(self.data_dir), "--source",
             f"npz:{self.recordings}?speed=20&loop=1", "--telemetry-interval", str(interval_s)],
            self.root / f"{self.name}.log", env=env).start()
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def state(self) -> dict[str, Any]:
        """Slots and key-value entries, read straight from the agent's database (read-only; {} while absent)."""
        db = read_agent_db(self.data_dir)
        return {} if db is None else {**db[0], **db[1]}


def read_agent_db(data_dir: Path) -> tuple[dict[str, str], dict[str, Any]] | None:
    """An agent's slots (name -> ref) and key-value entries, read-only; None while its database is not there."""
    path = data_dir / "agent.db"
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            slots = dict(db.execute("SELECT name, ref FROM slots").fetchall())
            kv = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM kv").fetchall()}
    except sqlite3.OperationalError:  # the agent is still creating its schema
        return None
    return slots, kv
