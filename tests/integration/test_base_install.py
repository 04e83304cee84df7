"""The base install is a device's: `pip install edgefleet` into a fresh venv (a real resolve through pip's index
and wheel cache, about 40 s here) brings the agent and nothing of the control plane, and that agent, run from
its own venv, installs a model over the air from a server run from the main venv and reports telemetry.

Also: a command that needs an extra says which in one line, and the systemd unit for the agent passes
``systemd-analyze verify`` (skipped, with the reason, where systemd-analyze is not installed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.cli.extras import EXTRA_MODULES
from edgefleet.processes import ManagedProcess, wait_until
from edgefleet.testing.base_install import ROOT, build_wheel, distributions, fresh_venv
from edgefleet.testing.fleet import LocalFleet

pytestmark = pytest.mark.integration
MODEL = "clf@1.0.0"
CONTROL_PLANE = {"fastapi", "uvicorn", "sqlalchemy", "psycopg", "psycopg-binary", "amqtt", "gmqtt",
                 "prometheus-client", "starlette", "pyyaml", "onnxconverter-common", "torch", "sktime",
                 "scikit-learn", "aiocoap", "onnx", "typer", "rich", "pygments"}
"""Not on a device: the control plane, the tooling, and the full CLI's toolkit (typer brings rich and pygments)."""
UNIT = ROOT / "packaging" / "edgefleet-agent.service"


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("base-install")
    wheel = build_wheel(root / "wheel")
    fresh_venv(root / "venv", [str(wheel)], timeout_s=240)
    yield root / "venv"


def test_base_install_brings_no_control_plane_package(base_venv: Path) -> None:
    """No server, build, train, data or CoAP distribution is installed, and none of their modules imports."""
    installed = distributions(base_venv)
    assert {"edgefleet", "onnxruntime", "numpy", "paho-mqtt", "cryptography"} <= installed
    assert not installed & CONTROL_PLANE, installed & CONTROL_PLANE
    modules = sorted({m for extra, names in EXTRA_MODULES.items() if extra != "camera" for m in names})
    probe = f"import importlib.util as u; print([m for m in {modules!r} if u.find_spec(m)])"
    done = subprocess.run([str(base_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_a_command_that_needs_an_extra_says_which_in_one_line(base_venv: Path, tmp_path: Path) -> None:
    edgefleet = str(base_venv / "bin" / "edgefleet")
    assert subprocess.run([edgefleet, "--help"], capture_output=True, timeout=60, check=False).returncode == 0
    for args, extra in ((["server", "--data-dir", str(tmp_path)], "server"),
                        (["coap-gateway", "--mqtt-url", "mqtt://127.0.0.1:1"], "coap"),
                        (["device", "list"], "cli"), (["agent", "status", "--data-dir", str(tmp_path)], "")):
        done = subprocess.run([edgefleet, *args], capture_output=True, text=True, timeout=60, check=False)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert (f"pip install 'edgefleet[{extra}]'" if extra else "holds no agent state") in lines[0]


def test_agent_from_the_base_install_updates_and_reports(base_venv: Path, fleet: LocalFleet) -> None:
    """The server runs from the main venv; the agent from the base venv installs the model and sends telemetry."""
    assert fleet.api is not None
    fleet.provision("field-01")
    fleet.api.push_model(fleet.bundle("1.0.0", 1))
    fleet.api.deploy(MODEL, ["field-01"])
    args = [str(base_venv / "bin" / "edgefleet"), "agent",
            "--credentials", str(fleet.root / "devices" / "field-01.json"),
            "--data-dir", str(fleet.root / "agents" / "field-01"),
            "--source", f"npz:{fleet.data_file()}?shard=0/1&speed=20", "--telemetry-interval", "0.5"]
    agent = fleet.group.start(ManagedProcess(args, fleet.root / "logs" / "field-01.log"))

    def reported() -> bool:
        assert agent.running, agent.log_tail(15)
        assert fleet.api is not None
        active = (fleet.api.device("field-01")["reported"] or {}).get("active")
        return bool(active == MODEL and fleet.api.telemetry("field-01")["batches"] > 0)

    wait_until(reported, 90, "the base-install agent to run the model and report")
    windows = sum(m["windows"] for m in fleet.api.telemetry("field-01")["models"] if m["model"] == MODEL)
    assert windows > 0
    # the device's own status command, from the base install (no typer): what the agent holds
    status = subprocess.run([str(base_venv / "bin" / "edgefleet"), "agent", "status", "--json", "--data-dir",
                             str(fleet.root / "agents" / "field-01")], capture_output=True, text=True, timeout=60,
                            check=False)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["active"] == MODEL


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """The agent's unit: restarts on failure, its own user and state directory, credentials by path."""
    text = UNIT.read_text()
    for line in ("Restart=on-failure", "StateDirectory=edgefleet-agent", "DynamicUser=yes",
                 "LoadCredential=device.json:/etc/edgefleet/device.json", "${CREDENTIALS_DIRECTORY}/device.json",
                 "--data-dir ${STATE_DIRECTORY}"):
        assert line in text, line
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit was not verified")
    # verify checks that ExecStart's binary exists: a copy of the unit points at one that does
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/opt/edgefleet/bin/edgefleet", "/usr/bin/true"))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and UNIT.name not in output, output
