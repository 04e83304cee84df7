"""A real agent process whose data directory is a small tmpfs that fills up at each step of an update.

The agent holds at the step (EDGEFLEET_FAULT_PAUSE), the test fills the tmpfs to the last block, the step goes
on and meets ENOSPC (the download's free-space check, the health check's files, SQLite's WAL). Then: the agent
is still running, the update is refused as ``disk_full`` (said in its log at once, and in its state and events
once the disk has room again), the old model stays active and inferring, nothing of the candidate is left, and
an agent killed and started again on the still full disk comes up, runs its model and does not crash-loop.

Mounting a tmpfs needs root (or passwordless sudo): where neither is there the test is skipped (failed in CI);
tests/unit/test_updater_disk_faults.py injects ENOSPC at each step without a mount.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.bundle.signing import SigningKey
from edgefleet.processes import ManagedProcess, wait_until
from edgefleet.testing.agent_rig import DeviceRig, Watcher
from edgefleet.testing.agents import model_ref, signed_bundle
from edgefleet.testing.artifacts import ArtifactServer
from edgefleet.transport.mqtt_url import MqttEndpoint

pytestmark = pytest.mark.integration
KEY = SigningKey.generate()
V1, V2 = signed_bundle(KEY, "1.0.0", 1), signed_bundle(KEY, "2.0.0", 2)
T1, T2 = model_ref(V1, "1.0.0", 1), model_ref(V2, "2.0.0", 2)
ENV = {"EDGEFLEET_DOWNLOAD_RESERVE_BYTES": str(64 * 1024),  # the default reserve is larger than this disk
       # one process's handling of the full disk; the restart after an update (which retries a refused target
       # once the disk has room, from the retained desired state) is tested in test_agent_field.py
       "EDGEFLEET_AGENT_REEXEC": "0"}


def _sudo(command: list[str]) -> list[str]:
    return command if os.geteuid() == 0 else ["sudo", "-n", *command]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs owned by this user, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    options = f"size=16m,mode=0700,uid={os.getuid()},gid={os.getgid()}"
    result = subprocess.run(_sudo(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)]),
                            capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs: {result.stderr.strip()[:200]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(_sudo(["umount", "-l", str(mount)]), capture_output=True, timeout=30, check=False)


def fill(disk: Path) -> Path:
    """Take every free block of ``disk`` (big writes, then small ones, until ENOSPC); the filler file."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:
        for size in (1024 * 1024, 4096, 512):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def logged(process: ManagedProcess, text: str) -> bool:
    return text in process.log_path.read_text(errors="replace")


@pytest.fixture
def rig(tmp_path: Path, small_disk: Path, embedded_broker: MqttEndpoint,
        request: pytest.FixtureRequest) -> Iterator[tuple[DeviceRig, Watcher]]:
    name = "full-" + request.node.name.split("[")[-1].rstrip("]").replace("_", "-")
    with ArtifactServer({T1.url: V1, T2.url: V2}) as artifacts:
        device = DeviceRig(tmp_path, embedded_broker, artifacts.url, artifacts.token, name, KEY.public,
                           data_dir=small_disk / "agent")
        watcher = Watcher(embedded_broker, name)
        try:
            yield device, watcher
        finally:
            device.stop_all()
            watcher.close()


@pytest.mark.parametrize("step", ["downloading", "verifying", "staged", "health_checking", "activating"])
def test_a_disk_that_fills_at_each_update_step_never_takes_the_agent_down(
        step: str, rig: tuple[DeviceRig, Watcher], small_disk: Path) -> None:
    device, watcher = rig
    watcher.desire(T1)
    agent = device.start({**ENV, "EDGEFLEET_FAULT_PAUSE": f"{step}:3"})
    wait_until(lambda: device.state().get("active") == "clf@1.0.0" and device.state().get("update_state") == "idle",
               90, "version 1 to become active")

    watcher.desire(T2)
    wait_until(lambda: device.state().get("update_state") == step, 30, f"the update to reach {step}")
    filler = fill(small_disk)
    wait_until(lambda: logged(agent, "(disk_full)") or device.state().get("active") == "clf@2.0.0", 30,
               "the update to meet the full disk")
    assert agent.running, agent.log_tail()
    filler.unlink()  # room again: what could not be written is written now

    wait_until(lambda: device.state().get("update_state") == "idle" and not device.state().get("pending_update"), 30,
               "the update state back to idle")
    state = device.state()
    assert state.get("candidate") is None
    if state.get("active") == "clf@2.0.0":  # SQLite's WAL still had room for the activation: it went through
        assert step == "activating" and state.get("previous") == "clf@1.0.0"
    else:
        assert state.get("active") == "clf@1.0.0" and "disk_full" in state["last_error"]
        wait_until(lambda: any(e.get("reason") == "disk_full" for e in watcher.named("refused")), 30,
                   "the refusal to be reported")
        assert not (device.data_dir / "bundles" / f"{T2.sha256}.bundle").exists()
        before = watcher.batches("clf@1.0.0")
        wait_until(lambda: watcher.batches("clf@1.0.0") > before + 2, 30, "telemetry from version 1")
    assert not list((device.data_dir / "downloads").glob("*")) and not list((device.data_dir / "health").glob("*"))
    running = state["active"]

    filler = fill(small_disk)  # full again, and the agent dies (power cut): it must come back up
    agent.kill()
    restarted_at = time.time()
    restarted = device.start(ENV)
    wait_until(lambda: not restarted.running or (watcher.reported.get("ts", 0) > restarted_at
                                                 and watcher.reported.get("active") == running), 60,
               "the restarted agent to report its model")
    time.sleep(2.0)  # a crash loop would show here: the desired state arrives, the outbox and the state are written
    assert restarted.running, restarted.log_tail()
    filler.unlink()
    before = watcher.batches(running)
    wait_until(lambda: watcher.batches(running) > before + 2, 30, "telemetry after the restart")
    assert restarted.running and device.state().get("active") == running
    assert restarted.stop() == 0
