"""Build reports (``edgefleet build --report``'s REPORT.json) kept beside the artifacts, one per model version.

They live in the artifact directory (``reports/NAME@VERSION.json``), which every replica shares, written
crash-safely; the dashboard draws each one's Pareto plot from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgefleet.errors import ConfigError
from edgefleet.storage import atomic_write

__all__ = ["BuildReports"]


class BuildReports:
    """A directory of build reports keyed by ``NAME@VERSION`` (the caller checks that the model exists)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, ref: str) -> Path:
        return self.root / f"{ref}.json"

    def put(self, ref: str, report: dict[str, Any]) -> None:
        """Store ``report``; ConfigError when it is not a build report (no ``candidates`` list)."""
        if not isinstance(report.get("candidates"), list) or not isinstance(report.get("baseline"), dict):
            raise ConfigError("not a build report: REPORT.json has a baseline and a list of candidates")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self._path(ref), json.dumps(report, separators=(",", ":")).encode())

    def get(self, ref: str) -> dict[str, Any] | None:
        path = self._path(ref)
        if not path.is_file():
            return None
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def has(self, ref: str) -> bool:
        return self._path(ref).is_file()
