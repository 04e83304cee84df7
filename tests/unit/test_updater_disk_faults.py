"""A full disk (ENOSPC) at each step of an update: the update aborts and cleans up, the old model keeps
inferring, the state returns to idle with the error, and the agent starts again on the same directory.

The download step writes to ``/dev/full`` (the kernel's own ENOSPC); the other steps have OSError(ENOSPC)
injected where they write (the adopted bundle, the staged slot, the health check's files, the activation).
A real tmpfs that fills at each step, with the agent process, is in tests/integration/test_agent_disk_full.py.
The outbox on a database that is really full (SQLite's page limit) refuses and counts.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent import updater as updater_module
from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.fetch import InMemoryFetcher
from edgefleet.agent.sources import ReplaySource
from edgefleet.agent.state import AgentState, describe
from edgefleet.agent.updater import ERROR_KEY, PENDING_KEY, STEP_KEY
from edgefleet.bundle.signing import SigningKey
from edgefleet.processes import wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.agents import model_ref, signed_bundle
from edgefleet.transport.mqtt_url import MqttEndpoint

KEY = SigningKey.generate()
V1, V2 = signed_bundle(KEY, "1.0.0", 1), signed_bundle(KEY, "2.0.0", 2)
T1, T2 = model_ref(V1, "1.0.0", 1), model_ref(V2, "2.0.0", 2)
STEPS = ["downloading", "verifying", "staged", "health_checking", "activating"]


def enospc(*_args: object, **_kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def make_agent(data_dir: Path, fetcher: InMemoryFetcher) -> Agent:
    config = AgentConfig(device_id="d1", server_url="http://127.0.0.1:9", mqtt=MqttEndpoint("127.0.0.1", 9),
                         token="t", trusted_keys={KEY.public.key_id: KEY.public}, data_dir=data_dir)
    return Agent(config, fetcher=fetcher)


@pytest.fixture
def fetcher() -> InMemoryFetcher:
    return InMemoryFetcher({T1.url: V1, T2.url: V2})


@pytest.fixture
def agent(tmp_path: Path, fetcher: InMemoryFetcher) -> Iterator[Agent]:
    device = make_agent(tmp_path, fetcher)
    device.updater.install(T1)
    assert device.model is not None and device.model.ref == "clf@1.0.0"
    yield device
    device.updater.stop()
    device.state.close()


def inject(step: str, agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the write of ``step`` fail with ENOSPC."""
    if step == "downloading":
        part = agent.state.data_dir / "downloads" / f"{T2.sha256}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        part.symlink_to("/dev/full")  # every write to it: ENOSPC, from the kernel
        return
    target: dict[str, tuple[object, str]] = {
        "verifying": (AgentState, "adopt_bundle"), "staged": (AgentState, "stage"),
        "health_checking": (updater_module, "run_health_check"), "activating": (AgentState, "activate_candidate")}
    owner, name = target[step]
    monkeypatch.setattr(owner, name, enospc)


def telemetry_models(state: AgentState) -> list[str | None]:
    return [json.loads(item.payload).get("model") for item in state.pending(limit=1000)
            if item.topic.endswith("/telemetry")]


def infer(agent: Agent) -> None:
    rec = synthetic.recordings(per_class=1, length=60)
    agent.run(ReplaySource(rec.test_x, rec.test_y, 10.0, speed=float("inf"), loop=False))


def events(state: AgentState, name: str) -> list[dict[str, object]]:
    found = [json.loads(item.payload) for item in state.pending(limit=1000) if item.topic.endswith("/events")]
    return [event["detail"] for event in found if event["name"] == name]


@pytest.mark.parametrize("step", STEPS)
def test_a_full_disk_at_each_step_aborts_cleanly_and_the_old_model_keeps_inferring(
        step: str, agent: Agent, fetcher: InMemoryFetcher, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with monkeypatch.context() as faults:
        inject(step, agent, faults)
        agent.updater.request(T2)  # pending before the updater starts: its first clean-up keeps the partial file
        agent.updater.start()
        wait_until(lambda: agent.state.get(PENDING_KEY) is None and agent.state.get(STEP_KEY) == "idle", 30,
                   f"the update to abort at {step}")
        agent.updater.stop()
    state = agent.state
    assert agent.model is not None and agent.model.ref == "clf@1.0.0"
    summary = describe(state)
    assert (summary["active"], summary["candidate"], summary["update_state"]) == ("clf@1.0.0", None, "idle")
    assert "disk_full" in state.get(ERROR_KEY)
    assert [e["reason"] for e in events(state, "refused")] == ["disk_full"]
    assert not state.bundle_path(T2.sha256).exists()  # the staged bundle is removed
    assert list((tmp_path / "downloads").glob("*")) == [] and list((tmp_path / "health").glob("*")) == []

    infer(agent)  # the old model still answers
    assert set(telemetry_models(state)) == {"clf@1.0.0"}
    state.close()

    restarted = make_agent(tmp_path, fetcher)  # a restart on the same directory: no crash, same model
    try:
        assert restarted.model is not None and restarted.model.ref == "clf@1.0.0"
        restarted.updater.start()
        restarted.updater.request(T2)  # the disk has room again: the same update now goes through
        wait_until(lambda: restarted.state.slot("active").ref == "clf@2.0.0"  # type: ignore[union-attr]
                   and restarted.state.get(STEP_KEY) == "idle", 30, "the update after the restart")
        assert restarted.state.get(ERROR_KEY) is None
    finally:
        restarted.updater.stop()
        restarted.state.close()


def test_the_step_is_written_once_the_database_can_write_again(
        agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal whose idle state cannot be written is written later; the updater never stays mid-step."""
    failing: list[bool] = [True]
    real_put_all: Callable[..., None] = AgentState.put_all

    def put_all(self: AgentState, values: dict[str, object]) -> None:
        if failing[0] and values.get(STEP_KEY) == "idle":
            enospc()
        real_put_all(self, values)

    monkeypatch.setattr(AgentState, "put_all", put_all)
    monkeypatch.setattr(updater_module, "UNSAVED_RETRY_S", 0.1)
    monkeypatch.setattr(updater_module, "run_health_check", enospc)
    agent.updater.start()
    agent.updater.request(T2)
    wait_until(lambda: agent.state.get(STEP_KEY) == "health_checking" and agent.state.get(PENDING_KEY) is None, 30,
               "the refusal, its idle state not written")
    failing[0] = False  # room again
    wait_until(lambda: agent.state.get(STEP_KEY) == "idle", 30, "the idle state written later")
    assert "disk_full" in agent.state.get(ERROR_KEY)
    assert agent.state.slot("active").ref == "clf@1.0.0"  # type: ignore[union-attr]


def fill_database(state: AgentState) -> None:
    """SQLite's own limit: the database may not grow by one more page, so big inserts fail as on a full disk."""
    pages = state._db.execute("PRAGMA page_count").fetchone()[0]
    state._db.execute(f"PRAGMA max_page_count = {int(pages) + 1}")


def test_the_outbox_on_a_full_database_refuses_and_counts_then_says_so(
        agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    state = agent.state
    before = state.pending_count()
    fill_database(state)
    big = b"x" * 200_000
    assert state.enqueue("t", "telemetry", lambda seq: big) is None  # refused, not raised
    agent.event("alert", {"reason": "x" * 100_000})  # the agent's own events: refused the same way
    assert state.outbox_refused == 2 and state.pending_count() == before
    assert describe(state)["outbox_refused"] == 2

    infer(agent)  # telemetry while the disk is full: the loop runs on, batches that fit are queued
    state._db.execute("PRAGMA max_page_count = 1073741823")  # room again
    agent.event("note", {})
    assert events(state, "alert")  # the event refused while the disk was full, queued now
    refused = events(state, "outbox_refused")
    assert refused and int(str(refused[-1]["refused"])) >= 2 and refused[-1]["total"] == state.outbox_refused
    assert state.counter("outbox_refused") == state.outbox_refused  # counted durably once it could write
    assert np.all(np.array([m == "clf@1.0.0" for m in telemetry_models(state)]))
