"""Run Debian's ``mosquitto`` broker on a free loopback port, with its own config, log and persistence.

Settings differ from Mosquitto's defaults on purpose: ``max_queued_messages 0`` (unlimited), because the
default of 1000 silently drops QoS 1 messages for a slow subscriber while the publisher is acknowledged.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path
from types import TracebackType

from edgefleet.errors import ConfigError, TransportError
from edgefleet.transport.mqtt_url import MqttEndpoint
from edgefleet.transport.ports import free_port, wait_for_mqtt

INSTALL_HINT = "apt-get install -y mosquitto mosquitto-clients"
_SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")


def find_mosquitto() -> Path:
    """Path of the ``mosquitto`` binary (PATH, then the sbin directories); ConfigError if absent."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path=os.pathsep.join(_SEARCH_DIRS))
    if found is None:
        raise ConfigError(f"the mosquitto broker is not installed; install it with: {INSTALL_HINT}")
    return Path(found)


def mosquitto_config(port: int, data_dir: Path, host: str = "127.0.0.1") -> str:
    """Text of a mosquitto.conf for one anonymous loopback listener with persistence in ``data_dir``."""
    return "\n".join(
        [
            # Run as whoever starts us: as root, mosquitto would otherwise switch to user "mosquitto",
            # which cannot write to our data directory.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            f"listener {port} {host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {data_dir}/",
            "max_queued_messages 0",
            "max_inflight_messages 0",
            f"log_dest file {data_dir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "",
        ]
    )


class Mosquitto:
    """A mosquitto process owned by this object: start, stop, restart on the same port and state."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> MqttEndpoint:
        """Where the running broker listens; TransportError if it is not running."""
        if self._process is None or self.port is None:
            raise TransportError("mosquitto is not running")
        return MqttEndpoint(self.host, self.port)

    @property
    def log_path(self) -> Path:
        """Mosquitto's own log file."""
        return self.data_dir / "mosquitto.log"

    def start(self, timeout_s: float = 10) -> MqttEndpoint:
        """Start mosquitto (on a free port the first time) and return once a client can CONNECT."""
        if self._process is not None:
            return self.endpoint
        binary = find_mosquitto()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        config = self.data_dir / "mosquitto.conf"
        config.write_text(mosquitto_config(self.port, self.data_dir, self.host), encoding="utf-8")
        with (self.data_dir / "mosquitto.stderr").open("ab") as err:
            self._process = subprocess.Popen(
                [str(binary), "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
            )
        endpoint = MqttEndpoint(self.host, self.port)
        try:
            wait_for_mqtt(endpoint, timeout_s)
            if self._process.poll() is not None:
                raise TransportError(f"mosquitto exited with code {self._process.returncode}")
        except TransportError as exc:
            self.stop()
            raise TransportError(f"{exc}\n{self._log_tail()}") from exc
        return endpoint

    def stop(self, timeout_s: float = 5) -> None:
        """SIGTERM mosquitto (it saves its persistence file), SIGKILL it past ``timeout_s``; idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    def restart(self, timeout_s: float = 10) -> MqttEndpoint:
        """Stop and start again on the same port with the same persistence directory."""
        self.stop()
        return self.start(timeout_s)

    def _log_tail(self, lines: int = 20) -> str:
        texts = []
        for path in (self.data_dir / "mosquitto.stderr", self.log_path):
            try:
                texts.extend(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
            except OSError:
                continue
        return "\n".join(texts) or "(mosquitto wrote no log)"

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
