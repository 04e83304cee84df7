"""MQTT ingest: reported state, telemetry and events from devices into the store.

gmqtt on its own asyncio thread. With MQTT 5 (Mosquitto), telemetry and events come through a shared
subscription (``$share/edgefleet/...``) so that server replicas split them, and each message is acknowledged
only after the database commit that stored it (manual PUBACKs, one write per batch: :mod:`edgefleet.server.acks`):
a replica killed mid-batch leaves its messages unacknowledged in its persistent session, to be delivered again,
and (device, seq) keys make the redelivery harmless. Messages are written in batches (one transaction per
batch). Reported state is retained and shared subscriptions get no retained messages, so every replica
subscribes to it directly.
The embedded amqtt broker speaks only MQTT 3.1.1: plain subscriptions, acknowledged on receipt.

Anything malformed, oversized, from an unknown or revoked device, or sent on another device's topic is
counted under ``rejected_*`` and acknowledged (never redelivered); the server keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from gmqtt import Client, Subscription
from gmqtt.mqtt.constants import MQTTv50, MQTTv311

from edgefleet.errors import EdgefleetError, TransportError
from edgefleet.learn.fielddata import example_rows
from edgefleet.server.acks import Ack, DeferredAcks
from edgefleet.server.store import Store
from edgefleet.transport import compact, topics
from edgefleet.transport.messages import Event, ReportedState, TelemetryBatch, parse
from edgefleet.transport.mqtt_url import MqttEndpoint, tls_context

log = logging.getLogger(__name__)
SHARE_GROUP = "edgefleet"


@dataclass
class _Item:
    channel: str
    device: str
    message: TelemetryBatch | Event | ReportedState
    raw: bytes = b""


class Ingest:
    """Validates what devices send and stores it in batches; counts every outcome in ``counts``."""

    def __init__(self, store: Store, endpoint: MqttEndpoint, *, replica: str = "server", mqtt5: bool = True,
                 batch_max: int = 1000, flush_s: float = 0.01, receive_maximum: int = 4000,
                 session_expiry_s: int = 600) -> None:
        self.store = store
        self.endpoint = endpoint
        self.replica = replica
        self.mqtt5 = mqtt5
        self.batch_max = batch_max
        self.flush_s = flush_s
        self.receive_maximum = receive_maximum
        self.session_expiry_s = session_expiry_s
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()
        self._failed: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._queue: list[_Item] = []
        self._acks: list[Ack] = []  # every QoS 1 message received, stored or rejected, in the order it came
        self._deferred: DeferredAcks | None = None
        self._wake: asyncio.Event | None = None
        self._devices: dict[str, bool] = {}
        self._unknown: dict[str, float] = {}
        self._refreshed = 0.0
        self._reported: dict[str, dict[str, Any]] = {}
        """Each device's last reported state seen here: what a report of changes applies to."""

    # lifecycle --------------------------------------------------------------------------------
    def start(self, timeout_s: float = 15.0) -> None:
        self._thread = threading.Thread(target=self._run, name=f"ingest-{self.replica}", daemon=True)
        self._thread.start()
        if not self._connected.wait(timeout_s):
            raise TransportError(f"ingest could not connect to {self.endpoint.url} within {timeout_s:g} s: "
                                 f"{self._failed or 'no CONNACK'}")

    def stop(self, timeout_s: float = 10.0) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # surfaced through start()'s error
            self._failed = exc
            log.error("ingest stopped: %s", exc)
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stopping, self._wake = asyncio.Event(), asyncio.Event()
        props: dict[str, Any] = {"session_expiry_interval": self.session_expiry_s,
                                     "receive_maximum": self.receive_maximum} \
            if self.mqtt5 else {}
        client = Client(f"edgefleet-{self.replica}-ingest", clean_session=False,
                        optimistic_acknowledgement=not self.mqtt5, **props)
        if self.endpoint.username is not None:
            client.set_auth_credentials(self.endpoint.username, self.endpoint.password)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        if self.mqtt5:
            self._deferred = DeferredAcks(client, self._on_qos1)
        client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        tls = tls_context(self.endpoint.tls) if self.endpoint.tls is not None else False
        await client.connect(self.endpoint.host, self.endpoint.port, keepalive=30, ssl=tls,
                             version=MQTTv50 if self.mqtt5 else MQTTv311)
        writer = asyncio.create_task(self._writer())
        await self._stopping.wait()
        # A clean stop leaves the shared group: stop taking messages, store and acknowledge what came, then end
        # the session (expiry 0) so that the broker hands this replica's share to the others. A crash keeps
        # the session for session_expiry_s, and the replica restarted under the same name gets its share back.
        try:
            client.unsubscribe([s.topic for s in self._subscriptions()])
            await asyncio.sleep(0.2)
            while self._queue or self._acks:
                await asyncio.sleep(self.flush_s * 2)
            await asyncio.sleep(0.1)
        finally:
            writer.cancel()
        try:
            await client.disconnect(**({"session_expiry_interval": 0} if self.mqtt5 else {}))
        except Exception as exc:  # already gone: nothing to tidy
            log.debug("ingest disconnect: %s", exc)

    def _subscriptions(self) -> list[Subscription]:
        share = f"$share/{SHARE_GROUP}/" if self.mqtt5 else ""
        return [Subscription(f"{share}{topics.device_filter('telemetry')}", qos=1),
                Subscription(f"{share}{topics.device_filter('events')}", qos=1),
                Subscription(topics.device_filter("reported"), qos=1)]

    def _on_connect(self, client: Client, _flags: int, _rc: int, _props: object) -> None:
        client.subscribe(self._subscriptions())
        self._connected.set()

    def _on_message(self, _client: Client, topic: str, payload: bytes, _qos: int, _props: object) -> int:
        """A message gmqtt acknowledges itself (MQTT 3.1.1, QoS 0)."""
        self._take(topic, payload)
        return 0

    def _on_qos1(self, topic: str, payload: bytes, ack: Ack) -> None:
        """A QoS 1 message acknowledged after the commit of its batch (MQTT 5); a rejected one with that batch
        too, so that acknowledgements keep the order of the messages."""
        self._acks.append(ack)
        self._take(topic, payload)

    def _take(self, topic: str, payload: bytes) -> None:
        item = self.validate(topic, payload)
        if item is None:
            return
        self._queue.append(item)
        if len(self._queue) >= self.batch_max and self._wake is not None:
            self._wake.set()

    async def _writer(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        refreshed = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            self._wake.clear()
            if time.monotonic() - refreshed > 5.0:
                refreshed = time.monotonic()
                try:
                    await loop.run_in_executor(None, self.refresh_devices)
                except EdgefleetError as exc:
                    log.warning("cannot refresh the device list: %s", exc)
            if not self._queue and not self._acks:
                continue
            batch, self._queue = self._queue, []
            acks, self._acks = self._acks, []
            delay = 0.1
            while True:
                try:
                    await loop.run_in_executor(None, self.commit, batch)
                    break
                except EdgefleetError as exc:  # database down: keep the batch, unacknowledged, and retry
                    log.warning("ingest commit failed, retrying in %.1f s: %s", delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            if self._deferred is not None:  # stays unacknowledged if the server dies before this
                self._deferred.send(acks)

    # validation and storage (also usable without a broker) -----------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        """Validate and store one message synchronously."""
        item = self.validate(topic, payload)
        if item is not None:
            self.commit([item])

    def validate(self, topic: str, payload: bytes) -> _Item | None:
        """The parsed message, or None after counting why it was rejected."""
        where = topics.split(topic)
        if where is None:
            self._count("rejected_topic")
            return None
        device, channel = where
        known = self._device_state(device)
        if known is None:
            self._count("rejected_unknown_device")
            return None
        if known:
            self._count("rejected_revoked_device")
            return None
        kinds: dict[str, type[TelemetryBatch] | type[Event] | type[ReportedState]] = {
            "telemetry": TelemetryBatch, "events": Event, "reported": ReportedState}
        kind = kinds.get(channel)
        if kind is None:
            self._count("rejected_topic")
            return None
        try:
            payload = compact.unpack(channel, payload)
            if channel == "reported":
                payload = self._whole_report(device, payload)
                if not payload:
                    self._count("reported_changes_without_base")
                    return None
            message: TelemetryBatch | Event | ReportedState = parse(kind, payload)
        except TransportError as exc:
            reason = "oversized" if "over the" in str(exc) else "malformed"
            log.info("rejected message on %s: %s", topic, exc)
            self._count(f"rejected_{reason}")
            return None
        if message.device != device:
            self._count("rejected_wrong_device")
            return None
        if isinstance(message, ReportedState):
            self._reported[device] = message.model_dump(mode="json", exclude_none=True)
        return _Item(channel, device, message, payload)

    def _whole_report(self, device: str, payload: bytes) -> bytes:
        """A reported state as a whole: a report of changes (:mod:`edgefleet.transport.compact`) applied to the
        device's last one (b"" when there is none to apply it to); a full report as it came."""
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            raise TransportError(f"malformed ReportedState: {exc}") from exc
        if not isinstance(data, dict):
            return payload
        if not compact.is_changes(data) and all(key in data for key in compact.STICKY):
            return payload
        base = self._reported.get(device)
        if base is None:
            row = self.store.get_device(device)
            base = dict(row.reported) if row is not None and isinstance(row.reported, dict) else None
        if not compact.is_changes(data):  # a full report without the facts: they stay as last reported
            return json.dumps(compact.keep_sticky(base, data)).encode()
        merged = compact.merge_changes(base, data)
        return b"" if merged is None else json.dumps(merged).encode()

    def commit(self, batch: list[_Item]) -> None:
        """Store a batch: telemetry in one transaction, then events and reported states."""
        items = [i for i in batch if isinstance(i.message, TelemetryBatch)]
        if items:
            telemetry = [i.message for i in items if isinstance(i.message, TelemetryBatch)]
            fresh = self.store.add_telemetry_many(telemetry, [i.raw for i in items])
            new = sum(fresh)
            self._count("telemetry", new)
            self._count("telemetry_duplicate", len(fresh) - new)
            examples = [row for batch, stored in zip(telemetry, fresh, strict=True) if stored
                        for row in example_rows(batch)]  # a redelivered batch's examples are stored once
            self._count("hard_examples", self.store.add_hard_examples(examples))
        for item in batch:
            if isinstance(item.message, Event):
                self._count("events" if self.store.add_event(item.message) else "events_duplicate")
            elif isinstance(item.message, ReportedState):
                stored = self.store.record_reported(item.device, item.message.model_dump(mode="json"))
                self._count("reported" if stored else "rejected_unknown_device")

    def _device_state(self, device: str) -> bool | None:
        """None if unknown, True if revoked, False if in good standing (cached; see :meth:`refresh_devices`)."""
        state = self._devices.get(device)
        if state is not None:
            return state
        now = time.monotonic()
        if now - self._unknown.get(device, -10.0) < 1.0:
            return None
        if now - self._refreshed > 2.0:  # many new devices at once: one query for all, not one each
            self.refresh_devices()
            if device in self._devices:
                return self._devices[device]
        row = self.store.get_device(device)
        if row is None:
            if len(self._unknown) > 100_000:
                self._unknown.clear()
            self._unknown[device] = now
            return None
        self._devices[device] = row.revoked
        return row.revoked

    def refresh_devices(self) -> None:
        """Re-read every device's standing (revocations made through another replica)."""
        self._devices = self.store.device_standing()
        self._refreshed = time.monotonic()

    def _count(self, key: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self.counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)
