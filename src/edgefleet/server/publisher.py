"""Publishing desired states (retained, QoS 1) with paho: many at once, then wait for every acknowledgement.

Each state carries the broker address devices are to dial (``mqtt_url``), so that moving the broker needs no
file edited on a device: an agent keeps the address it is told and dials it from its next start. With a
``trust`` source (the server sets one), each state also carries every key statement and, on a target whose
release has one, the rollback order (:mod:`edgefleet.server.trust`), whichever path published it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.errors import TransportError
from edgefleet.transport import topics
from edgefleet.transport.messages import DesiredState
from edgefleet.transport.mqtt_url import MqttEndpoint, parse_mqtt_url, tls_context

if TYPE_CHECKING:
    from edgefleet.server.trust import TrustDelivery

_WINDOW = 1000


class DesiredPublisher:
    """One MQTT connection that publishes retained desired states and waits until the broker has them."""

    def __init__(self, endpoint: MqttEndpoint, client_id: str, *, device_mqtt_url: str | None = None) -> None:
        self.endpoint = endpoint
        self.device_mqtt_url = _address(device_mqtt_url) if device_mqtt_url else None
        """Stamped on every state that names no broker address itself (without credentials)."""
        self._connected = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if endpoint.username is not None:
            self._client.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.tls is not None:
            self._client.tls_set_context(tls_context(endpoint.tls))
        self._client.max_inflight_messages_set(_WINDOW)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = lambda *_args: self._connected.clear()
        self._lock = threading.Lock()
        self.published = 0
        self.trust: Callable[[], TrustDelivery] | None = None
        """Read at every publish: the statements and rollback orders each state carries (None: none)."""

    def start(self, timeout_s: float = 15.0) -> None:
        try:
            self._client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise TransportError(f"bad MQTT endpoint {self.endpoint.url}: {exc}") from exc
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            raise TransportError(f"cannot publish: no MQTT connection to {self.endpoint.url} in {timeout_s:g} s")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, state: DesiredState) -> None:
        self.publish_many([state])

    def publish_many(self, states: Sequence[DesiredState], timeout_s: float = 60.0) -> None:
        """Publish every state, then wait until the broker acknowledged all; TransportError otherwise."""
        if not states:
            return
        if not self._connected.wait(min(timeout_s, 10.0)):
            raise TransportError(f"no MQTT connection to {self.endpoint.url}")
        deadline = time.monotonic() + timeout_s
        if self.device_mqtt_url is not None:
            stamp = {"mqtt_url": self.device_mqtt_url}
            states = [s if s.mqtt_url is not None else s.model_copy(update=stamp) for s in states]
        if self.trust is not None:
            delivery = self.trust()
            states = [with_trust(s, delivery) for s in states]
        with self._lock:  # in windows no larger than paho's in-flight limit: its queue is costly per ack
            for start in range(0, len(states), _WINDOW):
                infos = [self._client.publish(topics.desired(s.device), s.to_bytes(), qos=1, retain=True)
                         for s in states[start:start + _WINDOW]]
                for info in infos:
                    if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                        raise TransportError(f"publish failed: {mqtt.error_string(info.rc)}")
                    try:
                        info.wait_for_publish(max(0.01, deadline - time.monotonic()))
                    except (RuntimeError, ValueError) as exc:
                        raise TransportError(f"desired state not published: {exc}") from exc
                    if not info.is_published():
                        raise TransportError(f"desired states not acknowledged within {timeout_s:g} s")
        self.published += len(states)

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if not getattr(reason, "is_failure", False):
            self._connected.set()


def with_trust(state: DesiredState, delivery: TrustDelivery) -> DesiredState:
    """``state`` carrying the key statements (unless it has its own) and its targets' rollback orders."""
    update: dict[str, object] = {}
    if delivery.statements and not state.statements:
        update["statements"] = list(delivery.statements)
    for slot in ("model", "shadow"):
        ref = getattr(state, slot, None)
        if ref is None or ref.rollback_order is not None:
            continue
        order = delivery.rollback_orders.get((ref.name, ref.release))
        if order is not None:
            update[slot] = ref.model_copy(update={"rollback_order": order})
    return state.model_copy(update=update) if update else state


def _address(url: str) -> str:
    """The broker's address only: each device logs in with its own credentials, never with these."""
    return parse_mqtt_url(url).address.url
