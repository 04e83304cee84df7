"""The MQTT topic source against a real Mosquitto: JSON samples and blocks become readings, corrupt messages
are skipped and counted, and a full queue drops its oldest payloads (counted) instead of growing."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from edgefleet.agent.sensors.mqtt_source import MqttSource
from edgefleet.agent.sources import Reading, open_source
from edgefleet.errors import ConfigError
from edgefleet.transport.link import MqttLink
from edgefleet.transport.mqtt_url import MqttEndpoint

pytestmark = pytest.mark.integration


@pytest.fixture
def publisher(mosquitto_broker: MqttEndpoint) -> Iterator[MqttLink]:
    link = MqttLink(mosquitto_broker, f"pub-{uuid.uuid4().hex[:8]}")
    link.start(10)
    yield link
    link.stop()


def send(link: MqttLink, topic: str, payload: object) -> bool:
    """Publish and wait for the broker's acknowledgement; False, so it chains with ``or`` in a wait."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    link.publish_and_wait(topic, data, qos=1, timeout_s=10)
    return False


def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_messages_become_readings_and_bad_ones_are_counted(mosquitto_broker: MqttEndpoint,
                                                           publisher: MqttLink) -> None:
    topic = f"plant/{uuid.uuid4().hex[:8]}/vibration"
    source = open_source(f"{mosquitto_broker.url}/{topic}?qos=1&queue=100")
    assert isinstance(source, MqttSource)
    assert source.start(10)
    got: list[Reading] = []
    reader = threading.Thread(target=lambda: got.extend(source.readings()), daemon=True)
    reader.start()
    wait_for(lambda: send(publisher, topic, {"values": [0, 0, 0], "label": 9}) or bool(got))  # subscribed
    send(publisher, topic, {"values": [1, 2, 3], "label": 1})
    send(publisher, topic, b"not json")
    send(publisher, topic, {"values": [1, None, 3]})  # missing value, the consumer does not impute
    send(publisher, topic, {"values": [[4, 5, 6], [7, 8, 9]], "label": 2})  # a block of two samples
    send(publisher, topic, {"samples": [1, 2, 3]})
    send(publisher, topic, {"values": [10, 11, 12]})
    wait_for(lambda: bool(got) and got[-1].values.tolist() == [10, 11, 12])
    source.close()
    reader.join(5)
    assert not reader.is_alive()
    readings = [r for r in got if r.label != 9]  # the warm-up probes carry label 9
    assert [r.values.tolist() for r in readings] == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    assert [r.label for r in readings] == [1, 2, 2, None]
    assert source.skipped == 3


def test_a_full_queue_drops_the_oldest_and_counts_it(mosquitto_broker: MqttEndpoint, publisher: MqttLink) -> None:
    topic = f"plant/{uuid.uuid4().hex[:8]}/vibration"
    source = MqttSource(mosquitto_broker.url, topic, queue_size=3, idle_timeout_s=0.5)
    assert source.start(10)
    wait_for(lambda: send(publisher, topic, {"values": [-1.0]}) or source._queue.qsize() > 0)  # subscribed
    for i in range(20):
        send(publisher, topic, {"values": [float(i)]})

    def newest() -> bytes | None:
        with source._queue.mutex:
            return source._queue.queue[-1] if source._queue.queue else None

    wait_for(lambda: newest() == json.dumps({"values": [19.0]}).encode())  # everything arrived
    readings = list(source.readings())  # ends after half a second without messages
    assert [r.values.tolist() for r in readings] == [[17.0], [18.0], [19.0]]
    assert source.dropped >= 17 and source.skipped == source.dropped


def test_bad_mqtt_source_specs_are_config_errors() -> None:
    for spec in ("mqtt://127.0.0.1:1883/", "mqtt://127.0.0.1:1883/t?qos=2", "mqtt://127.0.0.1:1883/t?colour=red",
                 "mqtt://127.0.0.1:1883/t?queue=0"):
        with pytest.raises(ConfigError):
            open_source(spec)
