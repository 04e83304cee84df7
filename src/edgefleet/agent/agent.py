"""The edge agent: local inference on a sensor stream, telemetry through a durable outbox, model updates.

What the running agent imports stays small (numpy, ONNX Runtime, paho-mqtt, sqlite3 and this package's light
modules): pydantic, ``cryptography``, ``onnx`` and httpx are loaded only when an update is fetched and verified
(the stored models are re-verified at start in a child process, see :mod:`edgefleet.agent.verify`), messages are
encoded and decoded with :mod:`edgefleet.transport.messages`'s light helpers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgefleet import __version__
from edgefleet.agent.accepted import accepted_versions, device_clock, raise_floor, remember_bundle, time_floor
from edgefleet.agent.config import AgentConfig, remember_broker
from edgefleet.agent.facts import device_facts
from edgefleet.agent.fetch import ArtifactFetcher, Fetcher
from edgefleet.agent.inference import InferencePipeline, PipelineOptions
from edgefleet.agent.local_action import open_local_action
from edgefleet.agent.model import LoadedModel
from edgefleet.agent.restore import Restorer, SlotRefused
from edgefleet.agent.sources import SensorSource
from edgefleet.agent.state import PRIORITY_ALERT, PRIORITY_NORMAL, AgentState, device_public_key
from edgefleet.agent.updater import ERROR_KEY, STEP_KEY, HealthPolicy, Updater
from edgefleet.agent.verify import TrustSpec, trust_state
from edgefleet.errors import BundleError, EdgefleetError, TransportError
from edgefleet.transport import compact, topics
from edgefleet.transport.link import MqttLink
from edgefleet.transport.messages import DesiredUpdate, encode, event_detail, parse
from edgefleet.transport.wire import WIRE

if TYPE_CHECKING:
    from edgefleet.core.keys import Keyring
    from edgefleet.core.update import TrustState

log = logging.getLogger(__name__)
KEYRING_KEY = "keyring"
STATEMENTS_KEY = "statements_applied"
HELD_EVENTS = 32
"""Events kept in memory while the outbox cannot write (the oldest go first)."""
RUNNING_KEY = "running"
"""What the agent runs (``name@version``, null for nothing), as it last reported it."""
EXPIRED_KEY = "active_expired"
RUNNING_PID_KEY = "running_pid"
"""The process that recorded ``running`` (a restarted agent has not said what it runs until it records its own)."""
WIRE_KEY = "wire_bytes"
"""The bytes this agent's sockets moved (:mod:`edgefleet.transport.wire`), written at every telemetry flush and stop."""
RESTART_CHECK_S = 1.0
"""How often the run loop asks ``restart_when`` (see :meth:`Agent.run`)."""
HAND_OVER_WAIT_S = 5.0
"""How long a model change waits for the updater to finish, to run the new model only in the restarted process."""


class Agent:
    """One device. ``run`` blocks on the sensor loop; MQTT, the outbox and updates run on their own threads."""

    def __init__(self, config: AgentConfig, fetcher: Fetcher | None = None, *,
                 link_factory: Callable[..., MqttLink] = MqttLink) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.state = AgentState(config.data_dir, outbox_max_bytes=config.outbox_max_bytes)
        self.device = config.device_id
        self.public_key = self._device_key()
        self._stop = threading.Event()
        self._outbox_wake = threading.Event()
        self._outbox_exit = threading.Event()
        self._held_events: deque[tuple[str, dict[str, Any], float]] = deque(maxlen=HELD_EVENTS)
        self._skipped_reported = 0
        self._consecutive_failures = 0
        self.telemetry_hint_s: float | None = None
        """The interval a rollout asks for in the desired state (None: none does); see telemetry_interval_s."""
        self.restart_requested = False
        self._report_changes = compact.ReportChanges()
        self._facts = device_facts()
        """CPU, cores, memory, runtimes and providers (agent.facts): reported once a process (compact.STICKY)."""
        self.link = link_factory(config.mqtt, f"ef-agent-{self.device}", clean_session=False,
                              subscriptions=[(topics.desired(self.device), 1)], on_message=self._on_message)
        fetcher = fetcher or ArtifactFetcher(config.server_url, config.token, limits=config.downloads,
                                             tls=config.tls)
        self.updater = Updater(self.state, fetcher, self.trust, self._activate, self.event, self.report,
                               set_shadow=self._set_shadow,
                               health=HealthPolicy(config.health_timeout_s, config.latency_budget_ms),
                               providers=config.providers)
        self._restorer = Restorer(self.state, self.trust_spec, self.event, self.updater.remember_failed,
                                  providers=config.providers)
        restored = self._restorer.at_start()  # the policy: edgefleet.agent.restore
        self.model: LoadedModel | None = restored.model
        self.shadow: LoadedModel | None = restored.shadow
        self._expired_sha256 = restored.model.sha256 if restored.model is not None and restored.expired else None
        self._recorded: tuple[str | None, bool] | None = None
        self._record_running()
        self._outbox_thread = threading.Thread(target=self._drain_outbox, name="outbox", daemon=True)
        self.local = open_local_action(config.local_action, self.device)
        """Outcomes and alerts delivered on the device (agent.local_action); None when not configured."""

    # lifecycle --------------------------------------------------------------------------------
    def start(self, connect_timeout_s: float = 2.0) -> None:
        """Start the outbox and the updater, and connect; an unreachable broker is not fatal (offline mode)."""
        self._outbox_thread.start()
        if self.local is not None:
            self.local.start()
        self.updater.start()
        try:
            self.link.start(connect_timeout_s)
        except TransportError as exc:  # the network thread keeps trying: run offline meanwhile
            log.warning("starting offline: %s", exc)
        self.report()

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop the loop, give the outbox time to deliver what is queued, and disconnect."""
        self._stop.set()
        deadline = time.monotonic() + drain_timeout_s
        while self.state.pending_count() and time.monotonic() < deadline:
            self._outbox_wake.set()
            time.sleep(0.05)
        self.updater.stop()
        self.report()
        time.sleep(0.1)
        self.link.stop()
        self._outbox_exit.set()  # nothing more can be delivered: what is left stays queued on disk for the next start
        self._outbox_wake.set()
        self._outbox_thread.join(timeout=5)
        self._record_wire()
        if self.local is not None:
            self.local.close()
        self.state.close()

    def request_stop(self) -> None:
        self._stop.set()

    def _device_key(self) -> str | None:
        """This device's public key (the key pair is made at the first start; encrypted models are wrapped for
        it); None when it cannot be written (the device then takes clear models only, and says why)."""
        try:
            return device_public_key(self.config.data_dir)
        except (OSError, ValueError) as exc:
            log.error("no device key pair, encrypted models cannot be installed: %s", exc)
            return None

    # trust and models -------------------------------------------------------------------------
    def keyring(self) -> Keyring:
        """The pinned keys from the credentials, as changed by every verified rotation and revocation."""
        from edgefleet.core.keys import Keyring

        stored = self.state.get(KEYRING_KEY)
        ring = Keyring.from_json(stored) if stored else Keyring()
        return ring.with_pinned(self.config.trusted_keys.values())

    def trust_spec(self) -> TrustSpec:
        """What the device trusts, as plain data (see :func:`edgefleet.agent.verify.trust_state`)."""
        floor = time_floor(self.state)
        return TrustSpec(pinned=tuple(self.config.trusted_keys.values()), keyring=self.state.get(KEYRING_KEY),
                         highest_release=self.state.highest_releases(), hardware=self.config.hardware,
                         agent_version=__version__, device_id=self.device,
                         accepted_versions=accepted_versions(self.state),
                         time_floor=floor.isoformat() if floor is not None else None,
                         now=device_clock().isoformat(), runtimes=self.config.runtimes)

    def trust(self, *, accepted_before: bool = False) -> TrustState:
        """What new bundles are checked against; ``accepted_before`` admits retired keys for the device's own."""
        return trust_state(self.trust_spec(), accepted_before=accepted_before)

    def apply_statements(self, statements: list[str]) -> None:
        """Key rotations and revocations from the control plane; each is verified against the keyring. The
        same list again (a retained desired state at every reconnect) is not verified again."""
        pinned = sorted(key.to_text() for key in self.config.trusted_keys.values())
        digest = hashlib.sha256(json.dumps([statements, pinned]).encode()).hexdigest()
        if self.state.get(STATEMENTS_KEY) == digest:
            return
        from edgefleet.core.keys import parse_statement

        ring = self.keyring()
        issued: list[object] = []  # the signed times of the statements verified now raise the time floor
        for text in statements:
            try:
                data = base64.b64decode(text, validate=True)
                changed = ring.apply_statement(data)
            except (BundleError, binascii.Error, ValueError) as exc:
                self.event("statement_refused", {"error": str(exc)[:200]})
                continue
            if changed != ring:
                issued.append(parse_statement(data).signed.get("issued"))
            ring = changed
        raise_floor(self.state, issued)
        if ring != self.keyring():
            self.state.put(KEYRING_KEY, ring.to_json())
            self.event("keyring_changed", {"trusted": ",".join(sorted(ring.trusted()))})
        self.state.put(STATEMENTS_KEY, digest)

    def _restore(self, slot_name: str) -> LoadedModel | None:
        """Load a model the device accepted earlier (its signature, hashes and expiry are checked again)."""
        try:
            loaded = self._restorer.load(slot_name)
        except SlotRefused as exc:
            log.error("cannot restore %s model %s: %s", slot_name, exc.slot.ref, exc)
            return None
        return loaded[0] if loaded is not None else None

    def _activate(self, model: LoadedModel) -> None:
        self._consecutive_failures = 0
        self.model = model
        info = model.manifest
        remember_bundle(self.state, model.sha256, info.name, info.release, info.version)

    def _set_shadow(self, model: LoadedModel | None) -> None:
        self.shadow = model
        if model is not None:
            info = model.manifest
            remember_bundle(self.state, model.sha256, info.name, info.release, info.version, active=False)

    def _roll_back(self, reason: str) -> None:
        """The active model keeps failing: return to the previous one and never reinstall the failed one."""
        failed = self.state.slot("active")
        restored = self.state.roll_back()
        model = self._restore("active") if restored else None
        if failed is None or model is None:
            self.event("rollback_impossible", {"reason": reason, "model": failed.ref if failed else None})
            self._consecutive_failures = 0
            return
        self.updater.remember_failed(failed.sha256)
        self.model = model
        self._consecutive_failures = 0
        self.state.put("last_error", f"{failed.ref} rolled back: {reason}")
        self.event("rolled_back", {"from": failed.ref, "to": model.ref, "reason": reason})
        self.report()

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic != topics.desired(self.device):
            return
        try:
            desired = parse(DesiredUpdate, payload)
        except TransportError as exc:
            self.event("rejected_desired", {"error": str(exc)})
            return
        if desired.device == self.device:
            self.telemetry_hint_s = desired.telemetry_interval_s
            if desired.statements:
                self.apply_statements(desired.statements)
            if desired.mqtt_url:
                self._remember_broker(desired.mqtt_url)
            self.updater.request(desired.model, desired.shadow)

    def _remember_broker(self, url: str) -> None:
        """Keep the broker address the server gives; it is dialled from the next start (see agent.config)."""
        try:
            kept = remember_broker(self.config.data_dir, url, self.config.mqtt)
        except (EdgefleetError, OSError) as exc:
            self.event("rejected_broker", {"error": str(exc)})
            return
        if kept is not None:
            log.info("broker address %s kept: dialled from the next start", kept)
            self.event("broker_address", {"url": kept})

    # uplink -----------------------------------------------------------------------------------
    def event(self, name: str, detail: dict[str, Any], *, ts: float | None = None) -> None:
        """Queue an ``Event`` message (its schema: :class:`edgefleet.transport.schemas.Event`). An event the
        outbox refuses (it cannot write) is held in memory (the last :data:`HELD_EVENTS`) and queued once it
        accepts again, followed by an ``outbox_refused`` event that counts the refusals."""
        kind = "alert" if name == "alert" else "agent" if name == "outbox_refused" else "update"
        at = time.time() if ts is None else ts
        if self.state.enqueue(topics.events(self.device), "events", lambda seq: encode(
                {"device": self.device, "seq": seq, "ts": round(at, 3), "kind": kind, "name": name,
                 "detail": event_detail(detail)}), priority=PRIORITY_ALERT if kind == "alert" else PRIORITY_NORMAL
        ) is None:
            self._held_events.append((name, detail, at))
            return
        self._queued()

    def report(self) -> None:
        """Publish the ``ReportedState`` (schema: :class:`edgefleet.transport.schemas.ReportedState`).

        The slots say what the device has accepted; ``running`` says what it runs (absent: nothing), and
        ``active_expired`` whether that model's signed expiry has passed (it runs on: see agent.restore).
        """
        active, previous, shadow = self.state.slot("active"), self.state.slot("previous"), self.state.slot("shadow")
        running, expired = self._record_running()
        reported = self._report_changes.encode({"device": self.device, "agent_version": __version__,
                           "active": active.ref if active else None,
                           "active_sha256": active.sha256 if active else None,
                           "previous": previous.ref if previous else None,
                           "shadow": shadow.ref if shadow else None,
                           "running": running, "active_expired": expired,
                           "hardware": self.config.hardware, "profile": self.config.profile,
                           "runtimes": list(self.config.runtimes),
                           "update_state": self.state.get(STEP_KEY, "idle"),
                           "last_error": self.state.get(ERROR_KEY), "public_key": self.public_key,
                           "facts": self._facts,
                           "ts": round(time.time(), 3)})
        self.link.publish(topics.reported(self.device), compact.pack("reported", reported), qos=1, retain=True)

    def _record_running(self) -> tuple[str | None, bool]:
        """What runs now and whether it runs expired, also kept in the state for ``edgefleet agent status``."""
        model = self.model
        current = (model.ref if model is not None else None,
                   model is not None and model.sha256 == self._expired_sha256)
        if current != self._recorded:
            try:
                self.state.put(RUNNING_KEY, current[0])
                self.state.put(EXPIRED_KEY, current[1])
                self.state.put(RUNNING_PID_KEY, os.getpid())
                self._recorded = current
            except (OSError, sqlite3.Error) as exc:  # status is best effort; the report itself still goes out
                log.warning("cannot record the running model: %s", exc)
        return current

    def _drain_outbox(self) -> None:
        while True:
            self._outbox_wake.wait(timeout=1.0)
            self._outbox_wake.clear()
            if self._outbox_exit.is_set():
                return
            try:
                if self._stop.is_set() and not self.state.pending_count():
                    return
                if not self.link.connected:
                    continue
                for item in self.state.pending():
                    try:
                        self.link.publish_and_wait(item.topic, compact.pack(item.topic.rsplit("/", 1)[-1],
                                                                            item.payload), qos=1, timeout_s=10.0)
                    except TransportError as exc:
                        log.info("outbox waits: %s", exc)
                        break
                    self.state.delivered(item.id)  # not written (disk full): sent again later, a duplicate
                    if self.state.priority_queued:  # an alert came in behind this backlog: it goes next
                        self._outbox_wake.set()
                        break
            except OSError as exc:  # the state database cannot be read or written now: try again
                log.warning("outbox waits for its database: %s", exc)
                if self._stop.is_set():
                    return

    def _flush(self, pipeline: InferencePipeline | None, source: SensorSource) -> None:
        skipped = source.skipped - self._skipped_reported
        if pipeline is None or not (pipeline.has_data or skipped):
            return
        self._skipped_reported = source.skipped
        try:
            dropped = self.state.counter("outbox_dropped")
        except OSError:  # the database cannot be read: the count comes with the next batch
            dropped = 0

        def payload(seq: int) -> bytes:
            batch = pipeline.take_batch(self.device, seq, time.time(), skipped)
            batch.outbox_dropped = dropped
            return batch.to_bytes()

        if self.state.enqueue(topics.telemetry(self.device), "telemetry", payload) is not None:
            self._queued()

    def _queued(self) -> None:
        """A message is in the outbox: wake its sender. After refusals (the outbox could not write), queue the
        events held meanwhile and say how many messages were refused."""
        self._outbox_wake.set()
        if refused := self.state.take_refusals_recovered():
            held = []
            while self._held_events:
                held.append(self._held_events.popleft())
            for name, detail, at in held:
                self.event(name, detail, ts=at)
            self.event("outbox_refused", {"refused": refused, "total": self.state.outbox_refused,
                                          "error": (self.state.last_refusal or "")[:200]})

    # inference --------------------------------------------------------------------------------
    def telemetry_interval_s(self) -> float:
        """How often telemetry goes out now: the device's interval, or the rollout's if it asks for a shorter one."""
        hint = self.telemetry_hint_s
        return self.config.telemetry_interval_s if hint is None else min(self.config.telemetry_interval_s, hint)

    def holds_events(self) -> bool:
        """Whether events the outbox could not take (a full disk) are held in memory, waiting to be queued."""
        return bool(self._held_events)

    def _hand_over(self, restart_when: Callable[[], bool] | None) -> bool:
        """After a model change: whether the process will restart (``restart_when`` turns true once the updater
        is done, within :data:`HAND_OVER_WAIT_S`), so the new model runs only in the fresh process and a replay
        is not inferred twice."""
        if restart_when is None:
            return False
        deadline = time.monotonic() + HAND_OVER_WAIT_S
        while not self._stop.is_set():
            if restart_when():
                return True
            if time.monotonic() >= deadline:
                return False
            self._stop.wait(0.05)
        return False

    def _record_wire(self) -> None:
        try:
            self.state.put(WIRE_KEY, WIRE.snapshot())
        except (OSError, sqlite3.Error) as exc:
            log.warning("cannot record the wire byte counts: %s", exc)

    def run(self, source: SensorSource, duration_s: float | None = None, *,
            restart_when: Callable[[], bool] | None = None) -> None:
        """Infer on every window of ``source`` until it ends, ``duration_s`` passes, or a stop is requested.

        The source is read in blocks (what it has at once: one sample from a live sensor, more from a replay or
        a sensor FIFO); the checks below run once per block, the windowing once per block, inference per window.
        ``restart_when`` is asked about once a second, between blocks: True ends the run with
        ``restart_requested`` set (the process entry then re-executes itself, see :mod:`edgefleet.agent.main`).
        """
        started = time.monotonic()
        initial = self.model
        if source.waits_for_model:  # a replay starts with the first model, its windows aligned with its rows
            while self.model is None and not self._stop.is_set() and (
                    duration_s is None or time.monotonic() - started < duration_s):
                self._stop.wait(0.05)
            if self.model is not initial and self._hand_over(restart_when):
                self.restart_requested = True  # the replay starts in the restarted process, from its first row
                return
        last_flush = next_check = time.monotonic()
        model, shadow = self.model, self.shadow
        if model is not None:
            source.bind(model.pipeline.inputs)
        # -- sensing/edge filtering: tiered inference (None without --upstream) and imputing sources --------
        tiered = None
        if self.config.upstream_url:
            from edgefleet.agent.escalation import open_escalator

            tiered = open_escalator(self.config)
        options = PipelineOptions(hard_examples_per_hour=self.config.hard_examples_per_hour)
        pipeline = (InferencePipeline(model, shadow=shadow, escalator=tiered, source=source, sink=self.local,
                                      options=options) if model else None)
        stop = self._stop
        try:
            for block in source.blocks():
                now = time.monotonic()
                if stop.is_set() or (duration_s is not None and now - started >= duration_s):
                    break
                if self.model is not model or self.shadow is not shadow:  # flush what the old pair did
                    self._flush(pipeline, source)
                    if self._hand_over(restart_when):  # nothing of the new model runs in this process
                        self.restart_requested = True
                        break
                    model, shadow = self.model, self.shadow
                    if model is not None:
                        source.bind(model.pipeline.inputs)
                    pipeline = (InferencePipeline(model, shadow=shadow, escalator=tiered, source=source,
                                                  sink=self.local, options=options) if model else None)
                    if source.waits_for_model:  # a replay restarts at its next row: this block was cut for the
                        continue                # previous model
                if pipeline is not None:
                    outcomes = pipeline.push_block(block)
                    if pipeline.alerts:  # -- sensing/edge filtering: alert events, already rate-limited per reason
                        for alert in pipeline.take_alerts():
                            self.event("alert", alert)
                    for outcome in outcomes:
                        self._consecutive_failures = self._consecutive_failures + 1 if outcome.failed else 0
                        if self._consecutive_failures >= self.config.failures_before_rollback:
                            self._roll_back(f"{self._consecutive_failures} inference failures in a row")
                            break
                if now - last_flush >= self.telemetry_interval_s():
                    self._flush(pipeline, source)
                    self._record_wire()
                    last_flush = now
                if restart_when is not None and now >= next_check:
                    next_check = now + RESTART_CHECK_S
                    if restart_when():
                        self.restart_requested = True
                        break
        finally:  # the last batch, also when the source or the loop fails
            self._flush(pipeline, source)
        if tiered is not None:  # -- sensing/edge filtering: stop retrying escalations (the queue stays on disk)
            tiered.close()
