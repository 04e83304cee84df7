"""Re-verifying the bundles the agent keeps when it starts, in a child process.

At start the agent loads its active (and shadow) model again from disk, and checks it again exactly as it
checked it when installing it: :func:`edgefleet.core.update.decide` (signature with the current keyring,
revocations, release policy, member hashes, the ONNX safety check). That check needs ``cryptography``, pydantic
and ``onnx``, which the running agent otherwise never uses; loaded once, they would stay resident for the
process's life. So :func:`verify_stored` runs ``decide`` in a short-lived child process
(``python -m edgefleet.agent.verify``: a JSON line on stdin, then the bundle bytes; one JSON line out), and
the agent then takes the model and manifest from the very bytes the child accepted (their SHA-256 must match).
When those modules are loaded in this process anyway (tests, tools), it runs ``decide`` here instead.

An update that arrives later is verified in the agent process (by the updater), as before.

An encrypted model is restored with the wrapped model key kept with its slot (:class:`StoredKey`): the child
unwraps it with the device's private key, decrypts the model and hands the plaintext back through its stdout
pipe (after the model bytes, the JSON line says how many there are); the agent checks it against the signed
plaintext SHA-256. The plaintext never touches the disk.

Time: the spec carries the device's clock reading and its time floor (the newest signed time it has verified,
see :mod:`edgefleet.agent.timefloor`), so the child judges expiry at the same moment the agent would.
``allow_expired`` re-checks the model the device already runs (the start-up policy in
:mod:`edgefleet.agent.restore`): every check but the expiry applies, and :class:`Verified` says it expired.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from edgefleet.agent.model import ModelInfo
from edgefleet.bundle.container import MANIFEST, MODEL, MODEL_TFLITE, Limits, read_container
from edgefleet.bundle.signing import PublicKey
from edgefleet.errors import BundleError, EdgefleetError

if TYPE_CHECKING:
    from edgefleet.bundle.encrypt import ModelKey
    from edgefleet.core.update import TrustState

COMMAND: tuple[str, ...] = (sys.executable, "-m", "edgefleet.agent.verify")


@dataclass(frozen=True)
class TrustSpec:
    """What the device trusts, as plain data (the stored keyring JSON, the pinned keys, accepted releases)."""

    pinned: tuple[PublicKey, ...]
    keyring: str | None = None
    highest_release: Mapping[str, int] = field(default_factory=dict)
    hardware: str = "generic"
    agent_version: str = "0.1.0"
    device_id: str | None = None
    accepted_versions: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    """Per model name, the (release, version) accepted last at its highest release."""
    time_floor: str | None = None
    """ISO time: the newest signed time the device has verified."""
    now: str | None = None
    """ISO time: the device's clock when the spec was made (None: the system clock at the decision)."""
    runtimes: tuple[str, ...] | None = None
    """The runtimes the device runs models on; None: not judged."""

    def to_json(self) -> dict[str, Any]:
        return {"pinned": [k.to_text() for k in self.pinned], "keyring": self.keyring,
                "highest_release": dict(self.highest_release), "hardware": self.hardware,
                "agent_version": self.agent_version, "device_id": self.device_id,
                "accepted_versions": {k: list(v) for k, v in self.accepted_versions.items()},
                "time_floor": self.time_floor, "now": self.now,
                "runtimes": None if self.runtimes is None else list(self.runtimes)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrustSpec:
        versions = {str(k): (int(v[0]), str(v[1])) for k, v in dict(data.get("accepted_versions") or {}).items()}
        return cls(pinned=tuple(PublicKey.from_text(str(t)) for t in data["pinned"]), keyring=data.get("keyring"),
                   highest_release={str(k): int(v) for k, v in dict(data.get("highest_release", {})).items()},
                   hardware=str(data.get("hardware", "generic")),
                   agent_version=str(data.get("agent_version", "0.1.0")), device_id=data.get("device_id"),
                   accepted_versions=versions, time_floor=_optional_text(data.get("time_floor")),
                   now=_optional_text(data.get("now")),
                   runtimes=None if data.get("runtimes") is None else tuple(str(r) for r in data["runtimes"]))


def trust_state(spec: TrustSpec, *, accepted_before: bool = False) -> TrustState:
    """The :class:`TrustState` new bundles are checked against; ``accepted_before`` admits retired keys for
    bundles the device accepted earlier."""
    from edgefleet.core.keys import Keyring, parse_time
    from edgefleet.core.update import TrustState

    ring = Keyring.from_json(spec.keyring) if spec.keyring else Keyring()
    ring = ring.with_pinned(spec.pinned)
    state = TrustState.from_keyring(ring, highest_release=dict(spec.highest_release), hardware=spec.hardware,
                                    agent_version=spec.agent_version, device_id=spec.device_id,
                                    accepted_versions=dict(spec.accepted_versions),
                                    time_floor=parse_time(spec.time_floor) if spec.time_floor else None,
                                    now=parse_time(spec.now) if spec.now else None,
                                    runtimes=None if spec.runtimes is None else frozenset(spec.runtimes))
    return replace(state, keys=ring.accepted_keys()) if accepted_before else state


@dataclass(frozen=True)
class StoredKey:
    """An encrypted bundle's model key as the device keeps it: wrapped for it, and its private key's file."""

    wrapped: str
    device_key_file: str

    def model_key(self, device_id: str | None, bundle_sha256: str) -> ModelKey:
        """The unwrapped key (loads ``cryptography``); BundleError(reason="decrypt_failed") when it fails."""
        import base64
        import binascii
        from pathlib import Path

        from edgefleet.bundle.keywrap import unwrap_for_device

        try:
            private = base64.b64decode(Path(self.device_key_file).read_text().strip(), validate=True)
        except (OSError, binascii.Error, ValueError) as exc:
            raise BundleError(f"this device's key cannot be read: {exc}", reason="decrypt_failed") from exc
        return unwrap_for_device(self.wrapped, private, device_id or "", bundle_sha256)


@dataclass(frozen=True)
class Verified:
    """A stored bundle accepted again: its manifest fields, SHA-256 and model bytes; whether it has expired (only
    with ``allow_expired``) and its signed creation time (ISO)."""

    info: ModelInfo
    sha256: str
    model: bytes
    expired: bool = False
    created: str | None = None


def verify_stored(data: bytes, spec: TrustSpec, *, in_process: bool | None = None, timeout_s: float = 120.0,
                  command: Sequence[str] = COMMAND, allow_expired: bool = False,
                  stored_key: StoredKey | None = None) -> Verified:
    """Accept a bundle the device accepted before (rollback allowed) or raise BundleError (with its reason).

    ``in_process``: None runs the check here only if ``edgefleet.core.update`` is already imported.
    ``allow_expired``: an expired bundle passes (every other check still applies), with ``expired`` set.
    ``stored_key``: an encrypted bundle's wrapped model key; ``model`` is then the decrypted model (in memory).
    """
    if in_process is None:
        in_process = "edgefleet.core.update" in sys.modules
    if in_process:
        from edgefleet.core.update import decide

        digest = hashlib.sha256(data).hexdigest()
        key = stored_key.model_key(spec.device_id, digest) if stored_key is not None else None
        accepted = decide(data, trust_state(spec, accepted_before=True), allow_rollback=True,
                          allow_expired=allow_expired, decryption_key=key)
        return Verified(ModelInfo.from_bytes(accepted.manifest.canonical_bytes()), accepted.sha256, accepted.model,
                        expired=accepted.expired, created=accepted.manifest.created)
    key_fields = {} if stored_key is None else {"wrapped_key": stored_key.wrapped,
                                                "device_key_file": stored_key.device_key_file}
    request = json.dumps({**spec.to_json(), "allow_expired": allow_expired, **key_fields}).encode() + b"\n" + data
    try:
        result = subprocess.run(list(command), input=request, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BundleError(f"verification gave no answer within {timeout_s:.0f} s", reason="verify_failed") from exc
    except OSError as exc:
        raise BundleError(f"cannot start the verification: {exc}", reason="verify_failed") from exc
    head, _, last = result.stdout.rstrip(b"\n").rpartition(b"\n")
    try:
        report = json.loads(last)
        if not isinstance(report, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise BundleError(f"verification exited {result.returncode}: {tail[0][:200]}",
                          reason="verify_failed") from exc
    if not report.get("ok"):
        raise BundleError(str(report.get("error", "refused")), reason=str(report.get("reason") or "refused"))
    digest = hashlib.sha256(data).hexdigest()
    if report.get("sha256") != digest:
        raise BundleError("the verified bundle is not the one loaded", reason="hash_mismatch")
    members = read_container(data, Limits())
    clear = next((members[name] for name in (MODEL, MODEL_TFLITE) if name in members), None)
    model = clear if clear is not None else _decrypted(head, report, members[MANIFEST])
    return Verified(ModelInfo.from_bytes(members[MANIFEST]), digest, model,
                    expired=report.get("expired") is True, created=created_time(members[MANIFEST]))


def _decrypted(head: bytes, report: Mapping[str, Any], manifest: bytes) -> bytes:
    """The decrypted model the child sent before its report, checked against the signed plaintext SHA-256."""
    size = report.get("model_bytes")
    if not isinstance(size, int) or size <= 0 or size > len(head):
        raise BundleError("an encrypted model cannot be restored without its key", reason="decrypt_failed")
    model = head[len(head) - size:]
    try:
        expected = json.loads(manifest)["encryption"]["plaintext_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError("the manifest does not describe the encrypted model", reason="malformed") from exc
    if hashlib.sha256(model).hexdigest() != expected:
        raise BundleError("decrypted model does not match its signed SHA-256", reason="hash_mismatch")
    return model


def created_time(manifest: bytes) -> str | None:
    """The ``created`` field of verified canonical manifest bytes (None if it has none)."""
    try:
        value = json.loads(manifest).get("created")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def main() -> int:
    """The child: a JSON :class:`TrustSpec` line, then the bundle bytes, on stdin; one JSON line out."""
    raw = sys.stdin.buffer.read()
    head, _, data = raw.partition(b"\n")
    try:
        request = json.loads(head)
        spec = TrustSpec.from_json(request)
        stored_key = (StoredKey(str(request["wrapped_key"]), str(request["device_key_file"]))
                      if request.get("wrapped_key") else None)
        verified = verify_stored(data, spec, in_process=True, allow_expired=request.get("allow_expired") is True,
                                 stored_key=stored_key)
    except EdgefleetError as exc:
        _answer({"ok": False, "reason": getattr(exc, "reason", None) or type(exc).__name__, "error": str(exc)})
        return 0
    except (ValueError, KeyError, TypeError) as exc:
        _answer({"ok": False, "reason": "malformed", "error": f"bad request: {exc}"})
        return 0
    report = {"ok": True, "sha256": verified.sha256, "model": verified.info.ref, "expired": verified.expired}
    if stored_key is not None:  # the plaintext goes back through the pipe, never through a file
        _answer({**report, "model_bytes": len(verified.model)}, verified.model)
    else:
        _answer(report)
    return 0


def _answer(report: Mapping[str, Any], model: bytes = b"") -> None:
    """The child's answer on stdout: the decrypted model bytes (if any), then one JSON line."""
    out = sys.stdout.buffer
    out.write(model + (b"\n" if model else b"") + json.dumps(report).encode() + b"\n")
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
