"""The operator dashboard (``/ui``) in headless Chromium against a real server and real agents: log in, watch the
fleet come online without reloading, filter it, pause and resume a rollout with the page's buttons, follow a
canary rollout whose accuracy gate trips in wave 1 to its rollback, and open a build report made by the real
build search; with screenshots (EDGEFLEET_TEST_ARTIFACTS, default tmp_path) and no console errors. Without the
login every page and API request is refused, and a cookie-authenticated POST without the CSRF token is refused.

Chromium is Debian's (``/usr/bin/chromium``) driven by Playwright's Python API; the test skips where it is
missing and fails under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.processes import wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.fleet import LocalFleet

pytestmark = pytest.mark.integration
CHROMIUM = Path("/usr/bin/chromium")
README = Path(__file__).resolve().parents[2] / "README.md"
LAB = ["lab-0", "lab-1"]
GATE = "accuracy_drop > 5%"
WAIT_MS = 90_000


def chromium_path() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")


@pytest.fixture
def artifacts(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    root = os.environ.get("EDGEFLEET_TEST_ARTIFACTS")
    path = (Path(root) / request.node.name) if root else tmp_path / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    """One real ``edgefleet server`` (embedded broker, SQLite) for this module's tests, stopped after them."""
    local = LocalFleet(tmp_path_factory.mktemp("dashboard"))
    try:
        local.start_server()
        yield local
    finally:
        local.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(executable), args=["--no-sandbox"], headless=True)
        try:
            yield launched
        finally:
            launched.close()


def always_alpha_model() -> bytes:
    """The synthetic classifier with a bias that makes it answer "alpha" to everything: ~25% accurate."""
    return synthetic.channel_mean_model(bias=[100.0, 0.0, 0.0, 0.0])


def build_report() -> dict[str, Any]:
    """A real build search (int8 and fp16 candidates, measured) of a small conv model, as REPORT.json."""
    from edgefleet.build.evaluate import predict
    from edgefleet.build.pipeline import BuildData, BuildSearch
    from edgefleet.build.recipe import load_recipe
    from edgefleet.build.report import report_json
    from edgefleet.testing.outliers import conv_model

    model = conv_model()
    x = np.random.default_rng(1).normal(size=(400, 4, 8, 8)).astype(np.float32)
    recipe = load_recipe("latency: {budget_s: 0.05, min_runs: 3, max_runs: 20, warmup: 1, batches: [1]}\n")
    outcome = BuildSearch(model, BuildData(calib_x=x[:200], test_x=x[200:], test_y=predict(model, x[200:])
                                           .argmax(axis=1)), recipe, []).run()
    report: dict[str, Any] = json.loads(json.dumps(report_json(outcome, name="model", version="1.0.0"), default=str))
    return report


def readme_dashboard_commands() -> list[str]:
    block = README.read_text().split("<!-- dashboard -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def run_readme_block(fleet: LocalFleet, cwd: Path) -> None:
    """The README's dashboard commands, as a user types them with EDGEFLEET_SERVER and EDGEFLEET_TOKEN set."""
    env = {**os.environ, "EDGEFLEET_SERVER": fleet.server_url or "", "EDGEFLEET_TOKEN": fleet.operator_token or "",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    commands = readme_dashboard_commands()
    assert commands, "README has no dashboard commands"
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 0, f"{command}: {done.stderr}"


def wait_text(page: Any, selector: str, text: str, timeout_ms: int = WAIT_MS) -> None:
    """Wait for ``text`` in ``selector`` as the page updates itself (no reload); on a timeout the error names what
    the element showed."""
    try:
        page.wait_for_function("([s, t]) => { const e = document.querySelector(s); "
                               "return e !== null && e.textContent.includes(t); }", arg=[selector, text],
                               timeout=timeout_ms)
    except Exception as exc:
        shown = page.locator(selector).first.inner_text(timeout=1000) if page.locator(selector).count() else None
        raise AssertionError(f"{selector} never showed {text!r} (it shows {shown!r}) at {page.url}") from exc


def test_an_operator_follows_the_fleet_and_its_rollouts_in_the_browser(fleet: LocalFleet, browser: Any,
                                                                       artifacts: Path, tmp_path: Path) -> None:
    api = fleet.api
    assert api is not None and fleet.server_url is not None and fleet.key is not None
    base = fleet.server_url
    api.push_model(fleet.bundle("1.0.0", 1))
    api.push_model(fleet.bundle("2.0.0", 2, always_alpha_model()))
    api.push_model(fleet.bundle("1.1.0", 3))
    for device in LAB:
        fleet.provision(device, tags={"site": "lab"})
    fleet.provision("spare-0", tags={"site": "spare"})
    fleet.provision("shelf-0", tags={"site": "shelf"}, profile="raspberry-pi")
    api.deploy("clf@1.0.0", LAB)
    for device in LAB:
        fleet.start_agent(device, speed=20.0, duration_s=400, telemetry_interval_s=0.5)

    # meanwhile: a build report from the real build search, attached with the README's command
    report = build_report()
    (tmp_path / "report.json").write_text(json.dumps(report))
    api.push_model(pack_bundle(synthetic.channel_mean_model(), fleet.key, BundleSpec(
        name="model", version="1.0.0", release=1, labels=list(synthetic.LABELS),
        preprocess=synthetic.preprocess_spec())))
    run_readme_block(fleet, tmp_path)

    context = browser.new_context(base_url=base, viewport={"width": 1300, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    # log in: the page asks for the operator token and comes back to where it was sent from
    page.goto("/ui/fleet")
    assert "/ui/login" in page.url
    page.screenshot(path=str(artifacts / "login.png"))
    page.fill("#token", fleet.operator_token or "")
    page.click("button[type=submit]")
    page.wait_for_url("**/ui/fleet")
    cookie = next(c for c in context.cookies() if c["name"] == "edgefleet_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # the fleet: the agents come online and report their model while the page stays loaded
    page.evaluate("window.stillLoaded = true")
    for device in LAB:
        wait_text(page, f'tr[data-device="{device}"]', "online")
        wait_text(page, f'tr[data-device="{device}"] td.running', "clf@1.0.0")
    assert "silent" in page.inner_text('tr[data-device="shelf-0"]')
    assert page.evaluate("window.stillLoaded") is True  # updated in place, never reloaded
    page.screenshot(path=str(artifacts / "fleet.png"), full_page=True)
    page.select_option("select[name=tag]", "site=lab")
    page.click("#fleet-filters button")
    page.wait_for_url("**tag=site%3Dlab**")
    assert sorted(page.eval_on_selector_all("#devices tr[data-device]", "rs => rs.map(r => r.dataset.device)")) == LAB
    page.goto("/ui/fleet?profile=raspberry-pi")
    assert page.eval_on_selector_all("#devices tr[data-device]", "rs => rs.map(r => r.dataset.device)") == ["shelf-0"]

    # a rollout to a device with no agent stays installing: pause and resume it from its page
    spare = api.create_rollout("clf@1.1.0", select={"site": "spare"}, install_timeout_s=600)["id"]
    page.goto(f"/ui/rollouts/{spare}")
    page.click("button[data-action=pause]")
    wait_text(page, "#rollout-phase", "paused", 15_000)
    assert api.rollout(spare)["phase"] == "paused"
    page.click("button[data-action=resume]")
    page.wait_for_selector("button[data-action=pause]", timeout=15_000)
    assert api.rollout(spare)["phase"] != "paused"
    kinds = page.eval_on_selector_all("#decisions tr[data-kind]", "rs => rs.map(r => r.dataset.kind)")
    assert "pause" in kinds and "resume" in kinds, kinds
    refused = page.request.post(f"{base}/api/v1/rollouts/{spare}/pause")  # the cookie, but no CSRF token
    assert refused.status == 403 and "X-CSRF-Token" in refused.json()["detail"]
    assert api.rollout(spare)["phase"] != "paused"

    # the device: telemetry drawn as charts, and its events
    wait_until(lambda: all(api.telemetry(d)["batches"] > 2 for d in LAB), 90, "baseline telemetry")
    page.goto("/ui/devices/lab-0")
    assert page.locator("figure svg polyline").count() >= 2  # latency p50 and p99
    assert page.locator("#events tr").count() > 1
    page.screenshot(path=str(artifacts / "device.png"), full_page=True)

    # a canary whose accuracy gate trips in wave 1: the decision, its reason and the rollback, live
    bad = api.create_rollout("clf@2.0.0", select={"site": "lab"}, waves=["1", "100%"], gates=[GATE], window_s=4,
                             min_windows=20, install_timeout_s=60)["id"]
    page.goto(f"/ui/rollouts/{bad}")
    page.evaluate("window.stillLoaded = true")
    wait_text(page, "#rollout-phase", "aborted", 120_000)
    rollback = page.locator('#decisions tr[data-kind="rollback"]')
    assert rollback.count() == 1
    reason = rollback.locator("td.reason").inner_text()
    assert "accuracy_drop" in reason and "tripped" in reason, reason
    assert rollback.locator("td").nth(3).inner_text() == "1"  # wave 1
    assert page.locator("#gates .gate.outcome-fail svg").count() == 1
    assert page.evaluate("window.stillLoaded") is True
    page.screenshot(path=str(artifacts / "rollout-aborted.png"), full_page=True)
    page.goto("/ui/fleet?tag=site%3Dlab")
    for device in LAB:  # the wave-1 device back on version 1
        wait_text(page, f'tr[data-device="{device}"] td.running', "clf@1.0.0")
        assert page.inner_text(f'tr[data-device="{device}"] td.desired') == "clf@1.0.0"

    # the build report: candidates and the Pareto plots
    page.goto("/ui/models")
    page.click("text=model@1.0.0")
    page.wait_for_url("**/ui/models/model/1.0.0")
    assert page.inner_text("#report-chosen") == report["chosen"]
    assert page.locator("#build-report svg").count() == 2
    assert page.locator("#candidates tr").count() == 2 + len(report["candidates"])
    page.screenshot(path=str(artifacts / "build-report.png"), full_page=True)

    assert not problems, problems
    context.close()


def test_without_the_login_pages_and_the_api_are_refused(fleet: LocalFleet, browser: Any) -> None:
    """A fresh browser is sent to the login page; API calls without the token or a session are refused; a wrong
    token does not log in."""
    assert fleet.server_url is not None
    context = browser.new_context(base_url=fleet.server_url)
    request = context.request
    page = request.get("/ui/rollouts", max_redirects=0)
    assert page.status == 303 and page.headers["location"].startswith("/ui/login")
    assert request.get("/ui/fleet?fragment=1").status == 401
    assert request.get("/api/v1/devices").status == 401
    assert request.post("/api/v1/rollouts/ro-x/pause").status == 401
    assert request.post("/ui/login", headers={"Authorization": "Bearer wrong"}).status == 403
    assert not context.cookies()
    assert request.post("/ui/login", headers={"Authorization": f"Bearer {fleet.operator_token}"}).status == 204
    assert request.get("/api/v1/devices").status == 200  # the session cookie now
    assert request.post("/api/v1/rollouts/ro-x/pause").status == 403  # but no CSRF token
    context.close()
