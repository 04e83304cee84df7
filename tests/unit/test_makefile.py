"""The Makefile's benchmark targets: `make bench-NAME` runs bench/bench_NAME.py and `make bench` runs them all
(dry runs: `make -n` prints the commands without running them)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHES = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "bench").glob("bench_*.py"))


def dry_run(target: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", "--no-print-directory", target], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_bench_name_runs_that_benchmark() -> None:
    assert "compress" in BENCHES and "wire" in BENCHES
    assert "-m bench.bench_compress" in dry_run("bench-compress")


def test_make_bench_runs_every_benchmark() -> None:
    out = dry_run("bench")
    assert [name for name in BENCHES if f"-m bench.bench_{name}" not in out] == []
