"""Run the ``edgefleet`` command in-process, as its console script does, for tests."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest


def run_cli(args: Sequence[str | Path], monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``edgefleet ARGS``: the exit code and stdout + stderr."""
    from edgefleet.cli import main

    monkeypatch.setattr(sys, "argv", ["edgefleet", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err
