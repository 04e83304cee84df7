"""The layers run one way: the bundle format -> core (pure decisions) -> drivers -> cli.

`make lint` enforces it with import-linter's contracts in pyproject.toml; these tests prove the contracts
hold on the tree, that a wrong import breaks them (on a copy of the package with one line added), and that
importing `core` loads no driver and no model framework at module level.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(project: Path) -> subprocess.CompletedProcess[str]:
    """Run `lint-imports` on ``project`` (a pyproject.toml and src/edgefleet), its package first on the path."""
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    return subprocess.run([str(LINT_IMPORTS), "--no-logo", "--no-cache"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("bundle/pack.py", "from edgefleet.core.update import decide", "one direction"),
    ("core/rollout.py", "from edgefleet.agent.config import AgentConfig", "reach no driver"),
    ("core/update.py", "import onnx", "imports no ONNX package"),
    ("agent/config.py", "from edgefleet.cli import main", "one direction"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path: Path, module: str, line: str, broken: str) -> None:
    """One added import line, in a copy of the package, fails the check and names the contract it breaks."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "src" / "edgefleet", tmp_path / "src" / "edgefleet",
                    ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "src" / "edgefleet" / module
    target.write_text(target.read_text() + f"\n{line}  # deliberately wrong\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert f"{broken}" in result.stdout.split("Broken contracts")[-1], result.stdout


def test_importing_core_loads_no_driver_and_no_model_framework() -> None:
    """Module-level imports only: the format layer may import ONNX lazily, inside the model check."""
    probe = ("import pkgutil, sys, edgefleet.core as core\n"
             "for m in pkgutil.iter_modules(core.__path__): __import__(f'edgefleet.core.{m.name}')\n"
             "bad = ('edgefleet.agent', 'edgefleet.server', 'edgefleet.build', 'edgefleet.cli', 'onnx', "
             "'onnxruntime', 'torch')\n"
             "print(sorted(n for n in sys.modules if n.split('.')[0] in bad or n.startswith(bad)))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
