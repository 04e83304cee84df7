"""The agent's update path: desired state -> download -> verify -> stage -> health check -> [shadow] -> activate.

Any failure leaves the active model in place and is reported with its reason. The pending target is kept
in the agent's state, so an agent killed at any step resumes (a download from where it stopped). A model that
was rolled back after activation is remembered and not installed again.

Downloads are bounded by the fetcher's :class:`~edgefleet.agent.fetch.DownloadLimits` (size, free disk, deadline,
minimum rate); a newer desired state cancels a download in progress that it no longer wants. A full disk or an
I/O error at any step (download, staging, health check, the state database) ends the attempt as a refusal
with reason ``disk_full`` or ``io_error``: the candidate and its files are removed, the active model keeps
running, the step returns to ``idle`` with the error (written as soon as the database can write again), and the
next desired state tries again. Partial downloads and bundles that neither a slot nor a pending target holds are
removed when the updater starts and after every attempt.

An encrypted model (:mod:`edgefleet.bundle.encrypt`) comes with its model key wrapped for this device
(``wrapped_key`` in the target, :mod:`edgefleet.bundle.keywrap`): it is unwrapped with the device's private key
and the model decrypted in memory only; the health check gets the plaintext through a pipe. The wrapped key is
kept with the slot (``wrapped_key:<sha256>`` in the state) so that the model can be restored at the next start.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.agent.fetch import Download, DownloadCancelled, Fetcher
from edgefleet.agent.healthcheck import DEFAULT_COMMAND, run_health_check
from edgefleet.agent.model import LoadedModel, load_model
from edgefleet.agent.state import SLOTS, AgentState, Slot, device_private_key
from edgefleet.errors import BundleError, EdgefleetError, TransportError
from edgefleet.storage import atomic_write
from edgefleet.transport.messages import ModelTarget
from edgefleet.transport.retry import Backoff

if TYPE_CHECKING:  # loaded when an update is verified, not before: the idle agent stays small
    from edgefleet.bundle.encrypt import ModelKey
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
UNSAVED_RETRY_S = 5.0
"""How soon the update state the database could not write is written again."""


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
                 health: HealthPolicy = HealthPolicy(), providers: Sequence[str] = ()) -> None:
        self._state = state
        self._providers = tuple(providers)
        """ONNX Runtime execution providers to prefer for the models it loads (agent config ``providers``)."""
        self._fetcher = fetcher
        self._trust = trust
        self._activate = activate
        self._set_shadow = set_shadow or (lambda _model: None)
        self._event = event
        self._changed = changed
        self._health = health
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._guard = threading.Lock()  # the pending targets and the download in progress change together
        self._fetching: dict[str, Any] | None = None  # the target being downloaded, as it is kept
        self._given_up: dict[str, dict[str, Any]] = {}  # refused here; kept pending only by a failed write
        self._requests = 0  # requests recorded so far; a round notes how many it started after
        self._round_after: int | None = None
        self._unsaved: dict[str, Any] = {}
        self._saving = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="updater", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._wake.set()  # the thread collects garbage, then resumes a pending update

    def stop(self) -> None:
        self._stop.set()
        self._cancel.set()  # a download in progress ends at its next chunk (it resumes after a restart)
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def request(self, target: Target | None, shadow: Target | None = None) -> None:
        """Record the desired model (and shadow candidate); the update thread takes it from there. A download in
        progress that neither wants any more is cancelled. A database that cannot write leaves the request
        unrecorded (logged): the next desired state is recorded instead."""
        try:
            with self._guard:
                self._request(target, shadow)
                self._requests += 1
                if self._fetching is not None and not self._wanted(self._fetching):
                    self._cancel.set()
        except OSError as exc:
            log.warning("cannot record the desired state: %s", exc)
        self._wake.set()

    def _request(self, target: Target | None, shadow: Target | None) -> None:
        self._given_up.clear()  # asked again: a target refused before is tried again (unless it failed to run)
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

    def _wanted(self, target: dict[str, Any]) -> bool:
        """Whether the pending update or shadow candidate is still ``target`` (the same bundle from the same URL)."""
        return any(self._state.get(key) == target for key in (PENDING_KEY, SHADOW_KEY))

    def remember_failed(self, sha256: str) -> None:
        failed = [s for s in self._state.get(FAILED_KEY, []) if s != sha256][-15:]
        self._state.put(FAILED_KEY, [*failed, sha256])

    def _loop(self) -> None:
        backoff = Backoff(base_s=1.0, cap_s=60.0)
        delay: float | None = None
        self.collect_garbage()
        while not self._stop.is_set():
            self._wake.wait(timeout=delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._unsaved and self._save():
                self._report()
            try:
                delay = self._round(backoff)
            except OSError as exc:  # the database cannot even be read: wait and look again
                log.warning("update state unreadable: %s", exc)
                delay = backoff.next_delay()
            except Exception:  # a bug must not end the updater thread: the device keeps taking updates
                log.exception("update attempt failed")
                self._step("idle", error="internal error in the updater (see the agent's log)")
                delay = backoff.next_delay()
            self.collect_garbage()
            if self._unsaved:
                delay = UNSAVED_RETRY_S if delay is None else min(delay, UNSAVED_RETRY_S)

    def _round(self, backoff: Backoff) -> float | None:
        """One attempt at what is pending; the delay before the next round (None: wait for a request)."""
        with self._guard:
            self._round_after = self._requests
            pending, shadow = self._state.get(PENDING_KEY), self._state.get(SHADOW_KEY)
        key, attempted = (PENDING_KEY, pending) if pending else (SHADOW_KEY, shadow)
        try:
            return self._attempt(key, attempted, backoff)
        finally:
            self._round_after = None

    def _attempt(self, key: str, attempted: dict[str, Any] | None, backoff: Backoff) -> float | None:
        if not attempted:
            if self._state.slot("candidate") is not None:  # left by a refusal the database could not record
                self._state.drop_candidate()
            if self._state.get(STEP_KEY, "idle") != "idle":  # stopped mid-step, or idle was not written then
                self._step("idle")
            return None
        if self._given_up.get(key) == attempted:  # refused already: clear it once the database can write
            if not self._forget(key, attempted):
                return backoff.next_delay()
            return 0.0 if (self._state.get(PENDING_KEY) or self._state.get(SHADOW_KEY)) else None
        target = ModelTarget.from_wire(attempted)
        try:
            if key == PENDING_KEY:
                self.install(target)
            else:
                self.install_shadow(target)
        except DownloadCancelled as exc:  # a newer desired state: on to it at once
            if self._stop.is_set():  # the agent stops: the download resumes at its next start
                return None
            log.info("%s", exc)
            self._step("idle", cancelled=target.ref)
            return 0.0
        except TransportError as exc:  # the network: try again later, keep the partial download
            log.warning("update waits: %s", exc)
            self._step("idle", error=str(exc))
            return backoff.next_delay()
        if self._state.get(key) == attempted:  # done or refused, but the database could not say so
            return backoff.next_delay()
        backoff.reset()
        return 0.0 if (self._state.get(PENDING_KEY) or self._state.get(SHADOW_KEY)) else None

    def collect_garbage(self) -> None:
        """Remove partial downloads, health-check files and bundles that no slot or pending target holds."""
        try:
            keep = {slot.sha256 for name in SLOTS if (slot := self._state.slot(name)) is not None}
            keep |= {t["sha256"] for key in (PENDING_KEY, SHADOW_KEY) if (t := self._state.get(key))}
        except OSError as exc:
            log.warning("no garbage collection: %s", exc)
            return
        data_dir = self._state.data_dir
        doomed = [path for path in _files(self._state.bundles_dir)
                  if path.name.startswith(".") or path.name.removesuffix(".bundle") not in keep]
        doomed += [path for path in _files(data_dir / "downloads") if path.name.split(".")[0] not in keep]
        doomed += _files(data_dir / "health")  # left by agents that checked models through files
        try:
            self._state.forget_wrapped_keys(keep)
        except OSError as exc:
            log.warning("cannot drop unused model keys: %s", exc)
        for path in doomed:
            try:
                path.unlink(missing_ok=True)
                log.info("removed unused %s", path)
            except OSError as exc:
                log.warning("cannot remove %s: %s", path, exc)

    def install(self, target: Target) -> None:
        """One update attempt. Refusals (a disk fault included) are final for this target; transport errors
        propagate for a retry."""
        if (active := self._state.slot("active")) is not None and active.sha256 == target.sha256:
            self._done(PENDING_KEY)  # activated before the database could clear the pending update
            return
        try:
            accepted = self._verified(target)
            self._state.stage(Slot(accepted.sha256, accepted.manifest.ref))
            self._step("staged", target=target.ref)
            model = self._checked(accepted, target)
            self._step("activating", target=target.ref)
            self._state.activate_candidate(accepted.manifest.name, accepted.manifest.release)
        except TransportError:
            raise
        except EdgefleetError as exc:
            self._refuse(target, getattr(exc, "reason", None) or type(exc).__name__, str(exc), PENDING_KEY)
            return
        except OSError as exc:
            self._refuse(target, _disk_reason(exc), _disk_message(exc), PENDING_KEY)
            return
        self._activate(model)
        self._done(PENDING_KEY)
        self._step("idle", activated=target.ref)

    def install_shadow(self, target: Target) -> None:
        """Verify and health-check a shadow candidate; it then runs beside the active model and only reports."""
        if (current := self._state.slot("shadow")) is not None and current.sha256 == target.sha256:
            self._done(SHADOW_KEY)
            return
        try:
            accepted = self._verified(target)
            model = self._checked(accepted, target)
            self._state.set_shadow(Slot(accepted.sha256, accepted.manifest.ref))
        except TransportError:
            raise
        except EdgefleetError as exc:
            self._refuse(target, getattr(exc, "reason", None) or type(exc).__name__, str(exc), SHADOW_KEY)
            return
        except OSError as exc:
            self._refuse(target, _disk_reason(exc), _disk_message(exc), SHADOW_KEY)
            return
        self._set_shadow(model)
        self._done(SHADOW_KEY)
        self._step("idle", shadowing=target.ref)

    def _forget(self, key: str, target: dict[str, Any]) -> bool:
        """Drop a refused target's candidate slot and pending entry; whether the database could write it."""
        try:
            candidate = self._state.slot("candidate")
            if key == PENDING_KEY and candidate is not None and candidate.sha256 == target["sha256"]:
                self._state.drop_candidate()
            self._state.put(key, None)
        except OSError as exc:
            log.warning("cannot forget the refused %s yet: %s", target.get("version"), exc)
            return False
        return True

    def _done(self, key: str) -> None:
        """Clear a pending target once its outcome is durable (a database that cannot write: the next round)."""
        try:
            self._state.put(key, None)
        except OSError as exc:
            log.warning("cannot clear %s: %s", key, exc)

    def _verified(self, target: Target) -> AcceptedBundle:
        stored = self._state.bundle_path(target.sha256)
        download = None if stored.exists() else self._download(target)
        self._step("verifying", target=target.ref)
        if download is not None and download.sha256 != target.sha256:  # hashed while it streamed
            raise BundleError("downloaded bundle does not match the announced SHA-256", reason="hash_mismatch")
        data = (download.path if download is not None else stored).read_bytes()
        if download is None and hashlib.sha256(data).hexdigest() != target.sha256:
            raise BundleError("stored bundle does not match the announced SHA-256", reason="hash_mismatch")
        previous = self._state.slot("previous")  # going back one step is not a rollback attack
        try:
            order = base64.b64decode(target.rollback_order, validate=True) if target.rollback_order else None
        except (binascii.Error, ValueError) as exc:
            raise BundleError("rollback order is not base64", reason="malformed") from exc
        from edgefleet.core.update import decide

        trust = self._trust()
        wrapped = target.wrapped_key or self._state.wrapped_key(target.sha256)
        accepted = decide(data, trust, rollback_order=order, decryption_key=self._model_key(wrapped, trust, target),
                          allow_rollback=previous is not None and previous.sha256 == target.sha256)
        if accepted.manifest.encryption is not None and wrapped is not None:
            self._state.keep_wrapped_key(accepted.sha256, wrapped)
        if download is not None:
            self._state.adopt_bundle(accepted.sha256, download.path)
        return accepted

    def _model_key(self, wrapped: str | None, trust: TrustState, target: Target) -> ModelKey | None:
        """The model key the server wrapped for this device and bundle (None: none was sent)."""
        if wrapped is None:
            return None
        from edgefleet.bundle.keywrap import unwrap_for_device

        try:
            private = device_private_key(self._state.data_dir)
        except (OSError, ValueError) as exc:
            raise BundleError(f"this device's key cannot be read: {exc}", reason="decrypt_failed") from exc
        return unwrap_for_device(wrapped, private, trust.device_id or "", target.sha256)

    def _download(self, target: Target) -> Download:
        """The delta against the active bundle when one is offered and applies cleanly; else the whole bundle.
        Either way the bundle ends up in ``downloads/SHA256.part``, hashed."""
        self._step("downloading", target=target.ref)
        downloads = self._state.data_dir / "downloads"
        part = downloads / f"{target.sha256}.part"
        with self._guard:
            self._cancel.clear()
            self._fetching = _target_json(target)
            if self._round_after not in (None, self._requests) and not self._wanted(self._fetching):
                self._cancel.set()  # superseded by a request since this round began
        try:
            active = self._state.slot("active")
            if target.delta_url and active is not None and active.sha256 == target.delta_base_sha256:
                rebuilt = self._delta(target, active, downloads / f"{target.sha256}.delta.part")
                if rebuilt is not None:
                    atomic_write(part, rebuilt)
                    return Download(part, len(rebuilt), target.sha256)
            return self._fetcher.fetch(target.url, part, target.size, cancel=self._cancel)
        finally:
            with self._guard:
                self._fetching = None

    def _delta(self, target: Target, active: Slot, part: Path) -> bytes | None:
        """The bundle rebuilt from the offered delta; None when it cannot be (then the whole bundle is fetched)."""
        from edgefleet.bundle.delta import apply as apply_delta

        try:
            delta = self._fetcher.fetch(target.delta_url or "", part, target.delta_size or target.size,
                                        exact=target.delta_size is not None, cancel=self._cancel)
            payload = delta.path.read_bytes()
            rebuilt = apply_delta(self._state.bundle_path(active.sha256).read_bytes(), payload)
            if hashlib.sha256(rebuilt).hexdigest() == target.sha256:
                self._event("delta_applied", {"target": target.ref, "bytes": len(payload), "full": target.size})
                return rebuilt
            log.warning("delta for %s rebuilt the wrong bundle; fetching it whole", target.ref)
        except DownloadCancelled:
            raise
        except (BundleError, TransportError, OSError) as exc:
            log.warning("delta for %s unusable (%s); fetching it whole", target.ref, exc)
        finally:
            part.unlink(missing_ok=True)
        return None

    def _checked(self, accepted: AcceptedBundle, target: Target) -> LoadedModel:
        """The candidate's health check; OSError when its files cannot be written or its process not started."""
        self._step("health_checking", target=target.ref)
        latency = run_health_check(accepted.model, accepted.manifest, timeout_s=self._health.timeout_s,
                                   latency_budget_ms=self._health.latency_budget_ms, command=self._health.command)
        log.info("%s passed its health check (%.3f ms per window)", target.ref, latency)
        return load_model(accepted, self._providers)

    def _refuse(self, target: Target, reason: str, message: str, key: str) -> None:
        """Give ``target`` up: drop its candidate slot and files (each step on its own: the disk may be full)."""
        log.warning("refused %s (%s): %s", target.ref, reason, message)
        self._given_up[key] = _target_json(target)
        downloads = self._state.data_dir / "downloads"

        def unused_bundle() -> None:
            if all((slot := self._state.slot(name)) is None or slot.sha256 != target.sha256
                   for name in ("active", "previous", "shadow")):
                self._state.bundle_path(target.sha256).unlink(missing_ok=True)

        self._forget(key, _target_json(target))
        for cleanup in (unused_bundle, (downloads / f"{target.sha256}.part").unlink):
            try:
                cleanup()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("clean-up after refusing %s: %s", target.ref, exc)
        self._step("idle", error=f"{target.ref} refused ({reason}): {message}", refused=target.ref, reason=reason)

    def _step(self, step: str, *, error: str | None = None, **detail: str) -> None:
        """Record and report the update step; what the database cannot write now is written later."""
        with self._saving:
            self._unsaved[STEP_KEY] = step
            if error is not None or "activated" in detail:
                self._unsaved[ERROR_KEY] = error
        self._save()
        name = next((k for k in ("refused", "activated", "shadowing", "cancelled") if k in detail), step)
        self._event(name, {**detail, "error": error} if error else dict(detail))
        self._report()
        _fault_pause(step)

    def _report(self) -> None:
        try:
            self._changed()
        except OSError as exc:
            log.warning("cannot report the update state: %s", exc)

    def _save(self) -> bool:
        """Write the update state not written yet; whether it is written now."""
        with self._saving:
            try:
                self._state.put_all(self._unsaved)
            except OSError as exc:
                log.warning("update state not written (will retry): %s", exc)
                return False
            self._unsaved.clear()
            return True


def _target_json(target: Target) -> dict[str, Any]:
    """A target (``ModelRef`` or :class:`ModelTarget`) as the JSON the pending update is kept as."""
    return {name: getattr(target, name) for name in ModelTarget.__dataclass_fields__}


def _disk_reason(exc: OSError) -> str:
    return "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "io_error"


def _disk_message(exc: OSError) -> str:
    """One line: what failed, without the errno prefix."""
    return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")


def _files(directory: Path) -> list[Path]:
    try:
        return [path for path in directory.iterdir() if path.is_file() or path.is_symlink()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot list %s: %s", directory, exc)
        return []


def _fault_pause(step: str) -> None:
    """Hold at ``step`` when EDGEFLEET_FAULT_PAUSE names it (fault-injection tests kill the agent there)."""
    spec = os.environ.get(FAULT_PAUSE_ENV, "")
    name, _, seconds = spec.partition(":")
    if name == step:
        time.sleep(float(seconds or "30"))
