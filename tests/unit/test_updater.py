"""The agent's update path with the in-memory fetcher: activation, and refusals that keep the active model."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.updater import ERROR_KEY
from edgefleet.bundle.container import MODEL, read_container, write_container
from edgefleet.bundle.signing import SigningKey
from edgefleet.testing.agents import UpdaterHarness, signed_bundle
from edgefleet.testing.synthetic import channel_mean_model

KEY = SigningKey.generate()


def make_bundle(version: str, release: int, model: bytes | None = None) -> bytes:
    return signed_bundle(KEY, version, release, model)


@pytest.fixture
def harness(tmp_path: Path) -> UpdaterHarness:
    return UpdaterHarness(tmp_path, KEY)


def test_install_activates_and_keeps_the_previous_slot(harness: UpdaterHarness) -> None:
    harness.install(make_bundle("1.0.0", 1), "1.0.0", 1)
    harness.install(make_bundle("1.1.0", 2), "1.1.0", 2)
    assert harness.state.slot("active").ref == "clf@1.1.0"  # type: ignore[union-attr]
    assert harness.state.slot("previous").ref == "clf@1.0.0"  # type: ignore[union-attr]
    assert harness.state.highest_releases() == {"clf": 2}
    assert [e[0] for e in harness.events].count("activated") == 2


def test_model_bytes_changed_after_signing_are_refused_and_active_kept(harness: UpdaterHarness) -> None:
    harness.install(make_bundle("1.0.0", 1), "1.0.0", 1)
    members = read_container(make_bundle("1.1.0", 2))
    model = bytearray(members[MODEL])
    model[-20] ^= 0x01
    tampered = write_container({**members, MODEL: bytes(model)})
    harness.install(tampered, "1.1.0", 2)  # the announced SHA-256 is the tampered file's: only the signature knows
    assert harness.state.slot("active").ref == "clf@1.0.0"  # type: ignore[union-attr]
    assert harness.state.slot("candidate") is None
    name, detail = harness.events[-1]
    assert name == "refused" and detail["reason"] == "hash_mismatch"
    assert "hash_mismatch" in harness.state.get(ERROR_KEY)
    assert len(harness.active) == 1


def test_a_model_that_fails_its_health_check_is_refused(harness: UpdaterHarness) -> None:
    harness.install(make_bundle("1.0.0", 1), "1.0.0", 1)
    nan_model = channel_mean_model(bias=[float("nan")] * 4)
    harness.install(make_bundle("2.0.0", 2, nan_model), "2.0.0", 2)
    assert harness.state.slot("active").ref == "clf@1.0.0"  # type: ignore[union-attr]
    assert harness.events[-1][0] == "refused"
    assert harness.state.highest_releases() == {"clf": 1}


def test_an_older_release_is_refused_as_rollback(harness: UpdaterHarness) -> None:
    harness.install(make_bundle("2.0.0", 2), "2.0.0", 2)
    harness.install(make_bundle("1.0.0", 1), "1.0.0", 1)
    assert harness.events[-1][1]["reason"] == "rollback"
    assert harness.state.slot("active").ref == "clf@2.0.0"  # type: ignore[union-attr]
