"""The agent's keyring follows verified rotations and revocations from the control plane, survives restarts,
and updates arrive as weight-level deltas when offered (falling back to the whole bundle when a delta is bad)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.fetch import InMemoryFetcher
from edgefleet.bundle.delta import diff
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.keys import revocation_statement, rotation_statement
from edgefleet.testing import synthetic
from edgefleet.testing.agents import model_ref, signed_bundle
from edgefleet.transport import topics
from edgefleet.transport.messages import DesiredState, ModelRef
from edgefleet.transport.mqtt_url import MqttEndpoint

OLD, NEW = SigningKey.generate(), SigningKey.generate()


def make_agent(data_dir: Path, fetcher: InMemoryFetcher) -> Agent:
    config = AgentConfig(device_id="d1", server_url="http://127.0.0.1:9", mqtt=MqttEndpoint("127.0.0.1", 9),
                         token="t", trusted_keys={OLD.public.key_id: OLD.public}, data_dir=data_dir)
    return Agent(config, fetcher=fetcher)


def install(agent: Agent, fetcher: InMemoryFetcher, data: bytes, version: str, release: int,
            **extra: str | int) -> ModelRef:
    target = model_ref(data, version, release).model_copy(update=extra)
    fetcher.artifacts[target.url] = data
    agent.updater.install(target)
    return target


def events(agent: Agent) -> list[dict[str, object]]:
    return [json.loads(i.payload) for i in agent.state.pending(1000) if i.topic == topics.events("d1")]


def desire(agent: Agent, statements: list[bytes]) -> None:
    message = DesiredState(device="d1", statements=[base64.b64encode(s).decode() for s in statements])
    agent._on_message(topics.desired("d1"), message.to_bytes())


def test_a_rotation_moves_trust_to_the_new_key_and_survives_a_restart(tmp_path: Path) -> None:
    fetcher = InMemoryFetcher()
    agent = make_agent(tmp_path, fetcher)
    install(agent, fetcher, signed_bundle(OLD, "1.0.0", 1), "1.0.0", 1)
    desire(agent, [rotation_statement(OLD, NEW)])
    install(agent, fetcher, signed_bundle(NEW, "2.0.0", 2), "2.0.0", 2)
    assert agent.state.slot("active").ref == "clf@2.0.0"  # type: ignore[union-attr]
    install(agent, fetcher, signed_bundle(OLD, "3.0.0", 3), "3.0.0", 3)  # the retired key signs nothing new
    assert events(agent)[-1]["detail"]["reason"] == "unknown_key"  # type: ignore[index]
    agent.state.close()

    restarted = make_agent(tmp_path, fetcher)  # the keyring is durable; both own bundles still load
    assert restarted.model is not None and restarted.model.ref == "clf@2.0.0"
    assert NEW.public.key_id in restarted.keyring().trusted()
    assert restarted._restore("previous") is not None  # signed by the retired key, accepted before
    restarted.state.close()


def test_a_revoked_key_is_refused_and_a_forged_statement_is_ignored(tmp_path: Path) -> None:
    fetcher = InMemoryFetcher()
    agent = make_agent(tmp_path, fetcher)
    stranger = SigningKey.generate()
    desire(agent, [rotation_statement(stranger, NEW), b"not a statement"])
    assert NEW.public.key_id not in agent.keyring().trusted()
    assert [e["name"] for e in events(agent)].count("statement_refused") == 2
    desire(agent, [rotation_statement(OLD, NEW), revocation_statement(OLD.public.key_id, NEW)])
    install(agent, fetcher, signed_bundle(OLD, "1.0.0", 1), "1.0.0", 1)
    assert events(agent)[-1]["detail"]["reason"] == "revoked_key"  # type: ignore[index]
    assert agent.state.slot("active") is None
    agent.state.close()


@pytest.mark.parametrize("corrupt", [False, True])
def test_updates_use_the_delta_when_offered_and_fall_back_when_it_is_bad(tmp_path: Path, corrupt: bool) -> None:
    fetcher = InMemoryFetcher()
    agent = make_agent(tmp_path, fetcher)
    v1 = signed_bundle(OLD, "1.0.0", 1)
    v2 = signed_bundle(OLD, "1.1.0", 2, synthetic.channel_mean_model(bias=[0.1, 0.0, 0.0, 0.0]))
    base = install(agent, fetcher, v1, "1.0.0", 1)
    delta = diff(v1, v2)
    assert delta.is_delta
    payload = delta.data[:-8] + b"\x00" * 8 if corrupt else delta.data
    fetcher.artifacts["/delta/v1-v2"] = payload
    install(agent, fetcher, v2, "1.1.0", 2, delta_url="/delta/v1-v2", delta_base_sha256=base.sha256,
            delta_size=len(payload))
    assert agent.state.slot("active").ref == "clf@1.1.0"  # type: ignore[union-attr]
    assert ("delta_applied" in [e["name"] for e in events(agent)]) is not corrupt
    agent.state.close()
