"""Run the control plane: broker (embedded unless given), store, MQTT ingest and the HTTP API.

Addresses are stable: the embedded broker keeps its port across restarts (:func:`~edgefleet.server.broker.stable_port`),
and every desired state carries the broker address devices are to dial (``--device-mqtt-url``), which an agent
keeps and uses from its next start: moving the broker needs no file edited on a device.

With ``--tls`` every link is TLS (:func:`tls_material`): the fleet CA (:mod:`edgefleet.server.pki`, created in
``DATA_DIR/pki`` on the first start) signs the API's and the embedded broker's server certificate and the
server's own MQTT client certificate; the API is HTTPS, the broker ``mqtts://`` with mutual TLS, and ``device
add`` hands each device its certificate. A non-loopback ``--host`` without ``--tls`` is refused unless
``--insecure``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from edgefleet.bundle.signing import PublicKey, load_public_key
from edgefleet.errors import ConfigError
from edgefleet.server.app import ServerContext, create_app
from edgefleet.server.artifacts import ArtifactStore
from edgefleet.server.broker import BrokerTls, EmbeddedBroker, stable_port
from edgefleet.server.broker_auth import SERVER_USER, BrokerAccess
from edgefleet.server.export.settings import KafkaSettings
from edgefleet.server.ingest import Ingest
from edgefleet.server.limits import MIB, Limits
from edgefleet.server.metrics import Metrics
from edgefleet.server.model_keys import ModelKeys
from edgefleet.server.orchestrator import Orchestrator, desired_message
from edgefleet.server.pki import FleetCA
from edgefleet.server.publisher import DesiredPublisher
from edgefleet.server.store import Store, sqlite_url
from edgefleet.server.trust import trust_delivery
from edgefleet.storage import atomic_write
from edgefleet.transport.mqtt_url import MqttEndpoint, MqttTls, parse_mqtt_url
from edgefleet.transport.ports import free_port

if TYPE_CHECKING:
    from edgefleet.server.export.exporter import KafkaExporter

log = logging.getLogger(__name__)

TOKEN_FILE = "operator.token"
INFO_FILE = "server.json"


REPLICA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MIN_TOKEN_CHARS = 16
MAX_TICK_S = 3600.0
_LIMIT_RANGES = {"max_upload_mb": ("--max-upload-mb", 1, 64 * 1024), "max_json_kb": ("--max-json-kb", 1, 1024 * 1024),
                 "max_json_depth": ("--max-json-depth", 2, 256), "max_uploads": ("--max-uploads", 1, 1024)}


@dataclass(frozen=True)
class ServerSettings:
    """How to run one server process; validated on construction (ConfigError, one line, names the setting).

    The CLI fills it from its flags, each of which also reads an ``EDGEFLEET_...`` environment variable
    (``edgefleet server --help`` lists them).
    """

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    mqtt_url: str | None = None
    db_url: str | None = None
    trusted_keys: list[Path] = field(default_factory=list)
    operator_token: str | None = None
    """None: read from (or created in) DATA_DIR/operator.token."""
    replica: str = "server"
    """Stable name of this replica, used in its MQTT client ids (sessions survive a restart under it)."""
    artifact_dir: Path | None = None
    """Where artifacts are stored (shared by replicas); None: DATA_DIR/artifacts."""
    broker_auth_dir: Path | None = None
    """Where an external Mosquitto reads the password and ACL files the server writes (and its pid file)."""
    device_mqtt_url: str | None = None
    """The broker address handed to devices in their credentials; None: the server's own broker address."""
    mqtt5: bool = True
    """Use MQTT v5 (shared subscriptions) with an external broker; False for a 3.1.1-only broker."""
    tick_s: float = 1.0
    """Orchestrator period in seconds."""
    broker_port: int | None = None
    """The embedded broker's port; None: the one it had last time (DATA_DIR/broker/port), else a free one."""
    max_upload_mb: int = 256
    """Largest bundle upload, in MiB."""
    max_json_kb: int = 1024
    """Largest JSON request body, in KiB."""
    max_json_depth: int = 32
    """Deepest nesting of a JSON request body."""
    max_uploads: int = 2
    """Bundle uploads served at once; more get 429."""
    tls: bool = False
    """HTTPS, MQTT over mutual TLS and device certificates from the fleet CA in DATA_DIR/pki."""
    tls_names: list[str] = field(default_factory=list)
    """More host names or addresses for the server certificate (besides --host, localhost and 127.0.0.1)."""
    insecure: bool = False
    """Allow plain HTTP and MQTT on a non-loopback address."""
    kafka: KafkaSettings | None = None
    """Export telemetry, events, alerts, rollout decisions and hard examples to this Kafka cluster."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0-65535, not {self.port}")
        if not REPLICA_NAME.fullmatch(self.replica):
            raise ConfigError(f"--replica {self.replica!r}: 1-64 letters, digits, '.', '_' or '-', starting with a "
                              "letter or digit")
        if self.operator_token is not None and (len(self.operator_token) < MIN_TOKEN_CHARS
                                                or not self.operator_token.isprintable()
                                                or any(c.isspace() for c in self.operator_token)):
            raise ConfigError(f"--operator-token must be at least {MIN_TOKEN_CHARS} printable characters without "
                              "spaces")
        if not (math.isfinite(self.tick_s) and 0 < self.tick_s <= MAX_TICK_S):
            raise ConfigError(f"--tick must be more than 0 and at most {MAX_TICK_S:g} seconds, not {self.tick_s:g}")
        if not self.tls and not self.insecure and not is_loopback(self.host):
            raise ConfigError(f"--host {self.host} is not a loopback address: serve it with --tls, or pass --insecure "
                              "to send tokens and passwords in clear text")
        if self.mqtt_url is not None:
            endpoint = parse_mqtt_url(self.mqtt_url)
            if self.tls and endpoint.tls is None:
                raise ConfigError("--tls needs a TLS broker: give --mqtt-url as mqtts://HOST:PORT")
            if self.broker_auth_dir is not None and endpoint.password is None and endpoint.tls is None:
                raise ConfigError("--broker-auth-dir needs the server's own credentials in --mqtt-url "
                                  "(mqtt://USER:PASSWORD@HOST:PORT)")
        elif self.broker_auth_dir is not None:
            raise ConfigError("--broker-auth-dir is for an external Mosquitto: give its --mqtt-url too")
        if self.device_mqtt_url is not None:
            parse_mqtt_url(self.device_mqtt_url)
        if self.broker_port is not None:
            if not 0 < self.broker_port <= 65535:
                raise ConfigError(f"--broker-port must be 1-65535, not {self.broker_port}")
            if self.mqtt_url is not None:
                raise ConfigError("--broker-port is for the embedded broker; an external broker's address is "
                                  "--mqtt-url")
        for name, (flag, low, high) in _LIMIT_RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"{flag} must be {low}-{high}, not {value}")
        for flag, path in (("--artifact-dir", self.artifact_dir), ("--broker-auth-dir", self.broker_auth_dir),
                           ("--data-dir", self.data_dir)):
            if path is not None and path.exists() and not path.is_dir():
                raise ConfigError(f"{flag} {path} is not a directory")

    @property
    def limits(self) -> Limits:
        """The request limits these settings ask for."""
        return Limits(max_upload_bytes=self.max_upload_mb * MIB, max_json_bytes=self.max_json_kb * 1024,
                      max_json_depth=self.max_json_depth, max_uploads=self.max_uploads)

    @property
    def broker_dir(self) -> Path:
        """The embedded broker's directory: its configuration, log, port and password files."""
        return self.data_dir / "broker"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TlsMaterial:
    """What a ``--tls`` server serves with: its CA, the listeners' certificate, and its own MQTT client one."""

    ca: FleetCA
    server_cert: Path
    server_key: Path
    client: MqttTls


def tls_material(settings: ServerSettings) -> TlsMaterial:
    """Load (or create) the fleet CA and keep the server's certificates current in DATA_DIR/pki."""
    ca = FleetCA(settings.data_dir / "pki")
    names = {"127.0.0.1", "localhost", socket.gethostname(), *settings.tls_names}
    if settings.host not in ("0.0.0.0", "::", ""):
        names.add(settings.host.strip("[]"))
    if settings.device_mqtt_url:
        names.add(parse_mqtt_url(settings.device_mqtt_url).host)
    directory = ca.directory
    ca.write_identity(settings.host, directory / "server.pem", directory / "server.key", hosts=names)
    ca.write_identity(SERVER_USER, directory / "client.pem", directory / "client.key")
    return TlsMaterial(ca, directory / "server.pem", directory / "server.key",
                       MqttTls(ca.ca_path, directory / "client.pem", directory / "client.key"))


def operator_token(settings: ServerSettings) -> str:
    """The operator token: given, or read from / created in the data directory."""
    if settings.operator_token:
        return settings.operator_token
    path = settings.data_dir / TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    atomic_write(path, (token + "\n").encode(), mode=0o600)
    return token


def load_trusted(settings: ServerSettings) -> dict[str, PublicKey]:
    paths = list(settings.trusted_keys) + sorted((settings.data_dir / "trusted").glob("*.pub"))
    keys = {key.key_id: key for key in (load_public_key(p) for p in paths)}
    if not keys:
        raise ConfigError("no trusted signing key: pass --trusted-key FILE.pub or put one in DATA_DIR/trusted/")
    return keys


def run_server(settings: ServerSettings) -> None:
    """Start everything, serve until SIGINT/SIGTERM, then stop everything that was started."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    trusted = load_trusted(settings)
    token = operator_token(settings)
    replica = settings.replica
    broker_port = None if settings.mqtt_url else stable_port(settings.broker_dir, settings.host, settings.broker_port)
    store = Store(settings.db_url or sqlite_url(settings.data_dir))
    port = settings.port or free_port(settings.host)
    broker: EmbeddedBroker | None = None
    access: BrokerAccess | None = None
    tls = tls_material(settings) if settings.tls else None
    crl = tls.ca.crl_pem if tls is not None else None
    if settings.mqtt_url:
        endpoint = parse_mqtt_url(settings.mqtt_url)
        if tls is not None:
            endpoint = replace(endpoint, tls=tls.client)
        if settings.broker_auth_dir is not None:
            password = endpoint.password or _secret(settings.data_dir / "broker-server.secret")
            access = BrokerAccess(settings.broker_auth_dir, password, endpoint.username or SERVER_USER, crl=crl)
    else:
        secret = _secret(settings.broker_dir / "server.secret")
        access = BrokerAccess(settings.broker_dir / "auth", secret, crl=crl)
        access.sync(_credentials(store))
        broker_tls = None if tls is None else BrokerTls(tls.ca.ca_path, tls.server_cert, tls.server_key,
                                                        access.crl_path, client=tls.client)
        broker = EmbeddedBroker(settings.broker_dir, host=settings.host, port=broker_port,
                                password_file=access.passwd_path, login=(SERVER_USER, secret), tls=broker_tls)
        plain = broker.start()
        endpoint = MqttEndpoint(plain.host, plain.port, SERVER_USER, secret,
                                tls=tls.client if tls is not None else None)
    if access is not None:
        access.sync(_credentials(store))
    mqtt5 = settings.mqtt_url is not None and settings.mqtt5  # the embedded amqtt broker speaks 3.1.1 only
    ingest = Ingest(store, endpoint, replica=replica, mqtt5=mqtt5)
    device_mqtt_url = settings.device_mqtt_url or endpoint.url
    publisher = DesiredPublisher(endpoint, f"edgefleet-{replica}-publisher", device_mqtt_url=device_mqtt_url)
    publisher.trust = lambda: trust_delivery(store)  # every state carries the key statements (server.trust)
    metrics = Metrics()
    orchestrator = Orchestrator(store, publisher.publish_many, replica=replica, interval_s=settings.tick_s)
    orchestrator.model_keys = model_keys = ModelKeys.load(settings.data_dir)  # encrypted models' keys, sealed
    exporter = _exporter(store, settings, metrics)
    try:
        ingest.start()
        publisher.start()
        republish_desired(store, publisher, model_keys)
        public_url = f"{'https' if tls else 'http'}://{settings.host}:{port}"
        ctx = ServerContext(store=store, artifacts=ArtifactStore(settings.artifact_dir or
                                                                 settings.data_dir / "artifacts"),
                            trusted_keys=trusted, operator_token=token, public_url=public_url,
                            device_mqtt_url=device_mqtt_url, orchestrator=orchestrator, metrics=metrics,
                            access=access, limits=settings.limits, pki=tls.ca if tls is not None else None)
        orchestrator.housekeeping = ctx.sync_broker
        ctx.model_keys = model_keys
        metrics.ingest_counts = ingest.snapshot
        metrics.state = lambda: _state(store, orchestrator)
        orchestrator.start()
        info = json.dumps({"api_url": public_url, "mqtt_url": endpoint.url, "pid": os.getpid(),
                           "replica": replica, "ca_file": str(tls.ca.ca_path) if tls else None}).encode()
        config = uvicorn.Config(create_app(ctx), host=settings.host, port=port, log_level="warning",
                                access_log=False, ssl_certfile=tls.server_cert if tls else None,
                                ssl_keyfile=tls.server_key if tls else None)
        _Server(config, lambda: atomic_write(settings.data_dir / INFO_FILE, info)).run()
    finally:
        (settings.data_dir / INFO_FILE).unlink(missing_ok=True)
        orchestrator.stop()
        ingest.stop()
        publisher.stop()
        if exporter is not None:
            exporter.stop()
        if broker is not None:
            broker.stop()
        store.close()


def _exporter(store: Store, settings: ServerSettings, metrics: Metrics) -> KafkaExporter | None:
    """With ``--kafka``: the export to Kafka, started (it retries until the cluster answers), its figures in
    ``/metrics`` and its status in ``GET /api/v1/export/status``."""
    if settings.kafka is None:
        return None
    from edgefleet.server.export.exporter import KafkaExporter

    exporter = KafkaExporter(store, settings.kafka, settings.replica)
    exporter.start()
    metrics.export, metrics.export_status = exporter.figures, exporter.status
    return exporter


def _secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(24)
    atomic_write(path, (value + "\n").encode(), mode=0o600)
    return value


def _credentials(store: Store) -> list[tuple[str, str | None, bool]]:
    return [(d.id, d.mqtt_password_hash, d.revoked) for d in store.list_devices()]


def _state(store: Store, orchestrator: Orchestrator) -> dict[str, float]:
    phases: dict[str, float] = {}
    for row in store.list_rollouts():
        phases[f"rollouts_{row.phase}"] = phases.get(f"rollouts_{row.phase}", 0) + 1
    return {"devices": float(len(store.list_devices())), "rollout_steps": float(orchestrator.steps_taken), **phases}


class _Server(uvicorn.Server):
    """uvicorn, announcing itself (server.json) only once its socket accepts connections, and returning after a
    SIGTERM/SIGINT instead of raising the signal again: :func:`run_server` must stop what it started (the broker
    child first, so that its port is free for the next start) and exit 0."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # uvicorn would raise them again once its handlers are restored

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()


def republish_desired(store: Store, publisher: DesiredPublisher, keys: ModelKeys | None = None) -> None:
    """Publish every device's desired state again, so a fresh broker has it retained, and so that each device
    learns the broker address it is to dial (a device with no model desired gets a state that asks for none)."""
    models = {m.id: m for m in store.list_models()}
    publisher.publish_many([desired_message(d, models, keys) for d in store.list_devices() if not d.revoked])
