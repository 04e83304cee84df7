"""The server's trust decisions on a real (SQLite) store: its keyring follows published statements, bad statements
store nothing, every desired state carries the statements and its target's rollback order, and a rollout of an
older release needs a signed order that covers it."""

from __future__ import annotations

import base64
import functools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgefleet.bundle.pack import BundleSpec, pack_bundle, peek_manifest
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.keys import revocation_statement, rollback_order, rotation_statement
from edgefleet.errors import BundleError, ConfigError
from edgefleet.server.publisher import with_trust
from edgefleet.server.schema import Device
from edgefleet.server.store import Store
from edgefleet.server.trust import (
    pin_keys,
    publish_statement,
    rollback_admitted,
    server_keyring,
    trust_delivery,
)
from edgefleet.testing import synthetic
from edgefleet.transport.messages import DesiredState, ModelRef

A, B, C = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
LATER = datetime.now(UTC) + timedelta(hours=1)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    pin_keys(store, {A.public.key_id: A.public})
    return store


@functools.cache
def bundle(version: str, release: int, key: SigningKey = A) -> bytes:
    return pack_bundle(synthetic.channel_mean_model(), key, BundleSpec(
        name="clf", version=version, release=release, labels=list(synthetic.LABELS),
        preprocess=synthetic.preprocess_spec()))


def add_model(store: Store, version: str, release: int, key: SigningKey = A) -> None:
    data = bundle(version, release, key)
    store.add_model(peek_manifest(data), f"{version}-{release}".ljust(64, "0"), len(data), key.public.key_id)


def add_device(store: Store, device_id: str, desired: str | None = None, active: str | None = None) -> None:
    store.add_device(Device(id=device_id, token_sha256=device_id.ljust(64, "0"), mqtt_password_sha256="p" * 64,
                            tags={"site": "lab"}, profile=None, created=time.time(), revoked=False))
    if desired is not None:
        model = store.model_by_ref(desired)
        assert model is not None
        store.set_desired([device_id], model.id)
    if active is not None:
        store.record_reported(device_id, {"active": active})


def test_the_keyring_follows_rotation_then_revocation_and_every_device_is_republished(store: Store) -> None:
    add_device(store, "d1")
    rotation = rotation_statement(A, B)
    published = publish_statement(store, rotation)
    assert published.stored and published.type == "rotate" and published.subject == B.public.key_id
    assert set(server_keyring(store).trusted()) == {B.public.key_id}
    assert [d.id for d in store.desired_unpublished()] == ["d1"]  # its next desired state carries it
    assert not publish_statement(store, rotation).stored  # the same file again: nothing new
    revocation = revocation_statement(A.public.key_id, B)
    revoked = publish_statement(store, revocation)
    assert revoked.stored and revoked.keyring.revoked == {A.public.key_id}
    pin_keys(store, {A.public.key_id: A.public})  # a restart with the old --trusted-key brings nothing back
    assert set(server_keyring(store).trusted()) == {B.public.key_id}
    assert A.public.key_id in server_keyring(store).revoked
    assert [base64.b64decode(s) for s in trust_delivery(store).statements] == [rotation, revocation]


@pytest.mark.parametrize(("statement", "reason"), [
    (b"{not json", "malformed"),
    (revocation_statement(A.public.key_id, C), "unknown_key"),  # signed by a key the server does not trust
    (rollback_order("clf", 1, A, expires=LATER), "malformed"),  # orders go with `rollout create --rollback`
])
def test_a_bad_statement_is_refused_and_nothing_is_stored(store: Store, statement: bytes, reason: str) -> None:
    add_device(store, "d1")
    with pytest.raises(BundleError) as refused:
        publish_statement(store, statement)
    assert refused.value.reason == reason
    assert [r.kind for r in store.trust_log()] == ["pin"] and store.desired_unpublished() == []


def test_a_statement_whose_signature_was_tampered_with_is_refused(store: Store) -> None:
    statement = rotation_statement(A, B).replace(b'"sig": "', b'"sig": "AAAA', 1)
    with pytest.raises(BundleError) as refused:
        publish_statement(store, statement)
    assert refused.value.reason == "bad_signature"
    assert [r.kind for r in store.trust_log()] == ["pin"]


def test_desired_states_carry_the_statements_and_their_targets_rollback_order(store: Store) -> None:
    publish_statement(store, rotation_statement(A, B))
    store.add_trust_record("rollback", "clf", b"order-1", check=lambda _log: True, release=1)
    delivery = trust_delivery(store)
    ref = ModelRef(name="clf", version="1.0.0", release=1, sha256="a" * 64, size=1, url="/a")
    state = with_trust(DesiredState(device="d1", model=ref, shadow=ref.model_copy(update={"release": 2})), delivery)
    assert state.statements == list(delivery.statements) and len(state.statements) == 1
    assert state.model is not None and state.model.rollback_order == base64.b64encode(b"order-1").decode()
    assert state.shadow is not None and state.shadow.rollback_order is None  # release 2 has no order
    assert with_trust(DesiredState(device="d1"), delivery).statements == list(delivery.statements)


def test_an_older_release_needs_a_rollback_order_that_covers_it(store: Store) -> None:
    for version, release in (("1.0.0", 1), ("2.0.0", 2), ("3.0.0", 3)):
        add_model(store, version, release)
    add_device(store, "d1", desired="clf@3.0.0")
    add_device(store, "d2", desired="clf@2.0.0", active="clf@3.0.0")
    spec = {"candidate": "clf@1.0.0", "select": {"site": "lab"}}
    with pytest.raises(ConfigError, match=r"older than release 3 .* --rollback"), rollback_admitted(store, spec, None):
        pass
    with rollback_admitted(store, {**spec, "candidate": "clf@3.0.0"}, None):  # not older: nothing needed
        pass

    def order(**kw: object) -> str:
        fields: dict[str, object] = {"name": "clf", "release": 1, "signer": A, "expires": LATER, **kw}
        signer = fields.pop("signer")
        return base64.b64encode(rollback_order(signer=signer, **fields)).decode()  # type: ignore[arg-type]

    for bad, reason in ((order(release=2), "rollback"), (order(signer=C), "unknown_key"),
                        (order(expires=datetime.now(UTC) - timedelta(seconds=1)), "expired"),
                        (order(devices=["d1"]), "rollback")):
        with pytest.raises(BundleError) as refused, rollback_admitted(store, spec, bad):
            pass
        assert refused.value.reason == reason
    assert [r.kind for r in store.trust_log()] == ["pin"]
    good = order()
    with pytest.raises(RuntimeError), rollback_admitted(store, spec, good):
        raise RuntimeError("the rollout could not be created")
    assert [r.kind for r in store.trust_log()] == ["pin"]  # the order went with it
    with rollback_admitted(store, spec, good):
        assert ("clf", 1) in trust_delivery(store).rollback_orders  # before any device is assigned
    assert trust_delivery(store).rollback_orders[("clf", 1)] == good


def test_a_candidate_signed_by_a_retired_or_revoked_key_is_refused(store: Store) -> None:
    add_model(store, "1.0.0", 1)
    add_device(store, "d1")
    spec = {"candidate": "clf@1.0.0"}
    publish_statement(store, rotation_statement(A, B))
    with pytest.raises(BundleError, match="retired") as refused, rollback_admitted(store, spec, None):
        pass
    assert refused.value.reason == "unknown_key"
    publish_statement(store, revocation_statement(A.public.key_id, B))
    with pytest.raises(BundleError, match="revoked") as refused, rollback_admitted(store, spec, None):
        pass
    assert refused.value.reason == "revoked_key"
