"""Start-up: the models the agent runs, restored from its slots, and what it records about them.

At start each slot's bundle is checked again as it was checked at install (:func:`edgefleet.agent.verify.
verify_stored`: signature against the current keyring and revocations, hashes, the model's safety), at the
time :func:`edgefleet.agent.accepted.device_clock` reads, never before the time floor. Then:

- **The active model keeps running when it has only expired.** Its signed expiry passing while it runs (or the
  clock catching up with it) must not stop inference at the next restart: the device keeps the model it already
  accepted, raises an event ``model_expired`` and reports ``active_expired: true`` until an update replaces it.
  Expiry still refuses every new bundle, and the previous model as a fallback.
- **Any other failure refuses it** (revoked or unknown key, a changed file, a missing one, ...): an event
  ``restore_failed`` with the reason, the key-value entry ``slot_error:<slot>`` saying why, and ``last_error``.
  The previous model runs instead if it passes the full check; the slots then move back (previous -> active,
  one transaction) and the refused bundle is never installed again. If nothing passes, nothing runs, and the
  agent says so (``running`` is null) while the slot keeps the record of what was accepted.
- A check that could not run at all (reason ``verify_failed``: the verification child timed out or crashed)
  changes no slot: the next start tries again.
- A shadow candidate is dropped (its slot cleared) on any failure, expiry included.

Whatever runs is then what the agent reports (``running``) and what ``edgefleet agent status`` prints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.agent.accepted import raise_floor, remember_version
from edgefleet.agent.model import LoadedModel, make_model
from edgefleet.agent.state import DEVICE_KEY_FILE, AgentState, Slot
from edgefleet.agent.verify import StoredKey, TrustSpec, Verified, verify_stored
from edgefleet.errors import EdgefleetError

log = logging.getLogger(__name__)

SLOT_ERROR = "slot_error:"
"""Key-value prefix: ``slot_error:active`` says why that slot's model did not run at the last start (or null)."""
ERROR_KEY = "last_error"
TRANSIENT = frozenset({"verify_failed"})

Events = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class Restored:
    """What runs after start-up: the model (None: nothing), the shadow, and whether the model has expired."""

    model: LoadedModel | None
    shadow: LoadedModel | None
    expired: bool = False


class SlotRefused(Exception):
    """A slot's bundle did not pass its re-check (internal: carries the reason and whether it is final)."""

    def __init__(self, slot: Slot, reason: str, message: str) -> None:
        super().__init__(message)
        self.slot, self.reason = slot, reason

    @property
    def final(self) -> bool:
        return self.reason not in TRANSIENT


class Restorer:
    """Loads slots again; ``at_start`` applies the policy above, ``load`` is the plain full check."""

    def __init__(self, state: AgentState, spec: Callable[[], TrustSpec], event: Events,
                 remember_failed: Callable[[str], None],
                 verify: Callable[..., Verified] = verify_stored, providers: Sequence[str] = ()) -> None:
        self._state = state
        self._providers = tuple(providers)
        self._spec = spec
        self._event = event
        self._remember_failed = remember_failed
        self._verify = verify

    def load(self, slot_name: str, *, allow_expired: bool = False) -> tuple[LoadedModel, Verified] | None:
        """The slot's model after its full re-check (None for an empty slot); SlotRefused when it fails."""
        slot = self._state.slot(slot_name)
        if slot is None:
            return None
        try:
            data = self._state.bundle_path(slot.sha256).read_bytes()
            options: dict[str, Any] = {"allow_expired": allow_expired}
            wrapped = self._state.wrapped_key(slot.sha256)
            if wrapped is not None:  # an encrypted model: the child unwraps its key and decrypts it in memory
                options["stored_key"] = StoredKey(wrapped, str(self._state.data_dir / DEVICE_KEY_FILE))
            verified = self._verify(data, self._spec(), **options)
            model = make_model(verified.info, verified.sha256, verified.model, self._providers)
        except FileNotFoundError as exc:
            raise SlotRefused(slot, "missing_bundle", f"its bundle file is gone ({exc.filename})") from exc
        except OSError as exc:
            raise SlotRefused(slot, "unreadable", f"its bundle cannot be read: {exc.strerror or exc}") from exc
        except EdgefleetError as exc:
            raise SlotRefused(slot, getattr(exc, "reason", None) or type(exc).__name__, str(exc)) from exc
        raise_floor(self._state, [verified.created])
        return model, verified

    def at_start(self) -> Restored:
        """The active (or previous) model and the shadow, by the start-up policy."""
        model, expired = self._active()
        return Restored(model, self._shadow(), expired)

    def _active(self) -> tuple[LoadedModel | None, bool]:
        try:
            loaded = self.load("active", allow_expired=True)
        except SlotRefused as refused:
            return self._fall_back(refused), False
        if loaded is None:
            return None, False
        model, verified = loaded
        self._clear_error("active")
        remember_version(self._state, verified.info.name, verified.info.release, verified.info.version)
        if verified.expired:
            log.warning("active model %s has expired; it keeps running until an update replaces it", model.ref)
            self._event("model_expired", {"model": model.ref, "sha256": model.sha256})
        return model, verified.expired

    def _fall_back(self, refused: SlotRefused) -> LoadedModel | None:
        """The active model was refused: run the previous one if it passes, and say what happened."""
        try:
            loaded = self.load("previous")
        except SlotRefused as also:
            self._record("previous", also, None)
            loaded = None
        model = loaded[0] if loaded is not None else None
        if model is not None and refused.final:
            self._state.roll_back()
            self._remember_failed(refused.slot.sha256)
        self._record("active", refused, model)
        return model

    def _shadow(self) -> LoadedModel | None:
        try:
            loaded = self.load("shadow")
        except SlotRefused as refused:
            if refused.final:
                self._state.set_shadow(None)
            self._record("shadow", refused, None)
            return None
        if loaded is not None:
            self._clear_error("shadow")
        return loaded[0] if loaded is not None else None

    def _clear_error(self, slot_name: str) -> None:
        """Forget an earlier start's refusal of the slot; nothing is written when there is none (a start on a
        full disk must not fail here)."""
        if self._state.get(SLOT_ERROR + slot_name) is not None:
            self._state.put(SLOT_ERROR + slot_name, None)

    def _record(self, slot_name: str, refused: SlotRefused, fallback: LoadedModel | None) -> None:
        instead = f"; running {fallback.ref} instead" if fallback is not None else "; running nothing"
        line = f"{refused.slot.ref} ({slot_name}) refused at start ({refused.reason}): {refused}"
        log.error("%s%s", line, instead if slot_name == "active" else "")
        self._state.put(SLOT_ERROR + slot_name, line[:500])
        if slot_name == "active":
            self._state.put(ERROR_KEY, (line + instead)[:500])
        self._event("restore_failed", {"slot": slot_name, "model": refused.slot.ref, "sha256": refused.slot.sha256,
                                       "reason": refused.reason, "error": str(refused)[:200],
                                       "running": fallback.ref if fallback is not None else None})
