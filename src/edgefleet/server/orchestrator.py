"""The orchestrator: drives :mod:`edgefleet.core.rollout` from the store and the fleet's telemetry.

Each tick, for every running rollout: build an :class:`Observation` from the store (devices, what they
reported, their refusals, telemetry per device and model), run the pure state machine, and write its
decisions through :meth:`Store.advance_rollout`, which takes each step exactly once across replicas.
Desired states are then published to the devices that changed: every replica publishes what the store
says is unpublished, so a replica killed between commit and publish loses nothing (publishing a retained
desired state twice is harmless).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from sqlalchemy import Row

from edgefleet.core.rollout import (
    FINAL,
    DeviceView,
    Observation,
    RolloutPlan,
    RolloutState,
    Step,
    command,
    make_plan,
    start,
    step,
    telemetry_since,
)
from edgefleet.core.targeting import GENERIC_HARDWARE, fit_targets
from edgefleet.errors import ConfigError, EdgefleetError, StoreError
from edgefleet.learn.fielddata import add_field_labels
from edgefleet.learn.monitors import evaluate_monitors
from edgefleet.server.model_keys import ModelKeys
from edgefleet.server.schema import Device, ModelVersion, RolloutRow
from edgefleet.server.store import Advance, Store
from edgefleet.transport.messages import DesiredState, ModelRef

log = logging.getLogger(__name__)
MIN_TELEMETRY_HINT_S = 0.5
"""The shortest telemetry interval a rollout asks of a device."""
Publisher = Callable[[Sequence[DesiredState]], None]


def model_ref(model: ModelVersion, base_sha256: str | None = None, wrapped_key: str | None = None) -> ModelRef:
    """Where a device fetches ``model``; with the bundle it runs now (``base_sha256``), a delta is offered too,
    except for an encrypted model, which is sent whole with its key wrapped for the device (``wrapped_key``)."""
    ref = ModelRef(name=model.name, version=model.version, release=model.release, sha256=model.sha256,
                   size=model.size, url=f"/api/v1/artifacts/{model.sha256}", wrapped_key=wrapped_key)
    if base_sha256 and base_sha256 != model.sha256 and not model.manifest.get("encryption"):
        ref = ref.model_copy(update={"delta_url": f"/api/v1/artifacts/{model.sha256}/delta/{base_sha256}",
                                     "delta_base_sha256": base_sha256})
    return ref


def desired_message(device: Device | Row[Any], models: Mapping[int, ModelVersion],
                    keys: ModelKeys | None = None) -> DesiredState:
    """The desired state of a device; the shadow candidate is included once the message schema has the field.
    An encrypted model's key is wrapped for the device's public key by ``keys`` (never for a revoked device)."""

    def model_ref(model: ModelVersion, base: str | None = None) -> ModelRef:
        wrapped = None if keys is None else keys.wrap_for(model, device.id, getattr(device, "public_key", None),
                                                          revoked=bool(getattr(device, "revoked", False)))
        return _model_ref(model, base, wrapped)

    active = models.get(device.desired_model_id) if device.desired_model_id else None
    reported = getattr(device, "reported", None) or {}
    running = reported.get("active_sha256") if isinstance(reported, dict) else None
    known = {m.sha256 for m in models.values()}
    base = running if running in known else None
    fields: dict[str, Any] = {"device": device.id, "model": model_ref(active, base) if active else None}
    if "shadow" in DesiredState.model_fields:
        shadow = models.get(device.desired_shadow_id) if device.desired_shadow_id else None
        fields["shadow"] = model_ref(shadow) if shadow else None
    return DesiredState(**fields)


_model_ref = model_ref


class Orchestrator:
    """Creates rollouts, applies operator commands, and steps running rollouts on a background thread."""

    def __init__(self, store: Store, publish: Publisher, *, replica: str = "server", interval_s: float = 1.0,
                 clock: Callable[[], float] = time.time, raw_retention_s: float = 7 * 86400,
                 retention_s: float = 90 * 86400) -> None:
        self.store = store
        self._send = publish
        self._hinted: dict[str, float | None] = {}  # the telemetry interval each device was last told
        self.replica = replica
        self.interval_s = interval_s
        self.clock = clock
        self.raw_retention_s = raw_retention_s
        self.retention_s = retention_s
        self.steps_taken = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._publish_lock = threading.Lock()
        self._last_maintenance = 0.0
        self._last_housekeeping = 0.0
        self.housekeeping: Callable[[], None] | None = None
        self.model_keys: ModelKeys | None = None
        """Wraps encrypted models' keys for each device in its desired state (None: no keys are sent)."""

    # lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="orchestrator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def poke(self) -> None:
        """Step soon (new telemetry or a new rollout)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except EdgefleetError as exc:
                log.warning("orchestrator tick failed: %s", exc)
            except Exception:  # keep driving rollouts whatever one bad tick did
                log.exception("orchestrator tick crashed")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    # operator actions -------------------------------------------------------------------------
    def create(self, spec: Mapping[str, Any], actor: str = "operator") -> RolloutRow:
        """Validate a plan, choose targets and assign the first wave; ConfigError/StoreError say why not."""
        plan = make_plan(spec)
        model = self.store.model_by_ref(plan.candidate)
        if model is None:
            raise StoreError(f"unknown model {plan.candidate}: push it first")
        rollout_id = f"ro-{secrets.token_hex(4)}"
        now = self.clock()
        devices, skipped = fit_targets(plan, self._devices()[0], model.manifest)
        first = start(plan, rollout_id, devices, now)
        first.state.skipped = skipped
        self.store.create_rollout(rollout_id, plan.candidate, plan.to_json(), _advance(first), actor)
        self.publish_pending()
        self.poke()
        row = self.store.get_rollout(rollout_id)
        assert row is not None
        return row

    def command(self, rollout_id: str, action: Literal["pause", "resume", "abort"], actor: str = "operator",
                note: str = "") -> RolloutRow:
        row = self.store.get_rollout(rollout_id)
        if row is None:
            raise StoreError(f"unknown rollout {rollout_id}")
        devices, _ = self._devices()

        def compute(locked: RolloutRow) -> Advance:
            plan, state = make_plan(locked.plan), RolloutState.from_json(locked.state)
            return _advance(command(plan, state, action, self.clock(), devices, note or actor))

        for _ in range(5):  # lost a race with a replica's tick: read the new state and try again
            if self.store.advance_rollout(rollout_id, compute, actor, skip_locked=False) is not None:
                break
            latest = self.store.get_rollout(rollout_id)
            if latest is not None and latest.phase in FINAL:
                raise ConfigError(f"rollout {rollout_id} is already {latest.phase}")
        else:
            raise StoreError(f"rollout {rollout_id} is busy; try again")
        self.publish_pending()
        self.poke()
        latest = self.store.get_rollout(rollout_id)
        assert latest is not None
        return latest

    def promote(self, rollout_id: str, spec: Mapping[str, Any], actor: str = "operator") -> RolloutRow:
        """Start a canary rollout of a shadow rollout's candidate, once it has ``shadow-passed``: the same
        devices (selection and profile), the waves and options of ``spec``; without gates in ``spec``, the shadow
        rollout's gates that a canary can judge. ConfigError when the shadow rollout has not passed."""
        row = self.store.get_rollout(rollout_id)
        if row is None:
            raise StoreError(f"unknown rollout {rollout_id}")
        if row.phase != "shadow-passed":
            raise ConfigError(f"rollout {rollout_id} is {row.phase}: only a shadow rollout that passed "
                              "(shadow-passed) can be promoted")
        for other in self.store.list_rollouts():
            if other.plan.get("promoted_from") == rollout_id and other.phase not in ("aborted",):
                raise ConfigError(f"rollout {rollout_id} was already promoted: {other.id} ({other.phase})")
        shadow = make_plan(row.plan)
        gates = spec.get("gates") or [{"expr": r.gate.text, "action": r.action} for r in shadow.gates
                                      if "shadow_disagreement" not in r.gate.metrics]
        plan = {**{k: v for k, v in spec.items() if v is not None}, "candidate": shadow.candidate, "mode": "canary",
                "select": dict(shadow.select), "profile": shadow.profile, "gates": gates,
                "promoted_from": rollout_id}
        for key in ("confidence", "min_windows"):
            plan.setdefault(key, getattr(shadow, key))
        return self.create(plan, actor)

    # driving ----------------------------------------------------------------------------------
    def tick(self) -> int:
        """Step every running rollout once, publish changed desired states; return the steps taken."""
        taken = 0
        for row in self.store.active_rollouts():
            if row.phase == "paused":
                continue
            if self._step_one(row):
                taken += 1
        self.publish_pending()
        self.publish_telemetry_hints()
        evaluate_monitors(self)  # monitors after rollout (edgefleet.learn.monitors), when due
        self._maintenance()
        self.steps_taken += taken
        return taken

    # adaptive telemetry -----------------------------------------------------------------------
    def telemetry_hints(self) -> dict[str, float]:
        """How often each device a running rollout observes must report: a quarter of the rollout's window (at
        most every ``MIN_TELEMETRY_HINT_S``: a window of 0 judges at once), the shortest where several involve
        it. Observed: the devices its waves moved (the candidate active, or beside the active model in shadow
        mode) and, in A/B mode, the control half."""
        hints: dict[str, float] = {}
        for row in self.store.active_rollouts():
            interval = max(float(row.plan.get("window_s", 60.0)) / 4, MIN_TELEMETRY_HINT_S)
            for device in [*row.state.get("moved", {}), *row.state.get("control", [])]:
                hints[device] = min(interval, hints.get(device, interval))
        return hints

    def publish(self, states: Sequence[DesiredState]) -> None:
        """Publish desired states, each with the telemetry interval its device's rollouts ask for (None: none
        does, the device reports at its own interval)."""
        hints = self.telemetry_hints() if states else {}
        self._send([s.model_copy(update={"telemetry_interval_s": hints.get(s.device)}) for s in states])
        self._hinted.update((s.device, hints.get(s.device)) for s in states)

    def publish_telemetry_hints(self) -> int:
        """Publish the desired state again to every device whose telemetry interval changed (a wave moved it, its
        rollout ended); how many. A restarted server tells every observed device once more."""
        hints = self.telemetry_hints()
        changed = sorted(d for d in {*hints, *(d for d, v in self._hinted.items() if v is not None)}
                         if d not in self._hinted or hints.get(d) != self._hinted[d])
        if not changed:
            return 0
        with self._publish_lock:
            models = {m.id: m for m in self.store.list_models()}
            devices = [d for d in map(self.store.get_device, changed) if d is not None and not d.revoked]
            try:
                self.publish([desired_message(d, models, self.model_keys) for d in devices])
            except EdgefleetError as exc:
                log.warning("%d telemetry interval(s) not published yet: %s", len(devices), exc)
                return 0
            self._hinted.update((d, hints.get(d)) for d in changed)
            return len(devices)


    def _step_one(self, row: RolloutRow) -> bool:
        plan, state = make_plan(row.plan), RolloutState.from_json(row.state)
        obs = self.observe(plan, state)

        def compute(locked: RolloutRow) -> Advance | None:
            if locked.version != row.version:  # another replica stepped it since we looked: next tick
                return None
            result = step(plan, RolloutState.from_json(locked.state), obs)
            return _advance(result) if result.decisions else None

        return self.store.advance_rollout(row.id, compute, self.replica) is not None

    def observe(self, plan: RolloutPlan, state: RolloutState) -> Observation:
        """What the machine needs about the rollout's devices, from the store."""
        devices, _ = self._devices()
        involved = sorted({*state.targets, *state.control, *state.moved})
        since = telemetry_since(plan, state)
        primary, shadow = self.store.device_model_stats(involved, since)
        add_field_labels(primary, self.store.device_field_labels(involved, since))  # delayed labels (E8)
        refused = self.store.refused_models(state.moved, state.created)
        rolled_back = rolled_back_models(self.store.list_rollouts())
        for device_id in involved:
            view = devices.get(device_id)
            if view is None:
                continue
            shadow_running = view.shadow or (plan.candidate if plan.candidate in shadow.get(device_id, {}) else None)
            devices[device_id] = DeviceView(view.id, view.tags, view.profile, view.desired, view.active,
                                            shadow_running, frozenset(refused.get(device_id, ())), view.revoked)
        return Observation(self.clock(), devices, primary, shadow, rolled_back)

    def publish_pending(self) -> int:
        """Publish the desired state of every device whose desired model changed; return how many."""
        with self._publish_lock:
            pending = [d for d in self.store.desired_unpublished() if not d.revoked]
            if not pending:
                return 0
            models = {m.id: m for m in self.store.list_models()}
            try:
                self.publish([desired_message(d, models, self.model_keys) for d in pending])
            except EdgefleetError as exc:
                log.warning("%d desired state(s) not published yet: %s", len(pending), exc)
                return 0
            self.store.mark_published_many([(d.id, d.desired_rev) for d in pending])
            return len(pending)

    def _devices(self) -> tuple[dict[str, DeviceView], dict[int, ModelVersion]]:
        models = {m.id: m for m in self.store.list_models()}

        def ref(model_id: int | None) -> str | None:
            model = models.get(model_id) if model_id is not None else None
            return f"{model.name}@{model.version}" if model else None

        views = {}
        for d in self.store.device_views():
            reported = d.reported or {}
            shadow = reported.get("shadow")
            running = reported["running"] if "running" in reported else reported.get("active")
            runtimes = reported.get("runtimes")
            views[d.id] = DeviceView(d.id, dict(d.tags or {}), d.profile, ref(d.desired_model_id),
                                     running, shadow if isinstance(shadow, str) else None, frozenset(), d.revoked,
                                     str(reported.get("hardware") or d.hardware or GENERIC_HARDWARE),
                                     frozenset(map(str, runtimes)) if isinstance(runtimes, list) else None)
        return views, models

    def _maintenance(self) -> None:
        now = self.clock()
        if self.housekeeping is not None and now - self._last_housekeeping >= 5.0:
            self._last_housekeeping = now
            self.housekeeping()
        if now - self._last_maintenance < 600:
            return
        self._last_maintenance = now
        moved = self.store.compact_telemetry(now - self.raw_retention_s)
        purged = self.store.purge_telemetry(now - self.retention_s)
        if moved or purged:
            log.info("telemetry retention: %d batches rolled up, %d old rows purged", moved, purged)


def rolled_back_models(rows: Sequence[RolloutRow]) -> frozenset[str]:
    """Candidates that a rollout rolled back off active devices and that no later rollout completed since."""
    out: set[str] = set()
    for row in sorted(rows, key=lambda r: r.created):
        if row.phase == "aborted" and row.plan.get("mode") != "shadow":
            out.add(row.candidate)
        elif row.phase == "done":
            out.discard(row.candidate)
    return frozenset(out)


def _advance(result: Step) -> Advance:
    return Advance(result.state.to_json(), result.state.phase, result.state.step_no, result.wake_at,
                   result.decisions)


def rollout_json(row: RolloutRow, store: Store, *, audit: bool = True) -> dict[str, Any]:
    """A rollout's status for the API: plan, phase, progress and (optionally) its audit trail."""
    state = row.state
    data: dict[str, Any] = {
        "id": row.id, "candidate": row.candidate, "phase": row.phase, "created": row.created,
        "updated": row.updated, "wave": state.get("wave", -1) + 1, "waves": len(row.plan.get("waves", [])),
        "mode": row.plan.get("mode"), "targets": len(state.get("targets", [])),
        "control": len(state.get("control", [])), "moved": len(state.get("moved", {})),
        "reason": state.get("reason", ""), "skipped": state.get("skipped", []),
        "plan": row.plan, "promoted_from": row.plan.get("promoted_from"),
    }
    if row.plan.get("mode") == "ab":
        data["treatment_devices"] = list(state.get("targets", []))
        data["control_devices"] = list(state.get("control", []))
    if audit:
        data["decisions"] = [{"step": d.step_no, "kind": d.kind, "at": d.at, "wave": d.wave + 1, "reason": d.reason,
                              "actor": d.actor, "devices": d.detail.get("devices", []),
                              "model": d.detail.get("model"), "role": d.detail.get("role", "active"),
                              "values": d.detail.get("values", {})}
                             for d in store.decisions(row.id)]
        data["wave_devices"] = {w.wave + 1: w.devices for w in store.waves(row.id)}
    return data
