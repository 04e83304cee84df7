"""The agent's update path: desired state -> download -> verify -> stage -> health check -> activate.

Any failure leaves the active model in place and is reported with its reason. The pending target is kept
in the agent's state, so an agent killed mid-update resumes (the download from where it stopped).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable

from edgefleet.agent.fetch import Fetcher
from edgefleet.agent.model import LoadedModel, health_check, load_model
from edgefleet.agent.state import AgentState, Slot
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import BundleError, EdgefleetError, TransportError
from edgefleet.transport.messages import ModelRef

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, str | int | float | None]], None]
PENDING_KEY = "pending_update"
STEP_KEY = "update_state"
ERROR_KEY = "last_error"


class Updater:
    """Runs updates on its own thread, one at a time, newest desired state wins."""

    def __init__(self, state: AgentState, fetcher: Fetcher, trust: Callable[[], TrustState],
                 activate: Callable[[LoadedModel], None], event: EventSink,
                 changed: Callable[[], None]) -> None:
        self._state = state
        self._fetcher = fetcher
        self._trust = trust
        self._activate = activate
        self._event = event
        self._changed = changed
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="updater", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if self._state.get(PENDING_KEY):
            self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def request(self, target: ModelRef | None) -> None:
        """Record the desired model; the update thread takes it from there."""
        active = self._state.slot("active")
        if target is None or (active is not None and active.sha256 == target.sha256):
            self._state.put(PENDING_KEY, None)
            return
        self._state.put(PENDING_KEY, target.model_dump(mode="json"))
        self._wake.set()

    def _loop(self) -> None:
        retry_s: float | None = None
        while not self._stop.is_set():
            self._wake.wait(timeout=retry_s)
            self._wake.clear()
            pending = self._state.get(PENDING_KEY)
            if self._stop.is_set() or not pending:
                retry_s = None
                continue
            target = ModelRef.model_validate(pending)
            try:
                self.install(target)
                retry_s = None
            except TransportError as exc:  # the network: try again later, keep the partial download
                log.warning("update to %s waits: %s", target.ref, exc)
                self._step("idle", error=str(exc))
                retry_s = min((retry_s or 0.5) * 2, 60.0)

    def install(self, target: ModelRef) -> None:
        """One update attempt. Refusals are final for this target; transport errors propagate for a retry."""
        part = self._state.data_dir / "downloads" / f"{target.sha256}.part"
        try:
            self._step("downloading", target=target.ref)
            data = self._fetcher.fetch(target.url, part, target.size)
            self._step("verifying", target=target.ref)
            if hashlib.sha256(data).hexdigest() != target.sha256:
                part.unlink(missing_ok=True)
                raise BundleError("downloaded bundle does not match the announced SHA-256", reason="hash_mismatch")
            accepted = decide(data, self._trust())
            self._state.save_bundle(accepted.sha256, data)
            self._state.stage(Slot(accepted.sha256, accepted.manifest.ref))
            part.unlink(missing_ok=True)
            self._step("health_checking", target=target.ref)
            model = load_model(accepted)
            health_check(model)
            self._step("activating", target=target.ref)
            self._state.activate_candidate(accepted.manifest.name, accepted.manifest.release)
            self._activate(model)
            self._state.put(PENDING_KEY, None)
            self._step("idle", activated=target.ref)
        except TransportError:
            raise
        except EdgefleetError as exc:
            reason = getattr(exc, "reason", type(exc).__name__)
            log.warning("refused %s (%s): %s", target.ref, reason, exc)
            self._state.drop_candidate()
            self._state.put(PENDING_KEY, None)
            self._step("idle", error=f"{target.ref} refused ({reason}): {exc}", refused=target.ref, reason=reason)

    def _step(self, step: str, *, error: str | None = None, **detail: str) -> None:
        self._state.put(STEP_KEY, step)
        if error is not None or "activated" in detail:
            self._state.put(ERROR_KEY, error)
        name = "refused" if "refused" in detail else ("activated" if "activated" in detail else step)
        self._event(name, {**detail, "error": error} if error else dict(detail))
        self._changed()
