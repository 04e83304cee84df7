"""The dashboard's pages and the typed API in process (no browser, no broker): the fleet page's counts, filters and
pages over 250 devices; a judged rollout's gate drawn against its threshold; a build report's Pareto plot
numbered like its table; the OpenAPI document's typed responses; session cookies that expire or are forged are
refused; ``edgefleet model report`` refuses bad input in one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.server.app import ServerContext, create_app
from edgefleet.server.artifacts import ArtifactStore
from edgefleet.server.auth import SESSION_COOKIE, Sessions
from edgefleet.server.metrics import Metrics
from edgefleet.server.orchestrator import Orchestrator
from edgefleet.server.store import Store
from edgefleet.testing import synthetic
from edgefleet.transport.messages import DesiredState, ReportedState, TelemetryBatch

pytestmark = pytest.mark.integration
TOKEN = "operator-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Dashboard:
    def __init__(self, root: Path) -> None:
        self.key = SigningKey.generate()
        self.now = time.time()
        self.store = Store(f"sqlite:///{root / 'db.sqlite'}")
        self.orchestrator = Orchestrator(self.store, self.publish, clock=lambda: self.now)
        ctx = ServerContext(store=self.store, artifacts=ArtifactStore(root / "artifacts"),
                            trusted_keys={self.key.public.key_id: self.key.public}, operator_token=TOKEN,
                            public_url="http://127.0.0.1:1", device_mqtt_url="mqtt://127.0.0.1:1",
                            orchestrator=self.orchestrator, metrics=Metrics())
        self.http = TestClient(create_app(ctx), raise_server_exceptions=True)

    def publish(self, states: Sequence[DesiredState]) -> None:
        pass

    def push(self, version: str, release: int, model: bytes | None = None) -> None:
        bundle = pack_bundle(model or synthetic.channel_mean_model(), self.key, BundleSpec(
            name="clf", version=version, release=release, labels=list(synthetic.LABELS),
            preprocess=synthetic.preprocess_spec()))
        assert self.http.post("/api/v1/models", content=bundle, headers=AUTH).status_code == 201

    def device(self, device_id: str, profile: str | None = None, **tags: str) -> None:
        body = {"id": device_id, "tags": tags, "profile": profile}
        assert self.http.post("/api/v1/devices", json=body, headers=AUTH).status_code == 201

    def report(self, device: str, active: str, accuracy: float, seq: int) -> None:
        self.store.record_reported(device, ReportedState(device=device, agent_version="0.1.0", active=active,
                                                         running=active).model_dump(mode="json"))
        self.store.add_telemetry(TelemetryBatch(
            device=device, seq=seq, ts=self.now, model=active, windows=40, labelled=40,
            correct=round(40 * accuracy), latency_ms={"150": 40}, confidence=[0] * 19 + [40],
            classes={"alpha": 30, "beta": 10}))

    def page(self, path: str) -> str:
        response = self.http.get(path, headers=AUTH)
        assert response.status_code == 200, response.text
        return str(response.text)


@pytest.fixture
def ui(tmp_path: Path) -> Iterator[Dashboard]:
    dashboard = Dashboard(tmp_path)
    yield dashboard
    dashboard.store.close()


def rows(html: str) -> list[str]:
    return re.findall(r'<tr data-device="([^"]+)"', html)


def test_the_fleet_page_counts_the_whole_fleet_and_filters_and_pages_it(ui: Dashboard) -> None:
    ui.push("1.0.0", 1)
    for i in range(250):
        ui.device(f"d{i:03d}", "raspberry-pi" if i % 5 == 0 else None, site=f"s{i % 2}")
    for i in range(0, 250, 10):  # 25 report in: online, running version 1
        ui.report(f"d{i:03d}", "clf@1.0.0", 1.0, 1)

    first = ui.page("/ui/fleet")
    assert 'id="count-total">250<' in first and 'id="count-online">25<' in first and 'id="count-silent">225<' in first
    assert rows(first) == [f"d{i:03d}" for i in range(100)] and "page 1 of 3" in first
    assert rows(ui.page("/ui/fleet?page=3")) == [f"d{i:03d}" for i in range(200, 250)]
    assert rows(ui.page("/ui/fleet?page=99"))[-1] == "d249"  # past the end: the last page
    assert rows(ui.page("/ui/fleet?tag=site%3Ds1&per_page=500")) == [f"d{i:03d}" for i in range(1, 250, 2)]
    assert rows(ui.page("/ui/fleet?profile=raspberry-pi&per_page=500")) == [f"d{i:03d}" for i in range(0, 250, 5)]
    online = rows(ui.page("/ui/fleet?status=online&per_page=500"))
    assert online == [f"d{i:03d}" for i in range(0, 250, 10)]
    assert rows(ui.page("/ui/fleet?model=clf%401.0.0&per_page=500")) == online
    assert rows(ui.page("/ui/fleet?q=d24")) == [f"d24{i}" for i in range(10)]
    live = ui.page("/ui/fleet?fragment=1")  # the part the page polls for: no <html>, the same table
    assert "<html" not in live and rows(live) == rows(first)


def test_a_judged_rollout_shows_each_gate_against_its_threshold_and_its_decisions(ui: Dashboard) -> None:
    ui.push("1.0.0", 1)
    ui.push("2.0.0", 2)
    for d in ("a", "b"):
        ui.device(d, site="lab")
    assert ui.http.post("/api/v1/deployments", json={"model": "clf@1.0.0", "devices": ["a", "b"]},
                        headers=AUTH).status_code == 200
    for seq, d in enumerate(("a", "b")):
        for n in range(3):
            ui.report(d, "clf@1.0.0", 1.0, 10 * seq + n)
    created = ui.http.post("/api/v1/rollouts", json={
        "model": "clf@2.0.0", "select": {"site": "lab"}, "waves": ["1", "100%"], "gates": ["accuracy_drop > 5%"],
        "window_s": 10, "min_windows": 20, "baseline_s": 3600}, headers=AUTH).json()
    wave1 = created["wave_devices"]["1"][0]
    ui.report(wave1, "clf@2.0.0", 0.5, 100)  # installed, and half as accurate
    ui.now += 11
    ui.orchestrator.tick()
    ui.orchestrator.tick()
    status = ui.http.get(f"/api/v1/rollouts/{created['id']}", headers=AUTH).json()
    assert status["phase"] == "aborted", status["reason"]

    html = ui.page(f"/ui/rollouts/{created['id']}")
    assert 'class="gate outcome-fail"' in html and "accuracy_drop = 0.5" in html
    assert '<line x1="' in html and 'class="threshold"' in html and "&gt; 0.05" in html
    kinds = re.findall(r'data-kind="([a-z-]+)"', html)
    assert kinds[0] == "assign" and "rollback" in kinds
    assert "data-action=" not in html  # a finished rollout has no buttons
    listed = ui.page("/ui/rollouts")
    assert created["id"] in listed and "aborted" in listed


def test_a_build_report_is_attached_and_plotted_in_the_table_s_numbering(ui: Dashboard) -> None:
    ui.push("1.0.0", 1)

    def cand(label: str, acc: float | None, kb: float, ms: float, passed: bool) -> dict[str, Any]:
        return {"label": label, "accuracy": acc, "size_bytes": kb * 1024, "passed": passed,
                "latency_ms": {"b1": {"median_ms": ms}}}

    report = {"baseline": cand("float32", 0.99, 40, 1.0, True), "max_accuracy_drop_pp": 1.0, "chosen": "int8 b",
              "candidates": [cand("int8 a", 0.95, 10, 0.5, False), cand("same as a", None, 0, 0, False),
                             cand("int8 b", 0.985, 11, 0.6, True)], "reason": "smallest passing"}
    stored = ui.http.put("/api/v1/models/clf/1.0.0/report", json=report, headers=AUTH)
    assert stored.json() == {"model": "clf@1.0.0", "candidates": 3, "chosen": "int8 b"}
    assert ui.http.get("/api/v1/models/clf/1.0.0/report", headers=AUTH).json() == report
    assert ui.http.put("/api/v1/models/clf/9.9.9/report", json=report, headers=AUTH).status_code == 404
    refused = ui.http.put("/api/v1/models/clf/1.0.0/report", json={"chosen": "x"}, headers=AUTH)
    assert refused.status_code == 422 and "not a build report" in refused.json()["detail"]

    html = ui.page("/ui/models/clf/1.0.0")
    plots = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(plots) == 2
    for plot in plots:  # points 0, 1 and 3 drawn (2 was not measured), 3 the chosen one
        assert re.findall(r"<title>(\d+): ", plot) == ["0", "1", "3"]
        assert 'class="pt-chosen"><title>3: int8 b' in plot and 'class="pt-failed"><title>1: int8 a' in plot
        assert 'class="front"' in plot and 'class="gate"' in plot
    assert "yes" in ui.page("/ui/models")


def test_the_openapi_document_names_typed_responses(ui: Dashboard) -> None:
    spec = ui.http.get("/openapi.json").json()

    def schema(path: str, method: str, code: str = "200") -> str:
        content = spec["paths"][path][method]["responses"][code]["content"]["application/json"]["schema"]
        return json.dumps(content)

    assert "DeviceOut" in schema("/api/v1/devices", "get")
    assert "DeviceCredentials" in schema("/api/v1/devices", "post", "201")
    assert "ModelOut" in schema("/api/v1/models", "get")
    assert "RolloutOut" in schema("/api/v1/rollouts/{rollout_id}", "get")
    assert "EventOut" in schema("/api/v1/devices/{device_id}/events", "get")
    assert "ExportStatusOut" in schema("/api/v1/export/status", "get")
    assert "MeasuredProfile" in schema("/api/v1/profiles/{name}/measured", "get")
    assert "HardExampleOut" in schema("/api/v1/fielddata/{name}/examples", "get")
    assert not any(p.startswith("/ui") for p in spec["paths"])
    # every JSON response names its model; free-form objects only where the body is the user's document
    free_form = {("/api/v1/models/{name}/{version}/report", "get")}  # the build report, as the build wrote it
    untyped = []
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            for code, response in operation["responses"].items():
                body = response.get("content", {}).get("application/json", {}).get("schema")
                if code.startswith("2") and body is not None and (path, method) not in free_form:
                    text = json.dumps(body)
                    if "$ref" not in text and body.get("type") != "string":
                        untyped.append(f"{method.upper()} {path}: {text[:60]}")
    assert not untyped, untyped
    binary = spec["paths"]["/api/v1/artifacts/{digest}"]["get"]["responses"]["200"]["content"]
    assert set(binary) == {"application/octet-stream"}


def test_forged_or_expired_session_cookies_are_refused(ui: Dashboard) -> None:
    sessions = Sessions(TOKEN, lifetime_s=60)
    good = sessions.issue()
    assert sessions.valid(good) and not sessions.valid(good, now=time.time() + 61)
    forged = good[:-1] + ("0" if good[-1] != "0" else "1")
    other = Sessions("another token").issue()
    for cookie in (forged, other, sessions.issue(now=time.time() - 120), "v1.9999999999.00.00"):
        ui.http.cookies.set(SESSION_COOKIE, cookie)
        assert ui.http.get("/api/v1/devices").status_code == 401
        assert ui.http.get("/ui/fleet", follow_redirects=False).status_code == 303
    ui.http.cookies.set(SESSION_COOKIE, good)
    assert ui.http.get("/api/v1/devices").status_code == 200
    assert ui.http.post("/api/v1/rollouts/ro-x/pause").status_code == 403  # no CSRF token
    wrong = ui.http.post("/api/v1/rollouts/ro-x/pause", headers={"X-CSRF-Token": sessions.csrf(forged)})
    assert wrong.status_code == 403
    right = ui.http.post("/api/v1/rollouts/ro-x/pause", headers={"X-CSRF-Token": sessions.csrf(good)})
    assert right.status_code == 404  # past authentication: the rollout is unknown
    assert ui.http.get("/ui/login?next=https://evil.example/").text.count('data-next="/ui/fleet"') == 1


def test_model_report_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{")
    for args in (["clf", "list.json"], ["clf@1.0.0", "broken.json"]):
        done = subprocess.run([sys.executable, "-m", "edgefleet", "model", "report", *args, "--server",
                               "http://127.0.0.1:9", "--token", "t"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr
