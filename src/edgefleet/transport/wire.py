"""Bytes on the wire: what this process's MQTT and HTTP connections sent and received.

The uplink figure that matters to a device on a metered link is what its sockets move, not the sum of its
payloads: MQTT CONNECT/CONNACK, SUBSCRIBE, PUBLISH headers and topics, PUBACKs, PINGREQ/PINGRESP every
keepalive, reported states, and the HTTP requests and responses of a model download. :data:`WIRE` counts them
per channel, process-wide and thread-safe:

* ``mqtt``: every byte paho-mqtt's socket sends or receives (:class:`edgefleet.transport.link.MqttLink` counts
  in its client's two socket calls); with TLS these are the bytes under the TLS records (the records add about
  29 bytes each, and the handshake a few kilobytes per connection);
* ``http``: each HTTP/1.1 exchange as it is framed: request line, headers and body; status line, headers and the
  body bytes as received (:func:`count_http_exchange`, called by the agent's artifact fetcher).

Not counted (no socket sees them): TCP/IP headers (40 to 60 bytes a segment), TCP's own handshakes and ACKs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

CHANNELS = ("mqtt", "http")


@dataclass(frozen=True)
class WireTotals:
    """Bytes and socket calls of one channel (or all) so far."""

    sent: int = 0
    received: int = 0
    sends: int = 0
    receives: int = 0

    @property
    def total(self) -> int:
        return self.sent + self.received

    def __add__(self, other: WireTotals) -> WireTotals:
        return WireTotals(self.sent + other.sent, self.received + other.received, self.sends + other.sends,
                          self.receives + other.receives)


class WireCounter:
    """Per-channel byte counters, safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {name: [0, 0, 0, 0] for name in CHANNELS}

    def sent(self, channel: str, count: int) -> None:
        if count > 0:
            with self._lock:
                row = self._counts[channel]
                row[0] += count
                row[2] += 1

    def received(self, channel: str, count: int) -> None:
        if count > 0:
            with self._lock:
                row = self._counts[channel]
                row[1] += count
                row[3] += 1

    def add(self, snapshot: dict[str, dict[str, int]]) -> None:
        """Add counts taken earlier (:meth:`snapshot`), e.g. by the process image this one replaced."""
        with self._lock:
            for name, counts in snapshot.items():
                row = self._counts[name]
                for i, key in enumerate(("sent", "received", "sends", "receives")):
                    row[i] += int(counts[key])

    def totals(self, channel: str | None = None) -> WireTotals:
        """One channel's totals, or all channels' together."""
        with self._lock:
            rows = [self._counts[channel]] if channel else list(self._counts.values())
            return sum((WireTotals(*row) for row in rows), WireTotals())

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Every channel's counts as plain data (for the agent's state and logs)."""
        with self._lock:
            return {name: {"sent": r[0], "received": r[1], "sends": r[2], "receives": r[3]}
                    for name, r in self._counts.items()}


WIRE = WireCounter()
"""This process's counters."""


def count_http_exchange(response: Any, counter: WireCounter = WIRE) -> None:
    """Count one finished HTTP/1.1 exchange (an ``httpx.Response`` whose body was read, in part or whole) as
    framed on the connection: request line + headers + body sent, status line + headers + body bytes received."""
    request = response.request
    target = request.url.raw_path.decode("ascii", "replace")
    sent = len(f"{request.method} {target} HTTP/1.1\r\n") + _headers_size(request.headers.raw) + 2
    body = getattr(request, "_content", None)
    sent += len(body) if isinstance(body, bytes | bytearray) else 0
    reason = response.extensions.get("reason_phrase", b"")
    received = (len(f"HTTP/1.1 {response.status_code} ") + len(reason) + 2 + _headers_size(response.headers.raw)
                + 2 + int(response.num_bytes_downloaded))
    counter.sent("http", sent)
    counter.received("http", received)


def _headers_size(raw: list[tuple[bytes, bytes]]) -> int:
    return sum(len(name) + 2 + len(value) + 2 for name, value in raw)
