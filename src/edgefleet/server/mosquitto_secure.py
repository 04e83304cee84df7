"""Mosquitto with per-device credentials: the password and ACL files of :mod:`edgefleet.server.broker_auth`.

:class:`SecureMosquitto` runs Debian's broker like :class:`edgefleet.testing.mosquitto.Mosquitto`, but with
``allow_anonymous false``, ``password_file``/``acl_file`` in an auth directory that the server rewrites, and
a pid file there, so that the server can send SIGHUP to make it reload them. :func:`secure_config` is also
the reference configuration for operators running their own Mosquitto.

With a fleet CA (``ca``) the listener is TLS only, with mutual TLS: ``require_certificate true`` and
``use_identity_as_username true`` (a device's certificate names its id, the ACL's ``%u``), and the CRL the server
writes to the auth directory (re-read on SIGHUP, like the ACL that denies revoked devices on open connections).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from edgefleet.errors import TransportError
from edgefleet.server.broker_auth import ACL_FILE, CRL_FILE, PASSWD_FILE, PID_FILE, SERVER_USER, BrokerAccess
from edgefleet.server.pki import FleetCA
from edgefleet.storage import atomic_write
from edgefleet.testing.mosquitto import Mosquitto, find_mosquitto, mosquitto_config
from edgefleet.transport.mqtt_url import MqttEndpoint, MqttTls
from edgefleet.transport.ports import free_port, wait_for_mqtt


@dataclass(frozen=True)
class ListenerTls:
    """A Mosquitto listener's TLS files: the fleet CA, the broker's certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def secure_config(port: int, data_dir: Path, auth_dir: Path, host: str = "127.0.0.1",
                  tls: ListenerTls | None = None) -> str:
    """mosquitto.conf text: the plain loopback listener settings, then authentication and the ACL; with ``tls``
    the listener speaks TLS only and takes each client's identity from its fleet certificate."""
    base = mosquitto_config(port, data_dir, host).replace("allow_anonymous true\n", "")
    if tls is not None:
        listener = f"listener {port} {host}\n"
        base = base.replace(listener, listener + "\n".join([
            f"cafile {tls.ca_file}", f"certfile {tls.cert_file}", f"keyfile {tls.key_file}",
            "require_certificate true", "use_identity_as_username true", f"crlfile {auth_dir / CRL_FILE}",
            "tls_version tlsv1.2", ""]))
    return base + "\n".join([
        "allow_anonymous false",
        f"password_file {auth_dir / PASSWD_FILE}",
        f"acl_file {auth_dir / ACL_FILE}",
        "",
    ])


class SecureMosquitto(Mosquitto):
    """A Mosquitto whose clients must log in; the server's user is ``edgefleet-server``."""

    def __init__(self, data_dir: Path, server_password: str, host: str = "127.0.0.1",
                 port: int | None = None, ca: FleetCA | None = None) -> None:
        super().__init__(data_dir, host, port)
        self.server_password = server_password
        self.auth_dir = self.data_dir / "auth"
        self.ca = ca
        """With a fleet CA: a TLS listener (mutual TLS) whose certificate it signs."""
        self.tls_dir = self.data_dir / "tls"

    @property
    def server_tls(self) -> MqttTls | None:
        """The CA and the ``edgefleet-server`` client certificate (with a fleet CA), for the server's endpoint."""
        if self.ca is None:
            return None
        return MqttTls(self.ca.ca_path, self.tls_dir / "client.pem", self.tls_dir / "client.key")

    @property
    def server_endpoint(self) -> MqttEndpoint:
        """The endpoint with the server's own credentials."""
        plain = self.endpoint
        return MqttEndpoint(plain.host, plain.port, SERVER_USER, self.server_password, tls=self.server_tls)

    @property
    def server_url(self) -> str:
        """``mqtt://edgefleet-server:PASSWORD@host:port`` for ``edgefleet server --mqtt-url`` (``mqtts://`` with
        a fleet CA: the server then logs in with its certificate)."""
        plain = self.endpoint
        scheme = "mqtts" if self.ca is not None else "mqtt"
        return f"{scheme}://{SERVER_USER}:{self.server_password}@{plain.host}:{plain.port}"

    def start(self, timeout_s: float = 10) -> MqttEndpoint:
        if self._process is not None:
            return self.endpoint
        binary = find_mosquitto()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        listener = None
        if self.ca is not None:
            self.ca.write_identity(self.host, self.tls_dir / "broker.pem", self.tls_dir / "broker.key",
                                   hosts=[self.host, "localhost"])
            self.ca.write_identity(SERVER_USER, self.tls_dir / "client.pem", self.tls_dir / "client.key")
            listener = ListenerTls(self.ca.ca_path, self.tls_dir / "broker.pem", self.tls_dir / "broker.key")
        BrokerAccess(self.auth_dir, self.server_password, crl=self.ca.crl_pem if self.ca else None).sync([])
        if self.port is None:
            self.port = free_port(self.host)
        config = self.data_dir / "mosquitto.conf"
        config.write_text(secure_config(self.port, self.data_dir, self.auth_dir, self.host, listener),
                          encoding="utf-8")
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
