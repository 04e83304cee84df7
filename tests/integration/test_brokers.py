"""Both brokers (mosquitto, embedded amqtt) keep retained messages, deliver QoS 1 without loss, and stop
cleanly; mosquitto keeps persistent sessions across a restart on the same port."""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.errors import ConfigError, TransportError
from edgefleet.server.broker import EmbeddedBroker
from edgefleet.testing.mosquitto import Mosquitto
from edgefleet.transport.mqtt_url import MqttEndpoint
from edgefleet.transport.ports import wait_for_port

pytestmark = pytest.mark.integration

TIMEOUT_S = 10.0


class Inbox:
    """Messages received by a client, with a bounded wait for a given count."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.retained: list[bool] = []
        self._cond = threading.Condition()

    def on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.payloads.append(bytes(msg.payload))
            self.retained.append(bool(msg.retain))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout_s: float = TIMEOUT_S) -> list[bytes]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.payloads) >= count, timeout=timeout_s)
            return list(self.payloads)


@contextmanager
def connected(
    endpoint: MqttEndpoint,
    client_id: str | None = None,
    clean_session: bool = True,
    inbox: Inbox | None = None,
) -> Iterator[mqtt.Client]:
    """A paho client with its network thread running, connected (CONNACK received) within TIMEOUT_S."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"test-{uuid.uuid4().hex[:10]}",
        clean_session=clean_session,
    )
    client.max_queued_messages_set(0)
    if inbox is not None:
        client.on_message = inbox.on_message
    ready = threading.Event()
    client.on_connect = lambda _c, _u, _f, rc, _p: ready.set() if not rc.is_failure else None
    client.connect(endpoint.host, endpoint.port, keepalive=30)
    client.loop_start()
    try:
        assert ready.wait(TIMEOUT_S), f"no CONNACK from {endpoint.url}"
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def subscribe(client: mqtt.Client, topic: str, qos: int = 1) -> None:
    """Subscribe and wait for the SUBACK."""
    done = threading.Event()
    client.on_subscribe = lambda *_args: done.set()
    client.subscribe(topic, qos=qos)
    assert done.wait(TIMEOUT_S), f"no SUBACK for {topic}"


def publish_all(client: mqtt.Client, topic: str, payloads: list[bytes], retain: bool = False) -> None:
    """Publish at QoS 1 and wait until the broker acknowledged every message."""
    infos = [client.publish(topic, p, qos=1, retain=retain) for p in payloads]
    deadline = time.monotonic() + TIMEOUT_S
    for info in infos:
        info.wait_for_publish(timeout=max(0.01, deadline - time.monotonic()))
        assert info.is_published(), "publish not acknowledged in time"


def test_retained_qos1_message_reaches_a_later_subscriber(any_broker: MqttEndpoint) -> None:
    topic = f"fleet/{uuid.uuid4().hex}/desired"
    with connected(any_broker) as publisher:
        publish_all(publisher, topic, [b'{"model": "v2"}'], retain=True)
    inbox = Inbox()
    with connected(any_broker, inbox=inbox) as subscriber:
        subscribe(subscriber, topic)
        assert inbox.wait_for(1) == [b'{"model": "v2"}']
        assert inbox.retained == [True]


def test_retained_messages_go_only_to_matching_subscribers(any_broker: MqttEndpoint) -> None:
    """A device must never see another device's retained desired state (amqtt 0.12.1 leaked it on CONNECT)."""
    mine, theirs = (f"fleet/{uuid.uuid4().hex}/desired" for _ in range(2))
    with connected(any_broker) as publisher:
        publish_all(publisher, theirs, [b"theirs"], retain=True)
    with connected(any_broker) as other_device:
        subscribe(other_device, theirs)
        inbox = Inbox()
        with connected(any_broker, inbox=inbox) as device:
            subscribe(device, mine)
            with connected(any_broker) as publisher:
                publish_all(publisher, mine, [b"mine"])
            assert inbox.wait_for(1) == [b"mine"]
            time.sleep(0.2)  # give a stray retained message time to arrive
    assert inbox.payloads == [b"mine"]


def test_500_qos1_messages_all_arrive_in_order(any_broker: MqttEndpoint) -> None:
    topic = f"fleet/{uuid.uuid4().hex}/telemetry"
    payloads = [f"{i:05d}".encode() for i in range(500)]
    inbox = Inbox()
    with connected(any_broker, inbox=inbox) as subscriber, connected(any_broker) as publisher:
        subscribe(subscriber, topic)
        publish_all(publisher, topic, payloads)
        assert inbox.wait_for(len(payloads)) == payloads


def test_embedded_broker_stop_leaves_no_process(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path)
    endpoint = broker.start()
    pid = broker.pid
    assert pid is not None
    broker.stop()
    broker.stop()  # idempotent
    assert broker.exit_code == 0, broker.log_path.read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(TransportError, match="did not accept"):
        wait_for_port(endpoint.host, endpoint.port, timeout_s=0.2)


@pytest.mark.usefixtures("mosquitto_binary")
def test_mosquitto_restart_keeps_port_and_persistent_sessions(tmp_path: Path) -> None:
    topic = f"fleet/{uuid.uuid4().hex}/commands"
    client_id = f"persistent-{uuid.uuid4().hex[:8]}"
    with Mosquitto(tmp_path) as broker:
        first = broker.endpoint
        with connected(first, client_id, clean_session=False) as subscriber:
            subscribe(subscriber, topic)
        with connected(first) as publisher:
            publish_all(publisher, topic, [b"a", b"b", b"c"])
        assert broker.restart() == first
        inbox = Inbox()
        with connected(first, client_id, clean_session=False, inbox=inbox):
            assert inbox.wait_for(3) == [b"a", b"b", b"c"]


def test_embedded_broker_start_failure_reports_the_log(tmp_path: Path) -> None:
    with EmbeddedBroker(tmp_path / "first") as first:
        taken = first.endpoint.port
        with pytest.raises(TransportError, match="exited with code") as info:
            EmbeddedBroker(tmp_path / "second", port=taken).start()
    assert "address already in use" in str(info.value)


def test_missing_mosquitto_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda *_args, **_kwargs: None)
    with pytest.raises(ConfigError, match="apt-get install -y mosquitto"):
        Mosquitto(tmp_path).start()
