"""Local TCP ports: pick a free one, and wait until a service (or an MQTT broker) answers on one."""

from __future__ import annotations

import socket
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.errors import TransportError
from edgefleet.transport.mqtt_url import MqttEndpoint, tls_context

_POLL_S = 0.05


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    """Poll a TCP connect to ``host:port`` until it succeeds; TransportError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(1.0, timeout_s))):
                return
        except OSError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TransportError(
                f"{host}:{port} did not accept TCP connections within {timeout_s:g}s: {last}"
            )
        time.sleep(_POLL_S)


def wait_for_mqtt(endpoint: MqttEndpoint, timeout_s: float) -> None:
    """Retry a real MQTT CONNECT to ``endpoint`` until the broker accepts it, within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while True:
        last = _try_connect(endpoint, max(0.1, deadline - time.monotonic()))
        if not last:
            return
        if time.monotonic() >= deadline:
            raise TransportError(
                f"MQTT broker at {endpoint.url} did not accept a CONNECT within {timeout_s:g}s: {last}"
            )
        time.sleep(_POLL_S)


def _try_connect(endpoint: MqttEndpoint, timeout_s: float) -> str:
    """One CONNECT/CONNACK round trip; return "" on success, else why it failed."""
    result: list[str] = []

    def on_connect(_c: mqtt.Client, _u: object, _f: mqtt.ConnectFlags, rc: ReasonCode, _p: object) -> None:
        result.append(f"refused: {rc}" if rc.is_failure else "")

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgefleet-probe-{uuid.uuid4().hex[:12]}")
    client.on_connect = on_connect
    if endpoint.username is not None:
        client.username_pw_set(endpoint.username, endpoint.password)
    if endpoint.tls is not None:
        client.tls_set_context(tls_context(endpoint.tls))
    deadline = time.monotonic() + timeout_s
    try:
        client.connect(endpoint.host, endpoint.port, keepalive=10)
        while not result and time.monotonic() < deadline:
            client.loop(timeout=0.05)
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        _close(client)
    return result[0] if result else "no CONNACK"


def _close(client: mqtt.Client) -> None:
    """Send DISCONNECT if a socket is open, flush it, and make sure the socket is closed."""
    if client.socket() is None:
        return
    client.disconnect()
    for _ in range(3):
        if client.socket() is None:
            return
        client.loop(timeout=0.02)
    sock = client.socket()
    if sock is not None:
        sock.close()
