"""The control plane's trust: its keyring and what devices are sent, both replayed from the store's trust log.

The server checks bundles (``model push``), key statements (``keys publish``) and rollback orders (``rollout
create --rollback``) against one keyring: the keys it was started with (``--trusted-key``, pinned in the log at
start, so every replica and every restart knows them), changed by every rotation and revocation in the log, in
order, by the same rules as a device's keyring (:class:`edgefleet.core.keys.Keyring`). Every decision replays the
log from the database, so a statement registered on one replica holds on all of them at once.

Delivery (:func:`trust_delivery`, stamped on every desired state by
:class:`~edgefleet.server.publisher.DesiredPublisher`): each desired state carries every key statement of the
log, oldest first. A device applies them before it looks at the model, and a bundle signed by a new key can be
registered only once the statement that introduces it is in the log, so a device is never told to run a bundle
whose key it cannot know. A device that was offline finds them in its retained desired state when it comes back.
A rollback order rides in the target (``ModelRef.rollback_order``) of every device told to run its release.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from edgefleet.bundle.signing import PublicKey
from edgefleet.core.keys import Keyring, parse_statement, verify_rollback_order
from edgefleet.core.rollout import DeviceView, make_plan, select_targets
from edgefleet.errors import BundleError, ConfigError
from edgefleet.server.schema import ModelVersion, TrustRecord
from edgefleet.server.store import Store

log = logging.getLogger(__name__)
STATEMENT_KINDS = ("rotate", "revoke")


@dataclass(frozen=True)
class TrustDelivery:
    """What every desired state carries: the key statements (base64, oldest first) and, per (model name,
    release), the newest rollback order (base64)."""

    statements: tuple[str, ...] = ()
    rollback_orders: Mapping[tuple[str, int], str] = field(default_factory=dict)


@dataclass(frozen=True)
class Published:
    """The outcome of publishing a statement: whether it was added (False: already in effect) and the keyring."""

    type: str
    subject: str
    stored: bool
    keyring: Keyring


def replay(records: Iterable[TrustRecord]) -> Keyring:
    """The keyring the trust log describes: pins and statements applied in order (rollback orders change none)."""
    ring = Keyring()
    for record in records:
        data = base64.b64decode(record.body)
        if record.kind == "pin":
            ring = ring.with_pinned([PublicKey.from_text(data.decode())])
        elif record.kind in STATEMENT_KINDS:
            try:
                ring = ring.apply_statement(data)
            except BundleError as exc:  # checked when it was added: only a log edited by hand gets here
                log.warning("trust log record %d (%s) skipped: %s", record.id, record.kind, exc)
    return ring


def server_keyring(store: Store) -> Keyring:
    """The server's keyring now, as every replica sees it."""
    return replay(store.trust_log())


def pin_keys(store: Store, keys: Mapping[str, PublicKey]) -> None:
    """Record the keys the server was started with; a key the log already knows keeps its state there."""
    store.pin_keys((key_id, key.to_text()) for key_id, key in keys.items())


def trust_delivery(store: Store) -> TrustDelivery:
    """What the publisher stamps on every desired state (one query)."""
    statements: list[str] = []
    orders: dict[tuple[str, int], str] = {}
    for record in store.trust_log():
        if record.kind in STATEMENT_KINDS:
            statements.append(record.body)
        elif record.kind == "rollback" and record.release is not None:
            orders[(record.subject, record.release)] = record.body
    return TrustDelivery(tuple(statements), orders)


def publish_statement(store: Store, data: bytes) -> Published:
    """Verify a rotation or revocation against the server's keyring and add it to the log, every device's desired
    state marked for publishing again; BundleError (with a ``reason``) refuses it and stores nothing."""
    statement = parse_statement(data)
    if statement.type not in STATEMENT_KINDS:
        raise BundleError(f"a {statement.type or 'typeless'} statement cannot be published: only key rotations and "
                          "revocations (a rollback order goes with `rollout create --rollback`)", reason="malformed")
    subject = _subject(statement.type, statement.signed)
    outcome: dict[str, Keyring] = {}

    def check(records: list[TrustRecord]) -> bool:
        before = replay(records)
        outcome["keyring"] = after = before.apply_statement(data)  # raises to refuse
        return after != before

    signer = ",".join(sorted(statement.signatures))[:64]
    stored = store.add_trust_record(statement.type, subject, data, check=check, signer=signer, fan_out=True)
    return Published(statement.type, subject, stored, outcome.get("keyring") or server_keyring(store))


def keyring_json(ring: Keyring) -> dict[str, Any]:
    """The keyring for the API: trusted keys (id to public key), retired ones (id to successor), revoked ids."""
    return {"trusted": {k: v.to_text() for k, v in sorted(ring.trusted().items())},
            "retired": {k: e.replaced_by for k, e in sorted(ring.entries.items())
                        if e.status == "retired" and k not in ring.revoked},
            "revoked": sorted(ring.revoked)}


@contextmanager
def rollback_admitted(store: Store, spec: Mapping[str, Any], order_b64: str | None) -> Iterator[None]:
    """Admit a rollout's candidate, around its creation.

    Refused (one line): a candidate signed by a key the server's keyring no longer trusts (devices would refuse
    it), and a release older than one its target devices run or are told to run, unless ``order_b64`` is a
    rollback order signed by a trusted key, for this name and release, unexpired, naming every target (or no
    device). A verified order is added to the trust log before the rollout assigns anyone (so the first desired
    state carries it) and dropped again if the rollout is not created.
    """
    model = store.model_by_ref(str(spec.get("candidate", "")))
    if model is None:  # the orchestrator says so
        yield
        return
    ring = server_keyring(store)
    if model.key_id in ring.revoked:
        raise BundleError(f"{model.name}@{model.version} is signed by revoked key {model.key_id}", reason="revoked_key")
    if model.key_id not in ring.trusted():
        raise BundleError(f"{model.name}@{model.version} is signed by key {model.key_id}, which a rotation retired: "
                          "devices refuse it; sign it again with the current key", reason="unknown_key")
    targets, highest = _targets(store, spec, model)
    if order_b64 is None:
        if model.release < highest:
            raise ConfigError(f"{model.name}@{model.version} is release {model.release}, older than release {highest} "
                              "that its devices run or are told to run: give a signed rollback order (`edgefleet "
                              "bundle rollback-order`, then `rollout create ... --rollback ORDER_FILE`)")
        yield
        return
    data = _order_bytes(order_b64)
    try:
        order = verify_rollback_order(data, ring.trusted(), ring.revoked)
    except BundleError as exc:
        raise BundleError(f"rollback order refused ({exc.reason}): {exc}", reason=exc.reason) from exc
    if (order.name, order.release) != (model.name, model.release):
        raise BundleError(f"the rollback order is for {order.name} release {order.release}, not "
                          f"{model.name}@{model.version} (release {model.release})", reason="rollback")
    if datetime.now(UTC) >= order.expires:
        raise BundleError(f"the rollback order expired at {order.expires.isoformat()}", reason="expired")
    uncovered = [t for t in targets if order.devices and t not in order.devices]
    if uncovered:
        raise BundleError(f"the rollback order does not name device {uncovered[0]!r}"
                          + (f" (and {len(uncovered) - 1} more)" if len(uncovered) > 1 else "")
                          + " that the rollout targets", reason="rollback")
    added = store.add_trust_record("rollback", model.name, data, check=lambda _records: True, signer=order.key_id,
                                   release=model.release)
    try:
        yield
    except BaseException:
        if added:
            store.remove_trust_record(data)
        raise


def _targets(store: Store, spec: Mapping[str, Any], model: ModelVersion) -> tuple[list[str], int]:
    """The devices the rollout would target, and the highest release of the model's name that any of them runs
    (reported) or is told to run (desired); 0 when none."""
    models = store.list_models()
    by_id = {m.id: m for m in models}
    by_ref = {f"{m.name}@{m.version}": m for m in models}
    rows = {row.id: row for row in store.device_views()}
    views = [DeviceView(r.id, dict(r.tags or {}), r.profile, revoked=r.revoked) for r in rows.values()]
    targets = select_targets(make_plan(spec), views, "admission")
    highest = 0
    for device_id in targets:
        row = rows[device_id]
        active = (row.reported or {}).get("active")
        for other in (by_id.get(row.desired_model_id) if row.desired_model_id else None,
                      by_ref.get(active) if isinstance(active, str) else None):
            if other is not None and other.name == model.name:
                highest = max(highest, other.release)
    return targets, highest


def _order_bytes(order_b64: str) -> bytes:
    try:
        return base64.b64decode(order_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError("the rollback order is not base64") from exc


def _subject(kind: str, signed: Mapping[str, Any]) -> str:
    """The key a statement is about: the new key of a rotation, the revoked key of a revocation."""
    if kind == "rotate":
        try:
            return PublicKey.from_text(str(signed.get("new", ""))).key_id
        except ConfigError as exc:
            raise BundleError(f"rotation names an invalid new key: {exc}", reason="malformed") from exc
    return str(signed.get("keyid", ""))[:140]
