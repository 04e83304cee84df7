"""The agent at start-up: an expired active model keeps running and is reported expired; any other failed re-check
refuses it with an event and a slot error, falls back to the previous model if that passes, and what runs is what
the state and the report say. The time floor and the version per release counter are kept durably."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent import accepted
from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.fetch import InMemoryFetcher
from edgefleet.agent.model import ModelInfo, make_model
from edgefleet.agent.restore import Restorer
from edgefleet.agent.state import AgentState, Slot
from edgefleet.agent.verify import TrustSpec, Verified, verify_stored
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.keys import revocation_statement
from edgefleet.errors import BundleError
from edgefleet.testing import synthetic
from edgefleet.testing.agents import model_ref, signed_bundle
from edgefleet.transport import compact, topics
from edgefleet.transport.messages import ReportedState, parse
from edgefleet.transport.mqtt_url import MqttEndpoint

A, B = SigningKey.generate(), SigningKey.generate()
NOW = datetime.now(UTC).replace(microsecond=0)


def bundle(key: SigningKey, version: str, release: int, **spec: Any) -> bytes:
    return pack_bundle(synthetic.channel_mean_model(), key, BundleSpec(
        name="clf", version=version, release=release, labels=list(synthetic.LABELS),
        preprocess=synthetic.preprocess_spec(), **spec))


def make_agent(data_dir: Path) -> Agent:
    config = AgentConfig(device_id="d1", server_url="http://127.0.0.1:9", mqtt=MqttEndpoint("127.0.0.1", 9),
                         token="t", trusted_keys={A.public.key_id: A.public, B.public.key_id: B.public},
                         data_dir=data_dir)
    return Agent(config, fetcher=InMemoryFetcher())


def activate(data_dir: Path, data: bytes, version: str, release: int) -> str:
    """Put a bundle in the active slot as an accepted update would (the old active one becomes previous)."""
    state = AgentState(data_dir)
    digest = hashlib.sha256(data).hexdigest()
    state.save_bundle(digest, data)
    state.stage(Slot(digest, f"clf@{version}"))
    state.activate_candidate("clf", release)
    state.close()
    return digest


def events(agent: Agent) -> list[tuple[str, dict[str, Any]]]:
    messages = [json.loads(i.payload) for i in agent.state.pending(1000) if i.topic == topics.events("d1")]
    return [(m["name"], m["detail"]) for m in messages]


def reported(agent: Agent) -> ReportedState:
    sent: list[bytes] = []

    def publish(_topic: str, payload: bytes, **_options: object) -> int:
        sent.append(payload)
        return 0

    agent.link.publish = publish  # type: ignore[method-assign,assignment]
    agent._report_changes.reset()  # a full report (after the first, the agent sends changes only)
    agent.report()
    return parse(ReportedState, compact.unpack("reported", sent[-1]))


def revoke(data_dir: Path, key: SigningKey, signer: SigningKey) -> None:
    agent = make_agent(data_dir)
    agent.apply_statements([base64.b64encode(revocation_statement(key.public.key_id, signer)).decode()])
    agent.state.close()


def test_an_expired_active_model_keeps_running_and_is_reported_expired(tmp_path: Path) -> None:
    expired = bundle(A, "1.0.0", 1, created=(NOW - timedelta(days=60)).isoformat(),
                     expires=(NOW - timedelta(days=1)).isoformat())
    activate(tmp_path, expired, "1.0.0", 1)
    agent = make_agent(tmp_path)
    assert agent.model is not None and agent.model.ref == "clf@1.0.0"
    assert ("model_expired", {"model": "clf@1.0.0", "sha256": agent.model.sha256}) in events(agent)
    state = reported(agent)
    assert state.running == "clf@1.0.0" and state.active_expired and state.active == "clf@1.0.0"
    assert agent.state.get("running") == "clf@1.0.0" and agent.state.get("active_expired") is True
    assert agent.state.get("slot_error:active") is None
    agent.state.close()


def test_a_revoked_active_model_is_refused_and_the_previous_one_runs(tmp_path: Path) -> None:
    activate(tmp_path, bundle(B, "1.0.0", 1), "1.0.0", 1)
    failed = activate(tmp_path, bundle(A, "2.0.0", 2), "2.0.0", 2)
    revoke(tmp_path, A, B)
    agent = make_agent(tmp_path)
    assert agent.model is not None and agent.model.ref == "clf@1.0.0"
    detail = [d for n, d in events(agent) if n == "restore_failed"][-1]
    assert detail["slot"] == "active" and detail["model"] == "clf@2.0.0" and detail["reason"] == "revoked_key"
    assert detail["running"] == "clf@1.0.0"
    assert agent.state.slot("active").ref == "clf@1.0.0"  # type: ignore[union-attr]
    assert agent.state.slot("previous") is None and failed in agent.state.get("failed_models")
    assert "revoked_key" in agent.state.get("slot_error:active") and "clf@2.0.0" in agent.state.get("last_error")
    state = reported(agent)
    assert (state.running, state.active, state.active_expired) == ("clf@1.0.0", "clf@1.0.0", False)
    agent.state.close()


def test_with_nothing_that_passes_the_agent_runs_nothing_and_says_so(tmp_path: Path) -> None:
    activate(tmp_path, bundle(A, "1.0.0", 1), "1.0.0", 1)
    revoke(tmp_path, A, B)
    agent = make_agent(tmp_path)
    assert agent.model is None
    assert [d["reason"] for n, d in events(agent) if n == "restore_failed"] == ["revoked_key"]
    state = reported(agent)
    assert state.running is None and state.active == "clf@1.0.0"  # the slot keeps its record, marked
    assert agent.state.get("running") is None and "revoked_key" in agent.state.get("slot_error:active")
    agent.state.close()


def test_a_missing_bundle_file_is_a_refusal_and_an_expired_previous_does_not_stand_in(tmp_path: Path) -> None:
    activate(tmp_path, bundle(A, "1.0.0", 1, expires=(NOW - timedelta(days=1)).isoformat()), "1.0.0", 1)
    digest = activate(tmp_path, bundle(A, "2.0.0", 2), "2.0.0", 2)
    (tmp_path / "bundles" / f"{digest}.bundle").unlink()
    agent = make_agent(tmp_path)
    assert agent.model is None
    reasons = {d["slot"]: d["reason"] for n, d in events(agent) if n == "restore_failed"}
    assert reasons == {"active": "missing_bundle", "previous": "expired"}
    assert agent.state.slot("active").ref == "clf@2.0.0"  # type: ignore[union-attr]
    agent.state.close()


def test_a_check_that_could_not_run_changes_no_slot(tmp_path: Path) -> None:
    second = bundle(A, "2.0.0", 2)
    activate(tmp_path, bundle(A, "1.0.0", 1), "1.0.0", 1)
    activate(tmp_path, second, "2.0.0", 2)
    state = AgentState(tmp_path)
    seen: list[tuple[str, dict[str, Any]]] = []

    def flaky(data: bytes, spec: object, **options: object) -> Verified:
        if data == second:
            raise BundleError("verification gave no answer within 120 s", reason="verify_failed")
        return verify_stored(data, spec, **options)  # type: ignore[arg-type]

    spec = TrustSpec(pinned=(A.public, B.public))
    restorer = Restorer(state, lambda: spec, lambda n, d: seen.append((n, d)), lambda _sha: None, flaky)
    restored = restorer.at_start()
    assert restored.model is not None and restored.model.ref == "clf@1.0.0"  # runs, in memory only
    assert state.slot("active").ref == "clf@2.0.0" and state.slot("previous").ref == "clf@1.0.0"  # type: ignore
    assert seen[-1][1]["reason"] == "verify_failed"
    state.close()


def test_a_shadow_that_fails_its_check_is_dropped(tmp_path: Path) -> None:
    activate(tmp_path, bundle(A, "1.0.0", 1), "1.0.0", 1)
    shadow = bundle(A, "1.1.0", 2, expires=(NOW - timedelta(days=1)).isoformat())
    state = AgentState(tmp_path)
    digest = hashlib.sha256(shadow).hexdigest()
    state.save_bundle(digest, shadow)
    state.set_shadow(Slot(digest, "clf@1.1.0"))
    state.close()
    agent = make_agent(tmp_path)
    assert agent.model is not None and agent.shadow is None and agent.state.slot("shadow") is None
    assert "expired" in agent.state.get("slot_error:shadow")
    assert reported(agent).shadow is None
    agent.state.close()


def test_the_time_floor_rises_with_verified_bundles_and_statements_and_survives_a_restart(tmp_path: Path) -> None:
    created = NOW - timedelta(days=3)
    activate(tmp_path, bundle(A, "1.0.0", 1, created=created.isoformat()), "1.0.0", 1)
    agent = make_agent(tmp_path)
    assert accepted.time_floor(agent.state) == created
    issued = NOW + timedelta(minutes=5)
    agent.apply_statements([base64.b64encode(revocation_statement("0" * 16, A, now=issued)).decode()])
    assert accepted.time_floor(agent.state) == issued
    agent.state.close()
    again = make_agent(tmp_path)
    spec = again.trust_spec()
    assert spec.time_floor == issued.isoformat() and again.trust().time_floor == issued
    assert again.trust().accepted_versions == {"clf": (1, "1.0.0")}
    again.state.close()


def test_the_floor_never_goes_down(tmp_path: Path) -> None:
    state = AgentState(tmp_path)
    assert accepted.raise_floor(state, [NOW.isoformat()]) == NOW
    assert accepted.raise_floor(state, [(NOW - timedelta(days=1)).isoformat(), None, "not a time"]) is None
    assert accepted.time_floor(state) == NOW
    state.close()


def test_the_test_clock_offset_moves_the_trust_decisions_clock(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(accepted.FAKE_CLOCK_ENV, str(-3 * 365 * 86400))
    agent = make_agent(tmp_path)
    clock = agent.trust().now
    assert clock is not None and abs((NOW - clock).days - 3 * 365) <= 1
    agent.state.close()


def test_an_activation_records_its_version_under_its_release_counter(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    data = signed_bundle(A, "2.0.0", 4)
    digest = hashlib.sha256(data).hexdigest()
    agent.state.save_bundle(digest, data)
    agent.state.stage(Slot(digest, "clf@2.0.0"))
    agent.state.activate_candidate("clf", 4)
    info = ModelInfo("clf", "2.0.0", 4, preprocess=synthetic.preprocess_spec())
    agent._activate(make_model(info, digest, synthetic.channel_mean_model()))
    assert agent.trust().accepted_versions == {"clf": (4, "2.0.0")}
    assert accepted.time_floor(agent.state) is not None
    agent.state.close()


def test_the_updater_refuses_another_version_under_the_release_counter_it_accepted(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    fetcher = agent.updater._fetcher
    assert isinstance(fetcher, InMemoryFetcher)

    def install(version: str, release: int, model: bytes | None = None) -> str | None:
        data = signed_bundle(A, version, release, model)
        target = model_ref(data, version, release)
        fetcher.artifacts[target.url] = data
        before = len(events(agent))
        agent.updater.install(target)
        refusals = [d.get("reason") for n, d in events(agent)[before:] if n == "refused"]
        return refusals[-1] if refusals else None

    assert install("1.2.0", 3) is None and agent.state.slot("active").ref == "clf@1.2.0"  # type: ignore[union-attr]
    assert install("1.1.0", 3) == "rollback"
    assert install("1.3.0", 3) == "release_reused"
    rebuilt = synthetic.channel_mean_model(bias=[0.01, 0.0, 0.0, 0.0])
    assert install("1.2.0", 3, rebuilt) is None  # a sideways move with the same version is allowed
    assert install("1.3.0", 4) is None and agent.state.slot("active").ref == "clf@1.3.0"  # type: ignore[union-attr]
    agent.state.close()
