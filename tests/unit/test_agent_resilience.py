"""Bad candidates are rejected by the child-process health check; a failing active model is rolled back;
the outbox stays within its bound by dropping (and counting) the oldest messages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.fetch import InMemoryFetcher
from edgefleet.agent.sources import ReplaySource
from edgefleet.agent.state import AgentState
from edgefleet.agent.updater import ERROR_KEY, FAILED_KEY, HealthPolicy
from edgefleet.bundle.signing import SigningKey
from edgefleet.testing import synthetic
from edgefleet.testing.agents import UpdaterHarness, model_ref, signed_bundle
from edgefleet.transport.mqtt_url import MqttEndpoint

KEY = SigningKey.generate()


def candidate_refused(tmp_path: Path, health: HealthPolicy, model: bytes | None = None,
                      thresholds: dict[str, float] | None = None) -> str:
    harness = UpdaterHarness(tmp_path, KEY, health=HealthPolicy())
    harness.install(signed_bundle(KEY, "1.0.0", 1), "1.0.0", 1)
    harness.updater._health = health  # the same agent, now with a stricter or faulty checker
    harness.install(signed_bundle(KEY, "2.0.0", 2, model, thresholds), "2.0.0", 2)
    assert harness.active_ref() == "clf@1.0.0"
    assert harness.state.slot("candidate") is None
    assert harness.events[-1][0] == "refused"
    error: str = harness.state.get(ERROR_KEY)
    return error


def test_a_candidate_that_crashes_the_runtime_is_refused(tmp_path: Path) -> None:
    segfault = (sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert "crashed" in candidate_refused(tmp_path, HealthPolicy(command=segfault))


def test_a_candidate_that_hangs_is_refused_after_the_time_limit(tmp_path: Path) -> None:
    hang = (sys.executable, "-c", "import time; time.sleep(60)")
    assert "hung" in candidate_refused(tmp_path, HealthPolicy(timeout_s=1.5, command=hang))


def test_a_candidate_that_emits_nan_is_refused(tmp_path: Path) -> None:
    nan_model = synthetic.channel_mean_model(bias=[float("nan")] * synthetic.CLASSES)
    assert "NaN" in candidate_refused(tmp_path, HealthPolicy(), nan_model)


def test_a_candidate_over_its_latency_budget_is_refused(tmp_path: Path) -> None:
    error = candidate_refused(tmp_path, HealthPolicy(), thresholds={"max_latency_ms": 1e-6})
    assert "budget" in error


def sqrt_model() -> bytes:
    """Like the synthetic classifier, but takes sqrt(mean + 1): NaN once a channel's mean drops below -1."""
    model = onnx.load_model_from_string(synthetic.channel_mean_model())
    graph = model.graph
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"))
    graph.node[1].input[0] = "rooted"
    graph.node.insert(1, helper.make_node("Add", ["pooled", "one"], ["shifted"]))
    graph.node.insert(2, helper.make_node("Sqrt", ["shifted"], ["rooted"]))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_repeated_runtime_failures_roll_back_to_the_previous_model(tmp_path: Path) -> None:
    good, fragile = signed_bundle(KEY, "1.0.0", 1), signed_bundle(KEY, "2.0.0", 2, sqrt_model())
    config = AgentConfig(device_id="d1", server_url="http://127.0.0.1:9", mqtt=MqttEndpoint("127.0.0.1", 9),
                         token="t", trusted_keys={KEY.public.key_id: KEY.public}, data_dir=tmp_path,
                         failures_before_rollback=3)
    fetcher = InMemoryFetcher()
    agent = Agent(config, fetcher=fetcher)
    for data, version, release in ((good, "1.0.0", 1), (fragile, "2.0.0", 2)):
        target = model_ref(data, version, release)
        fetcher.artifacts[target.url] = data
        agent.updater.install(target)
    assert agent.model is not None and agent.model.ref == "clf@2.0.0"

    rec = synthetic.recordings(per_class=1, length=60)
    negative = np.full_like(rec.test_x, -5.0)  # every window's mean is -5: sqrt of a negative number
    agent.run(ReplaySource(negative, rec.test_y, 10.0, speed=float("inf"), loop=False))

    assert agent.model.ref == "clf@1.0.0"
    assert agent.state.slot("active").ref == "clf@1.0.0"  # type: ignore[union-attr]
    assert model_ref(fragile, "2.0.0", 2).sha256 in agent.state.get(FAILED_KEY)
    events = [json.loads(item.payload) for item in agent.state.pending() if item.topic.endswith("/events")]
    rolled = [e for e in events if e["name"] == "rolled_back"]
    assert rolled and rolled[0]["detail"]["from"] == "clf@2.0.0" and rolled[0]["detail"]["to"] == "clf@1.0.0"
    agent.updater.request(model_ref(fragile, "2.0.0", 2))  # the server still asks for it: refused
    assert agent.state.get("pending_update") is None
    agent.state.close()


def test_outbox_overflow_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    state = AgentState(tmp_path, outbox_max_bytes=1000)
    for _ in range(100):
        state.enqueue("t", "telemetry", lambda seq: json.dumps({"seq": seq, "pad": "x" * 80}).encode())
    pending = state.pending(limit=1000)
    seqs = [json.loads(item.payload)["seq"] for item in pending]
    assert sum(len(item.payload) for item in pending) <= 1000
    assert seqs == list(range(100 - len(seqs), 100))  # the newest survive, in order
    assert state.counter("outbox_dropped") == 100 - len(seqs)
    for item in pending:
        state.delivered(item.id)
    assert state.counter("outbox_bytes") == 0
    state.close()


@pytest.mark.parametrize("limit", [0, 50])
def test_a_message_larger_than_the_outbox_is_dropped_not_stuck(tmp_path: Path, limit: int) -> None:
    state = AgentState(tmp_path, outbox_max_bytes=limit)
    state.enqueue("t", "telemetry", lambda seq: b"x" * 100)
    assert state.pending_count() == 0 and state.counter("outbox_dropped") == 1
    state.close()


def test_stopping_offline_keeps_the_queue_on_disk_and_ends_the_sender_cleanly(tmp_path: Path) -> None:
    """An agent stopped while its broker is unreachable: the outbox thread ends before the database closes (no
    'closed database' error in that thread) and what was queued is still there at the next start."""
    import threading

    errors: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment,misc]
    try:
        config = AgentConfig(device_id="d1", server_url="http://127.0.0.1:9", mqtt=MqttEndpoint("127.0.0.1", 9),
                             token="t", trusted_keys={KEY.public.key_id: KEY.public}, data_dir=tmp_path)
        agent = Agent(config, fetcher=InMemoryFetcher())
        agent.start(connect_timeout_s=0.2)
        agent.event("alert", {"why": "kept"})
        queued = agent.state.pending_count()
        agent.stop(drain_timeout_s=0.3)
        assert not agent._outbox_thread.is_alive()
    finally:
        threading.excepthook = previous
    assert errors == []
    reopened = AgentState(tmp_path)
    assert queued >= 1 and reopened.pending_count() == queued
    reopened.close()
