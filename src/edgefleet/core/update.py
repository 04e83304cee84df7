"""The device's trust decision: bytes and the device's trusted state in, an accepted bundle or a refusal out.

Nothing here touches the network, the disk or a model runtime, so every refusal can be tested directly.
The order follows TUF: the signature is checked over the manifest bytes before the manifest is parsed,
the manifest's policy (release counter, hardware, expiry, agent version) before the payload is hashed,
and the model's hash (then, if encrypted, its decryption and plaintext hash) before anyone parses the
model. The model is then sniffed for pickles and archives here, by its bytes, and handed to
``model_check``: by default :func:`edgefleet.bundle.safe_onnx.check_onnx`, which imports ``onnx`` itself
when it runs, so this module stays free of ONNX (see that module's docstring).

Time and versions. Expiry is judged at ``max(now, state.time_floor)``: the floor is the newest signed time
(a bundle's ``created``, a statement's ``issued``) the device has verified, so a clock set back cannot make an
expired bundle valid again. Under one release counter there is one version: a bundle with the release counter
the device accepted last for that name and another version is refused (a lower version as ``rollback``, any
other as ``release_reused``); a sideways move needs the same version. ``allow_expired`` is for a model the
device already runs (see :mod:`edgefleet.agent.restore` for the start-up policy): every other check still
applies, and the accepted bundle says it expired.

Refusal reasons: bad_signature, unknown_key, revoked_key, hash_mismatch, rollback, release_reused,
wrong_hardware, missing_runtime, expired, agent_too_old, missing_member, unexpected_member, duplicate_member, truncated,
oversized, malformed, decrypt_failed, unsafe_format, external_data, invalid_model.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from edgefleet.bundle.container import (
    MANIFEST,
    MODEL,
    MODEL_ENC,
    MODEL_TFLITE,
    SIGNATURES,
    Limits,
    model_member,
    read_container,
)
from edgefleet.bundle.delta import apply as apply_delta
from edgefleet.bundle.encrypt import ModelKey, decrypt_model, release_aad
from edgefleet.bundle.manifest import SEMVER, Manifest
from edgefleet.bundle.runtimes import MODEL_FORMATS
from edgefleet.bundle.safe_onnx import check_onnx, sniff_model
from edgefleet.bundle.safe_tflite import check_tflite
from edgefleet.bundle.signing import PublicKey, verify_any
from edgefleet.core.keys import Keyring, parse_time, verify_rollback_order
from edgefleet.errors import BundleError

ModelCheck = Callable[[bytes], None]


@dataclass(frozen=True)
class TrustState:
    """What the device trusts and what it has already accepted."""

    keys: dict[str, PublicKey]
    highest_release: dict[str, int] = field(default_factory=dict)
    hardware: str | None = "generic"
    """The device's hardware id; None: not judged (the server accepts bundles for any hardware)."""
    runtimes: frozenset[str] | None = None
    """The runtimes the device can run models on; None: not judged (relays, and callers that run nothing)."""
    agent_version: str = "0.1.0"
    limits: Limits = field(default_factory=Limits)
    revoked: frozenset[str] = frozenset()
    device_id: str | None = None
    accepted_versions: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Per model name, the (release counter, version) the device accepted last at its highest release."""
    time_floor: datetime | None = None
    """The newest signed time the device has verified; expiry is judged at ``max(now, time_floor)``."""
    now: datetime | None = None
    """The device's clock when this state was made (None: the system clock, read at the decision)."""

    @classmethod
    def from_keyring(cls, keyring: Keyring, **fields: Any) -> TrustState:
        """A trust state whose keys and revocations come from the device's keyring."""
        return cls(keys=keyring.trusted(), revoked=keyring.revoked, **fields)


@dataclass(frozen=True)
class AcceptedBundle:
    """A bundle that passed every check; ``model`` is the verified model bytes (ciphertext if ``encrypted``)."""

    manifest: Manifest
    model: bytes
    key_id: str
    sha256: str
    encrypted: bool = False
    expired: bool = False
    """Accepted although its signed expiry has passed (only with ``allow_expired``)."""


def decide(bundle: bytes, state: TrustState, *, now: datetime | None = None, allow_rollback: bool = False,
           rollback_order: bytes | None = None, decryption_key: ModelKey | None = None,
           model_check: ModelCheck | None = check_onnx, open_model: bool = True,
           allow_expired: bool = False) -> AcceptedBundle:
    """Accept ``bundle`` for this device or raise BundleError whose ``reason`` names the refusal.

    ``allow_rollback`` is for bundles the device accepted before (its previous slot); a new older
    release needs ``rollback_order``, a signed rollback statement that names it. ``decryption_key``
    opens an encrypted model member. ``model_check`` inspects the verified model bytes (None: skip).
    ``open_model=False`` is for relays that route bundles without running them (the control plane
    without the model key): an encrypted model is then left closed and unchecked, and ``model`` holds
    the verified ciphertext, with ``encrypted`` set. ``allow_expired`` accepts a bundle whose only fault is
    its expiry (for the model the device already runs), with ``expired`` set.
    """
    members = read_container(bundle, state.limits)
    signatures = parse_signatures(members[SIGNATURES])
    key_id = verify_any(signatures, members[MANIFEST], state.keys, state.revoked)
    manifest = Manifest.from_bytes(members[MANIFEST])
    if manifest.canonical_bytes() != members[MANIFEST]:
        raise BundleError("manifest bytes are not canonical", reason="malformed")
    moment = effective_time(state, now)
    expired = _check_policy(manifest, state, moment,
                            allow_rollback or _ordered(manifest, state, moment, rollback_order), allow_expired)
    _check_members(manifest, members)
    digest = hashlib.sha256(bundle).hexdigest()
    if not open_model and MODEL_ENC in members and manifest.encryption is not None:
        return AcceptedBundle(manifest, members[MODEL_ENC], key_id, digest, encrypted=True, expired=expired)
    model = _plaintext(manifest, members, decryption_key)
    sniff_model(model, state.limits.max_member_bytes)
    if model_member(members) == MODEL_TFLITE:
        check_tflite(model, state.limits.max_member_bytes)
    elif model_check is not None:
        model_check(model)
    return AcceptedBundle(manifest, model, key_id, digest, expired=expired)


def accept_delta(a: bytes, delta: bytes, state: TrustState, **decide_options: Any) -> AcceptedBundle:
    """The device's path for a delta: rebuild B from the active bundle ``a`` (:func:`bundle.delta.apply`), then
    :func:`decide` on it."""
    return decide(apply_delta(a, delta, limits=state.limits), state, **decide_options)


def effective_time(state: TrustState, now: datetime | None = None) -> datetime:
    """The time trust decisions use: the clock (``now``, else ``state.now``, else the system clock), never
    earlier than the state's time floor."""
    moment = now or state.now or datetime.now(UTC)
    return max(moment, state.time_floor) if state.time_floor is not None else moment


def parse_signatures(data: bytes) -> dict[str, bytes]:
    """``{"signatures": [{"keyid": ..., "sig": base64}]}`` -> key id to signature bytes."""
    try:
        entries = json.loads(data)["signatures"]
        result = {str(e["keyid"]): base64.b64decode(e["sig"], validate=True) for e in entries}
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as exc:
        raise BundleError("signatures member is malformed", reason="malformed") from exc
    if not result:
        raise BundleError("bundle carries no signature", reason="bad_signature")
    return result


def _ordered(manifest: Manifest, state: TrustState, now: datetime, order: bytes | None) -> bool:
    """Whether a signed rollback order covers this release (only consulted when it is needed)."""
    if order is None or manifest.release >= state.highest_release.get(manifest.name, 0):
        return False
    verified = verify_rollback_order(order, state.keys, state.revoked)
    if not verified.covers(manifest.name, manifest.release, state.device_id, now):
        raise BundleError(f"the rollback order (for {verified.name} release {verified.release}, until "
                          f"{verified.expires.isoformat()}) does not cover {manifest.ref} release "
                          f"{manifest.release} on this device", reason="rollback")
    return True


def _plaintext(manifest: Manifest, members: dict[str, bytes], key: ModelKey | None) -> bytes:
    """The model bytes: the member itself, or its decryption checked against the signed plaintext digest."""
    member = model_member(members)
    expected_format = MODEL_FORMATS.get(manifest.needs_runtime)
    member_format = "tflite" if member == MODEL_TFLITE else "onnx"
    if expected_format is not None and expected_format != member_format:
        raise BundleError(f"runtime {manifest.needs_runtime} reads a {expected_format} model, the bundle holds "
                          f"{member}", reason="malformed")
    if member in (MODEL, MODEL_TFLITE):
        if manifest.encryption is not None:
            raise BundleError("manifest says the model is encrypted, the bundle holds it in the clear",
                              reason="malformed")
        return members[member]
    if manifest.encryption is None:
        raise BundleError("bundle holds an encrypted model its manifest does not describe", reason="malformed")
    model = decrypt_model(members[MODEL_ENC], key, release_aad(manifest.name, manifest.version, manifest.release))
    expected = manifest.encryption
    if len(model) != expected.plaintext_size or hashlib.sha256(model).hexdigest() != expected.plaintext_sha256:
        raise BundleError("decrypted model does not match its signed SHA-256", reason="hash_mismatch")
    return model


def _check_members(manifest: Manifest, members: dict[str, bytes]) -> None:
    payload = {name: data for name, data in members.items() if name not in (MANIFEST, SIGNATURES)}
    if set(payload) != set(manifest.members):
        raise BundleError("bundle members differ from the manifest's list", reason="unexpected_member")
    for name, data in payload.items():
        digest = manifest.members[name]
        if len(data) != digest.size or hashlib.sha256(data).hexdigest() != digest.sha256:
            raise BundleError(f"member {name!r} does not match its signed SHA-256", reason="hash_mismatch")


def _check_policy(manifest: Manifest, state: TrustState, now: datetime, allow_rollback: bool,
                  allow_expired: bool = False) -> bool:
    """Release counter and version, hardware, expiry and agent version, from the (verified) manifest alone.

    Returns whether the bundle has expired (only ever True with ``allow_expired``; otherwise that refuses it).
    """
    highest = state.highest_release.get(manifest.name, 0)
    if manifest.release < highest and not allow_rollback:
        raise BundleError(f"release {manifest.release} of {manifest.name} is older than accepted release "
                          f"{highest}", reason="rollback")
    if not allow_rollback:
        _check_same_release(manifest, state)
    if manifest.hardware and state.hardware is not None and state.hardware not in manifest.hardware:
        raise BundleError(f"bundle is for hardware {manifest.hardware}, this device is {state.hardware!r}",
                          reason="wrong_hardware")
    if state.runtimes is not None and manifest.needs_runtime not in state.runtimes:
        raise BundleError(f"bundle needs runtime {manifest.needs_runtime}, this device has "
                          f"{', '.join(sorted(state.runtimes)) or 'none'}", reason="missing_runtime")
    expired = manifest.expires is not None and now >= parse_time(manifest.expires)
    if expired and not allow_expired:
        raise BundleError(f"bundle expired at {manifest.expires}", reason="expired")
    if _version_key(state.agent_version) < _version_key(manifest.min_agent_version):
        raise BundleError(f"bundle needs agent {manifest.min_agent_version}, this is {state.agent_version}",
                          reason="agent_too_old")
    return expired


def _check_same_release(manifest: Manifest, state: TrustState) -> None:
    """Under the release counter accepted last, only the version accepted with it."""
    known = state.accepted_versions.get(manifest.name)
    if known is None or known[0] != manifest.release or known[1] == manifest.version:
        return
    if _version_key(manifest.version) < _version_key(known[1]):
        raise BundleError(f"{manifest.ref} is older than the accepted {manifest.name}@{known[1]} under the same "
                          f"release {manifest.release}", reason="rollback")
    raise BundleError(f"release {manifest.release} of {manifest.name} was accepted as version {known[1]}; "
                      f"version {manifest.version} needs a higher release counter", reason="release_reused")


def _version_key(version: str) -> tuple[int, int, int]:
    match = SEMVER.match(version)
    if not match:
        raise BundleError(f"{version!r} is not a semantic version", reason="malformed")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))
