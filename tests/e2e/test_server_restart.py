"""Stable addresses, as an operator runs the fleet: ``edgefleet server`` with its embedded broker restarted under
connected ``edgefleet agent`` processes, and the broker moved to a new address announced through the server.
No device's credentials file is edited; each agent keeps (or is told) where to dial and delivers telemetry."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.bundle.signing import PUBLIC_KEY_FILE, write_keypair
from edgefleet.client import ControlPlane
from edgefleet.errors import EdgefleetError
from edgefleet.processes import ManagedProcess, wait_until
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport.ports import free_port

DEVICE = "dev-r"


class Operator:
    """One server's data directory and API port, kept across restarts, and a fleet of agents."""

    def __init__(self, root: Path) -> None:
        self.fleet = LocalFleet(root)
        self.fleet.key = write_keypair(root / "keys", overwrite=True)
        self.data_dir = root / "server"
        self.api_port = free_port()
        self.server: ManagedProcess | None = None
        self.starts = 0

    def start(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Start ``edgefleet server`` (embedded broker); return its broker URL once it serves."""
        info = self.data_dir / "server.json"
        info.unlink(missing_ok=True)
        self.starts += 1
        self.server = self.fleet.group.start(ManagedProcess.edgefleet(
            ["server", "--data-dir", str(self.data_dir), "--port", str(self.api_port), "--trusted-key",
             str(self.fleet.root / "keys" / PUBLIC_KEY_FILE), "--tick", "0.2", *args],
            self.fleet.root / "logs" / f"server-{self.starts}.log", env=env))

        def ready() -> bool:
            if self.server is None or not self.server.running:
                raise EdgefleetError(f"server exited: {self.server.log_tail(10) if self.server else ''}")
            return info.exists()

        wait_until(ready, 60, "the server to start")
        if self.fleet.api is None:
            token = (self.data_dir / "operator.token").read_text().strip()
            self.fleet.server_url = f"http://127.0.0.1:{self.api_port}"
            self.fleet.api = ControlPlane(self.fleet.server_url, token)
        return str(json.loads(info.read_text())["mqtt_url"])

    def stop(self) -> None:
        assert self.server is not None
        assert self.server.stop() == 0, self.server.log_tail()  # a clean stop, the broker stopped first

    @property
    def api(self) -> ControlPlane:
        assert self.fleet.api is not None
        return self.fleet.api

    def device_running_version_1(self) -> tuple[ManagedProcess, str]:
        """Provision the device, give it a model, start its agent; the credentials file's digest."""
        self.api.push_model(self.fleet.bundle("1.0.0", 1))
        credentials = self.fleet.provision(DEVICE)
        self.api.deploy("clf@1.0.0", [DEVICE])
        agent = self.fleet.start_agent(DEVICE, speed=20.0)
        wait_until(lambda: (self.api.device(DEVICE)["reported"] or {}).get("active") == "clf@1.0.0", 60,
                   "the agent to run version 1")
        return agent, _digest(credentials)

    def batches(self) -> int:
        return int(self.api.telemetry(DEVICE)["batches"])

    def delivers_telemetry(self, agent: ManagedProcess) -> None:
        """New telemetry from the agent arrives at the (restarted) server."""
        seen = self.batches()

        def more() -> bool:
            if not agent.running:
                raise EdgefleetError(f"agent exited: {agent.log_tail(10)}")
            return self.batches() > seen

        wait_until(more, 90, "telemetry after the restart")


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[Operator]:
    op = Operator(tmp_path)
    try:
        yield op
    finally:
        op.fleet.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_restarted_server_keeps_its_broker_port_and_connected_agents_come_back(operator: Operator) -> None:
    first_url = operator.start()
    agent, credentials = operator.device_running_version_1()
    assert (operator.data_dir / "broker" / "port").read_text().strip() == first_url.rsplit(":", 1)[1]
    operator.stop()
    assert operator.start() == first_url
    operator.delivers_telemetry(agent)
    assert _digest(operator.fleet.root / "devices" / f"{DEVICE}.json") == credentials


def test_a_broker_moved_through_the_server_is_dialled_from_the_agents_next_start(operator: Operator) -> None:
    old_port, new_port = free_port(), free_port()
    assert operator.start(env={"EDGEFLEET_BROKER_PORT": str(old_port)}) == f"mqtt://127.0.0.1:{old_port}"
    agent, credentials = operator.device_running_version_1()
    kept = operator.fleet.root / "agents" / DEVICE / "broker.url"
    assert not kept.exists()

    # Step 1: the broker still listens on the old port; the server announces the new address to every device.
    new_url = f"mqtt://127.0.0.1:{new_port}"
    operator.stop()
    operator.start("--device-mqtt-url", new_url)
    wait_until(kept.exists, 90, "the agent to keep the announced broker address")
    assert kept.read_text().strip() == new_url
    wait_until(lambda: "broker_address" in [e["name"] for e in operator.api.events(DEVICE)], 30,
               "the agent's broker_address event")

    # Step 2: the broker moves; the agent, restarted with its credentials file untouched, dials the new port.
    assert agent.stop() == 0, agent.log_tail()
    operator.stop()
    assert operator.start("--broker-port", str(new_port), "--device-mqtt-url", new_url) == new_url
    agent = operator.fleet.start_agent(DEVICE, speed=20.0)
    operator.delivers_telemetry(agent)
    assert _digest(operator.fleet.root / "devices" / f"{DEVICE}.json") == credentials
    assert (operator.data_dir / "broker" / "port").read_text().strip() == str(new_port)


def test_a_taken_broker_port_is_one_line_and_no_silent_move(operator: Operator) -> None:
    operator.start()
    port = int((operator.data_dir / "broker" / "port").read_text())
    operator.stop()
    with socket.socket() as squatter:  # another program takes the port while the server is down
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the old connections' TIME_WAIT
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        result = subprocess.run([sys.executable, "-m", "edgefleet", "server", "--data-dir", str(operator.data_dir),
                                 "--port", str(operator.api_port), "--trusted-key",
                                 str(operator.fleet.root / "keys" / PUBLIC_KEY_FILE)],
                                capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"port 127.0.0.1:{port}" in result.stderr and "in use" in result.stderr
    assert int((operator.data_dir / "broker" / "port").read_text()) == port
