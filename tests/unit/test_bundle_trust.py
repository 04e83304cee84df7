"""The device's trust decision (core.update.decide) over real signed bundles: accept, and every refusal."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from edgefleet.bundle.container import MANIFEST, MODEL, SIGNATURES, read_container, write_container
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import BundleError
from edgefleet.testing.synthetic import channel_mean_model, preprocess_spec

KEY = SigningKey.generate()
MODEL_BYTES = channel_mean_model()


def bundle(**overrides: object) -> bytes:
    spec = {"name": "clf", "version": "1.0.0", "release": 3, "preprocess": preprocess_spec(), **overrides}
    return pack_bundle(MODEL_BYTES, KEY, BundleSpec(**spec))  # type: ignore[arg-type]


def trust(**overrides: object) -> TrustState:
    return TrustState(**{"keys": {KEY.public.key_id: KEY.public}, **overrides})  # type: ignore[arg-type]


def refusal(data: bytes, state: TrustState | None = None) -> str:
    with pytest.raises(BundleError) as caught:
        decide(data, state or trust())
    return caught.value.reason


def test_a_signed_bundle_is_accepted_with_its_model_bytes() -> None:
    accepted = decide(bundle(), trust())
    assert accepted.model == MODEL_BYTES
    assert accepted.manifest.ref == "clf@1.0.0"
    assert accepted.key_id == KEY.public.key_id


def test_changed_model_bytes_are_refused_as_hash_mismatch() -> None:
    members = read_container(bundle())
    model = bytearray(members[MODEL])
    model[len(model) // 2] ^= 0xFF
    assert refusal(write_container({**members, MODEL: bytes(model)})) == "hash_mismatch"


def test_a_changed_manifest_field_breaks_the_signature() -> None:
    members = read_container(bundle())
    manifest = json.loads(members[MANIFEST])
    manifest["release"] = 99
    tampered = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert refusal(write_container({**members, MANIFEST: tampered})) == "bad_signature"


def test_a_model_swapped_under_the_same_manifest_is_refused() -> None:
    other = pack_bundle(channel_mean_model(scale=1.0), KEY, BundleSpec(name="clf", version="1.0.0", release=3))
    members = read_container(bundle())
    swapped = write_container({**members, MODEL: read_container(other)[MODEL]})
    assert refusal(swapped) == "hash_mismatch"


def test_an_unknown_key_is_refused() -> None:
    stranger = SigningKey.generate()
    foreign = pack_bundle(MODEL_BYTES, stranger, BundleSpec(name="clf", version="1.0.0"))
    assert refusal(foreign) == "unknown_key"


def test_a_lower_release_is_a_rollback_unless_ordered() -> None:
    state = trust(highest_release={"clf": 4})
    assert refusal(bundle(), state) == "rollback"
    assert decide(bundle(), state, allow_rollback=True).manifest.release == 3


def test_wrong_hardware_expired_and_too_old_agent_are_refused() -> None:
    assert refusal(bundle(hardware=["jetson-orin"])) == "wrong_hardware"
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    assert refusal(bundle(expires=past)) == "expired"
    assert refusal(bundle(), trust(agent_version="0.0.1")) == "agent_too_old"


def test_truncated_padded_and_foreign_files_are_refused() -> None:
    data = bundle()
    assert refusal(data[:-10]) == "truncated"
    assert refusal(data + b"x") == "malformed"
    assert refusal(b"PK\x03\x04 not a bundle at all") in ("malformed", "truncated")


def test_missing_signature_member_is_refused() -> None:
    members = read_container(bundle())
    del members[SIGNATURES]
    with pytest.raises(BundleError) as caught:
        write_container(members) and decide(write_container(members), trust())
    assert caught.value.reason == "missing_member"
