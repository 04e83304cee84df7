"""A local fleet of real processes for tests and benchmarks: one server and any number of agents."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.bundle.encrypt import ModelKey
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import PUBLIC_KEY_FILE, SigningKey, write_keypair
from edgefleet.client import ControlPlane
from edgefleet.data.basicmotions import save_npz
from edgefleet.errors import EdgefleetError
from edgefleet.processes import ManagedProcess, ProcessGroup, wait_until
from edgefleet.testing import synthetic


@dataclass
class LocalFleet:
    """Starts ``edgefleet server`` (embedded broker unless ``mqtt_url``) and ``edgefleet agent`` processes."""

    root: Path
    mqtt_url: str | None = None
    group: ProcessGroup = field(default_factory=ProcessGroup)
    api: ControlPlane | None = None
    key: SigningKey | None = None
    server: ManagedProcess | None = None
    server_url: str | None = None
    operator_token: str | None = None
    replicas: dict[str, ManagedProcess] = field(default_factory=dict)

    def start_server(self, timeout_s: float = 60.0) -> ControlPlane:
        self.key = write_keypair(self.root / "keys", overwrite=True)
        data_dir = self.root / "server"
        args = ["--mqtt-url", self.mqtt_url] if self.mqtt_url else []
        self.server, self.server_url = self._start("server", data_dir, args, {}, timeout_s)
        self.operator_token = (data_dir / "operator.token").read_text().strip()
        self.api = ControlPlane(self.server_url, self.operator_token)
        return self.api

    def start_replica(self, name: str, *, db_url: str, mqtt_url: str, auth_dir: Path | None = None,
                      tick_s: float = 0.2, timeout_s: float = 60.0) -> ControlPlane:
        """One of several ``edgefleet server`` replicas sharing a database, a broker, the artifact directory and
        the operator token; ``name`` is stable across restarts (its MQTT sessions are kept by the broker)."""
        if self.key is None:
            self.key = write_keypair(self.root / "keys", overwrite=True)
        if self.operator_token is None:
            self.operator_token = secrets.token_urlsafe(24)
        args = ["--mqtt-url", mqtt_url, "--db-url", db_url, "--replica", name,
                "--artifact-dir", str(self.root / "artifacts"), "--tick", str(tick_s)]
        if auth_dir is not None:
            args += ["--broker-auth-dir", str(auth_dir)]
        env = {"EDGEFLEET_OPERATOR_TOKEN": self.operator_token}  # --operator-token's variable: not in `ps` output
        process, url = self._start(f"server-{name}", self.root / f"server-{name}", args, env, timeout_s)
        self.replicas[name] = process
        api = ControlPlane(url, self.operator_token)
        if self.api is None:
            self.api, self.server_url, self.server = api, url, process
        return api

    def _start(self, log_name: str, data_dir: Path, extra: list[str], env: dict[str, str],
               timeout_s: float) -> tuple[ManagedProcess, str]:
        info_file = data_dir / "server.json"
        info_file.unlink(missing_ok=True)
        args = [sys.executable, "-m", "edgefleet", "server", "--data-dir", str(data_dir), "--port", "0",
                "--trusted-key", str(self.root / "keys" / PUBLIC_KEY_FILE), *extra]
        server = self.group.start(ManagedProcess(args, self.root / "logs" / f"{log_name}.log", env=env))

        def ready() -> bool:
            if not server.running:
                raise EdgefleetError(f"server exited: {server.log_tail(10)}")
            return info_file.exists()

        wait_until(ready, timeout_s, "the server to start")
        return server, str(json.loads(info_file.read_text())["api_url"])

    def bundle(self, version: str, release: int, model: bytes | None = None,
               encrypt_key: ModelKey | None = None) -> bytes:
        """A signed bundle of the synthetic classifier (or ``model``) with the synthetic preprocessing; its model
        encrypted with ``encrypt_key`` when given."""
        assert self.key is not None, "start_server first"
        return pack_bundle(model or synthetic.channel_mean_model(), self.key, BundleSpec(
            name="clf", version=version, release=release, labels=list(synthetic.LABELS),
            preprocess=synthetic.preprocess_spec(), encrypt_key=encrypt_key))

    def provision(self, device: str, tags: dict[str, str] | None = None, profile: str | None = None,
                  hardware: str | None = None) -> Path:
        assert self.api is not None, "start_server first"
        path = self.root / "devices" / f"{device}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.api.add_device(device, tags, profile, hardware)))
        return path

    def cli(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``edgefleet ARGS`` against this fleet's server (EDGEFLEET_SERVER / EDGEFLEET_TOKEN set)."""
        assert self.server_url is not None, "start_server first"
        env = {**os.environ, "EDGEFLEET_SERVER": self.server_url, "EDGEFLEET_TOKEN": self.operator_token or ""}
        return subprocess.run([sys.executable, "-m", "edgefleet", *args], capture_output=True, text=True,
                              timeout=timeout_s, env=env, check=False)

    def data_file(self) -> Path:
        path = self.root / "recordings.npz"
        if not path.exists():
            save_npz(synthetic.recordings(per_class=2, length=60), path)
        return path

    def start_agent(self, device: str, *, shard: str = "0/1", speed: float = 20.0,
                    duration_s: float | None = None, telemetry_interval_s: float = 0.5,
                    env: dict[str, str] | None = None) -> ManagedProcess:
        args = ["agent", "--credentials", str(self.root / "devices" / f"{device}.json"),
                "--data-dir", str(self.root / "agents" / device),
                "--source", f"npz:{self.data_file()}?shard={shard}&speed={speed}",
                "--telemetry-interval", str(telemetry_interval_s)]
        if duration_s is not None:
            args += ["--duration", str(duration_s)]
        return self.group.start(ManagedProcess.edgefleet(args, self.root / "logs" / f"{device}.log", env=env))

    def close(self) -> None:
        self.group.stop_all()
        if self.api is not None:
            self.api.close()
