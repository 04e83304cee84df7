"""Monitors and field data through the REST API on a real SQLite store, with telemetry taken in by the real
ingest code (no broker): a silence monitor fires, pauses the model's rollout, POSTs its webhook and clears; hard
examples are stored from telemetry, labels posted for them turn an unknown accuracy into a decision, and the
exported dataset is what `edgefleet build --data` reads."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from fastapi.testclient import TestClient

from edgefleet.agent.stats import encode_example
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey, write_keypair
from edgefleet.learn.monitors import MonitorRunner, runner_of
from edgefleet.server.app import ServerContext, create_app
from edgefleet.server.artifacts import ArtifactStore
from edgefleet.server.ingest import Ingest
from edgefleet.server.metrics import Metrics
from edgefleet.server.orchestrator import Orchestrator
from edgefleet.server.store import Store
from edgefleet.testing import synthetic
from edgefleet.transport import topics
from edgefleet.transport.messages import DesiredState, TelemetryBatch
from edgefleet.transport.mqtt_url import parse_mqtt_url

pytestmark = pytest.mark.integration
AUTH = {"Authorization": "Bearer operator-secret"}


class Harness:
    def __init__(self, root: Path) -> None:
        self.key = SigningKey.generate()
        self.store = Store(f"sqlite:///{root / 'db.sqlite'}")
        self.orchestrator = Orchestrator(self.store, self.publish)
        self.metrics = Metrics()
        ctx = ServerContext(store=self.store, artifacts=ArtifactStore(root / "artifacts"),
                            trusted_keys={self.key.public.key_id: self.key.public}, operator_token="operator-secret",
                            public_url="http://127.0.0.1:1", device_mqtt_url="mqtt://127.0.0.1:1",
                            orchestrator=self.orchestrator, metrics=self.metrics)
        self.http = TestClient(create_app(ctx), raise_server_exceptions=False)
        self.ingest = Ingest(self.store, parse_mqtt_url("mqtt://127.0.0.1:1"))
        self.seq = 0
        bundle = pack_bundle(synthetic.channel_mean_model(), self.key, BundleSpec(
            name="clf", version="1.0.0", release=1, labels=list(synthetic.LABELS),
            preprocess=synthetic.preprocess_spec()))
        assert self.call("POST", "/api/v1/models", content=bundle).status_code == 201

    @property
    def runner(self) -> MonitorRunner:
        runner = runner_of(self.orchestrator)
        assert runner is not None
        return runner

    def publish(self, states: Sequence[DesiredState]) -> None:
        pass

    def call(self, method: str, path: str, **kw: Any) -> Any:
        return self.http.request(method, path, headers=AUTH, **kw)

    def device(self, device_id: str, **tags: str) -> None:
        assert self.call("POST", "/api/v1/devices", json={"id": device_id, "tags": tags}).status_code == 201
        assert self.call("POST", "/api/v1/deployments", json={"model": "clf@1.0.0", "devices": [device_id]}
                         ).status_code == 200

    def send(self, device: str, *, hard: int = 0, model: str = "clf@1.0.0", **fields: Any) -> None:
        """One telemetry batch through the ingest's validation and commit, as if it came over MQTT."""
        self.seq += 1
        rng = np.random.default_rng(self.seq)
        examples = [dataclasses.asdict(encode_example(rng.normal(size=(synthetic.CHANNELS, synthetic.WINDOW))
                                                      .astype(np.float32), "alpha", 0.4, time.time()))
                    for _ in range(hard)]
        batch = TelemetryBatch(device=device, seq=self.seq, ts=time.time(), model=model,
                               windows=fields.pop("windows", 10), hard_examples=examples, **fields)
        self.ingest.handle(topics.telemetry(device), batch.model_dump_json(exclude_none=True).encode())


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.http.close()
    harness.store.close()


class Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        Hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


def test_a_silence_monitor_fires_pauses_the_rollout_posts_its_webhook_and_clears(h: Harness) -> None:
    h.device("d1")
    h.device("d2")
    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        created = h.call("POST", "/api/v1/monitors", json={
            "expr": "silent_for > 15m", "model": "clf", "pause_rollouts": True,
            "webhook": f"http://127.0.0.1:{hook.server_address[1]}/alerts"})
        assert created.status_code == 201, created.text
        monitor = created.json()["id"]
        rollout = h.call("POST", "/api/v1/rollouts", json={"model": "clf@1.0.0", "window_s": 3600}).json()["id"]
        now = time.time()
        h.send("d1")
        h.send("d2")
        assert h.runner.run_once(now) == {monitor: "ok"}
        assert h.runner.run_once(now + 16 * 60) == {monitor: "firing"}  # nobody reported for 16 minutes
        alerts = h.call("GET", "/api/v1/alerts", params={"active": True}).json()
        assert [a["monitor"] for a in alerts] == [monitor] and alerts[0]["paused_rollouts"] == [rollout]
        assert "silent_for=960" in alerts[0]["explanation"]
        assert h.call("GET", f"/api/v1/rollouts/{rollout}").json()["phase"] == "paused"
        assert 'edgefleet_alerts_total{model="clf"} 1.0' in h.http.get("/metrics").text
        assert h.runner.run_once(now + 16 * 60 + 1) == {monitor: "firing"}  # still firing: no second alert
        assert len(h.call("GET", "/api/v1/alerts").json()) == 1
        for _ in range(100):  # the webhook is POSTed from a background thread
            if Hook.received:
                break
            time.sleep(0.05)
        assert Hook.received and Hook.received[0]["event"] == "firing" and Hook.received[0]["monitor"] == monitor
        assert h.runner.run_once(now + 60) == {monitor: "ok"}  # the devices reported again: it clears
        assert h.call("GET", "/api/v1/alerts", params={"active": True}).json() == []
        assert h.call("DELETE", f"/api/v1/monitors/{monitor}").status_code == 200
        assert h.call("DELETE", f"/api/v1/monitors/{monitor}").status_code == 404
    finally:
        hook.shutdown()


def test_bad_monitors_are_refused_with_one_line(h: Harness) -> None:
    for body, status, words in (({"expr": "silent_for >", "model": "clf"}, 422, "unexpected end"),
                                ({"expr": "nonsense > 1", "model": "clf"}, 422, "unknown metric"),
                                ({"expr": "accuracy < 90%", "model": "other"}, 404, "unknown model"),
                                ({"expr": "accuracy < 90%", "model": "clf", "webhook": "ftp://x"}, 422, "webhook")):
        answer = h.call("POST", "/api/v1/monitors", json=body)
        assert answer.status_code == status and words in answer.json()["detail"], answer.text
    refused = h.call("POST", "/api/v1/rollouts", json={"model": "clf@1.0.0", "gates": ["silent_for > 5m"]})
    assert refused.status_code == 422 and "monitors" in refused.json()["detail"]


def test_labels_for_hard_examples_turn_an_unknown_accuracy_into_a_decision_and_export_round_trips(
        h: Harness, tmp_path: Path) -> None:
    h.device("d1")
    h.send("d1", hard=12, windows=40)
    h.send("d1", hard=0, windows=40)
    examples = h.call("GET", "/api/v1/fielddata/clf/examples").json()
    assert len(examples) == 12 and {e["device"] for e in examples} == {"d1"}
    assert all(e["model"] == "clf@1.0.0" and e["predicted"] == "alpha" and e["label"] is None for e in examples)
    monitor = h.call("POST", "/api/v1/monitors", json={"expr": "accuracy < 90%", "model": "clf"}).json()["id"]
    assert h.runner.run_once() == {monitor: "unknown"}  # the agents' replay carries no labels
    shown = h.call("GET", f"/api/v1/monitors/{monitor}").json()
    assert shown["values"] == {"accuracy": None} and "no data for accuracy" in shown["explanation"]

    first = examples[0]["id"]
    assert h.call("POST", "/api/v1/fielddata/labels", json={"example": first, "label": "alpha"}).json() == {
        "labelled": 1, "example": {**examples[0], "label": "alpha", "label_source": "operator",
                                   "label_trust": "ground_truth", "labelled_at": pytest.approx(time.time(), abs=60)}}
    ranged = h.call("POST", "/api/v1/fielddata/labels", json={
        "device": "d1", "start": examples[1]["ts"], "end": examples[-1]["ts"] + 1, "label": "beta", "model": "clf"})
    assert ranged.json()["labelled"] == 12  # the range holds the first one too: relabelled
    assert h.runner.run_once() == {monitor: "firing"}  # the delayed labels say alpha was wrong every time
    shown = h.call("GET", f"/api/v1/monitors/{monitor}").json()
    assert shown["values"] == {"accuracy": 0.0} and "tripped" in shown["explanation"]

    unknown = h.call("POST", "/api/v1/fielddata/labels", json={"example": 10**6, "label": "alpha"})
    assert unknown.status_code == 404 and unknown.json()["detail"] == "unknown hard example 1000000"
    wrong = h.call("POST", "/api/v1/fielddata/labels", json={"example": first, "label": "omega"})
    assert wrong.status_code == 422 and "not a class of clf" in wrong.json()["detail"]

    exported = h.call("GET", "/api/v1/fielddata/clf/export").json()
    assert (exported["examples"], exported["labelled"]) == (12, 12)
    data = np.load(io.BytesIO(base64.b64decode(exported["npz"])))
    assert data["calib_x"].shape == (12, synthetic.CHANNELS, synthetic.WINDOW)
    assert data["test_y"].tolist() == [1] * 12 and data["labels"].tolist() == list(synthetic.LABELS)
    stored = h.store.hard_examples("clf")[0]
    from edgefleet.learn.fielddata import decode

    assert np.allclose(data["calib_x"][0], decode(stored))

    field = tmp_path / "field.npz"  # what `edgefleet data export` writes, read back by `edgefleet build --data`
    field.write_bytes(base64.b64decode(exported["npz"]))
    (tmp_path / "clf.onnx").write_bytes(synthetic.channel_mean_model())
    write_keypair(tmp_path / "keys")
    built = subprocess.run([sys.executable, "-m", "edgefleet", "build", str(tmp_path / "clf.onnx"), "--data",
                            str(field), "--key", str(tmp_path / "keys" / "signing.key"), "--out",
                            str(tmp_path / "field.bundle")], capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "field.bundle").exists()


def test_field_labels_feed_a_rollouts_accuracy_gate(h: Harness) -> None:
    """A candidate's accuracy is unknown from replay-free telemetry; delayed labels decide its gate."""
    candidate = pack_bundle(synthetic.channel_mean_model(), h.key, BundleSpec(
        name="clf", version="2.0.0", release=2, labels=list(synthetic.LABELS), preprocess=synthetic.preprocess_spec()))
    assert h.call("POST", "/api/v1/models", content=candidate).status_code == 201
    h.device("d1")
    h.store.record_reported("d1", {"active": "clf@1.0.0", "running": "clf@1.0.0"})
    created = h.call("POST", "/api/v1/rollouts", json={"model": "clf@2.0.0", "window_s": 1, "min_windows": 10,
                                                      "gates": ["accuracy < 90%"], "unknown_timeout_s": 3600})
    assert created.status_code == 201, created.text
    rollout = created.json()["id"]
    h.store.record_reported("d1", {"active": "clf@2.0.0", "running": "clf@2.0.0"})
    h.send("d1", hard=12, windows=40, model="clf@2.0.0")
    h.orchestrator.tick()
    time.sleep(1.2)
    h.orchestrator.tick()
    assert h.call("GET", f"/api/v1/rollouts/{rollout}").json()["phase"] not in ("aborted", "done")  # unknown
    labelled = h.call("POST", "/api/v1/fielddata/labels", json={
        "device": "d1", "start": 0, "end": time.time() + 60, "label": "delta", "model": "clf"})
    assert labelled.json()["labelled"] == 12
    h.orchestrator.tick()
    status = h.call("GET", f"/api/v1/rollouts/{rollout}").json()
    assert status["phase"] == "aborted", status
    assert any("accuracy" in d["reason"] for d in status["decisions"])


def _answer(x: np.ndarray, ts: float, label: str, *, device: str = "d1", local: str = "alpha") -> dict[str, Any]:
    """One upstream answer as `edgefleet serve-model --report-to` posts it (the window as the agent escalated it)."""
    return {"model": "clf@1.0.0", "device": device, "ts": ts, "shape": list(x.shape),
            "data": base64.b64encode(np.ascontiguousarray(x, "<f4").tobytes()).decode(), "local_label": local,
            "local_confidence": 0.4, "label": label, "confidence": 0.9, "upstream_model": "big@1.0.0"}


def test_upstream_answers_are_labels_of_lower_trust_kept_apart_from_gates_and_exported_only_when_asked(
        h: Harness) -> None:
    h.device("d1")
    rng = np.random.default_rng(7)
    windows = [rng.normal(size=(synthetic.CHANNELS, synthetic.WINDOW)).astype(np.float32) for _ in range(4)]
    now = time.time()
    # the upstream answered windows 0-2; the device's own hard example of window 0 comes later, with its batch
    posted = h.call("POST", "/api/v1/fielddata/upstream", json={"answers": [
        _answer(windows[i], now + i * 0.01, "beta") for i in range(3)] + [
        _answer(windows[3], now, "beta", device="stranger")]})
    assert posted.status_code == 200, posted.text
    assert posted.json() == {"stored": 3, "labelled": 0, "kept": 0, "unknown": 1}
    h.seq += 1
    same = dataclasses.asdict(encode_example(windows[0], "alpha", 0.4, now))  # int8 on the wire: not bit-equal
    other = dataclasses.asdict(encode_example(windows[3], "alpha", 0.4, now))
    batch = TelemetryBatch(device="d1", seq=h.seq, ts=now, model="clf@1.0.0", windows=10, hard_examples=[same, other])
    h.ingest.handle(topics.telemetry("d1"), batch.model_dump_json(exclude_none=True).encode())
    examples = h.call("GET", "/api/v1/fielddata/clf/examples").json()
    assert len(examples) == 4  # window 0 is stored once; window 3 (no answer for d1) is a new example
    upstream = [e for e in examples if e["label_source"] == "upstream"]
    assert len(upstream) == 3 and all(e["label"] == "beta" and e["label_trust"] == "low" for e in upstream)
    assert all(e["predicted"] == "alpha" and e["confidence"] == 0.4 for e in upstream)  # the local answer kept

    monitor = h.call("POST", "/api/v1/monitors", json={"expr": "accuracy < 90%", "model": "clf"}).json()["id"]
    assert h.runner.run_once() == {monitor: "unknown"}  # upstream labels are never a gate's evidence

    refused = h.call("GET", "/api/v1/fielddata/clf/export")
    assert refused.status_code == 422 and "upstream labels" in refused.json()["detail"]
    exported = h.call("GET", "/api/v1/fielddata/clf/export", params={"include_upstream": True}).json()
    assert (exported["labelled"], exported["upstream_labelled"]) == (3, 3)
    data = np.load(io.BytesIO(base64.b64decode(exported["npz"])))
    assert data["test_source"].tolist() == ["upstream"] * 3 and data["test_y"].tolist() == [1, 1, 1]
    assert np.allclose(data["test_x"][1], windows[1], atol=0.01)  # kept as float16

    # an operator's label replaces the upstream one and is never replaced by a later answer
    first = upstream[0]["id"]
    assert h.call("POST", "/api/v1/fielddata/labels", json={"example": first, "label": "gamma"}).status_code == 200
    again = h.call("POST", "/api/v1/fielddata/upstream", json={"answers": [_answer(windows[0], now, "delta")]})
    assert again.json() == {"stored": 0, "labelled": 0, "kept": 1, "unknown": 0}
    row = next(e for e in h.call("GET", "/api/v1/fielddata/clf/examples").json() if e["id"] == first)
    assert (row["label"], row["label_source"], row["label_trust"]) == ("gamma", "operator", "ground_truth")
    mixed = h.call("GET", "/api/v1/fielddata/clf/export").json()
    assert (mixed["labelled"], mixed["upstream_left_out"]) == (1, 2)
    assert h.store.field_labels("clf") == [("clf@1.0.0", "alpha", "gamma")]  # what gates and monitors count
    bad = h.call("POST", "/api/v1/fielddata/upstream", json={"answers": [{**_answer(windows[0], now, "beta"),
                                                                          "data": "AAAA"}]})
    assert bad.status_code == 422 and "needs" in bad.json()["detail"]
