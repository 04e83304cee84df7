"""Tiered inference over real HTTP: ``edgefleet serve-model`` verifies and serves a bundle; an agent whose
upstream is down answers locally and queues its escalations on disk, and delivers them once it is back; corrupt
sensor lines are skipped and counted while the loop runs on; alerts leave as events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.escalation import EscalationPolicy, Escalator, HttpUpstream, encode_request
from edgefleet.agent.fetch import InMemoryFetcher
from edgefleet.agent.sources import JsonLinesSource
from edgefleet.bundle.pack import write_bundle
from edgefleet.bundle.signing import PUBLIC_KEY_FILE, SigningKey, write_keypair
from edgefleet.errors import TransportError
from edgefleet.testing import synthetic
from edgefleet.testing.agents import model_ref, signed_bundle
from edgefleet.transport.mqtt_url import MqttEndpoint
from edgefleet.transport.ports import free_port
from edgefleet.upstream.service import BackgroundService, load_upstream

pytestmark = pytest.mark.integration


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key pair (signing.key, signing.pub) and a bundle of the synthetic classifier signed with it."""
    directory = tmp_path_factory.mktemp("keys")
    key = write_keypair(directory)
    write_bundle(directory / "big.bundle", signed_bundle(key, "2.0.0", 1))
    return directory


@pytest.fixture(scope="module")
def bundle_file(key_dir: Path) -> Path:
    return key_dir / "big.bundle"


@pytest.fixture
def served(bundle_file: Path, key_dir: Path, tmp_path: Path) -> Iterator[str]:
    """``edgefleet serve-model`` as a real process on a free port; yields its URL."""
    info = tmp_path / "upstream.json"
    process = subprocess.Popen([sys.executable, "-m", "edgefleet", "serve-model", str(bundle_file), "--port", "0",
                                "--pub", str(key_dir / PUBLIC_KEY_FILE), "--info-file", str(info)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "NO_COLOR": "1"})
    try:
        wait_for(lambda: info.exists() or process.poll() is not None)
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        yield str(json.loads(info.read_text())["url"])
    finally:
        process.terminate()
        process.wait(10)


def window(offset_channel: int | None = None) -> np.ndarray:
    x = np.zeros((1, synthetic.CHANNELS, synthetic.WINDOW), dtype=np.float32)
    if offset_channel is not None:
        x[0, offset_channel] = 3.0
    return x


def test_serve_model_answers_with_the_verified_bundle(served: str) -> None:
    import httpx

    assert httpx.get(f"{served}/v1/health", timeout=5).json() == {"status": "ok", "model": "clf@2.0.0"}
    upstream = HttpUpstream(served)
    answer = upstream.infer(encode_request(window(2), "clf@1.0.0", "alpha", 0.3), 5.0)
    assert answer.label == "gamma" and answer.confidence > 0.9 and answer.model == "clf@2.0.0"
    bad = np.zeros((1, 3, 7), dtype=np.float32)  # not the model's input shape
    with pytest.raises(TransportError, match="422"):
        upstream.infer(encode_request(bad, "clf@1.0.0", "alpha", 0.3), 5.0)
    upstream.close()


def test_serve_model_refuses_a_bundle_signed_by_another_key(bundle_file: Path, tmp_path: Path) -> None:
    write_keypair(tmp_path / "other")
    result = subprocess.run([sys.executable, "-m", "edgefleet", "serve-model", str(bundle_file), "--port", "0",
                             "--pub", str(tmp_path / "other" / PUBLIC_KEY_FILE)],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "error" in result.stderr.lower()


def test_upstream_down_local_answers_used_queued_then_delivered(bundle_file: Path, key_dir: Path,
                                                                 tmp_path: Path) -> None:
    port = free_port()
    policy = EscalationPolicy(deadline_s=2.0, request_timeout_s=2.0, retry_base_s=0.05, retry_cap_s=0.2)
    escalator = Escalator(HttpUpstream(f"http://127.0.0.1:{port}"), tmp_path, policy)
    service = BackgroundService(load_upstream(bundle_file, key_dir / PUBLIC_KEY_FILE), port=port)
    try:
        for channel in range(3):
            assert escalator.resolve(window(channel), "clf@1.0.0", "delta", 0.3) is None  # local answer stands
        counts = escalator.take_counts()
        assert counts["failed"] == 1 and counts["queued"] == 3 and counts["pending"] == 3
        service.start()
        wait_for(lambda: len(escalator.queue) == 0)
        assert escalator.take_counts() == {"delivered": 3}
        answer = escalator.resolve(window(1), "clf@1.0.0", "delta", 0.3)
        assert answer is not None and answer.label == "beta"
    finally:
        escalator.close()
        service.stop()


def agent_with_model(tmp_path: Path, key: SigningKey, **config: Any) -> Agent:
    settings = AgentConfig(device_id="d1", server_url="http://127.0.0.1:9", mqtt=MqttEndpoint("127.0.0.1", 9),
                           token="t", trusted_keys={key.public.key_id: key.public}, data_dir=tmp_path / "agent",
                           **config)
    fetcher = InMemoryFetcher()
    agent = Agent(settings, fetcher=fetcher)
    data = signed_bundle(key, "1.0.0", 1, thresholds={"alert:gamma": 0.9, "escalate_below": 0.6})
    target = model_ref(data, "1.0.0", 1)
    fetcher.artifacts[target.url] = data
    agent.updater.install(target)
    assert agent.model is not None
    return agent


def sensor_lines() -> str:
    """Two recordings of each class as JSON lines, with corrupt lines and NaN readings mixed in."""
    rec = synthetic.recordings(per_class=2, length=40)
    lines = []
    for x, y in zip(rec.test_x, rec.test_y, strict=True):
        for t in range(x.shape[1]):
            lines.append(json.dumps({"values": x[:, t].tolist(), "label": int(y)}))
            if t == 7:
                lines += ["{corrupt", '{"values": [NaN, 0, 0, 0, 0, 0]}', '{"values": [1, 2]}']
    return "\n".join(lines) + "\n"


def test_an_agent_with_its_upstream_down_answers_locally_and_reports_everything(tmp_path: Path) -> None:
    key = SigningKey.generate()
    agent = agent_with_model(tmp_path, key, upstream_url=f"http://127.0.0.1:{free_port()}",
                             telemetry_interval_s=3600.0, escalation_rate_per_s=1000.0, escalation_burst=1000.0)
    try:
        import io

        source = JsonLinesSource(io.StringIO(sensor_lines()))
        agent.run(source)
        items = agent.state.pending(limit=1000)
        batches = [json.loads(i.payload) for i in items if i.topic.endswith("/telemetry")]
        events = [json.loads(i.payload) for i in items if i.topic.endswith("/events")]
    finally:
        agent.state.close()
    assert len(batches) == 1
    (batch,) = batches
    assert batch["skipped"] == 8 * 3 and batch["windows"] > 0  # 8 recordings, 3 bad lines each
    escalations = batch["escalations"]
    assert escalations["failed"] == 1 and escalations["queued"] >= 1 and "answered" not in escalations
    assert batch["drift"]["n"] > 0 and batch["alerts"]["class:gamma"] > 0
    alerts = [e for e in events if e["kind"] == "alert"]
    assert len(alerts) == 1 and alerts[0]["detail"]["label"] == "gamma"
    assert (tmp_path / "agent" / "escalations.db").exists()
