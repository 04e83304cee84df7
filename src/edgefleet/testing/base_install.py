"""Fresh virtual environments with only what ``pip install edgefleet`` brings, for the install test and benchmark.

The wheel is built from the working tree without dependencies; installing it into a new venv is a real resolve
(pip's own index settings, its wheel cache), exactly what a device's ``pip install edgefleet`` does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgefleet.errors import EdgefleetError

ROOT = Path(__file__).resolve().parents[3]
TOOLING = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth")
"""What ``python -m venv`` puts in every environment: not part of an install's size."""


def _run(args: list[str], timeout_s: float) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise EdgefleetError(f"{' '.join(args[:4])} ... failed: {tail}")


def build_wheel(out_dir: Path, timeout_s: float = 120.0) -> Path:
    """edgefleet's wheel from the working tree (no dependencies), with this interpreter's setuptools."""
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
          str(out_dir), str(ROOT)], timeout_s)
    return max(out_dir.glob("edgefleet-*.whl"), key=lambda p: p.stat().st_mtime)


def fresh_venv(path: Path, requirements: list[str], timeout_s: float = 300.0) -> Path:
    """A new venv at ``path`` with ``requirements`` resolved and installed; returns its bin directory."""
    _run([sys.executable, "-m", "venv", str(path)], 60)
    _run([str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          *requirements], timeout_s)
    return path / "bin"


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def installed_mb(venv: Path) -> float:
    """Size on disk of what was installed into the venv (its site-packages less pip and setuptools), MB."""
    total = 0
    for entry in site_packages(venv).iterdir():
        if entry.name in TOOLING or entry.name.split("-")[0] in ("pip", "setuptools"):
            continue
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file() and not p.is_symlink()]
        total += sum(p.stat().st_size for p in files)
    return total / 1e6


def distributions(venv: Path) -> set[str]:
    """Normalized names of the distributions installed in the venv."""
    return {p.name.split("-")[0].lower().replace("_", "-") for p in site_packages(venv).glob("*.dist-info")}
