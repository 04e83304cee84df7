"""Run the control plane: broker (embedded unless given), store, MQTT ingest and the HTTP API."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from edgefleet.bundle.signing import PublicKey, load_public_key
from edgefleet.errors import ConfigError
from edgefleet.server.app import ServerContext, create_app, model_ref
from edgefleet.server.artifacts import ArtifactStore
from edgefleet.server.broker import EmbeddedBroker
from edgefleet.server.ingest import Ingest
from edgefleet.server.store import Store, sqlite_url
from edgefleet.storage import atomic_write
from edgefleet.transport.messages import DesiredState
from edgefleet.transport.mqtt_url import parse_mqtt_url
from edgefleet.transport.ports import free_port

log = logging.getLogger(__name__)

TOKEN_FILE = "operator.token"
INFO_FILE = "server.json"


@dataclass(frozen=True)
class ServerSettings:
    """How to run one server process."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    mqtt_url: str | None = None
    db_url: str | None = None
    trusted_keys: list[Path] = field(default_factory=list)
    operator_token: str | None = None


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
    store = Store(settings.db_url or sqlite_url(settings.data_dir))
    port = settings.port or free_port(settings.host)
    broker: EmbeddedBroker | None = None
    if settings.mqtt_url:
        endpoint = parse_mqtt_url(settings.mqtt_url)
    else:
        broker = EmbeddedBroker(settings.data_dir / "broker", host=settings.host)
        endpoint = broker.start()
    ingest = Ingest(store, endpoint)
    try:
        ingest.start()
        republish_desired(store, ingest)
        public_url = f"http://{settings.host}:{port}"
        ctx = ServerContext(store=store, artifacts=ArtifactStore(settings.data_dir / "artifacts"),
                            trusted_keys=trusted, operator_token=token, public_url=public_url,
                            device_mqtt_url=endpoint.url, publish_desired=ingest.publish_desired)
        info = json.dumps({"api_url": public_url, "mqtt_url": endpoint.url, "pid": os.getpid()}).encode()
        config = uvicorn.Config(create_app(ctx), host=settings.host, port=port, log_level="warning",
                                access_log=False)
        _Server(config, lambda: atomic_write(settings.data_dir / INFO_FILE, info)).run()
    finally:
        (settings.data_dir / INFO_FILE).unlink(missing_ok=True)
        ingest.stop()
        if broker is not None:
            broker.stop()


class _Server(uvicorn.Server):
    """uvicorn, announcing itself (server.json) only once its socket accepts connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()


def republish_desired(store: Store, ingest: Ingest) -> None:
    """Publish every device's desired state again, so a fresh broker has it retained."""
    for device in store.list_devices():
        if device.desired_model_id is None or device.revoked:
            continue
        model = store.model_by_id(device.desired_model_id)
        if model is not None:
            ingest.publish_desired(DesiredState(device=device.id, model=model_ref(model)))
