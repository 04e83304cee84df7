"""The agent's update path: desired state -> download -> verify -> stage -> health check -> [shadow] -> activate.

Any failure leaves the active model in place and is reported with its reason. The pending target is kept
in the agent's state, so an agent killed at any step resumes (a download from where it stopped). A model that
was rolled back after activation is remembered and not installed again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgefleet.agent.fetch import Fetcher
from edgefleet.agent.healthcheck import DEFAULT_COMMAND, run_health_check
from edgefleet.agent.model import LoadedModel, load_model
from edgefleet.agent.state import AgentState, Slot
from edgefleet.errors import BundleError, EdgefleetError, TransportError
from edgefleet.transport.messages import ModelTarget
from edgefleet.transport.retry import Backoff

if TYPE_CHECKING:  # loaded when an update is verified, not before: the idle agent stays small
    from edgefleet.core.update import AcceptedBundle, TrustState
    from edgefleet.transport.messages import ModelRef

    Target = ModelRef | ModelTarget

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, str | int | float | None]], None]
PENDING_KEY = "pending_update"
SHADOW_KEY = "pending_shadow"
STEP_KEY = "update_state"
ERROR_KEY = "last_error"
FAILED_KEY = "failed_models"
FAULT_PAUSE_ENV = "EDGEFLEET_FAULT_PAUSE"  # "STEP:SECONDS": hold at a step, for the fault-injection tests


@dataclass(frozen=True)
class HealthPolicy:
    """How candidates are checked before they may run."""

    timeout_s: float = 30.0
    latency_budget_ms: float | None = None
    command: Sequence[str] = DEFAULT_COMMAND


class Updater:
    """Runs updates on its own thread, one at a time; the newest desired state wins."""

    def __init__(self, state: AgentState, fetcher: Fetcher, trust: Callable[[], TrustState],
                 activate: Callable[[LoadedModel], None], event: EventSink, changed: Callable[[], None], *,
                 set_shadow: Callable[[LoadedModel | None], None] | None = None,
                 health: HealthPolicy = HealthPolicy()) -> None:
        self._state = state
        self._fetcher = fetcher
        self._trust = trust
        self._activate = activate
        self._set_shadow = set_shadow or (lambda _model: None)
        self._event = event
        self._changed = changed
        self._health = health
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="updater", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if self._state.get(PENDING_KEY) or self._state.get(SHADOW_KEY):
            self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def request(self, target: Target | None, shadow: Target | None = None) -> None:
        """Record the desired model (and shadow candidate); the update thread takes it from there."""
        active = self._state.slot("active")
        if target is None or (active is not None and active.sha256 == target.sha256):
            self._state.put(PENDING_KEY, None)
            if self._state.get(STEP_KEY, "idle") != "idle":  # killed after activating, before saying so
                self._step("idle")
        elif target.sha256 in self._state.get(FAILED_KEY, []):
            self._state.put(PENDING_KEY, None)
            self._step("idle", error=f"{target.ref} was rolled back on this device; not installing it again",
                       refused=target.ref, reason="failed_before")
        else:
            self._state.put(PENDING_KEY, _target_json(target))
        current_shadow = self._state.slot("shadow")
        if shadow is None or (current_shadow is not None and current_shadow.sha256 == shadow.sha256):
            self._state.put(SHADOW_KEY, None)
            if shadow is None and current_shadow is not None:
                self._state.set_shadow(None)
                self._set_shadow(None)
                self._changed()
        else:
            self._state.put(SHADOW_KEY, _target_json(shadow))
        self._wake.set()

    def remember_failed(self, sha256: str) -> None:
        failed = [s for s in self._state.get(FAILED_KEY, []) if s != sha256][-15:]
        self._state.put(FAILED_KEY, [*failed, sha256])

    def _loop(self) -> None:
        backoff = Backoff(base_s=1.0, cap_s=60.0)
        delay: float | None = None
        while not self._stop.is_set():
            self._wake.wait(timeout=delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            pending, shadow = self._state.get(PENDING_KEY), self._state.get(SHADOW_KEY)
            try:
                if pending:
                    self.install(ModelTarget.from_wire(pending))
                elif shadow:
                    self.install_shadow(ModelTarget.from_wire(shadow))
                backoff.reset()
                delay = 0.0 if (self._state.get(PENDING_KEY) or self._state.get(SHADOW_KEY)) else None
            except TransportError as exc:  # the network: try again later, keep the partial download
                log.warning("update waits: %s", exc)
                self._step("idle", error=str(exc))
                delay = backoff.next_delay()

    def install(self, target: Target) -> None:
        """One update attempt. Refusals are final for this target; transport errors propagate for a retry."""
        try:
            accepted = self._verified(target)
            self._state.stage(Slot(accepted.sha256, accepted.manifest.ref))
            self._step("staged", target=target.ref)
            model = self._checked(accepted, target)
            self._step("activating", target=target.ref)
            self._state.activate_candidate(accepted.manifest.name, accepted.manifest.release)
            self._activate(model)
            self._state.put(PENDING_KEY, None)
            self._step("idle", activated=target.ref)
        except TransportError:
            raise
        except EdgefleetError as exc:
            self._refuse(target, exc, PENDING_KEY)

    def install_shadow(self, target: Target) -> None:
        """Verify and health-check a shadow candidate; it then runs beside the active model and only reports."""
        try:
            accepted = self._verified(target)
            model = self._checked(accepted, target)
            self._state.set_shadow(Slot(accepted.sha256, accepted.manifest.ref))
            self._set_shadow(model)
            self._state.put(SHADOW_KEY, None)
            self._step("idle", shadowing=target.ref)
        except TransportError:
            raise
        except EdgefleetError as exc:
            self._refuse(target, exc, SHADOW_KEY)

    def _verified(self, target: Target) -> AcceptedBundle:
        stored = self._state.bundle_path(target.sha256)
        data = stored.read_bytes() if stored.exists() else self._download(target)
        self._step("verifying", target=target.ref)
        if hashlib.sha256(data).hexdigest() != target.sha256:
            raise BundleError("downloaded bundle does not match the announced SHA-256", reason="hash_mismatch")
        previous = self._state.slot("previous")  # going back one step is not a rollback attack
        try:
            order = base64.b64decode(target.rollback_order, validate=True) if target.rollback_order else None
        except (binascii.Error, ValueError) as exc:
            raise BundleError("rollback order is not base64", reason="malformed") from exc
        from edgefleet.core.update import decide

        accepted = decide(data, self._trust(), rollback_order=order,
                          allow_rollback=previous is not None and previous.sha256 == target.sha256)
        if not stored.exists():
            self._state.save_bundle(accepted.sha256, data)
        return accepted

    def _download(self, target: Target) -> bytes:
        """The delta against the active bundle when one is offered and applies cleanly; else the whole bundle."""
        self._step("downloading", target=target.ref)
        downloads = self._state.data_dir / "downloads"
        active = self._state.slot("active")
        if target.delta_url and active is not None and active.sha256 == target.delta_base_sha256:
            part = downloads / f"{target.sha256}.delta.part"
            from edgefleet.bundle.delta import apply as apply_delta

            try:
                delta = self._fetcher.fetch(target.delta_url, part, target.delta_size or target.size)
                rebuilt = apply_delta(self._state.bundle_path(active.sha256).read_bytes(), delta)
                if hashlib.sha256(rebuilt).hexdigest() == target.sha256:
                    self._event("delta_applied", {"target": target.ref, "bytes": len(delta), "full": target.size})
                    return rebuilt
                log.warning("delta for %s rebuilt the wrong bundle; fetching it whole", target.ref)
            except (BundleError, OSError) as exc:
                log.warning("delta for %s unusable (%s); fetching it whole", target.ref, exc)
            finally:
                part.unlink(missing_ok=True)
        part = downloads / f"{target.sha256}.part"
        data = self._fetcher.fetch(target.url, part, target.size)
        part.unlink(missing_ok=True)
        return data

    def _checked(self, accepted: AcceptedBundle, target: Target) -> LoadedModel:
        self._step("health_checking", target=target.ref)
        latency = run_health_check(accepted.model, accepted.manifest, self._state.data_dir / "health",
                                   timeout_s=self._health.timeout_s,
                                   latency_budget_ms=self._health.latency_budget_ms, command=self._health.command)
        log.info("%s passed its health check (%.3f ms per window)", target.ref, latency)
        return load_model(accepted)

    def _refuse(self, target: Target, exc: EdgefleetError, key: str) -> None:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        log.warning("refused %s (%s): %s", target.ref, reason, exc)
        if key == PENDING_KEY:
            self._state.drop_candidate()
        self._state.put(key, None)
        if all((slot := self._state.slot(name)) is None or slot.sha256 != target.sha256
               for name in ("active", "previous", "shadow")):
            self._state.bundle_path(target.sha256).unlink(missing_ok=True)
        self._step("idle", error=f"{target.ref} refused ({reason}): {exc}", refused=target.ref, reason=reason)

    def _step(self, step: str, *, error: str | None = None, **detail: str) -> None:
        self._state.put(STEP_KEY, step)
        if error is not None or "activated" in detail:
            self._state.put(ERROR_KEY, error)
        name = next((k for k in ("refused", "activated", "shadowing") if k in detail), step)
        self._event(name, {**detail, "error": error} if error else dict(detail))
        self._changed()
        _fault_pause(step)


def _target_json(target: Target) -> dict[str, Any]:
    """A target (``ModelRef`` or :class:`ModelTarget`) as the JSON the pending update is kept as."""
    return {name: getattr(target, name) for name in ModelTarget.__dataclass_fields__}


def _fault_pause(step: str) -> None:
    """Hold at ``step`` when EDGEFLEET_FAULT_PAUSE names it (fault-injection tests kill the agent there)."""
    spec = os.environ.get(FAULT_PAUSE_ENV, "")
    name, _, seconds = spec.partition(":")
    if name == step:
        time.sleep(float(seconds or "30"))
