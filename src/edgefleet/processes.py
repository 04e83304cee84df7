"""Child processes that are always cleaned up: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from edgefleet.errors import EdgefleetError


class ManagedProcess:
    """One ``python -m edgefleet ...`` (or any) child with its output in a log file."""

    def __init__(self, args: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.args = list(args)
        self.log_path = log_path
        self._env = env
        self._cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def edgefleet(cls, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> ManagedProcess:
        return cls([sys.executable, "-m", "edgefleet", *args], log_path, env=env)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(self._env or {})}, cwd=self._cwd)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None if still running after ``timeout_s``."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        code = self.wait(grace_s)
        if code is None:
            self.proc.kill()
            code = self.wait(5.0)
        return code

    def kill(self) -> None:
        if self.running and self.proc is not None:
            self.proc.kill()
            self.proc.wait(5.0)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProcessGroup:
    """Stops every process it started, in reverse order, whatever happens."""

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []

    def start(self, process: ManagedProcess) -> ManagedProcess:
        self.processes.append(process.start())
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    """Poll ``predicate()`` until true; raise EdgefleetError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise EdgefleetError(f"timed out after {timeout_s:.0f} s waiting for {what}")
