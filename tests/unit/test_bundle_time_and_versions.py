"""The trust decision's time floor, its expiry allowance for a running model, and one version per release counter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.keys import rollback_order
from edgefleet.core.update import TrustState, decide, effective_time
from edgefleet.errors import BundleError
from edgefleet.testing.synthetic import channel_mean_model, preprocess_spec

KEY = SigningKey.generate()
MODEL_BYTES = channel_mean_model()
NOW = datetime.now(UTC).replace(microsecond=0)


def bundle(**overrides: object) -> bytes:
    spec = {"name": "clf", "version": "1.0.0", "release": 3, "preprocess": preprocess_spec(), **overrides}
    return pack_bundle(MODEL_BYTES, KEY, BundleSpec(**spec))  # type: ignore[arg-type]


def trust(**overrides: object) -> TrustState:
    return TrustState(**{"keys": {KEY.public.key_id: KEY.public}, **overrides})  # type: ignore[arg-type]


def refusal(data: bytes, state: TrustState, **options: object) -> str:
    with pytest.raises(BundleError) as caught:
        decide(data, state, **options)  # type: ignore[arg-type]
    return caught.value.reason


# time --------------------------------------------------------------------------------------------
EXPIRED_LAST_YEAR = bundle(created=(NOW - timedelta(days=730)).isoformat(),
                           expires=(NOW - timedelta(days=365)).isoformat())


def test_a_clock_set_years_back_accepts_an_expired_bundle_without_a_floor() -> None:
    behind = NOW - timedelta(days=3 * 365)
    assert decide(EXPIRED_LAST_YEAR, trust(now=behind)).manifest.ref == "clf@1.0.0"


def test_the_time_floor_refuses_an_expired_bundle_while_the_clock_is_behind() -> None:
    behind = NOW - timedelta(days=3 * 365)
    assert refusal(EXPIRED_LAST_YEAR, trust(now=behind, time_floor=NOW)) == "expired"
    assert refusal(EXPIRED_LAST_YEAR, trust(time_floor=NOW), now=behind) == "expired"
    assert refusal(EXPIRED_LAST_YEAR, trust()) == "expired"  # and with the clock right again


def test_the_decision_time_is_the_later_of_clock_and_floor() -> None:
    behind, floor = NOW - timedelta(days=1000), NOW - timedelta(days=10)
    assert effective_time(trust(now=behind, time_floor=floor)) == floor
    assert effective_time(trust(now=NOW, time_floor=floor)) == NOW
    assert effective_time(trust(time_floor=floor), now=behind) == floor
    assert effective_time(trust(now=behind)) == behind


def test_the_floor_also_ends_a_rollback_order_early() -> None:
    order = rollback_order("clf", 3, KEY, expires=NOW + timedelta(days=1))
    state = trust(highest_release={"clf": 5}, now=NOW)
    assert decide(bundle(), state, rollback_order=order).manifest.release == 3
    later = trust(highest_release={"clf": 5}, now=NOW - timedelta(days=900), time_floor=NOW + timedelta(days=2))
    assert refusal(bundle(), later, rollback_order=order) == "rollback"


def test_an_expired_model_is_accepted_only_when_allowed_and_then_says_so() -> None:
    assert refusal(EXPIRED_LAST_YEAR, trust()) == "expired"
    accepted = decide(EXPIRED_LAST_YEAR, trust(), allow_expired=True)
    assert accepted.expired and accepted.model == MODEL_BYTES
    assert not decide(bundle(), trust(), allow_expired=True).expired


def test_allowing_expiry_lifts_no_other_check() -> None:
    stranger = SigningKey.generate()
    foreign = pack_bundle(MODEL_BYTES, stranger, BundleSpec(name="clf", version="1.0.0",
                                                            expires=(NOW - timedelta(days=1)).isoformat()))
    assert refusal(foreign, trust(), allow_expired=True) == "unknown_key"
    revoked = trust(revoked=frozenset({KEY.public.key_id}))
    assert refusal(EXPIRED_LAST_YEAR, revoked, allow_expired=True) == "revoked_key"
    assert refusal(EXPIRED_LAST_YEAR, trust(highest_release={"clf": 4}), allow_expired=True) == "rollback"
    old_agent = bundle(expires=(NOW - timedelta(days=1)).isoformat(), min_agent_version="9.0.0")
    assert refusal(old_agent, trust(), allow_expired=True) == "agent_too_old"


# versions under one release counter ------------------------------------------------------------------
def test_a_lower_version_under_the_same_release_counter_is_a_rollback() -> None:
    state = trust(highest_release={"clf": 3}, accepted_versions={"clf": (3, "1.2.0")})
    assert refusal(bundle(version="1.1.9"), state) == "rollback"
    assert refusal(bundle(version="0.9.0"), state) == "rollback"


def test_a_sideways_move_needs_the_same_version() -> None:
    state = trust(highest_release={"clf": 3}, accepted_versions={"clf": (3, "1.0.0")})
    assert decide(bundle(version="1.0.0"), state).manifest.ref == "clf@1.0.0"  # same counter, same version
    assert refusal(bundle(version="1.0.1"), state) == "release_reused"
    assert refusal(bundle(version="1.0.0-rc.1"), state) == "release_reused"


def test_a_new_version_with_a_higher_release_counter_is_accepted() -> None:
    state = trust(highest_release={"clf": 3}, accepted_versions={"clf": (3, "1.2.0")})
    assert decide(bundle(version="1.3.0", release=4), state).manifest.release == 4
    assert decide(bundle(version="0.1.0", release=4), state).manifest.release == 4  # the counter orders releases


def test_the_version_check_keeps_to_its_model_and_spares_the_devices_own_bundles() -> None:
    state = trust(highest_release={"clf": 3, "other": 3}, accepted_versions={"other": (3, "5.0.0")})
    assert decide(bundle(version="1.0.0"), state).manifest.ref == "clf@1.0.0"
    mine = trust(highest_release={"clf": 3}, accepted_versions={"clf": (3, "2.0.0")})
    assert decide(bundle(version="1.0.0"), mine, allow_rollback=True).manifest.ref == "clf@1.0.0"
