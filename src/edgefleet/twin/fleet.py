"""A fleet of twins: provisioned through the control plane like devices, run in a few host processes.

Every twin is a device of the server (its own credentials, broker login and token) tagged ``twin=RUN`` and
``twin_group=GROUP``: a rollout reaches twins only when its selection names the ``twin`` tag
(:data:`edgefleet.core.rollout.TWIN_TAG`), and ``device list`` leaves them out. :meth:`TwinFleet.close` stops
the hosts and revokes the twins (``keep=True`` keeps them for another run).
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.core.rollout import TWIN_TAG
from edgefleet.errors import EdgefleetError
from edgefleet.processes import ManagedProcess, ProcessGroup
from edgefleet.twin.scenario import Scenario

TWINS_PER_PROCESS = 250
"""Twins one host process runs (one network thread, one thread per twin's sensor loop, outbox and updater)."""
GROUP_TAG = "twin_group"


def running_model(data_dir: Path) -> str | None:
    """What the agent in ``data_dir`` last recorded it runs (NAME@VERSION; None: nothing, or no state yet)."""
    path = data_dir / "agent.db"
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)) as db:
            row = db.execute("SELECT value FROM kv WHERE key = 'running'").fetchone()
    except sqlite3.Error:
        return None
    value = json.loads(row[0]) if row else None
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class TwinSpec:
    """One provisioned twin."""

    device_id: str
    credentials: Path
    data_dir: Path
    group: int
    seed: int


@dataclass
class TwinFleet:
    """Provision ``devices`` twins for ``scenario`` under ``root`` and run them (see the module docstring)."""

    api: Any
    root: Path
    scenario: Scenario
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    per_process: int = TWINS_PER_PROCESS
    twins: list[TwinSpec] = field(default_factory=list)
    group: ProcessGroup = field(default_factory=ProcessGroup)
    hosts: list[ManagedProcess] = field(default_factory=list)
    _hosted: int = 0

    @property
    def tag(self) -> dict[str, str]:
        """The selection that reaches this fleet's twins (and only them)."""
        return {TWIN_TAG: self.run_id}

    def provision(self, devices: int) -> list[TwinSpec]:
        """Add ``devices`` twins to the server, spread over the scenario's groups; put each group on its model."""
        sizes = self.scenario.sizes(devices)
        index = len(self.twins)
        for group_index, (group, size) in enumerate(zip(self.scenario.groups, sizes, strict=True)):
            ids = []
            for _ in range(size):
                device_id = f"twin-{self.run_id}-{index:05d}"
                tags = {**group.tags, TWIN_TAG: self.run_id, GROUP_TAG: group.name}
                creds = self.api.add_device(device_id, tags, group.profile, group.hardware)
                path = self.root / "credentials" / f"{device_id}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(creds))
                path.chmod(0o600)
                self.twins.append(TwinSpec(device_id, path, self.root / "twins" / device_id, group_index,
                                           self.scenario.seed * 1_000_003 + index))
                ids.append(device_id)
                index += 1
            if group.model and ids:
                self.api.deploy(group.model, ids)
        return self.twins

    def start(self, *, duration_s: float | None = None, timeout_s: float = 300.0, env: dict[str, str] | None = None
              ) -> float:
        """Start host processes for the twins no running host has (all of them after a stop or kill); return once
        every new host has started its twins (seconds taken)."""
        started = time.monotonic()
        if not self.hosts:
            self._hosted = 0
        fresh = self.twins[self._hosted:]
        self._hosted = len(self.twins)
        processes = max(1, math.ceil(len(fresh) / self.per_process))
        ready = []
        first = len(self.hosts)
        for index in range(processes):
            share = fresh[index::processes]
            number = first + index
            spec_file = self.root / "hosts" / f"host-{number}.json"
            ready_file = self.root / "hosts" / f"host-{number}.ready"
            ready_file.unlink(missing_ok=True)
            spec_file.parent.mkdir(parents=True, exist_ok=True)
            spec_file.write_text(json.dumps({
                "scenario": self.scenario.model_dump(mode="json"), "duration_s": duration_s,
                "ready_file": str(ready_file),
                "twins": [{"credentials": str(t.credentials), "data_dir": str(t.data_dir), "group": t.group,
                           "seed": t.seed} for t in share]}))
            host = ManagedProcess([sys.executable, "-m", "edgefleet.twin.host", str(spec_file)],
                                  self.root / "logs" / f"host-{number}.log", env=env)
            self.hosts.append(self.group.start(host))
            ready.append(ready_file)
        deadline = time.monotonic() + timeout_s
        while not all(r.exists() for r in ready):
            for host in self.hosts:
                if not host.running:
                    raise EdgefleetError(f"a twin host exited: {host.log_tail(3)}")
            if time.monotonic() > deadline:
                raise EdgefleetError(f"twins did not start within {timeout_s:.0f} s")
            time.sleep(0.2)
        return time.monotonic() - started

    def running(self, model: str | None = None) -> int:
        """Twins that run ``model`` (any model: None), as each twin's agent recorded it in its own state."""
        return sum(1 for t in self.twins if (ran := running_model(t.data_dir)) is not None
                   and (model is None or ran == model))

    def wait_running(self, model: str | None, wanted: int, timeout_s: float) -> int:
        """Wait (bounded) until ``wanted`` twins run ``model``; how many do."""
        deadline = time.monotonic() + timeout_s
        count = self.running(model)
        while count < wanted and time.monotonic() < deadline:
            if self.hosts and not any(h.running for h in self.hosts):
                raise EdgefleetError(f"every twin host exited: {self.hosts[0].log_tail(3)}")
            time.sleep(0.5)
            count = self.running(model)
        return count

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the host processes together (each drains its twins' outboxes; killed after ``grace_s``)."""
        for host in self.hosts:
            if host.running and host.proc is not None:
                host.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for host in self.hosts:
            if host.wait(max(0.1, deadline - time.monotonic())) is None:
                host.kill()
                host.wait(5.0)
        self.group.processes.clear()
        self.hosts.clear()

    def kill(self) -> None:
        """SIGKILL every host process, as a power cut would end the devices (start again to resume)."""
        for host in self.hosts:
            host.kill()
            host.wait(10.0)
        self.group.processes.clear()
        self.hosts.clear()

    def close(self, *, keep: bool = False) -> None:
        """Stop, then revoke every twin unless ``keep`` (revoked twins are in no rollout and no view)."""
        self.stop()
        if keep:
            return
        for twin in self.twins:
            with contextlib.suppress(EdgefleetError):
                self.api.revoke_device(twin.device_id)
