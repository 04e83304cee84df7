"""`edgefleet demo` end to end, both scenarios with short settings: the product build reaches every device through
a rollout, the devices' accuracy on the replayed test rows is the build's, and no process is left behind.

Tolerance: the replayed rows ARE the build's test rows, through the same input pipeline, scored by the same
shipped model in the same ONNX Runtime, so the fleet's correct count should equal the build's. The one
difference is that the agent infers one row at a time where the build scores batches, and ONNX Runtime's int8
kernels may take another code path per batch size, which can flip a near tie: we allow 1% of the windows, at
least one window.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.train

ROW = re.compile(r"^\W*(?P<device>[\w-]+)\W+(?P<model>[\w.-]+@[\d.]+)\W+(?P<windows>\d+)/(?P<expected>\d+)\W+"
                 r"(?P<accuracy>[\d.]+)%\W+(?P<build>[\d.]+)%")
FLEET = re.compile(r"^\W*fleet\W+(?P<windows>\d+)/(?P<expected>\d+)\W+(?P<accuracy>[\d.]+)%\W+(?P<build>[\d.]+)%")


def run_demo(workdir: Path, *args: str) -> str:
    """Run ``edgefleet demo`` to completion in ``workdir``; its stdout. Fails when it exits non-zero or leaves a
    process running."""
    result = subprocess.run([sys.executable, "-m", "edgefleet", "demo", "--workdir", str(workdir), *args],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    leftovers = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left running: {leftovers.stdout}"
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def check_fleet(out: str, devices: list[str], model: str) -> None:
    """Every device ends on ``model`` having inferred every row of its shard; the fleet's on-device accuracy is
    the build's within the tolerance in the module docstring."""
    rows = {m["device"]: m for m in map(ROW.match, out.splitlines()) if m}
    assert set(rows) == set(devices), out
    for device, row in rows.items():
        assert row["model"] == model, f"{device} runs {row['model']}: {out}"
        assert row["windows"] == row["expected"], f"{device} inferred {row['windows']}/{row['expected']}: {out}"
    fleet = next(m for m in map(FLEET.match, out.splitlines()) if m)
    windows = int(fleet["windows"])
    assert windows == int(fleet["expected"]) > 0
    diff = abs(float(fleet["accuracy"]) - float(fleet["build"])) / 100 * windows  # windows scored differently
    assert diff <= max(1.0, 0.01 * windows) + 0.5, f"on-device {fleet['accuracy']}% vs build {fleet['build']}%"
    assert re.search(r"rollout ro-[0-9a-f]+\s+done", " ".join(out.split())), out


def test_watch_demo_ships_the_built_model_to_every_device(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("sktime")
    out = run_demo(tmp_path / "watch", "--devices", "2", "--duration", "8", "--epochs", "8")
    check_fleet(out, ["watch-01", "watch-02"], "basicmotions@1.0.0")
    assert (tmp_path / "watch" / "basicmotions.npz").exists()  # the data file the agents replayed


def test_camera_demo_replays_digit_frames(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    out = run_demo(tmp_path / "camera", "--scenario", "camera", "--devices", "2", "--duration", "5",
                   "--epochs", "3")
    check_fleet(out, ["cam-01", "cam-02"], "digits@1.0.0")


def test_an_unknown_scenario_is_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "edgefleet", "demo", "--scenario", "drone"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["edgefleet: error: --scenario must be one of watch, camera, "
                                                  "not 'drone'"]
