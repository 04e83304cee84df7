"""A protocol load generator: many devices in one asyncio process, each speaking the real protocols.

Light devices only subscribe to their desired topic (and can publish a telemetry batch): enough to measure
how fast a desired state reaches 10,000 connections. Simulated agents do what an agent does on an update,
without inference: on a new desired state they download the artifact over HTTP with their own token,
verify it with the device's own trust decision (:func:`edgefleet.core.update.decide`: signature, hashes,
release counter, compatibility), activate it, report their state over MQTT and send a telemetry batch whose
accuracy is given, not measured. Rollouts that gates must judge on real behaviour run on twins instead
(:mod:`edgefleet.twin`: the agent's own code on a varied, replayed sensor), as the fleet benchmark's does.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from gmqtt import Client, Subscription
from gmqtt.mqtt.constants import MQTTv311

from edgefleet.bundle.signing import PublicKey
from edgefleet.core.telemetry import CONFIDENCE_BINS
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import EdgefleetError, TransportError
from edgefleet.transport import topics
from edgefleet.transport.messages import DesiredState, ReportedState, encode_telemetry, parse
from edgefleet.transport.mqtt_url import MqttEndpoint, MqttTls, tls_context

log = logging.getLogger(__name__)


@dataclass
class SimDevice:
    """One simulated device: its credentials and what it runs."""

    id: str
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    token: str = ""
    full: bool = False
    active: str | None = None
    active_sha256: str | None = None
    highest: dict[str, int] = field(default_factory=dict)
    seq: int = 0
    desired_at: dict[str, float] = field(default_factory=dict)
    activated_at: dict[str, float] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    client: Client | None = None
    tls: MqttTls | None = None
    """With a TLS broker: the fleet CA and this device's certificate (mutual TLS)."""


class SimFleet:
    """Runs its devices on an asyncio loop in a background thread; every wait is bounded."""

    def __init__(self, endpoint: MqttEndpoint, devices: Sequence[SimDevice], *, server_url: str = "",
                 trusted_keys: dict[str, PublicKey] | None = None, accuracy: Callable[[str], float] | None = None,
                 connect_concurrency: int = 200, download_concurrency: int = 32) -> None:
        self.endpoint = endpoint
        self.devices = {d.id: d for d in devices}
        self.server_url = server_url.rstrip("/")
        self.trusted_keys = trusted_keys or {}
        self.accuracy = accuracy or (lambda _model: 1.0)
        self.connect_concurrency = connect_concurrency
        self.download_concurrency = download_concurrency
        self.connected = 0
        self.errors: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="simfleet", daemon=True)
        self._http: httpx.AsyncClient | None = None
        self._downloads: asyncio.Semaphore | None = None

    # lifecycle --------------------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> float:
        """Connect every device (subscribed to its desired topic); return the seconds it took."""
        self._thread.start()
        started = time.monotonic()
        asyncio.run_coroutine_threadsafe(self._connect_all(), self._loop).result(timeout_s)
        return time.monotonic() - started

    def stop(self, timeout_s: float = 60.0) -> None:
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._disconnect_all(), self._loop).result(timeout_s)
            except (TimeoutError, EdgefleetError) as exc:
                log.warning("simulated fleet did not disconnect cleanly: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)

    def run(self, coro: Any, timeout_s: float = 60.0) -> Any:
        """Run a coroutine on the fleet's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _connect_all(self) -> None:
        self._http = httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(max_connections=self.download_concurrency))
        self._downloads = asyncio.Semaphore(self.download_concurrency)
        gate = asyncio.Semaphore(self.connect_concurrency)

        async def one(device: SimDevice) -> None:
            async with gate:
                await self._connect(device)

        await asyncio.gather(*(one(d) for d in self.devices.values()))

    async def _connect(self, device: SimDevice) -> None:
        client = Client(f"sim-{device.id}", clean_session=True)
        if device.mqtt_username is not None:
            client.set_auth_credentials(device.mqtt_username, device.mqtt_password)
        client.on_message = lambda _c, topic, payload, _qos, _p: self._on_desired(device, payload)
        client.set_config({"reconnect_retries": 3, "reconnect_delay": 1})
        for attempt in range(5):
            try:
                await client.connect(self.endpoint.host, self.endpoint.port, keepalive=600, version=MQTTv311,
                                     ssl=tls_context(device.tls) if device.tls is not None else False)
                break
            except Exception as exc:  # broker busy accepting thousands at once: bounded retries
                if attempt == 4:
                    self.errors.append(f"{device.id}: cannot connect: {exc}")
                    return
                await asyncio.sleep(0.5 * (attempt + 1))
        client.subscribe(Subscription(topics.desired(device.id), qos=1))
        device.client = client
        self.connected += 1

    async def _disconnect_all(self) -> None:
        clients = [d.client for d in self.devices.values() if d.client is not None]
        await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    # behaviour --------------------------------------------------------------------------------
    def _on_desired(self, device: SimDevice, payload: bytes) -> int:
        try:
            desired = parse(DesiredState, payload)
        except TransportError as exc:
            self.errors.append(f"{device.id}: {exc}")
            return 0
        if desired.model is None:
            return 0
        device.desired_at.setdefault(desired.model.ref, time.monotonic())
        if device.full and desired.model.sha256 != device.active_sha256:
            self._loop.create_task(self._install(device, desired))
        return 0

    async def _install(self, device: SimDevice, desired: DesiredState) -> None:
        target = desired.model
        assert target is not None and self._http is not None and self._downloads is not None
        try:
            data = await self._download(device, target.url)
            if hashlib.sha256(data).hexdigest() != target.sha256:
                raise TransportError("downloaded bundle does not match the announced SHA-256")
            accepted = await asyncio.get_running_loop().run_in_executor(None, lambda: decide(
                data, TrustState(keys=self.trusted_keys, highest_release=dict(device.highest)), allow_rollback=True))
        except (EdgefleetError, httpx.HTTPError) as exc:
            device.refused.append(target.ref)
            self.errors.append(f"{device.id}: {target.ref}: {exc}")
            return
        name = accepted.manifest.name
        device.highest[name] = max(device.highest.get(name, 0), accepted.manifest.release)
        device.active, device.active_sha256 = target.ref, target.sha256
        device.activated_at[target.ref] = time.monotonic()
        self.report(device)
        self.send_telemetry(device)

    async def _download(self, device: SimDevice, url: str, attempts: int = 5) -> bytes:
        """GET the artifact with the device's token; network failures are retried with backoff, like the agent."""
        assert self._http is not None and self._downloads is not None
        for attempt in range(attempts):
            try:
                async with self._downloads:
                    response = await self._http.get(f"{self.server_url}{url}",
                                                    headers={"Authorization": f"Bearer {device.token}"})
                if response.status_code == 200:
                    return response.content
                if response.status_code < 500:
                    raise TransportError(f"download refused: HTTP {response.status_code}")
            except httpx.HTTPError as exc:
                if attempt == attempts - 1:
                    raise TransportError(f"download failed: {type(exc).__name__} {exc}") from exc
            await asyncio.sleep(0.5 * 2 ** attempt)
        raise TransportError(f"download of {url} failed {attempts} times")

    def report(self, device: SimDevice) -> None:
        if device.client is not None:
            state = ReportedState(device=device.id, agent_version="0.1.0", active=device.active,
                                  active_sha256=device.active_sha256, running=device.active)
            device.client.publish(topics.reported(device.id), state.to_bytes(), qos=1, retain=True)

    def send_telemetry(self, device: SimDevice, windows: int = 20) -> None:
        """One telemetry batch for the device's active model: labelled windows at the model's accuracy."""
        if device.client is None:
            return
        correct = round(windows * self.accuracy(device.active or ""))
        confidence = [0] * CONFIDENCE_BINS
        confidence[-1] = windows
        batch = encode_telemetry({"device": device.id, "seq": device.seq, "ts": round(time.time(), 3),
                                  "model": device.active, "windows": windows, "labelled": windows,
                                  "correct": correct, "latency_ms": {"150": windows}, "confidence": confidence})
        device.seq += 1
        device.client.publish(topics.telemetry(device.id), batch, qos=1)  # the agent's own compact encoding

    def send_telemetry_all(self) -> None:
        """Every connected device sends one batch (called from any thread)."""
        def send() -> None:
            for device in self.devices.values():
                self.send_telemetry(device)

        self._loop.call_soon_threadsafe(send)

    def count(self, predicate: Callable[[SimDevice], bool]) -> int:
        return sum(1 for d in self.devices.values() if predicate(d))
