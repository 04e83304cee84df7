"""One agent per data directory: an exclusive ``flock`` on ``DATA_DIR/agent.lock``, held for the process's life.

Two agents on one directory would share its SQLite state and its MQTT client id, and take turns kicking each
other off the broker. The agent process (:mod:`edgefleet.agent.main`) takes this lock before anything else and
writes its process id into the file; a second agent on the same directory exits with one line naming the
directory and that id. The kernel drops the lock when the process ends, however it ends (kill -9 included), so a
file left behind never blocks a restart. ``edgefleet agent status`` uses :func:`probe` to tell whether an agent
holds the directory now.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from edgefleet.errors import ConfigError

LOCK_FILE = "agent.lock"


@dataclass
class DataDirLock:
    """The held lock (an open descriptor); :meth:`release` or the process's end lets it go."""

    path: Path
    fd: int

    @classmethod
    def acquire(cls, data_dir: Path, *, attempts: int = 20, interval_s: float = 0.05) -> DataDirLock:
        """Lock ``data_dir`` (created if missing) or raise ConfigError naming the holder.

        A few short retries ride out :func:`probe`, which holds a shared lock for an instant.
        """
        path = data_dir / LOCK_FILE
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot lock data directory {data_dir}: {exc.strerror or exc}") from exc
        for attempt in range(max(1, attempts)):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt + 1 < attempts:
                    time.sleep(interval_s)
        else:
            pid = _read_pid(fd)
            os.close(fd)
            raise ConfigError(f"data directory {data_dir} is in use by another agent (pid {pid or 'unknown'})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = -1


@dataclass(frozen=True)
class LockState:
    """Whether an agent process holds a data directory now (None: no agent process ever locked it), and its pid."""

    held: bool | None
    pid: int | None = None


def probe(data_dir: Path) -> LockState:
    """Whether an agent holds ``data_dir``, without creating anything there."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file (never run as a process here), or not readable
        return LockState(None)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return LockState(True, _read_pid(fd))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return LockState(False)
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
