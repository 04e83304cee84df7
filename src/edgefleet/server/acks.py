"""QoS 1 acknowledgements sent after the database commit, many in one socket write.

gmqtt's own manual acknowledgement (``optimistic_acknowledgement=False``) runs each message's callback as an
asyncio task and writes each PUBACK on its own: measured on the server's ingest thread at 10,000 msg/s, the
task and the write cost about a third of its time per message. :class:`DeferredAcks` instead takes each QoS 1
PUBLISH from gmqtt's packet handler with its packet id, hands it to a plain function, and later writes the
PUBACKs of a whole committed batch at once, in the order the messages came (MQTT-4.6.0-2). An
acknowledgement is sent only on the connection its message came on: after a reconnect the broker redelivers
what was not acknowledged, and the store's (device, seq) keys make the second copy harmless.

It hooks the packet handler of gmqtt 0.8 (``Client._package_handler._handle_qos_1_publish_packet``) and
refuses, with a clear error, a gmqtt that lacks it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from gmqtt import Client

from edgefleet.errors import ConfigError

Ack = tuple[object, int]  # (the connection the message came on, its packet id)
QosOneHandler = Callable[[str, bytes, Ack], None]


class DeferredAcks:
    """Routes QoS 1 messages of ``client`` to ``handler(topic, payload, ack)``; :meth:`send` acknowledges them."""

    def __init__(self, client: Client, handler: QosOneHandler) -> None:
        packets = getattr(client, "_package_handler", None)
        if packets is None or not hasattr(packets, "_handle_qos_1_publish_packet"):
            raise ConfigError("this gmqtt has no packet handler hook for deferred acknowledgements (gmqtt 0.8 has)")
        self._packets: Any = packets
        self._handler = handler
        packets._handle_qos_1_publish_packet = self._on_publish

    def _on_publish(self, mid: int, payload: bytes, topic: str, _properties: object) -> None:
        self._handler(topic, payload, (self._packets._connection, mid))

    def send(self, acks: Iterable[Ack]) -> int:
        """Write the PUBACKs (success, no properties: 4 bytes each) of ``acks`` that came on the current
        connection, in one write; return how many were sent."""
        connection = self._packets._connection
        if connection is None or connection.is_closing():
            return 0
        data = b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for conn, mid in acks if conn is connection)
        if data:
            connection.send_package(data)
        return len(data) // 4
