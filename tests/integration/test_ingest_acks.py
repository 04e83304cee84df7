"""Deferred acknowledgements on a real Mosquitto (MQTT 5): a QoS 1 message is acknowledged only when the ingest
says so, so the broker redelivers exactly the messages that were not, to whoever takes the session over."""

from __future__ import annotations

import asyncio
import uuid

import paho.mqtt.client as mqtt
import pytest
from gmqtt import Client, Subscription
from gmqtt.mqtt.constants import MQTTv50
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.server.acks import Ack, DeferredAcks
from edgefleet.transport.mqtt_url import MqttEndpoint

pytestmark = pytest.mark.integration


async def _wait(predicate: object, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


async def _session(endpoint: MqttEndpoint, client_id: str, topic: str, n: int, acked: int) -> list[bytes]:
    """Take ``n`` messages through :class:`DeferredAcks`, acknowledge the first ``acked``, then let a second
    connection take the session over; return what the broker redelivers to it."""
    first = Client(client_id, clean_session=False, optimistic_acknowledgement=False, session_expiry_interval=60)
    first.set_config({"reconnect_retries": 0})
    received: list[tuple[bytes, Ack]] = []
    acks = DeferredAcks(first, lambda _t, payload, ack: received.append((payload, ack)))
    await first.connect(endpoint.host, endpoint.port, version=MQTTv50)
    first.subscribe(Subscription(topic, qos=1))
    await asyncio.sleep(0.3)

    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    publisher.connect(endpoint.host, endpoint.port)
    publisher.loop_start()
    try:
        for info in [publisher.publish(topic, f"m{i}".encode(), qos=1) for i in range(n)]:
            info.wait_for_publish(10)
    finally:
        publisher.disconnect()
        publisher.loop_stop()
    await _wait(lambda: len(received) == n, 10)
    assert [p for p, _ in received] == [f"m{i}".encode() for i in range(n)]
    assert acks.send(ack for _, ack in received[:acked]) == acked
    await asyncio.sleep(0.3)

    redelivered: list[bytes] = []
    second = Client(client_id, clean_session=False, session_expiry_interval=0)
    second.on_message = lambda _c, _t, payload, _q, _p: redelivered.append(payload) or 0
    await second.connect(endpoint.host, endpoint.port, version=MQTTv50)  # takes the session over
    try:
        await _wait(lambda: len(redelivered) >= n - acked, 10)
        await asyncio.sleep(0.3)  # nothing more comes
        assert acks.send(ack for _, ack in received) == 0  # the first connection is gone: no stale ack
    finally:
        await second.disconnect(session_expiry_interval=0)
    return redelivered


def test_only_unacknowledged_messages_are_redelivered(mosquitto_broker: MqttEndpoint) -> None:
    name = uuid.uuid4().hex[:8]
    redelivered = asyncio.run(_session(mosquitto_broker, f"acks-{name}", f"acks/{name}", 10, 4))
    assert redelivered == [f"m{i}".encode() for i in range(4, 10)]


def test_nothing_is_redelivered_once_all_are_acknowledged(mosquitto_broker: MqttEndpoint) -> None:
    name = uuid.uuid4().hex[:8]
    assert asyncio.run(_session(mosquitto_broker, f"acks-{name}", f"acks/{name}", 5, 5)) == []
