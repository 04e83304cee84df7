"""Base install size: `pip install edgefleet` into a fresh venv against ONNX Runtime + numpy alone (target <= 1.3x).

Both are real resolves into new venvs; the size is what lands in site-packages, less the pip and setuptools every
venv starts with. Also lists the largest distributions of the base install, so the figure can be read.
Writes ``bench/results/install.json`` and adds ``base_install_mb`` and ``base_install_ratio`` to
``bench/results/agent.json``. Run: ``python -m bench.bench_install`` (or ``make bench-install``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from bench.common import RESULTS, markdown_table, publish
from edgefleet.testing.base_install import TOOLING, build_wheel, fresh_venv, installed_mb, site_packages

TARGET_RATIO = 1.3


def largest(venv: Path, count: int = 8) -> list[tuple[str, float]]:
    """The biggest top-level entries of site-packages (a package or its .libs folder), MB."""
    sizes = []
    for entry in site_packages(venv).iterdir():
        if entry.name in TOOLING or entry.name.endswith((".dist-info", ".pth")) or entry.name == "__pycache__":
            continue
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes.append((entry.name, sum(p.stat().st_size for p in files) / 1e6))
    return sorted(sizes, key=lambda item: -item[1])[:count]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-install-") as tmp:
        root = Path(tmp)
        wheel = build_wheel(root / "wheel")
        fresh_venv(root / "base", [str(wheel)])
        fresh_venv(root / "ort", ["onnxruntime", "numpy"])
        base_mb, ort_mb = installed_mb(root / "base"), installed_mb(root / "ort")
        biggest = largest(root / "base")
    ratio = base_mb / ort_mb
    result: dict[str, Any] = {"base_install_mb": round(base_mb, 1), "onnxruntime_numpy_mb": round(ort_mb, 1),
                              "base_install_ratio": round(ratio, 3), "target_ratio": TARGET_RATIO,
                              "largest_mb": {name: round(mb, 1) for name, mb in biggest}}
    rows = [["pip install edgefleet", f"{base_mb:.1f}", f"{ratio:.2f}x"],
            ["onnxruntime + numpy", f"{ort_mb:.1f}", "1.00x"]]
    section = (f"Installed size in fresh venvs (site-packages less pip/setuptools), target <= {TARGET_RATIO}x.\n\n"
               + markdown_table(["install", "MB", "ratio"], rows)
               + "\n\nLargest in the base install: "
               + ", ".join(f"{name} {mb:.0f} MB" for name, mb in biggest) + ".\n")
    publish("install", result, section)
    agent = RESULTS / "agent.json"
    if agent.exists():
        data = json.loads(agent.read_text())
        data.update(base_install_mb=result["base_install_mb"], base_install_ratio=result["base_install_ratio"])
        agent.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
