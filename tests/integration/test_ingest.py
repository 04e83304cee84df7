"""Telemetry ingest with a real broker: every batch stored once (redeliveries too), gaps counted, and bad
messages (malformed, oversized, unknown or revoked device, another device's name) rejected and counted
while good ones keep flowing. MQTT 5 with a shared subscription on Mosquitto; MQTT 3.1.1 on amqtt."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.processes import wait_until
from edgefleet.server.ingest import Ingest
from edgefleet.server.schema import Device
from edgefleet.server.store import Store
from edgefleet.transport.messages import Event, TelemetryBatch
from edgefleet.transport.mqtt_url import MqttEndpoint

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for name, revoked in (("dev-a", False), ("dev-b", False), ("dev-r", True)):
        s.add_device(Device(id=name, token_sha256=name.ljust(64, "0"), mqtt_password_sha256="0" * 64, tags={},
                            created=time.time(), revoked=revoked))
    yield s
    s.close()


def batch(device: str, seq: int, **kw: object) -> bytes:
    return TelemetryBatch(device=device, seq=seq, ts=time.time(), model="clf@1.0.0", windows=5,
                          **kw).to_bytes()  # type: ignore[arg-type]


def publisher(endpoint: MqttEndpoint) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(100)
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    return client


@pytest.mark.parametrize("kind", ["mosquitto", "embedded"])
def test_batches_are_stored_once_and_bad_messages_are_counted(kind: str, store: Store,
                                                              request: pytest.FixtureRequest) -> None:
    endpoint: MqttEndpoint = request.getfixturevalue(f"{kind}_broker")
    ingest = Ingest(store, endpoint, replica=f"t-{uuid.uuid4().hex[:6]}", mqtt5=kind == "mosquitto")
    ingest.start()
    client = publisher(endpoint)
    try:
        infos = []
        for seq in [*range(0, 50), 10, 20, 30, 60]:  # three redeliveries and a gap of ten
            infos.append(client.publish("ef/v1/dev-a/telemetry", batch("dev-a", seq), qos=1))
        bad = [("ef/v1/dev-a/telemetry", b"{not json"), ("ef/v1/dev-a/telemetry", b"x" * 300_000),
               ("ef/v1/ghost/telemetry", batch("ghost", 0)), ("ef/v1/dev-r/telemetry", batch("dev-r", 0)),
               ("ef/v1/dev-b/telemetry", batch("dev-a", 99)), ("ef/v1/dev-a/events", b"[]")]
        for topic, payload in bad:
            infos.append(client.publish(topic, payload, qos=1))
        event = Event(device="dev-b", seq=0, kind="update", name="activated", detail={"activated": "x"})
        infos.append(client.publish("ef/v1/dev-b/events", event.to_bytes(), qos=1))
        for info in infos:
            info.wait_for_publish(10)

        def settled() -> bool:
            c = ingest.snapshot()
            return c.get("telemetry", 0) + c.get("telemetry_duplicate", 0) >= 54 and c.get("events", 0) >= 1 \
                and sum(v for k, v in c.items() if k.startswith("rejected")) >= len(bad)

        wait_until(settled, 30, "the ingest to see every message")
        counts = ingest.snapshot()
        assert counts["telemetry"] == 51 and counts["telemetry_duplicate"] == 3
        assert [b.seq for b in store.telemetry("dev-a")] == [*range(50), 60]
        assert store.sequence_gaps("dev-a") == 10
        assert counts["rejected_malformed"] == 2
        # the session's broker also carries other tests' devices, which this store does not know
        assert counts["rejected_unknown_device"] >= 1 and counts["rejected_revoked_device"] == 1
        assert counts["rejected_wrong_device"] == 1
        assert counts.get("rejected_oversized", 0) + counts.get("rejected_malformed", 0) >= 2
        assert [e.name for e in store.events("dev-b")] == ["activated"]
        # still running: a new batch goes through
        client.publish("ef/v1/dev-b/telemetry", batch("dev-b", 0), qos=1).wait_for_publish(10)
        wait_until(lambda: store.telemetry("dev-b"), 15, "a batch after the bad ones")
    finally:
        client.disconnect()
        client.loop_stop()
        ingest.stop()
