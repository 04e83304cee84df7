"""Wrong clocks, expired and revoked models at restart, and two agents on one data directory, with real agent
processes, a real broker and real ONNX Runtime.

- a clock years behind: an expired bundle is refused thanks to the time floor (a fresh device with the same clock
  would take it), and still refused once the clock is right; the old model runs on;
- an expiry that arrives while a model runs: after a restart the model keeps running and inferring, the agent
  reports it expired, and the control plane shows it in the device's record;
- a revoked key at restart: the model is refused with an event, the previous model runs (or nothing, said so);
- a second agent on the same data directory exits with one line naming the directory and the first one's pid.

Each checks the state afterwards: no crash loop, what runs is what the state, the report and
``edgefleet agent status`` say, the event reported. The clock is shifted with EDGEFLEET_FAKE_CLOCK_OFFSET_S (read
by the agent for its trust decisions only; libfaketime is not installed where these run).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.accepted import FAKE_CLOCK_ENV
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.keys import revocation_statement
from edgefleet.data.basicmotions import save_npz
from edgefleet.processes import ManagedProcess, wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.agent_rig import Watcher, read_agent_db
from edgefleet.testing.agents import model_ref
from edgefleet.testing.artifacts import ArtifactServer
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport.mqtt_url import MqttEndpoint

pytestmark = pytest.mark.integration
A, B = SigningKey.generate(), SigningKey.generate()
NOW = datetime.now(UTC).replace(microsecond=0)
YEAR_S = 365 * 86400

REEXEC_OFF = ("EDGEFLEET_AGENT_REEXEC", "0")


def bundle(key: SigningKey, version: str, release: int, **spec: Any) -> bytes:
    return pack_bundle(synthetic.channel_mean_model(), key, BundleSpec(
        name="clf", version=version, release=release, labels=list(synthetic.LABELS),
        preprocess=synthetic.preprocess_spec(), **spec))


V1 = bundle(B, "1.0.0", 1)
V2 = bundle(A, "2.0.0", 2)
STALE = bundle(A, "3.0.0", 3, created=(NOW - timedelta(days=730)).isoformat(),
               expires=(NOW - timedelta(days=365)).isoformat())  # signed two years ago, expired last year
REFS = {"1.0.0": model_ref(V1, "1.0.0", 1), "2.0.0": model_ref(V2, "2.0.0", 2), "3.0.0": model_ref(STALE, "3.0.0", 3)}


class Device:
    """A device's credentials (trusting A and B) and data directory, and its agent process, restartable."""

    def __init__(self, root: Path, broker: MqttEndpoint, server_url: str, token: str, name: str,
                 data_dir: Path | None = None) -> None:
        self.root, self.name = root, name
        self.data_dir = data_dir or root / name
        self.credentials = root / f"{name}.json"
        self.credentials.write_text(json.dumps({
            "device_id": name, "server_url": server_url, "mqtt_url": broker.url, "token": token,
            "trusted_keys": {k.public.key_id: k.public.to_text() for k in (A, B)}}))
        self.recordings = root / "recordings.npz"
        if not self.recordings.exists():
            save_npz(synthetic.recordings(per_class=2, length=60), self.recordings)
        self.processes: list[ManagedProcess] = []

    def start(self, *, clock_offset_s: float | None = None, log: str | None = None) -> ManagedProcess:
        env = {FAKE_CLOCK_ENV: str(clock_offset_s)} if clock_offset_s is not None else {}
        env[REEXEC_OFF[0]] = REEXEC_OFF[1]  # what one process's start-up does; a re-exec would restore again
        process = ManagedProcess.edgefleet(
            ["agent", "--credentials", str(self.credentials), "--data-dir", str(self.data_dir), "--source",
             f"npz:{self.recordings}?speed=20&loop=1", "--telemetry-interval", "0.3"],
            self.root / f"{log or self.name}.log", env=env).start()
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def state(self) -> dict[str, Any]:
        """Slots and key-value entries, read straight from the agent's database (read-only)."""
        return read_state(self.data_dir)

    def status(self) -> dict[str, Any]:
        return agent_status(self.data_dir)


def read_state(data_dir: Path) -> dict[str, Any]:
    db = read_agent_db(data_dir)
    return {} if db is None else {"slots": db[0], **db[1]}


def agent_status(data_dir: Path) -> dict[str, Any]:
    """``edgefleet agent status --json``, as an operator runs it."""
    result = subprocess.run([sys.executable, "-m", "edgefleet", "agent", "status", "--data-dir", str(data_dir),
                             "--json"], capture_output=True, text=True, timeout=60, check=True)
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def assert_runs(device: Device, process: ManagedProcess, watcher: Watcher | None, ref: str | None) -> None:
    """``ref`` runs (None: nothing) and the process stays up: the state, the report and the status all say so."""
    pid = process.proc.pid  # type: ignore[union-attr]
    wait_until(lambda: device.state().get("running", "?") == ref and device.state().get("running_pid") == pid, 60,
               f"{device.name} (pid {pid}) to run {ref}")
    if watcher is not None:
        wait_until(lambda: watcher.reported.get("running") == ref and watcher.reported.get("ts", 0) > 0, 30,
                   f"{device.name} to report running {ref}")
    time.sleep(1.0)  # a crash loop would show here: the process exits and the status holder goes away
    assert process.running, process.log_tail()
    status = device.status()
    assert status["running"] == ref and status["agent_pid"] == pid


@pytest.fixture
def artifacts() -> Iterator[ArtifactServer]:
    with ArtifactServer({ref.url: data for ref, data in zip(REFS.values(), (V1, V2, STALE), strict=True)}) as server:
        yield server


@pytest.fixture
def rig(tmp_path: Path, embedded_broker: MqttEndpoint, artifacts: ArtifactServer,
        request: pytest.FixtureRequest) -> Iterator[tuple[Device, Watcher]]:
    name = "surv-" + request.node.name.split("[")[0].removeprefix("test_")[:20].replace("_", "-") + str(
        int(time.time() * 1000) % 100000)
    device = Device(tmp_path, embedded_broker, artifacts.url, artifacts.token, name)
    watcher = Watcher(embedded_broker, name)
    try:
        yield device, watcher
    finally:
        device.stop_all()
        watcher.close()


def test_a_clock_years_behind_cannot_install_an_expired_bundle_and_the_old_model_runs_on(
        tmp_path: Path, embedded_broker: MqttEndpoint, artifacts: ArtifactServer,
        rig: tuple[Device, Watcher]) -> None:
    device, watcher = rig
    watcher.desire(REFS["1.0.0"])
    first = device.start()
    wait_until(lambda: device.state().get("running") == "clf@1.0.0", 60, "version 1 to run")
    assert device.state()["time_floor"] is not None  # V1's signed creation time, kept
    assert first.stop() == 0

    behind = device.start(clock_offset_s=-3 * YEAR_S, log="behind")
    watcher.desire(REFS["3.0.0"])
    wait_until(lambda: any(e.get("refused") == "clf@3.0.0" for e in watcher.named("refused")), 60,
               "the expired bundle to be refused")
    assert watcher.named("refused")[-1]["reason"] == "expired"
    assert_runs(device, behind, watcher, "clf@1.0.0")
    assert device.state()["slots"] == {"active": "clf@1.0.0"}
    assert behind.stop() == 0

    # The control: a device with the same clock and no time floor yet takes the same bundle (the clock is behind).
    fresh = Device(tmp_path, embedded_broker, artifacts.url, artifacts.token, device.name + "-fresh")
    fresh_watcher = Watcher(embedded_broker, fresh.name)
    try:
        fresh_watcher.desire(REFS["3.0.0"])
        control = fresh.start(clock_offset_s=-3 * YEAR_S)
        wait_until(lambda: fresh.state().get("running") == "clf@3.0.0", 60, "the clock-behind device to take it")
        control.stop()
    finally:
        fresh_watcher.close()

    right = device.start(log="right")  # the clock is right again: the bundle is still expired, v1 still runs
    refusals = len(watcher.named("refused"))
    wait_until(lambda: len(watcher.named("refused")) > refusals, 60, "the retained desired state to be refused again")
    assert watcher.named("refused")[-1]["reason"] == "expired"
    assert_runs(device, right, watcher, "clf@1.0.0")


@pytest.mark.parametrize("with_previous", [True, False])
def test_a_model_whose_key_was_revoked_is_refused_at_restart_and_the_agent_says_what_runs(
        with_previous: bool, rig: tuple[Device, Watcher]) -> None:
    device, watcher = rig
    agent = device.start()
    if with_previous:
        watcher.desire(REFS["1.0.0"])
        wait_until(lambda: device.state().get("running") == "clf@1.0.0", 60, "version 1 to run")
    watcher.desire(REFS["2.0.0"])
    wait_until(lambda: device.state().get("running") == "clf@2.0.0", 60, "version 2 (signed by A) to run")
    watcher.desire(REFS["2.0.0"], [revocation_statement(A.public.key_id, B)])
    wait_until(lambda: A.public.key_id in json.loads(device.state().get("keyring") or "{}").get("revoked", []), 30,
               "the revocation to reach the keyring")
    assert agent.stop() == 0

    restarted = device.start(log="restarted")
    wait_until(lambda: bool(watcher.named("restore_failed")), 60, "the restore_failed event")
    failure = watcher.named("restore_failed")[0]
    assert (failure["slot"], failure["model"], failure["reason"]) == ("active", "clf@2.0.0", "revoked_key")
    expected = "clf@1.0.0" if with_previous else None
    assert failure.get("running") == expected
    assert_runs(device, restarted, watcher, expected)
    state, status = device.state(), device.status()
    assert "revoked_key" in state["slot_error:active"] and "revoked_key" in status["slot_error:active"]
    if with_previous:  # the slots moved back; the refused model is never installed again
        assert state["slots"] == {"active": "clf@1.0.0"} and watcher.reported["active"] == "clf@1.0.0"
        wait_until(lambda: any(e.get("reason") == "failed_before" for e in watcher.named("refused")), 30,
                   "the retained desired state (version 2) to be refused as failed before")
    else:  # the slot keeps its record, and says why nothing runs
        assert state["slots"] == {"active": "clf@2.0.0"} and "running" not in watcher.reported
    assert restarted.stop() == 0


def test_a_second_agent_on_the_same_data_directory_exits_with_one_line(rig: tuple[Device, Watcher]) -> None:
    device, watcher = rig
    watcher.desire(REFS["1.0.0"])
    first = device.start()
    wait_until(lambda: device.state().get("running") == "clf@1.0.0", 60, "version 1 to run")
    second = device.start(log="second")
    code = second.wait(60)
    assert code == 2, second.log_tail()
    lines = second.log_path.read_text().strip().splitlines()
    pid = first.proc.pid  # type: ignore[union-attr]
    assert lines == [f"edgefleet: error: data directory {device.data_dir} is in use by another agent (pid {pid})"]
    assert_runs(device, first, watcher, "clf@1.0.0")  # the first one was not disturbed

    first.kill()  # kill -9: the kernel drops the lock; the next agent starts
    assert device.status()["agent_pid"] is None and device.status()["running"] is None
    third = device.start(log="third")
    assert_runs(device, third, watcher, "clf@1.0.0")
    assert third.stop() == 0


def test_an_expiry_reached_while_running_keeps_the_model_running_and_the_server_shows_it(
        fleet: LocalFleet) -> None:
    assert fleet.api is not None and fleet.key is not None
    expiring = pack_bundle(synthetic.channel_mean_model(), fleet.key, BundleSpec(
        name="clf", version="1.0.0", release=1, labels=list(synthetic.LABELS),
        preprocess=synthetic.preprocess_spec(), expires=(datetime.now(UTC) + timedelta(hours=1)).isoformat()))
    fleet.api.push_model(expiring)
    credentials = fleet.provision("exp-dev")
    fleet.api.deploy("clf@1.0.0", ["exp-dev"])
    data_dir = fleet.root / "agents" / "exp-dev"

    def start(offset_s: float | None, log: str) -> ManagedProcess:
        env = {FAKE_CLOCK_ENV: str(offset_s)} if offset_s is not None else {}
        env[REEXEC_OFF[0]] = REEXEC_OFF[1]
        return fleet.group.start(ManagedProcess.edgefleet(
            ["agent", "--credentials", str(credentials), "--data-dir", str(data_dir), "--source",
             f"npz:{fleet.data_file()}?speed=20&loop=1", "--telemetry-interval", "0.3"],
            fleet.root / "logs" / f"{log}.log", env=env))

    def reported() -> dict[str, Any]:
        return dict(fleet.api.device("exp-dev")["reported"] or {})  # type: ignore[union-attr]

    def windows() -> int:
        models = fleet.api.telemetry("exp-dev")["models"]  # type: ignore[union-attr]
        return sum(int(m["windows"]) for m in models if m["model"] == "clf@1.0.0")

    first = start(None, "exp-dev")
    wait_until(lambda: reported().get("running") == "clf@1.0.0", 90, "the model to run")
    assert reported()["active_expired"] is False
    assert first.stop() == 0

    later = start(2 * 3600, "exp-dev-later")  # two hours on: the bundle expired an hour ago
    wait_until(lambda: reported().get("active_expired") is True, 60, "the server to show the model expired")
    record = fleet.api.device("exp-dev")
    assert record["reported"]["running"] == "clf@1.0.0" and record["reported"]["active"] == "clf@1.0.0"
    wait_until(lambda: any(e["name"] == "model_expired" for e in fleet.api.events("exp-dev")), 30,  # type: ignore
               "the model_expired event at the server")
    before = windows()
    wait_until(lambda: windows() > before, 60, "inference to go on with the expired model")
    time.sleep(1.0)
    assert later.running, later.log_tail()
    status = agent_status(data_dir)
    assert status["running"] == "clf@1.0.0" and status["active_expired"] is True
    assert later.stop() == 0
