"""The server's embedded MQTT broker: amqtt, run in a child process of its own.

amqtt shares an event loop with nothing else there: in the same process as paho clients it times out
under QoS 1 load. :class:`EmbeddedBroker` writes the config, starts the child, waits until a real MQTT
CONNECT succeeds, and stops it with SIGTERM (then SIGKILL). Its address is stable: :func:`stable_port` keeps
the port in the broker's directory, so devices provisioned against it still reach it after a restart.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

import edgefleet
from edgefleet.errors import ConfigError, TransportError
from edgefleet.storage import atomic_write
from edgefleet.transport.mqtt_url import MqttEndpoint, MqttTls
from edgefleet.transport.ports import free_port, wait_for_mqtt

CONFIG_NAME = "broker.yaml"
LOG_NAME = "broker.log"
PORT_NAME = "port"
PORT_WAIT_S = 5.0
"""How long a start waits for its port to be released (a broker of a killed server exits within ~1 s)."""


def stable_port(data_dir: Path, host: str, requested: int | None = None, wait_s: float = PORT_WAIT_S) -> int:
    """The embedded broker's port: ``requested``, else the one stored in ``data_dir``, else a free one; stored.

    A port that stays taken for ``wait_s`` is a ConfigError (one line): moving silently would strand every
    device provisioned with the old address.
    """
    path = data_dir / PORT_NAME
    stored = _read_port(path)
    port = requested or stored or free_port(host)
    deadline = time.monotonic() + wait_s
    while not _bindable(host, port):
        if time.monotonic() >= deadline:
            origin = "--broker-port" if requested else f"stored in {path}" if stored else "chosen"
            raise ConfigError(f"the embedded broker's port {host}:{port} ({origin}) is in use by another process; "
                              "stop it or pass another --broker-port (devices must then be told the new address)")
        time.sleep(0.1)
    if port != stored:
        atomic_write(path, f"{port}\n".encode())
    return port


def _read_port(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the embedded broker's port from {path}: {exc.strerror}") from exc
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ConfigError(f"{path} should hold the embedded broker's port (1-65535), not {text[:20]!r}")
    return int(text)


def _bindable(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now (SO_REUSEADDR, as asyncio's servers bind)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise ConfigError(f"the embedded broker cannot bind {host}:{port}: {exc.strerror}") from exc
    return True


@dataclass(frozen=True)
class BrokerTls:
    """The embedded broker's TLS listener: the fleet CA that client certificates must chain to, the broker's
    own certificate, the CRL, and (``client``) the certificate the server itself connects with."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path
    client: MqttTls | None = None


def broker_config(host: str, port: int, password_file: Path | None = None,
                  tls: BrokerTls | None = None) -> dict[str, Any]:
    """amqtt configuration: one TCP listener, no $SYS topics, no packet logging.

    With ``password_file`` every client must log in with a user from it, and each device is kept to its own
    topics (:mod:`edgefleet.server.broker_auth`); without it, access is anonymous (tests of the broker alone).
    With ``tls`` (and a password file) the listener speaks TLS only and every client must present a fleet
    certificate, whose Common Name is its user name (:class:`~edgefleet.server.broker_auth.CertificateAuth`).
    """
    plugins: dict[str, Any] = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    listener: dict[str, Any] = {"type": "tcp", "bind": f"{host}:{port}"}
    if password_file is not None:
        auth: dict[str, Any] = {"edgefleet.server.broker_auth.PasswordFileAuth": {"password_file": str(password_file)}}
        if tls is not None:
            auth = {"edgefleet.server.broker_auth.CertificateAuth": {"password_file": str(password_file),
                                                                    "crl_file": str(tls.crl_file)}}
        plugins = {**auth, "edgefleet.server.broker_auth.DeviceTopicAcl": {"password_file": str(password_file)}}
    if tls is not None:
        listener.update(ssl=True, cafile=str(tls.ca_file), certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    return {"listeners": {"default": listener}, "plugins": plugins}


def ready_path(config_path: Path) -> Path:
    """The file the broker process writes its pid to once its listeners are bound."""
    return config_path.with_suffix(".ready")


class EmbeddedBroker:
    """An amqtt broker in a child process, bound to one loopback address."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int | None = None,
                 password_file: Path | None = None, login: tuple[str, str] | None = None,
                 tls: BrokerTls | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.password_file = password_file
        self.tls = tls
        self._login = login
        self.host = host
        self._port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._endpoint: MqttEndpoint | None = None
        self.exit_code: int | None = None
        """Exit status of the last broker process that was stopped (0 after a clean SIGTERM shutdown)."""

    @property
    def endpoint(self) -> MqttEndpoint:
        """Where the running broker listens; TransportError if it is not started."""
        if self._endpoint is None:
            raise TransportError("the embedded broker is not running")
        return self._endpoint

    @property
    def log_path(self) -> Path:
        """The child's combined stdout and stderr."""
        return self.data_dir / LOG_NAME

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, if any."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout_s: float = 15) -> MqttEndpoint:
        """Start the broker and return its endpoint once it accepts MQTT connections."""
        if self._process is not None:
            return self.endpoint
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = self._port if self._port is not None else free_port(self.host)
        config_path = self.data_dir / CONFIG_NAME
        config = broker_config(self.host, port, self.password_file, self.tls)
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        ready_path(config_path).unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "edgefleet.server.broker_process", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(),
            )
        endpoint = MqttEndpoint(self.host, port, tls=MqttTls(self.tls.ca_file) if self.tls else None)
        probe = MqttEndpoint(self.host, port, *self._login) if self._login else endpoint
        if self.tls is not None:
            probe = replace(probe, tls=self.tls.client or endpoint.tls)
        try:
            self._wait_ready(probe, ready_path(config_path), timeout_s)
        except BaseException:
            self.stop()
            raise
        self._endpoint = endpoint
        return endpoint

    def _wait_ready(self, endpoint: MqttEndpoint, ready_file: Path, timeout_s: float) -> None:
        """Wait until our child says it is listening and a CONNECT succeeds; fail fast if it exits.

        The ready file guards against a CONNECT that another process on the same port answered.
        """
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise TransportError(f"embedded broker exited with code {code} on start:\n{self._log_tail()}")
            if not _is_ready(ready_file, self._process.pid):
                if time.monotonic() >= deadline:
                    raise TransportError(
                        f"embedded broker did not start listening within {timeout_s:g}s:\n{self._log_tail()}"
                    )
                time.sleep(0.05)
                continue
            try:
                wait_for_mqtt(endpoint, timeout_s=min(0.5, max(0.05, deadline - time.monotonic())))
                return
            except TransportError as exc:
                if time.monotonic() >= deadline:
                    raise TransportError(
                        f"embedded broker did not accept MQTT connections within {timeout_s:g}s: {exc}\n"
                        f"{self._log_tail()}"
                    ) from exc

    def stop(self, timeout_s: float = 5) -> None:
        """SIGTERM the broker, SIGKILL it if it lingers past ``timeout_s``; safe to call twice."""
        process, self._process, self._endpoint = self._process, None, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
        self.exit_code = process.returncode

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no broker log)"
        return "\n".join(text.splitlines()[-lines:]) or "(broker log is empty)"

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _is_ready(ready_file: Path, pid: int) -> bool:
    try:
        return ready_file.read_text(encoding="utf-8").strip() == str(pid)
    except OSError:
        return False


def _child_env() -> dict[str, str]:
    """Our environment, with the directory this edgefleet was imported from first on PYTHONPATH."""
    env = dict(os.environ)
    root = str(Path(edgefleet.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env
