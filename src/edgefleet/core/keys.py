"""Signed statements about keys and releases, and the device's keyring: bytes in, a new keyring out.

A statement is JSON of at most 64 KiB::

    {"signed": {"type": ..., ...}, "signatures": [{"keyid": "...", "sig": "<base64>"}]}

Each signature covers ``b"edgefleet statement v1\\n" + canonical_json(signed)``; the prefix keeps a
statement signature from ever passing as a manifest signature, and the reverse. Three types:

- ``rotate`` ``{"old": keyid, "new": base64 public key}``: key *new* replaces key *old*. It must be signed
  by *old* while the device trusts it; a signature by *new* (proof that its holder has it) is optional
  but must verify when present. *old* is retired: it no longer signs bundles or statements.
- ``revoke`` ``{"keyid": id}``, signed by any trusted key: the key is refused from then on with reason
  ``revoked_key``, even where it is pinned in the device's configuration, and can never come back.
- ``rollback`` ``{"name", "release", "expires", "devices"}``: lets a device accept release *release* of
  *name* although it accepted a higher one. It is checked by ``decide(..., rollback_order=...)``, never
  stored in the keyring, and must expire.

Every change to a keyring is monotonic (trusted -> retired, anything -> revoked), so replaying an old
statement can never undo a later one. Applying a statement that is already in effect is a no-op.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from edgefleet.bundle.manifest import NAME, canonical_json
from edgefleet.bundle.signing import PublicKey, SigningKey, verify_any
from edgefleet.errors import BundleError, ConfigError

MAX_STATEMENT_BYTES = 64 * 1024
STATEMENT_CONTEXT = b"edgefleet statement v1\n"
KEYRING_FORMAT = 1


@dataclass(frozen=True)
class Statement:
    """A parsed, not yet verified statement: its signed body, its signatures, and the signed message."""

    signed: dict[str, Any]
    signatures: dict[str, bytes]

    @property
    def type(self) -> str:
        return str(self.signed.get("type", ""))

    @property
    def message(self) -> bytes:
        return STATEMENT_CONTEXT + canonical_json(self.signed)


@dataclass(frozen=True)
class RollbackOrder:
    """A verified order to accept one older release of one model on the named devices (all, if none)."""

    name: str
    release: int
    expires: datetime
    devices: tuple[str, ...]
    key_id: str

    def covers(self, name: str, release: int, device_id: str | None, now: datetime) -> bool:
        return (self.name == name and self.release == release and now < self.expires
                and (not self.devices or device_id in self.devices))


@dataclass(frozen=True)
class KeyEntry:
    """One key the device knows: trusted, or retired by a rotation (``replaced_by`` names its successor)."""

    public: PublicKey
    status: Literal["trusted", "retired"] = "trusted"
    replaced_by: str | None = None


@dataclass(frozen=True)
class Keyring:
    """The device's keys: pinned at provisioning, then changed only by verified statements."""

    entries: Mapping[str, KeyEntry] = field(default_factory=dict)
    revoked: frozenset[str] = frozenset()

    @classmethod
    def pinned(cls, keys: Iterable[PublicKey]) -> Keyring:
        return cls({key.key_id: KeyEntry(key) for key in keys})

    def with_pinned(self, keys: Iterable[PublicKey]) -> Keyring:
        """Add keys pinned by configuration; a key the keyring already knows keeps its state (retired, revoked)."""
        entries = dict(self.entries)
        for key in keys:
            entries.setdefault(key.key_id, KeyEntry(key))
        return Keyring(entries, self.revoked)

    def trusted(self) -> dict[str, PublicKey]:
        """Keys that may sign bundles and statements now: trusted and not revoked."""
        return {key_id: entry.public for key_id, entry in self.entries.items()
                if entry.status == "trusted" and key_id not in self.revoked}

    def accepted_keys(self) -> dict[str, PublicKey]:
        """Trusted and retired keys, never revoked ones.

        For re-checking bundles the device accepted before a rotation (its active and previous slots);
        new bundles and statements are checked against :meth:`trusted`.
        """
        return {key_id: entry.public for key_id, entry in self.entries.items() if key_id not in self.revoked}

    def apply_statement(self, data: bytes) -> Keyring:
        """The keyring after a rotation or revocation statement, or BundleError with a ``reason``."""
        statement = parse_statement(data)
        if statement.type == "rotate":
            return self._rotate(statement)
        if statement.type == "revoke":
            return self._revoke(statement)
        raise BundleError(f"a {statement.type or 'typeless'} statement does not change a keyring", reason="malformed")

    def _rotate(self, statement: Statement) -> Keyring:
        old_id = _text(statement.signed, "old")
        try:
            new = PublicKey.from_text(_text(statement.signed, "new"))
        except ConfigError as exc:
            raise BundleError(f"rotation names an invalid new key: {exc}", reason="malformed") from exc
        if new.key_id == old_id:
            raise BundleError("rotation replaces a key with itself", reason="malformed")
        old = self.entries.get(old_id)
        if old is not None and old.status == "retired" and old.replaced_by == new.key_id:
            return self  # already in effect
        if new.key_id in self.revoked:
            raise BundleError(f"rotation to revoked key {new.key_id}", reason="revoked_key")
        trusted = self.trusted()
        verify_any({old_id: statement.signatures[old_id]} if old_id in statement.signatures else {},
                   statement.message, {old_id: trusted[old_id]} if old_id in trusted else {}, self.revoked,
                   what="rotation statement")
        if new.key_id in statement.signatures and not new.verify(statement.signatures[new.key_id], statement.message):
            raise BundleError("the new key's signature on the rotation does not verify", reason="bad_signature")
        entries = dict(self.entries)
        entries[old_id] = replace(entries[old_id], status="retired", replaced_by=new.key_id)
        entries[new.key_id] = KeyEntry(new)
        return Keyring(entries, self.revoked)

    def _revoke(self, statement: Statement) -> Keyring:
        target = _text(statement.signed, "keyid")
        if target in self.revoked:
            return self  # already in effect
        verify_any(statement.signatures, statement.message, self.trusted(), self.revoked, what="revocation")
        return Keyring(self.entries, self.revoked | {target})

    def to_json(self) -> str:
        """Stable JSON for the agent's state directory."""
        keys = [{"keyid": key_id, "public": e.public.to_text(), "status": e.status, "replaced_by": e.replaced_by}
                for key_id, e in sorted(self.entries.items())]
        return canonical_json({"format": KEYRING_FORMAT, "keys": keys, "revoked": sorted(self.revoked)}).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> Keyring:
        """Parse :meth:`to_json` output, raising ConfigError on anything else."""
        try:
            raw = json.loads(text)
            if raw["format"] != KEYRING_FORMAT:
                raise ValueError(f"format {raw['format']}")
            entries: dict[str, KeyEntry] = {}
            for item in raw["keys"]:
                public = PublicKey.from_text(str(item["public"]))
                status, successor = item["status"], item.get("replaced_by")
                if public.key_id != item["keyid"] or status not in ("trusted", "retired"):
                    raise ValueError(f"entry {item['keyid']!r} is inconsistent")
                entries[public.key_id] = KeyEntry(public, status, None if successor is None else str(successor))
            return cls(entries, frozenset(str(key_id) for key_id in raw["revoked"]))
        except (ValueError, KeyError, TypeError, RecursionError, ConfigError) as exc:
            raise ConfigError(f"keyring is invalid: {exc}") from exc


def parse_statement(data: bytes) -> Statement:
    """Parse statement bytes without verifying them; BundleError(reason="malformed"/"oversized") on garbage."""
    if len(data) > MAX_STATEMENT_BYTES:
        raise BundleError(f"statement is {len(data)} bytes, over the {MAX_STATEMENT_BYTES} limit", reason="oversized")
    try:
        raw = json.loads(data)
        signed = raw["signed"]
        signatures = {str(e["keyid"]): base64.b64decode(e["sig"], validate=True) for e in raw["signatures"]}
        if not isinstance(signed, dict):
            raise TypeError("signed part is not an object")
        statement = Statement(signed, signatures)
        statement.message  # noqa: B018  -- canonical form must exist (finite numbers only)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, RecursionError) as exc:
        raise BundleError(f"statement is malformed: {str(exc)[:120]}", reason="malformed") from exc
    if not signatures:
        raise BundleError("statement carries no signature", reason="bad_signature")
    return statement


def verify_rollback_order(data: bytes, keys: Mapping[str, PublicKey], revoked: Iterable[str] = ()) -> RollbackOrder:
    """A rollback order signed by one of ``keys`` (none revoked), or BundleError with a ``reason``."""
    statement = parse_statement(data)
    if statement.type != "rollback":
        raise BundleError(f"expected a rollback order, got a {statement.type or 'typeless'} statement",
                          reason="malformed")
    key_id = verify_any(statement.signatures, statement.message, keys, frozenset(revoked), what="rollback order")
    signed = statement.signed
    release, devices = signed.get("release"), signed.get("devices", [])
    if not isinstance(release, int) or isinstance(release, bool) or release < 1:
        raise BundleError("rollback order names no valid release", reason="malformed")
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise BundleError("rollback order's devices are not a list of ids", reason="malformed")
    return RollbackOrder(_text(signed, "name"), release, parse_time(_text(signed, "expires")), tuple(devices), key_id)


def sign_statement(signed: Mapping[str, Any], signers: Sequence[SigningKey]) -> bytes:
    """Serialize ``signed`` with one signature per signer."""
    statement = Statement(dict(signed), {})
    entries = [{"keyid": k.public.key_id, "sig": base64.b64encode(k.sign(statement.message)).decode()}
               for k in signers]
    return json.dumps({"signed": statement.signed, "signatures": entries}, indent=2, sort_keys=True).encode() + b"\n"


def rotation_statement(old: SigningKey, new: SigningKey | PublicKey, *, now: datetime | None = None) -> bytes:
    """A statement that ``new`` replaces ``old``, signed by ``old`` and, given its private half, by ``new``."""
    public = new.public if isinstance(new, SigningKey) else new
    signed = {"type": "rotate", "old": old.public.key_id, "new": public.to_text(), "issued": _iso(now)}
    return sign_statement(signed, [old, new] if isinstance(new, SigningKey) else [old])


def revocation_statement(key_id: str, signer: SigningKey, *, reason: str = "", now: datetime | None = None) -> bytes:
    """A statement that ``key_id`` is revoked, signed by ``signer``."""
    return sign_statement({"type": "revoke", "keyid": key_id, "reason": reason, "issued": _iso(now)}, [signer])


def rollback_order(name: str, release: int, signer: SigningKey, *, expires: datetime,
                   devices: Sequence[str] = (), now: datetime | None = None) -> bytes:
    """An order to accept ``name`` release ``release`` again, until ``expires``, on ``devices`` (all if empty)."""
    if not NAME.match(name) or release < 1:
        raise ConfigError(f"rollback order needs a model name and a release >= 1, got {name!r} {release}")
    signed = {"type": "rollback", "name": name, "release": release, "expires": _iso(expires),
              "devices": list(devices), "issued": _iso(now)}
    return sign_statement(signed, [signer])


def parse_time(text: str) -> datetime:
    """An ISO 8601 time, UTC when it names no zone; BundleError(reason="malformed") otherwise."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise BundleError(f"{text[:40]!r} is not an ISO time", reason="malformed") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _iso(moment: datetime | None) -> str:
    return (moment or datetime.now(UTC)).isoformat(timespec="seconds")


def _text(signed: Mapping[str, Any], key: str) -> str:
    value = signed.get(key)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise BundleError(f"statement field {key!r} is missing or not text", reason="malformed")
    return value
