"""The device's trust decision: bytes and the device's trusted state in, an accepted bundle or a refusal out.

Nothing here touches the network, the disk or a model runtime, so every refusal can be tested directly.
The order follows TUF: the signature is checked over the manifest bytes before the manifest is parsed,
the manifest's policy (release counter, hardware, expiry, agent version) before the payload is hashed,
and the model's hash (then, if encrypted, its decryption and plaintext hash) before anyone parses the
model. The model is then sniffed for pickles and archives here, by its bytes, and handed to
``model_check``: by default :func:`edgefleet.bundle.safe_onnx.check_onnx`, which imports ``onnx`` itself
when it runs, so this module stays free of ONNX (see that module's docstring).

Refusal reasons: bad_signature, unknown_key, revoked_key, hash_mismatch, rollback, wrong_hardware,
expired, agent_too_old, missing_member, unexpected_member, duplicate_member, truncated, oversized,
malformed, decrypt_failed, unsafe_format, external_data, invalid_model.
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

from edgefleet.bundle.container import MANIFEST, MODEL, MODEL_ENC, SIGNATURES, Limits, model_member, read_container
from edgefleet.bundle.encrypt import ModelKey, decrypt_model, release_aad
from edgefleet.bundle.safe_onnx import check_onnx, sniff_model
from edgefleet.bundle.signing import PublicKey, verify_any
from edgefleet.core.keys import Keyring, parse_time, verify_rollback_order
from edgefleet.core.manifest import SEMVER, Manifest
from edgefleet.errors import BundleError

ModelCheck = Callable[[bytes], None]


@dataclass(frozen=True)
class TrustState:
    """What the device trusts and what it has already accepted."""

    keys: dict[str, PublicKey]
    highest_release: dict[str, int] = field(default_factory=dict)
    hardware: str = "generic"
    agent_version: str = "0.1.0"
    limits: Limits = field(default_factory=Limits)
    revoked: frozenset[str] = frozenset()
    device_id: str | None = None

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


def decide(bundle: bytes, state: TrustState, *, now: datetime | None = None, allow_rollback: bool = False,
           rollback_order: bytes | None = None, decryption_key: ModelKey | None = None,
           model_check: ModelCheck | None = check_onnx, open_model: bool = True) -> AcceptedBundle:
    """Accept ``bundle`` for this device or raise BundleError whose ``reason`` names the refusal.

    ``allow_rollback`` is for bundles the device accepted before (its previous slot); a new older
    release needs ``rollback_order``, a signed rollback statement that names it. ``decryption_key``
    opens an encrypted model member. ``model_check`` inspects the verified model bytes (None: skip).
    ``open_model=False`` is for relays that route bundles without running them (the control plane
    without the model key): an encrypted model is then left closed and unchecked, and ``model`` holds
    the verified ciphertext, with ``encrypted`` set.
    """
    members = read_container(bundle, state.limits)
    signatures = parse_signatures(members[SIGNATURES])
    key_id = verify_any(signatures, members[MANIFEST], state.keys, state.revoked)
    manifest = Manifest.from_bytes(members[MANIFEST])
    if manifest.canonical_bytes() != members[MANIFEST]:
        raise BundleError("manifest bytes are not canonical", reason="malformed")
    moment = now or datetime.now(UTC)
    _check_policy(manifest, state, moment, allow_rollback or _ordered(manifest, state, moment, rollback_order))
    _check_members(manifest, members)
    digest = hashlib.sha256(bundle).hexdigest()
    if not open_model and MODEL_ENC in members and manifest.encryption is not None:
        return AcceptedBundle(manifest, members[MODEL_ENC], key_id, digest, encrypted=True)
    model = _plaintext(manifest, members, decryption_key)
    sniff_model(model, state.limits.max_member_bytes)
    if model_check is not None:
        model_check(model)
    return AcceptedBundle(manifest, model, key_id, digest)


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
    if model_member(members) == MODEL:
        if manifest.encryption is not None:
            raise BundleError("manifest says the model is encrypted, the bundle holds it in the clear",
                              reason="malformed")
        return members[MODEL]
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


def _check_policy(manifest: Manifest, state: TrustState, now: datetime, allow_rollback: bool) -> None:
    """Release counter, hardware, expiry and agent version, from the (verified) manifest alone."""
    highest = state.highest_release.get(manifest.name, 0)
    if manifest.release < highest and not allow_rollback:
        raise BundleError(f"release {manifest.release} of {manifest.name} is older than accepted release "
                          f"{highest}", reason="rollback")
    if manifest.hardware and state.hardware not in manifest.hardware:
        raise BundleError(f"bundle is for hardware {manifest.hardware}, this device is {state.hardware!r}",
                          reason="wrong_hardware")
    if manifest.expires is not None and now >= parse_time(manifest.expires):
        raise BundleError(f"bundle expired at {manifest.expires}", reason="expired")
    if _version_key(state.agent_version) < _version_key(manifest.min_agent_version):
        raise BundleError(f"bundle needs agent {manifest.min_agent_version}, this is {state.agent_version}",
                          reason="agent_too_old")


def _version_key(version: str) -> tuple[int, int, int]:
    match = SEMVER.match(version)
    if not match:
        raise BundleError(f"{version!r} is not a semantic version", reason="malformed")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))
