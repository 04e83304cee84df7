"""One agent per data directory: the lock refuses a second holder with one line naming the directory and the pid,
is let go when its holder closes it, and can be probed without being taken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.lock import LOCK_FILE, DataDirLock, probe
from edgefleet.errors import ConfigError


def test_a_second_holder_is_refused_with_the_directory_and_the_holders_pid(tmp_path: Path) -> None:
    data_dir = tmp_path / "agent"
    first = DataDirLock.acquire(data_dir)
    with pytest.raises(ConfigError) as refused:
        DataDirLock.acquire(data_dir, attempts=2, interval_s=0.01)
    assert str(refused.value) == f"data directory {data_dir} is in use by another agent (pid {os.getpid()})"
    assert "\n" not in str(refused.value)
    first.release()
    DataDirLock.acquire(data_dir).release()  # let go: the next one gets it


def test_probe_tells_held_from_free_without_creating_anything(tmp_path: Path) -> None:
    assert probe(tmp_path).held is None and not (tmp_path / LOCK_FILE).exists()
    lock = DataDirLock.acquire(tmp_path)
    state = probe(tmp_path)
    assert state.held is True and state.pid == os.getpid()
    lock.release()
    assert probe(tmp_path).held is False


def test_a_lock_left_by_a_killed_process_does_not_block_the_next(tmp_path: Path) -> None:
    code = ("import os, sys; from pathlib import Path; from edgefleet.agent.lock import DataDirLock; "
            "DataDirLock.acquire(Path(sys.argv[1])); print('held', flush=True); os.kill(os.getpid(), 9)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.stdout.strip() == "held" and result.returncode == -9
    assert (tmp_path / LOCK_FILE).exists() and probe(tmp_path).held is False
    DataDirLock.acquire(tmp_path, attempts=1).release()


def test_an_unusable_directory_is_one_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot lock data directory"):
        DataDirLock.acquire(blocker / "agent")
