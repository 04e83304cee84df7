"""Mutual TLS with the fleet CA on real brokers (Mosquitto with require_certificate + use_identity_as_username,
and the embedded amqtt broker with its certificate plugin): Mosquitto's own clients without a certificate, with
an expired one or a revoked one are refused, as is plain text on the TLS port; device A's certificate gets
nothing of device B's topics; a device revoked while connected stops receiving and publishing on its open
connection. Then a ``--tls`` server end to end: the API over HTTPS with the fleet CA (no token: refused), a
non-loopback address without TLS refused, and a real agent over mqtts + https installs a model and reports
telemetry."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import queue
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.bundle.signing import PUBLIC_KEY_FILE, write_keypair
from edgefleet.client import ControlPlane
from edgefleet.processes import ManagedProcess, ProcessGroup, wait_until
from edgefleet.server.broker import BrokerTls, EmbeddedBroker
from edgefleet.server.broker_auth import SERVER_USER, BrokerAccess, hash_password
from edgefleet.server.mosquitto_secure import SecureMosquitto
from edgefleet.server.pki import FleetCA
from edgefleet.testing import synthetic
from edgefleet.transport.mqtt_url import MqttTls, tls_context

pytestmark = pytest.mark.integration
SERVER_PASSWORD = "server-secret"
DEVICES = ("dev-a", "dev-b")
HASHES = {d: hash_password(f"pass-{d}") for d in DEVICES}
QUIET_S = 1.5


@dataclass
class TlsBroker:
    kind: str
    host: str
    port: int
    ca: FleetCA
    access: BrokerAccess
    certs: Path

    def provision(self, revoked: tuple[str, ...] = ()) -> None:
        self.access.sync((d, HASHES[d], d in revoked) for d in DEVICES)

    def cert(self, identity: str, **validity: dt.datetime) -> tuple[Path, Path]:
        issued = self.ca.issue(identity, **validity)
        stem = self.certs / f"{identity}-{issued.serial:x}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".pem").write_text(issued.cert_pem)
        stem.with_suffix(".key").write_text(issued.key_pem)
        return stem.with_suffix(".pem"), stem.with_suffix(".key")


@contextlib.contextmanager
def tls_mosquitto(root: Path) -> Iterator[TlsBroker]:
    ca = FleetCA(root / "pki")
    mosquitto = SecureMosquitto(root / "mosquitto", SERVER_PASSWORD, ca=ca)
    mosquitto.start()
    try:
        broker = TlsBroker("mosquitto", mosquitto.host, mosquitto.endpoint.port, ca,
                           BrokerAccess(mosquitto.auth_dir, SERVER_PASSWORD, crl=ca.crl_pem), root / "certs")
        broker.provision()
        yield broker
    finally:
        mosquitto.stop()


@contextlib.contextmanager
def tls_embedded(root: Path) -> Iterator[TlsBroker]:
    ca = FleetCA(root / "pki")
    access = BrokerAccess(root / "auth", SERVER_PASSWORD, crl=ca.crl_pem)
    access.sync([])
    tls = root / "tls"
    ca.write_identity("127.0.0.1", tls / "broker.pem", tls / "broker.key", hosts=["127.0.0.1"])
    ca.write_identity(SERVER_USER, tls / "client.pem", tls / "client.key")
    embedded = EmbeddedBroker(root / "amqtt", password_file=access.passwd_path, login=(SERVER_USER, SERVER_PASSWORD),
                              tls=BrokerTls(ca.ca_path, tls / "broker.pem", tls / "broker.key", access.crl_path,
                                            client=MqttTls(ca.ca_path, tls / "client.pem", tls / "client.key")))
    endpoint = embedded.start()
    try:
        broker = TlsBroker("embedded", endpoint.host, endpoint.port, ca, access, root / "certs")
        broker.provision()
        yield broker
    finally:
        embedded.stop()


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TlsBroker]:
    if request.param == "mosquitto":
        request.getfixturevalue("mosquitto_clients")
        with tls_mosquitto(tmp_path) as b:
            yield b
    else:
        request.getfixturevalue("mosquitto_clients")
        with tls_embedded(tmp_path) as b:
            yield b


def cli_pub(b: TlsBroker, topic: str, *tls: str) -> subprocess.CompletedProcess[str]:
    """``mosquitto_pub`` of one QoS 1 message, with these TLS options."""
    return subprocess.run(["mosquitto_pub", "-h", b.host, "-p", str(b.port), "-t", topic, "-m", "x", "-q", "1",
                           "-i", f"probe-{uuid.uuid4().hex[:8]}", *tls], capture_output=True, text=True, timeout=15,
                          check=False)


def cert_args(b: TlsBroker, cert: tuple[Path, Path] | None) -> list[str]:
    args = ["--cafile", str(b.ca.ca_path)]
    return [*args, "--cert", str(cert[0]), "--key", str(cert[1])] if cert else args


class Client:
    """A paho client over TLS with one certificate; what it receives lands in ``messages``."""

    def __init__(self, b: TlsBroker, cert: tuple[Path, Path], subscribe: str | None = None) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connected: queue.Queue[str] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:10]}")
        self.client.tls_set_context(tls_context(MqttTls(b.ca.ca_path, *cert)))
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.acked: set[int] = set()  # message ids the broker acknowledged (after a reconnect too)
        self.client.on_publish = lambda _c, _u, mid, _rc, _p: self.acked.add(mid)
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connected.put("" if not rc.is_failure else str(rc))
        self.client.connect(b.host, b.port, keepalive=10)
        self.client.loop_start()
        assert self.connected.get(timeout=10) == ""
        if subscribe:
            self.client.subscribe(subscribe, qos=1)
            time.sleep(0.5)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish at QoS 1. A broker may close the connection after a refused publish: paho keeps the message
        queued, reconnects by itself and sends it then."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        deadline = time.monotonic() + 20
        while info.mid not in self.acked and time.monotonic() < deadline:
            time.sleep(0.05)

    def quiet(self, seconds: float = QUIET_S) -> list[tuple[str, bytes]]:
        time.sleep(seconds)
        got = []
        while not self.messages.empty():
            got.append(self.messages.get_nowait())
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_clients_without_a_valid_certificate_and_plain_text_are_refused(broker: TlsBroker) -> None:
    """No certificate, an expired one, a revoked one, and plain text on the TLS port: each refused; a valid
    device certificate is accepted."""
    topic = "ef/v1/dev-a/telemetry"
    assert cli_pub(broker, topic, *cert_args(broker, broker.cert("dev-a"))).returncode == 0
    assert cli_pub(broker, topic, *cert_args(broker, None)).returncode != 0
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    expired = broker.cert("dev-a", not_before=past, not_after=past + dt.timedelta(days=1))
    assert cli_pub(broker, topic, *cert_args(broker, expired)).returncode != 0
    assert cli_pub(broker, topic).returncode != 0  # plain MQTT to the TLS listener
    foreign = FleetCA(broker.certs / "other-ca")  # a certificate of another CA, for the same device id
    other = foreign.issue("dev-a")
    (broker.certs / "o.pem").write_text(other.cert_pem)
    (broker.certs / "o.key").write_text(other.key_pem)
    assert cli_pub(broker, topic, *cert_args(broker, (broker.certs / "o.pem", broker.certs / "o.key"))).returncode != 0
    revoked = broker.cert("dev-b")
    assert cli_pub(broker, "ef/v1/dev-b/telemetry", *cert_args(broker, revoked)).returncode == 0
    broker.ca.revoke("dev-b")
    broker.provision(revoked=("dev-b",))
    time.sleep(0.5)
    assert cli_pub(broker, "ef/v1/dev-b/telemetry", *cert_args(broker, revoked)).returncode != 0


def test_a_device_certificate_reaches_only_its_own_topics(broker: TlsBroker) -> None:
    """Device A's certificate (identity dev-a) neither receives B's desired state nor publishes as B."""
    server = Client(broker, broker.cert(SERVER_USER), subscribe="ef/v1/+/telemetry")
    a = Client(broker, broker.cert("dev-a"), subscribe="ef/v1/dev-b/desired")
    try:
        a.client.subscribe("ef/v1/dev-a/desired", qos=1)
        time.sleep(0.3)
        server.publish("ef/v1/dev-b/desired", b"for-b", retain=True)
        server.publish("ef/v1/dev-a/desired", b"for-a", retain=True)
        a.publish("ef/v1/dev-b/telemetry", b"forged")
        a.publish("ef/v1/dev-a/telemetry", b"own")
        assert a.quiet() == [("ef/v1/dev-a/desired", b"for-a")]
        assert server.quiet(0.5) == [("ef/v1/dev-a/telemetry", b"own")]
    finally:
        a.close()
        server.close()


def test_a_device_revoked_while_connected_is_cut_off_on_its_open_connection(broker: TlsBroker) -> None:
    """After revocation (CRL + ACL deny on Mosquitto, connection closed on the embedded broker) the open
    connection neither receives its desired state nor gets telemetry through."""
    server = Client(broker, broker.cert(SERVER_USER), subscribe="ef/v1/+/telemetry")
    a = Client(broker, broker.cert("dev-a"), subscribe="ef/v1/dev-a/desired")
    try:
        server.publish("ef/v1/dev-a/desired", b"before")
        assert a.quiet(1.0) == [("ef/v1/dev-a/desired", b"before")]
        broker.ca.revoke("dev-a")
        broker.provision(revoked=("dev-a",))
        time.sleep(1.0)
        server.publish("ef/v1/dev-a/desired", b"after")
        with contextlib.suppress(RuntimeError, ValueError):
            a.client.publish("ef/v1/dev-a/telemetry", b"after", qos=1)
        assert a.quiet() == []
        assert server.quiet(0.5) == []
    finally:
        a.close()
        server.close()


# -- a --tls server, end to end ----------------------------------------------------------------------------
@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, str, Path, ProcessGroup]]:
    write_keypair(tmp_path / "keys")
    data_dir = tmp_path / "server"
    group = ProcessGroup()
    server = group.start(ManagedProcess(
        [sys.executable, "-m", "edgefleet", "server", "--data-dir", str(data_dir), "--port", "0", "--tls",
         "--tick", "0.2", "--trusted-key", str(tmp_path / "keys" / PUBLIC_KEY_FILE)], tmp_path / "logs" / "server.log"))
    try:
        def ready() -> bool:
            if not server.running:
                raise AssertionError(server.log_tail(20))
            return (data_dir / "server.json").exists()

        wait_until(ready, 60, "the --tls server to start")
        info = json.loads((data_dir / "server.json").read_text())
        yield info["api_url"], (data_dir / "operator.token").read_text().strip(), data_dir / "pki" / "ca.pem", group
    finally:
        group.stop_all()


def test_server_refuses_a_non_loopback_address_without_tls(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "edgefleet", "server", "--data-dir", str(tmp_path), "--host",
                             "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "--tls" in result.stderr and "--insecure" in result.stderr and "Traceback" not in result.stderr


def test_tls_server_api_is_https_with_the_fleet_ca_and_an_agent_works_over_mqtts(
        tls_server: tuple[str, str, Path, ProcessGroup], tmp_path: Path) -> None:
    """The API answers over HTTPS verified by the fleet CA (not without it; no token: 401); a device added through
    the CLI gets a certificate; a real agent over mqtts:// + https:// installs a model and reports telemetry; the
    device's certificate is renewed; revoked, its certificate stops working."""
    url, token, ca_file, group = tls_server
    assert url.startswith("https://")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/api/v1/health")  # the system's CAs do not know the fleet CA
    assert httpx.get(f"{url}/api/v1/devices", verify=tls_context(MqttTls(ca_file))).status_code == 401
    api = ControlPlane(url, token, ca=ca_file)
    creds_path = tmp_path / "dev-1.json"
    env = {"EDGEFLEET_SERVER": url, "EDGEFLEET_TOKEN": token}
    import os

    added = subprocess.run([sys.executable, "-m", "edgefleet", "device", "add", "dev-1", "--out", str(creds_path),
                            "--ca", str(ca_file), "--json"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, **env}, check=False)
    assert added.returncode == 0, added.stderr
    creds = json.loads(creds_path.read_text())
    assert creds["mqtt_url"].startswith("mqtts://") and "BEGIN CERTIFICATE" in creds["client_cert"]
    assert "client_key" not in json.loads(added.stdout)
    from edgefleet.bundle.pack import BundleSpec, pack_bundle
    from edgefleet.bundle.signing import load_signing_key

    key = load_signing_key(tmp_path / "keys" / "signing.key")
    bundle = pack_bundle(synthetic.channel_mean_model(), key, BundleSpec(
        name="clf", version="1.0.0", release=1, labels=list(synthetic.LABELS), preprocess=synthetic.preprocess_spec()))
    api.push_model(bundle)
    data = tmp_path / "rec.npz"
    from edgefleet.data.basicmotions import save_npz

    save_npz(synthetic.recordings(per_class=2, length=60), data)
    agent = group.start(ManagedProcess.edgefleet(
        ["agent", "--credentials", str(creds_path), "--data-dir", str(tmp_path / "agent"),
         "--source", f"npz:{data}?speed=20", "--telemetry-interval", "0.5"], tmp_path / "logs" / "agent.log"))
    api.deploy("clf@1.0.0", ["dev-1"])
    wait_until(lambda: (api.device("dev-1").get("reported") or {}).get("active") == "clf@1.0.0", 60,
               f"the agent to install over TLS: {agent.log_tail(20)}")
    wait_until(lambda: api.telemetry("dev-1")["batches"] > 0, 60, "telemetry over mqtts")
    renewed = subprocess.run([sys.executable, "-m", "edgefleet", "device", "renew", "dev-1", "--credentials",
                              str(creds_path), "--ca", str(ca_file)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **env}, check=False)
    assert renewed.returncode == 0, renewed.stderr
    assert json.loads(creds_path.read_text())["client_cert"] != creds["client_cert"]
    api.revoke_device("dev-1")
    old = tmp_path / "old"
    old.mkdir()
    (old / "c.pem").write_text(creds["client_cert"])
    (old / "c.key").write_text(creds["client_key"])
    host, port = creds["mqtt_url"].removeprefix("mqtts://").rsplit(":", 1)
    time.sleep(1.0)
    refused = subprocess.run(["mosquitto_pub", "-h", host, "-p", port, "-t", "ef/v1/dev-1/telemetry", "-m", "x",
                              "-q", "1", "--cafile", str(ca_file), "--cert", str(old / "c.pem"), "--key",
                              str(old / "c.key")], capture_output=True, text=True, timeout=15, check=False)
    assert refused.returncode != 0
    api.close()
