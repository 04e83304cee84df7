"""An MQTT connection that reconnects by itself, re-subscribes, and reports acknowledged publishes.

A thin driver around paho-mqtt's network thread. Callbacks run on that thread: keep them short.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.errors import TransportError
from edgefleet.transport.mqtt_url import MqttEndpoint, tls_context
from edgefleet.transport.wire import WIRE

log = logging.getLogger(__name__)


class _NoTls:
    """What paho-mqtt gets as its ``ssl`` module where it was imported without one (see :func:`_plain_sockets`)."""

    class SSLWantReadError(OSError):
        """Raised only by a TLS socket: never, here."""

    class SSLWantWriteError(OSError):
        """Raised only by a TLS socket: never, here."""


def _plain_sockets() -> None:
    """Make paho-mqtt's socket reads and writes safe where ``ssl`` could not be imported.

    paho imports ``ssl`` optionally (``ssl = None`` without it; ``tls_set`` then refuses), but every socket read
    and write names ``ssl.SSLWantReadError`` and ``ssl.SSLWantWriteError`` in its except clauses. With ``ssl``
    None, the first socket error there (a connection reset by the broker, a full send buffer) becomes an
    AttributeError that ends paho's network thread for good: no more reconnects. That is the case in the agent
    process, which keeps OpenSSL out of memory (:mod:`edgefleet.agent.lean`). Without ``ssl`` no connection of
    this client is TLS, so those two errors cannot occur: stand-ins that nothing raises make the clauses inert.
    """
    if getattr(mqtt, "ssl", True) is None:
        setattr(mqtt, "ssl", _NoTls)  # noqa: B010  # mypy: paho does not export its ``ssl``


_plain_sockets()


class _CountingClient(mqtt.Client):
    """paho's client with every byte its socket moves counted in :data:`edgefleet.transport.wire.WIRE`."""

    def _sock_send(self, buf: bytes | bytearray) -> int:
        sent = super()._sock_send(buf)
        WIRE.sent("mqtt", sent)
        return sent

    def _sock_recv(self, bufsize: int) -> bytes:
        data = super()._sock_recv(bufsize)
        WIRE.received("mqtt", len(data))
        return data


MessageHandler = Callable[[str, bytes], None]
AckHandler = Callable[[int], None]


class MqttLink:
    """One MQTT session: ``start`` connects, then paho reconnects with backoff until ``stop``."""

    def __init__(self, endpoint: MqttEndpoint, client_id: str, *, subscriptions: Sequence[tuple[str, int]] = (),
                 on_message: MessageHandler | None = None, on_ack: AckHandler | None = None,
                 clean_session: bool = True, keepalive_s: int = 30) -> None:
        self.endpoint = endpoint
        self._subscriptions = list(subscriptions)
        self._on_message = on_message
        self._on_ack = on_ack
        self._keepalive_s = keepalive_s
        self._connected = threading.Event()
        self._started = False
        self._client = _CountingClient(CallbackAPIVersion.VERSION2, client_id=client_id,
                                       clean_session=clean_session)
        if endpoint.username is not None:
            self._client.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.tls is not None:  # mqtts://: verify the broker, present the device's certificate
            self._client.tls_set_context(tls_context(endpoint.tls))
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.max_queued_messages_set(0)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_publish = self._handle_publish

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout_s: float = 10.0) -> None:
        """Connect and start the network thread; raise TransportError if not connected in time.

        The network thread keeps trying after the error: call ``stop`` to give up, or carry on offline.
        """
        self.start_background()
        if not self._connected.wait(timeout_s):
            raise TransportError(f"no MQTT connection to {self.endpoint.url} within {timeout_s:.0f} s")

    def start_background(self) -> None:
        """Start the network thread, which connects (and reconnects) whenever the broker is reachable."""
        if self._started:
            return
        try:
            self._client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=self._keepalive_s)
        except (OSError, ValueError) as exc:
            raise TransportError(f"bad MQTT endpoint {self.endpoint.url}: {exc}") from exc
        self._client.loop_start()
        self._started = True

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue a publish and return its message id; QoS 1 completion arrives through ``on_ack``."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return int(info.mid)

    def publish_and_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                         timeout_s: float = 10.0) -> None:
        """Publish and block until the broker acknowledged it."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"publish to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise TransportError(f"publish to {topic} not acknowledged within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()
            self._started = False
        self._connected.clear()

    def _handle_connect(self, client: mqtt.Client, _userdata: object, _flags: object, reason: object,
                        _props: object) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("MQTT connection to %s refused: %s", self.endpoint.url, reason)
            return
        for topic, qos in self._subscriptions:
            client.subscribe(topic, qos=qos)
        self._connected.set()

    def _handle_disconnect(self, _client: mqtt.Client, _userdata: object, _flags: object, reason: object,
                           _props: object) -> None:
        self._connected.clear()
        log.info("MQTT disconnected from %s: %s", self.endpoint.url, reason)

    def _handle_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(message.topic, bytes(message.payload))
        except Exception:  # a bad message must never kill the network thread
            log.exception("handler failed for a message on %s", message.topic)

    def _handle_publish(self, _client: mqtt.Client, _userdata: object, mid: int, _reason: object,
                        _props: object) -> None:
        if self._on_ack is not None:
            self._on_ack(mid)
