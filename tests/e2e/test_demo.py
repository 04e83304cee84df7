"""`edgefleet demo` end to end (short settings): it prints the summary and leaves no process behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.train


def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("sktime")
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "demo", "--workdir", str(workdir), "--devices", "2",
         "--duration", "8", "--epochs", "8"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "160"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "watch-01" in result.stdout and "watch-02" in result.stdout
    assert "basicmotions-cnn@1.0.0" in result.stdout
    fleet_row = next(line for line in result.stdout.splitlines() if "fleet" in line and "%" in line)
    accuracy = float(re.search(r"([0-9.]+)%", fleet_row).group(1))  # type: ignore[union-attr]
    assert accuracy >= 80.0, f"on-device accuracy fell to {accuracy}%: {fleet_row}"
    leftovers = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left running: {leftovers.stdout}"
