"""Mosquitto with per-device credentials: the password and ACL files of :mod:`edgefleet.server.broker_auth`.

:class:`SecureMosquitto` runs Debian's broker like :class:`edgefleet.testing.mosquitto.Mosquitto`, but with
``allow_anonymous false``, ``password_file``/``acl_file`` in an auth directory that the server rewrites, and
a pid file there, so that the server can send SIGHUP to make it reload them. :func:`secure_config` is also
the reference configuration for operators running their own Mosquitto.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from edgefleet.errors import TransportError
from edgefleet.server.broker_auth import ACL_FILE, PASSWD_FILE, PID_FILE, SERVER_USER, BrokerAccess
from edgefleet.storage import atomic_write
from edgefleet.testing.mosquitto import Mosquitto, find_mosquitto, mosquitto_config
from edgefleet.transport.mqtt_url import MqttEndpoint
from edgefleet.transport.ports import free_port, wait_for_mqtt


def secure_config(port: int, data_dir: Path, auth_dir: Path, host: str = "127.0.0.1") -> str:
    """mosquitto.conf text: the plain loopback listener settings, then authentication and the ACL."""
    base = mosquitto_config(port, data_dir, host).replace("allow_anonymous true\n", "")
    return base + "\n".join([
        "allow_anonymous false",
        f"password_file {auth_dir / PASSWD_FILE}",
        f"acl_file {auth_dir / ACL_FILE}",
        "",
    ])


class SecureMosquitto(Mosquitto):
    """A Mosquitto whose clients must log in; the server's user is ``edgefleet-server``."""

    def __init__(self, data_dir: Path, server_password: str, host: str = "127.0.0.1",
                 port: int | None = None) -> None:
        super().__init__(data_dir, host, port)
        self.server_password = server_password
        self.auth_dir = self.data_dir / "auth"

    @property
    def server_endpoint(self) -> MqttEndpoint:
        """The endpoint with the server's own credentials."""
        plain = self.endpoint
        return MqttEndpoint(plain.host, plain.port, SERVER_USER, self.server_password)

    @property
    def server_url(self) -> str:
        """``mqtt://edgefleet-server:PASSWORD@host:port`` for ``edgefleet server --mqtt-url``."""
        plain = self.endpoint
        return f"mqtt://{SERVER_USER}:{self.server_password}@{plain.host}:{plain.port}"

    def start(self, timeout_s: float = 10) -> MqttEndpoint:
        if self._process is not None:
            return self.endpoint
        binary = find_mosquitto()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        BrokerAccess(self.auth_dir, self.server_password).sync([])
        if self.port is None:
            self.port = free_port(self.host)
        config = self.data_dir / "mosquitto.conf"
        config.write_text(secure_config(self.port, self.data_dir, self.auth_dir, self.host), encoding="utf-8")
        with (self.data_dir / "mosquitto.stderr").open("ab") as err:
            self._process = subprocess.Popen([str(binary), "-c", str(config)], stdin=subprocess.DEVNULL,
                                             stdout=err, stderr=subprocess.STDOUT)
        atomic_write(self.auth_dir / PID_FILE, f"{self._process.pid}\n".encode())
        try:
            wait_for_mqtt(self.server_endpoint, timeout_s)
            if self._process.poll() is not None:
                raise TransportError(f"mosquitto exited with code {self._process.returncode}")
        except TransportError as exc:
            self.stop()
            raise TransportError(f"{exc}\n{self._log_tail()}") from exc
        return self.endpoint

    def stop(self, timeout_s: float = 5) -> None:
        super().stop(timeout_s)
        (self.auth_dir / PID_FILE).unlink(missing_ok=True)
