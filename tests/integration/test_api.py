"""The REST API in process (no broker: desired states go to a list): devices, models, rollouts driven by the
orchestrator, artifacts per device, bad input rejected and counted, and schemathesis finding no 5xx."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.server.app import ServerContext, create_app
from edgefleet.server.artifacts import ArtifactStore
from edgefleet.server.metrics import Metrics
from edgefleet.server.orchestrator import Orchestrator
from edgefleet.server.store import Store
from edgefleet.testing import synthetic
from edgefleet.transport.messages import DesiredState, ReportedState, TelemetryBatch

pytestmark = pytest.mark.integration
TOKEN = "operator-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Harness:
    def __init__(self, root: Path) -> None:
        self.key = SigningKey.generate()
        self.sent: list[DesiredState] = []
        self.now = 1000.0
        self.store = Store(f"sqlite:///{root / 'db.sqlite'}")
        self.orchestrator = Orchestrator(self.store, self.publish, clock=lambda: self.now)
        self.ctx = ServerContext(store=self.store, artifacts=ArtifactStore(root / "artifacts"),
                                 trusted_keys={self.key.public.key_id: self.key.public}, operator_token=TOKEN,
                                 public_url="http://127.0.0.1:1", device_mqtt_url="mqtt://127.0.0.1:1",
                                 orchestrator=self.orchestrator, metrics=Metrics())
        self.http = TestClient(create_app(self.ctx), raise_server_exceptions=False)

    def publish(self, states: Sequence[DesiredState]) -> None:
        self.sent.extend(states)

    def bundle(self, version: str, release: int) -> bytes:
        return pack_bundle(synthetic.channel_mean_model(), self.key, BundleSpec(
            name="clf", version=version, release=release, labels=list(synthetic.LABELS),
            preprocess=synthetic.preprocess_spec()))

    def device(self, device_id: str, **tags: str) -> dict[str, Any]:
        response = self.http.post("/api/v1/devices", json={"id": device_id, "tags": tags}, headers=AUTH)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def report(self, device: str, active: str, accuracy: float, seq: int) -> None:
        self.store.record_reported(device, ReportedState(device=device, agent_version="0.1.0",
                                                         active=active, running=active).model_dump(mode="json"))
        self.store.add_telemetry(TelemetryBatch(
            device=device, seq=seq, ts=self.now, model=active, windows=20, labelled=20,
            correct=round(20 * accuracy), latency_ms={"150": 20}, confidence=[0] * 19 + [20]))


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.http.close()
    harness.store.close()


def test_devices_models_and_a_gated_rollout_that_aborts(h: Harness) -> None:
    for i in range(4):
        h.device(f"d{i}", site="a")
    assert h.http.post("/api/v1/models", content=h.bundle("1.0.0", 1), headers=AUTH).status_code == 201
    assert h.http.post("/api/v1/models", content=h.bundle("2.0.0", 2), headers=AUTH).status_code == 201
    assert h.http.post("/api/v1/deployments", json={"model": "clf@1.0.0", "select": {"site": "a"}},
                       headers=AUTH).status_code == 200
    assert {s.device for s in h.sent} == {"d0", "d1", "d2", "d3"}
    for i in range(4):
        h.report(f"d{i}", "clf@1.0.0", 1.0, 0)

    spec = {"model": "clf@2.0.0", "select": {"site": "a"}, "waves": ["25%", "100%"], "window_s": 10,
            "gates": ["accuracy_drop > 5%"], "min_windows": 10}
    created = h.http.post("/api/v1/rollouts", json=spec, headers=AUTH)
    assert created.status_code == 201, created.text
    rollout = created.json()
    assert rollout["targets"] == 4 and rollout["moved"] == 1 and rollout["phase"] == "installing"
    (moved,) = rollout["decisions"][0]["devices"]
    assert h.sent[-1].device == moved and h.sent[-1].model is not None and h.sent[-1].model.version == "2.0.0"

    h.now += 1
    h.report(moved, "clf@2.0.0", 0.5, 1)  # the candidate is much worse on labelled data
    h.orchestrator.tick()
    h.now += 11
    h.orchestrator.tick()
    status = h.http.get(f"/api/v1/rollouts/{rollout['id']}", headers=AUTH).json()
    assert status["phase"] == "aborted"
    kinds = [d["kind"] for d in status["decisions"]]
    assert kinds[-2:] == ["rollback", "aborted"]
    rollback = status["decisions"][-2]
    assert rollback["values"]["metrics"]["accuracy_drop"] == pytest.approx(0.5)
    assert "accuracy_drop" in rollback["reason"]
    assert h.sent[-1].device == moved and h.sent[-1].model is not None and h.sent[-1].model.version == "1.0.0"
    listed = h.http.get("/api/v1/rollouts", headers=AUTH).json()
    assert [r["id"] for r in listed] == [rollout["id"]]
    again = h.http.post(f"/api/v1/rollouts/{rollout['id']}/resume", headers=AUTH)
    assert again.status_code == 422 and "already aborted" in again.json()["detail"]


def test_pause_resume_abort_over_the_api(h: Harness) -> None:
    h.device("d0")
    h.device("d1")
    h.http.post("/api/v1/models", content=h.bundle("2.0.0", 2), headers=AUTH)
    rid = h.http.post("/api/v1/rollouts", json={"model": "clf@2.0.0", "waves": ["1", "2"]}, headers=AUTH).json()["id"]
    paused = h.http.post(f"/api/v1/rollouts/{rid}/pause", json={"note": "lunch"}, headers=AUTH).json()
    assert paused["phase"] == "paused" and "lunch" in paused["reason"]
    assert h.http.post(f"/api/v1/rollouts/{rid}/resume", headers=AUTH).json()["phase"] == "installing"
    aborted = h.http.post(f"/api/v1/rollouts/{rid}/abort", headers=AUTH).json()
    assert aborted["phase"] == "aborted" and aborted["decisions"][-1]["kind"] == "aborted"
    assert h.http.post(f"/api/v1/rollouts/{rid}/explode", headers=AUTH).status_code == 422
    assert h.http.get("/api/v1/rollouts/ro-nothing", headers=AUTH).status_code == 404


@pytest.mark.parametrize(("spec", "status", "message"), [
    ({"model": "clf@2.0.0", "gates": ["accuracy_fall > 5%"]}, 422, "unknown metric 'accuracy_fall'"),
    ({"model": "clf@2.0.0", "gates": ["accuracy_drop >"]}, 422, "unexpected end"),
    ({"model": "clf@9.0.0"}, 404, "unknown model clf@9.0.0"),
    ({"model": "clf@2.0.0", "select": {"site": "mars"}}, 422, "no device matches"),
    ({"model": "clf@2.0.0", "waves": ["0%"]}, 422, "bad wave"),
    ({"model": "clf"}, 422, "NAME@VERSION"),
])
def test_bad_rollouts_are_refused_at_creation_with_a_clear_reason(h: Harness, spec: dict[str, Any], status: int,
                                                                  message: str) -> None:
    h.device("d0", site="a")
    h.http.post("/api/v1/models", content=h.bundle("2.0.0", 2), headers=AUTH)
    response = h.http.post("/api/v1/rollouts", json=spec, headers=AUTH)
    assert response.status_code == status and message in response.json()["detail"], response.text
    assert h.store.list_rollouts() == []


def test_a_device_fetches_only_its_own_artifacts_and_a_revoked_one_nothing(h: Harness) -> None:
    first = h.device("d0")
    h.device("d1")
    v1 = h.http.post("/api/v1/models", content=h.bundle("1.0.0", 1), headers=AUTH).json()
    v2 = h.http.post("/api/v1/models", content=h.bundle("2.0.0", 2), headers=AUTH).json()
    h.http.post("/api/v1/deployments", json={"model": "clf@1.0.0", "devices": ["d0"]}, headers=AUTH)
    h.http.post("/api/v1/deployments", json={"model": "clf@2.0.0", "devices": ["d1"]}, headers=AUTH)
    mine = {"Authorization": f"Bearer {first['token']}"}
    own = h.http.get(f"/api/v1/artifacts/{v1['sha256']}", headers=mine)
    assert own.status_code == 200 and own.headers["etag"] == f'"{v1["sha256"]}"'
    part = h.http.get(f"/api/v1/artifacts/{v1['sha256']}", headers={**mine, "Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == own.content[10:20]
    assert h.http.get(f"/api/v1/artifacts/{v2['sha256']}", headers=mine).status_code == 403
    assert h.http.get(f"/api/v1/artifacts/{v2['sha256']}", headers={"Authorization": "Bearer nope"}).status_code \
        == 403
    assert h.http.post("/api/v1/devices/d0/revoke", headers=AUTH).json()["revoked"] is True
    assert h.http.get(f"/api/v1/artifacts/{v1['sha256']}", headers=mine).status_code == 403


def test_bad_input_is_rejected_counted_and_the_server_keeps_running(h: Harness) -> None:
    bad = [
        h.http.post("/api/v1/devices", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}),
        h.http.post("/api/v1/devices", json={"id": "../etc"}, headers=AUTH),
        h.http.post("/api/v1/devices", content=b"x" * (2 * 1024 * 1024),
                    headers={**AUTH, "Content-Type": "application/json"}),
        h.http.get("/api/v1/devices", headers={"Authorization": "Bearer wrong"}),
        h.http.get("/api/v1/devices"),
        h.http.get("/api/v1/devices/ghost", headers=AUTH),
        h.http.post("/api/v1/models", content=b"not a bundle", headers=AUTH),
    ]
    assert [r.status_code for r in bad] == [422, 422, 413, 403, 401, 404, 422]
    text = h.http.get("/metrics").text
    for reason, at_least in (("malformed_request", 3), ("oversized", 1), ("bad_credentials", 2), ("not_found", 1)):
        line = next(x for x in text.splitlines() if x.startswith("edgefleet_rejected_total")
                    and f'reason="{reason}"' in x)
        assert float(line.rsplit(" ", 1)[1]) >= at_least
    assert h.http.get("/api/v1/health").json()["status"] == "ok"


def test_model_and_device_telemetry_aggregates(h: Harness) -> None:
    h.device("d0")
    h.http.post("/api/v1/models", content=h.bundle("1.0.0", 1), headers=AUTH)
    h.report("d0", "clf@1.0.0", 0.75, 0)
    h.report("d0", "clf@1.0.0", 0.75, 2)
    model = h.http.get("/api/v1/models/clf/1.0.0/telemetry", headers=AUTH).json()
    assert model["devices"] == 1 and model["windows"] == 40 and model["accuracy"] == 0.75
    device = h.http.get("/api/v1/devices/d0/telemetry", headers=AUTH).json()
    assert device["gaps"] == 1 and device["models"][0]["latency_ms"]["p95"] is not None
    assert h.http.get("/api/v1/models/clf/9.9.9/telemetry", headers=AUTH).status_code == 404


def test_schemathesis_finds_no_server_error(h: Harness) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    h.device("d0", site="a")
    h.http.post("/api/v1/models", content=h.bundle("1.0.0", 1), headers=AUTH)
    schema = schemathesis.openapi.from_asgi("/openapi.json", h.http.app)
    failures: list[str] = []
    checked = 0

    def check(operation: Any) -> None:
        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            response = case.call(headers=AUTH)
            if response.status_code >= 500:
                failures.append(f"{operation.method.upper()} {operation.path}: {response.status_code} "
                                f"{response.text[:200]}")

        run()

    for result in schema.get_all_operations():
        check(result.ok())
        checked += 1
    assert checked >= 15
    assert failures == []
