"""Readings from an MQTT topic: ``mqtt://[user:pass@]HOST:PORT/TOPIC[?qos=1&queue=10000&idle=S]``.

Each message is JSON ``{"values": [...], "label": optional int}`` (one sample), or ``{"values": [[...], ...]}``
(a block of samples, one row each). paho's network thread puts payloads into a bounded queue; when the agent
falls behind, the oldest payload is dropped (the stream stays current) and counted in ``dropped`` and in
``skipped``. The topic may hold MQTT wildcards. ``idle`` ends the stream after that many seconds without a
message; ``close`` ends it at once.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from edgefleet.agent.sources import Reading, SensorSource, number_option, parse_json_reading
from edgefleet.errors import ConfigError
from edgefleet.transport.link import MqttLink
from edgefleet.transport.mqtt_url import parse_mqtt_url

POLL_S = 0.2
MAX_QUEUE = 1_000_000


class MqttSource(SensorSource):
    """Subscribes to one topic (filter) and yields the readings its messages carry."""

    def __init__(self, url: str, topic: str, *, qos: int = 1, queue_size: int = 10_000,
                 idle_timeout_s: float | None = None, client_id: str | None = None) -> None:
        super().__init__()
        if not topic or qos not in (0, 1) or not 1 <= queue_size <= MAX_QUEUE:
            raise ConfigError(f"MQTT source needs a topic, qos 0|1 and 1 <= queue <= {MAX_QUEUE}")
        self.topic = topic
        self.dropped = 0
        self._counted_drops = 0
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_size)
        self._idle_timeout_s = idle_timeout_s
        self._closed = threading.Event()
        self._link = MqttLink(parse_mqtt_url(url), client_id or f"ef-source-{uuid.uuid4().hex[:12]}",
                              subscriptions=[(topic, qos)], on_message=self._on_message)

    @classmethod
    def from_spec(cls, spec: str) -> MqttSource:
        """Parse ``mqtt://[user:pass@]HOST:PORT/TOPIC[?qos=..&queue=..&idle=..]``."""
        parts = urlsplit(spec)
        topic = unquote(parts.path.lstrip("/"))
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = sorted(set(options) - {"qos", "queue", "idle"})
        if unknown:
            raise ConfigError(f"unknown MQTT source option(s) {', '.join(unknown)}: use qos, queue, idle")
        idle = options.get("idle")
        return cls(f"mqtt://{parts.netloc}", topic, qos=int(number_option(options, "qos", 1)),
                   queue_size=int(number_option(options, "queue", 10_000)),
                   idle_timeout_s=None if idle is None else number_option(options, "idle", 0.0))

    def start(self, timeout_s: float = 10.0) -> bool:
        """Connect now (``readings`` connects by itself otherwise); True when connected within ``timeout_s``."""
        self._link.start_background()
        return self._link.wait_connected(timeout_s)

    def close(self) -> None:
        """End the stream and disconnect."""
        self._closed.set()
        self._link.stop()

    def _on_message(self, _topic: str, payload: bytes) -> None:  # paho's thread
        while True:
            try:
                self._queue.put_nowait(payload)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _raw(self) -> Iterator[Reading | None]:
        self._link.start_background()
        quiet_since = time.monotonic()
        try:
            while not self._closed.is_set():
                if self.dropped != self._counted_drops:  # fold the network thread's drops in, on this thread
                    self.skipped += self.dropped - self._counted_drops
                    self._counted_drops = self.dropped
                try:
                    payload = self._queue.get(timeout=POLL_S)
                except queue.Empty:
                    if self._idle_timeout_s is not None and time.monotonic() - quiet_since > self._idle_timeout_s:
                        return
                    continue
                quiet_since = time.monotonic()
                reading = parse_json_reading(payload)
                if reading is not None and reading.values.ndim == 2:
                    for row in reading.values:
                        yield Reading(row, reading.label)
                else:
                    yield reading
        finally:
            self._link.stop()
