"""MQTT ingest: reported state, telemetry and events from devices into the store."""

from __future__ import annotations

import logging
import threading
from collections import Counter

from edgefleet.errors import TransportError
from edgefleet.server.store import Store
from edgefleet.transport import topics
from edgefleet.transport.link import MqttLink
from edgefleet.transport.messages import DesiredState, Event, ReportedState, TelemetryBatch, parse
from edgefleet.transport.mqtt_url import MqttEndpoint

log = logging.getLogger(__name__)


class Ingest:
    """Subscribes to every device's uplink topics and writes what validates; counts what does not."""

    def __init__(self, store: Store, endpoint: MqttEndpoint, client_id: str = "edgefleet-server") -> None:
        self.store = store
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.link = MqttLink(endpoint, client_id, on_message=self.handle, subscriptions=[
            (topics.device_filter("reported"), 1),
            (topics.device_filter("telemetry"), 1),
            (topics.device_filter("events"), 1),
        ])

    def start(self, timeout_s: float = 10.0) -> None:
        self.link.start(timeout_s)

    def stop(self) -> None:
        self.link.stop()

    def publish_desired(self, state: DesiredState) -> None:
        self.link.publish_and_wait(topics.desired(state.device), state.to_bytes(), qos=1, retain=True)

    def handle(self, topic: str, payload: bytes) -> None:
        """Validate one message and store it; anything malformed is counted and dropped."""
        where = topics.split(topic)
        if where is None:
            self._count("rejected_topic")
            return
        device, channel = where
        try:
            if channel == "telemetry":
                batch = parse(TelemetryBatch, payload)
                self._check_sender(device, batch.device)
                self._count("telemetry" if self.store.add_telemetry(batch) else "telemetry_duplicate")
            elif channel == "events":
                item = parse(Event, payload)
                self._check_sender(device, item.device)
                self._count("events" if self.store.add_event(item) else "events_duplicate")
            elif channel == "reported":
                state = parse(ReportedState, payload)
                self._check_sender(device, state.device)
                stored = self.store.record_reported(device, state.model_dump(mode="json"))
                self._count("reported" if stored else "rejected_unknown_device")
        except TransportError as exc:
            log.warning("rejected message on %s: %s", topic, exc)
            self._count(f"rejected_{channel}")

    def _check_sender(self, topic_device: str, payload_device: str) -> None:
        if topic_device != payload_device:
            raise TransportError(f"payload names device {payload_device!r} on {topic_device!r}'s topic")

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1
