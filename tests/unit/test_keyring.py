"""The device's keyring: rotation, forged rotations, revocation, persistence, and signed rollback orders."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.keys import (
    Keyring,
    parse_statement,
    revocation_statement,
    rollback_order,
    rotation_statement,
    sign_statement,
)
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import BundleError, ConfigError
from edgefleet.testing.synthetic import channel_mean_model

A, B, C = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
MODEL = channel_mean_model()


def bundle(key: SigningKey, release: int = 2) -> bytes:
    return pack_bundle(MODEL, key, BundleSpec(name="clf", version=f"1.{release}.0", release=release))


def reason_of(action: object) -> str:
    with pytest.raises(BundleError) as caught:
        action()  # type: ignore[operator]
    return caught.value.reason


def accepts(ring: Keyring, data: bytes, **fields: object) -> str:
    return decide(data, TrustState.from_keyring(ring, **fields)).key_id


def test_rotation_signed_by_the_old_key_moves_trust_to_the_new_one() -> None:
    ring = Keyring.pinned([A.public])
    assert reason_of(lambda: accepts(ring, bundle(B))) == "unknown_key"
    rotated = ring.apply_statement(rotation_statement(A, B))
    assert accepts(rotated, bundle(B)) == B.public.key_id
    assert reason_of(lambda: accepts(rotated, bundle(A))) == "unknown_key"  # retired: no new bundles from A
    assert rotated.entries[A.public.key_id].replaced_by == B.public.key_id
    restored = TrustState(keys=rotated.accepted_keys(), revoked=rotated.revoked)  # the slot it already runs
    assert decide(bundle(A), restored, allow_rollback=True).key_id == A.public.key_id
    assert ring.trusted() == {A.public.key_id: A.public}  # keyrings are values: the original is unchanged


def test_rotation_without_the_new_keys_signature_is_accepted_and_chains() -> None:
    ring = Keyring.pinned([A.public]).apply_statement(rotation_statement(A, B.public))
    ring = ring.apply_statement(rotation_statement(B, C))
    assert set(ring.trusted()) == {C.public.key_id}


def test_applying_a_rotation_twice_is_a_no_op() -> None:
    statement = rotation_statement(A, B)
    once = Keyring.pinned([A.public]).apply_statement(statement)
    assert once.apply_statement(statement) is once


def test_a_rotation_signed_by_an_untrusted_key_is_refused() -> None:
    ring = Keyring.pinned([A.public])
    forged = sign_statement({"type": "rotate", "old": A.public.key_id, "new": C.public.to_text()}, [C])
    assert reason_of(lambda: ring.apply_statement(forged)) == "unknown_key"
    by_stranger = rotation_statement(B, C)  # B is not trusted, so it cannot hand its place to C
    assert reason_of(lambda: ring.apply_statement(by_stranger)) == "unknown_key"


def test_a_rotation_with_a_forged_signature_is_refused() -> None:
    statement = json.loads(rotation_statement(A, C))
    statement["signed"]["new"] = B.public.to_text()  # re-target a genuine statement at another key
    data = json.dumps(statement).encode()
    ring = Keyring.pinned([A.public])
    assert reason_of(lambda: ring.apply_statement(data)) == "bad_signature"
    assert ring.trusted() == {A.public.key_id: A.public}


def test_a_bad_signature_by_the_new_key_refuses_the_rotation() -> None:
    statement = json.loads(rotation_statement(A, B))
    for entry in statement["signatures"]:
        if entry["keyid"] == B.public.key_id:
            entry["sig"] = json.loads(rotation_statement(A, C))["signatures"][0]["sig"]
    assert reason_of(lambda: Keyring.pinned([A.public]).apply_statement(json.dumps(statement).encode())) \
        == "bad_signature"


def test_a_revoked_key_is_refused_even_when_pinned() -> None:
    ring = Keyring.pinned([A.public, B.public]).apply_statement(revocation_statement(B.public.key_id, A))
    assert reason_of(lambda: accepts(ring, bundle(B))) == "revoked_key"
    pinned = TrustState(keys={A.public.key_id: A.public, B.public.key_id: B.public}, revoked=ring.revoked)
    assert reason_of(lambda: decide(bundle(B), pinned)) == "revoked_key"
    assert accepts(ring, bundle(A)) == A.public.key_id


def test_revoked_keys_cannot_sign_statements_or_be_rotated_to() -> None:
    ring = Keyring.pinned([A.public, B.public]).apply_statement(revocation_statement(B.public.key_id, A))
    assert reason_of(lambda: ring.apply_statement(revocation_statement(A.public.key_id, B))) == "revoked_key"
    assert reason_of(lambda: ring.apply_statement(rotation_statement(B, C))) == "revoked_key"
    ahead = Keyring.pinned([A.public]).apply_statement(revocation_statement(C.public.key_id, A))
    assert reason_of(lambda: ahead.apply_statement(rotation_statement(A, C))) == "revoked_key"


def test_a_revocation_signed_by_an_unknown_key_is_refused() -> None:
    ring = Keyring.pinned([A.public])
    assert reason_of(lambda: ring.apply_statement(revocation_statement(A.public.key_id, C))) == "unknown_key"


def test_replaying_an_old_rotation_cannot_undo_a_later_one() -> None:
    first = rotation_statement(A, B)
    ring = Keyring.pinned([A.public]).apply_statement(first).apply_statement(rotation_statement(B, C))
    assert ring.apply_statement(first) is ring
    assert set(ring.trusted()) == {C.public.key_id}


def test_pinning_again_never_revives_a_retired_or_revoked_key() -> None:
    ring = (Keyring.pinned([A.public, C.public]).apply_statement(rotation_statement(A, B))
            .apply_statement(revocation_statement(C.public.key_id, B)))
    newcomer = SigningKey.generate().public
    again = ring.with_pinned([A.public, C.public, newcomer])
    assert set(again.trusted()) == {B.public.key_id, newcomer.key_id}
    assert again.revoked == ring.revoked


def test_the_keyring_round_trips_through_json() -> None:
    ring = (Keyring.pinned([A.public, C.public]).apply_statement(rotation_statement(A, B))
            .apply_statement(revocation_statement(C.public.key_id, B)))
    again = Keyring.from_json(ring.to_json())
    assert again == ring
    assert again.to_json() == ring.to_json()
    with pytest.raises(ConfigError):
        Keyring.from_json('{"format": 1, "keys": [{"keyid": "x", "public": "AAAA", "status": "trusted"}]}')
    with pytest.raises(ConfigError):
        Keyring.from_json("not json")


@pytest.mark.parametrize("data", [b"", b"[]", b'{"signed": 1, "signatures": []}', b'{"signed": {}, "signatures": []}',
                                  b'{"signed": {"x": NaN}, "signatures": [{"keyid": "a", "sig": "AA=="}]}',
                                  b'{"signed": {}, "signatures": [{"keyid": "a", "sig": "!!"}]}', b"x" * 70000])
def test_garbage_statements_are_refused_as_bundle_errors(data: bytes) -> None:
    with pytest.raises(BundleError):
        Keyring.pinned([A.public]).apply_statement(data)


def test_a_statement_signature_never_passes_as_a_manifest_signature() -> None:
    statement = parse_statement(rotation_statement(A, B))
    assert statement.message.startswith(b"edgefleet statement v1\n")


def test_a_signed_rollback_order_lets_the_device_go_back_to_the_named_release() -> None:
    old = bundle(A, release=2)
    state = TrustState(keys={A.public.key_id: A.public}, highest_release={"clf": 4}, device_id="dev-1")
    assert reason_of(lambda: decide(old, state)) == "rollback"
    order = rollback_order("clf", 2, A, expires=datetime.now(UTC) + timedelta(hours=1), devices=["dev-1"])
    assert decide(old, state, rollback_order=order).manifest.release == 2


@pytest.mark.parametrize("mismatch", ["release", "name", "device", "expired"])
def test_a_rollback_order_covers_only_what_it_names(mismatch: str) -> None:
    soon = datetime.now(UTC) + timedelta(hours=1)
    order = {
        "release": lambda: rollback_order("clf", 3, A, expires=soon),
        "name": lambda: rollback_order("other", 2, A, expires=soon),
        "device": lambda: rollback_order("clf", 2, A, expires=soon, devices=["dev-9"]),
        "expired": lambda: rollback_order("clf", 2, A, expires=datetime.now(UTC) - timedelta(seconds=1)),
    }[mismatch]()
    state = TrustState(keys={A.public.key_id: A.public}, highest_release={"clf": 4}, device_id="dev-1")
    assert reason_of(lambda: decide(bundle(A, release=2), state, rollback_order=order)) == "rollback"


def test_a_rollback_order_must_be_signed_by_a_trusted_unrevoked_key() -> None:
    soon = datetime.now(UTC) + timedelta(hours=1)
    state = TrustState(keys={A.public.key_id: A.public, B.public.key_id: B.public}, highest_release={"clf": 4},
                       revoked=frozenset({B.public.key_id}))
    old = bundle(A, release=2)
    assert reason_of(lambda: decide(old, state, rollback_order=rollback_order("clf", 2, C, expires=soon))) \
        == "unknown_key"
    assert reason_of(lambda: decide(old, state, rollback_order=rollback_order("clf", 2, B, expires=soon))) \
        == "revoked_key"
    tampered = json.loads(rollback_order("clf", 3, A, expires=soon))
    tampered["signed"]["release"] = 2
    assert reason_of(lambda: decide(old, state, rollback_order=json.dumps(tampered).encode())) == "bad_signature"


def test_a_rollback_order_is_ignored_when_no_rollback_is_needed() -> None:
    state = TrustState(keys={A.public.key_id: A.public}, highest_release={"clf": 1})
    assert decide(bundle(A, release=2), state, rollback_order=b"garbage").manifest.release == 2
