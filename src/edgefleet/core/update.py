"""The device's trust decision: bytes and the device's trusted state in, an accepted bundle or a refusal out.

Nothing here touches the network, the disk or a model runtime, so every refusal can be tested directly.
The order follows TUF: the signature is checked over the manifest bytes before the manifest is parsed,
and the model's hash before anyone parses the model.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

from edgefleet.bundle.container import MANIFEST, MODEL, SIGNATURES, Limits, read_container
from edgefleet.bundle.signing import PublicKey, verify_any
from edgefleet.core.manifest import SEMVER, Manifest
from edgefleet.errors import BundleError


@dataclass(frozen=True)
class TrustState:
    """What the device trusts and what it has already accepted."""

    keys: dict[str, PublicKey]
    highest_release: dict[str, int] = field(default_factory=dict)
    hardware: str = "generic"
    agent_version: str = "0.1.0"
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class AcceptedBundle:
    """A bundle that passed every check; ``model`` is the verified model bytes."""

    manifest: Manifest
    model: bytes
    key_id: str
    sha256: str


def decide(bundle: bytes, state: TrustState, *, now: datetime | None = None,
           allow_rollback: bool = False) -> AcceptedBundle:
    """Accept ``bundle`` for this device or raise BundleError whose ``reason`` names the refusal."""
    members = read_container(bundle, state.limits)
    signatures = parse_signatures(members[SIGNATURES])
    key_id = verify_any(signatures, members[MANIFEST], state.keys)
    manifest = Manifest.from_bytes(members[MANIFEST])
    if manifest.canonical_bytes() != members[MANIFEST]:
        raise BundleError("manifest bytes are not canonical", reason="malformed")
    _check_members(manifest, members)
    _check_policy(manifest, state, now or datetime.now(UTC), allow_rollback)
    return AcceptedBundle(manifest, members[MODEL], key_id, hashlib.sha256(bundle).hexdigest())


def parse_signatures(data: bytes) -> dict[str, bytes]:
    """``{"signatures": [{"keyid": ..., "sig": base64}]}`` -> key id to signature bytes."""
    try:
        entries = json.loads(data)["signatures"]
        result = {str(e["keyid"]): base64.b64decode(e["sig"], validate=True) for e in entries}
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise BundleError("signatures member is malformed", reason="malformed") from exc
    if not result:
        raise BundleError("bundle carries no signature", reason="bad_signature")
    return result


def _check_members(manifest: Manifest, members: dict[str, bytes]) -> None:
    payload = {name: data for name, data in members.items() if name not in (MANIFEST, SIGNATURES)}
    if set(payload) != set(manifest.members):
        raise BundleError("bundle members differ from the manifest's list", reason="unexpected_member")
    for name, data in payload.items():
        digest = manifest.members[name]
        if len(data) != digest.size or hashlib.sha256(data).hexdigest() != digest.sha256:
            raise BundleError(f"member {name!r} does not match its signed SHA-256", reason="hash_mismatch")


def _check_policy(manifest: Manifest, state: TrustState, now: datetime, allow_rollback: bool) -> None:
    highest = state.highest_release.get(manifest.name, 0)
    if manifest.release < highest and not allow_rollback:
        raise BundleError(f"release {manifest.release} of {manifest.name} is older than accepted release "
                          f"{highest}", reason="rollback")
    if manifest.hardware and state.hardware not in manifest.hardware:
        raise BundleError(f"bundle is for hardware {manifest.hardware}, this device is {state.hardware!r}",
                          reason="wrong_hardware")
    if manifest.expires is not None:
        try:
            expires = datetime.fromisoformat(manifest.expires)
        except ValueError as exc:
            raise BundleError("manifest expiry is not an ISO date", reason="malformed") from exc
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        if now >= expires:
            raise BundleError(f"bundle expired at {manifest.expires}", reason="expired")
    if _version_key(state.agent_version) < _version_key(manifest.min_agent_version):
        raise BundleError(f"bundle needs agent {manifest.min_agent_version}, this is {state.agent_version}",
                          reason="agent_too_old")


def _version_key(version: str) -> tuple[int, int, int]:
    match = SEMVER.match(version)
    if not match:
        raise BundleError(f"{version!r} is not a semantic version", reason="malformed")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))
