"""Per-device MQTT credentials with real clients, on Mosquitto (password + ACL files, reloaded on SIGHUP)
and on the embedded amqtt broker (the same files through our plugins): a device reaches only its own topics,
a wrong or revoked login is refused, a device revoked while connected is cut off (it can neither publish nor
receive any more), and the server's own user sees everything."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import paho.mqtt.client as mqtt
import pytest
from amqtt.contexts import Action, BaseContext
from amqtt.session import Session
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.server.broker import EmbeddedBroker
from edgefleet.server.broker_auth import (
    SERVER_USER,
    BrokerAccess,
    DeviceTopicAcl,
    allowed,
    hash_password,
    verify_password,
)
from edgefleet.server.mosquitto_secure import SecureMosquitto
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport.mqtt_url import parse_mqtt_url

pytestmark = pytest.mark.integration
WAIT_S = 10.0
SERVER_PASSWORD = "server-secret"
PASSWORDS = {"dev-a": "pass-a", "dev-b": "pass-b"}


@dataclass
class SecuredBroker:
    kind: str
    host: str
    port: int
    access: BrokerAccess

    def provision(self, revoked: tuple[str, ...] = ()) -> None:
        self.access.sync((d, HASHES[d], d in revoked) for d in PASSWORDS)


HASHES = {d: hash_password(p) for d, p in PASSWORDS.items()}


@contextlib.contextmanager
def secured_mosquitto(root: Path) -> Iterator[SecuredBroker]:
    """Mosquitto with the password file and ACL the server writes, the two devices provisioned."""
    mosquitto = SecureMosquitto(root / "mosquitto", SERVER_PASSWORD)
    mosquitto.start()
    try:
        secured = SecuredBroker("mosquitto", mosquitto.host, mosquitto.endpoint.port,
                                BrokerAccess(mosquitto.auth_dir, SERVER_PASSWORD))
        secured.provision()
        yield secured
    finally:
        mosquitto.stop()


@contextlib.contextmanager
def secured_embedded(root: Path) -> Iterator[SecuredBroker]:
    """The embedded broker on the same password file and rules, the two devices provisioned."""
    access = BrokerAccess(root / "auth", SERVER_PASSWORD)
    access.sync([])
    embedded = EmbeddedBroker(root / "amqtt", password_file=access.passwd_path, login=(SERVER_USER, SERVER_PASSWORD))
    endpoint = embedded.start()
    try:
        secured = SecuredBroker("embedded", endpoint.host, endpoint.port, access)
        secured.provision()
        yield secured
    finally:
        embedded.stop()


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecuredBroker]:
    if request.param == "mosquitto":
        request.getfixturevalue("mosquitto_binary")
        with secured_mosquitto(tmp_path) as secured:
            yield secured
    else:
        with secured_embedded(tmp_path) as secured:
            yield secured


@pytest.fixture
def mosquitto_secured(mosquitto_binary: Path, mosquitto_clients: None, tmp_path: Path) -> Iterator[SecuredBroker]:
    """Mosquitto only: for the tests that drive it with its own C clients."""
    with secured_mosquitto(tmp_path) as secured:
        yield secured


class HostPort(Protocol):
    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class Peer:
    """A paho client that records what it receives and the CONNACK it got."""

    def __init__(self, broker: HostPort, user: str | None, password: str | None) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.connack: list[bool] = []
        self.subacks: list[list[bool]] = []
        self.disconnects = 0
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user or 'anon'}-{uuid.uuid4().hex[:6]}")
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        with self._cond:
            self.connack.append(not getattr(rc, "is_failure", True))
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: object, _mid: int, codes: list[object], _p: object) -> None:
        with self._cond:
            self.subacks.append([not getattr(c, "is_failure", False) for c in codes])
            self._cond.notify_all()

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, _rc: object, _p: object) -> None:
        with self._cond:
            self.disconnects += 1
            self._cond.notify_all()

    def wait(self, predicate: object, what: str) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, WAIT_S), f"timed out waiting for {what}"  # type: ignore[arg-type]

    def connected(self) -> bool:
        self.wait(lambda: self.connack, "CONNACK")
        return self.connack[0]

    def subscribe(self, topic: str) -> bool:
        before = len(self.subacks)
        self.client.subscribe(topic, qos=1)
        self.wait(lambda: len(self.subacks) > before, f"SUBACK for {topic}")
        return self.subacks[-1][0]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers(broker: SecuredBroker) -> Iterator[dict[str, Peer]]:
    made = {"server": Peer(broker, SERVER_USER, SERVER_PASSWORD),
            **{d: Peer(broker, d, p) for d, p in PASSWORDS.items()}}
    for peer in made.values():
        assert peer.connected()
    yield made
    for peer in made.values():
        peer.close()


def test_a_device_reads_only_its_own_desired_state(peers: dict[str, Peer]) -> None:
    server, a = peers["server"], peers["dev-a"]
    server.publish("ef/v1/dev-b/desired", b"for-b", retain=True)
    for forbidden in ("ef/v1/dev-b/desired", "ef/v1/+/desired", "#", "ef/v1/dev-b/#"):
        granted = a.subscribe(forbidden)
        assert not granted or a.received == [], forbidden
    assert a.subscribe("ef/v1/dev-a/desired")
    server.publish("ef/v1/dev-a/desired", b"for-a", retain=True)
    a.wait(lambda: any(p == b"for-a" for _t, p in a.received), "its own desired state")
    assert [p for _t, p in a.received] == [b"for-a"]


def test_a_device_cannot_write_another_devices_topics(broker: SecuredBroker, peers: dict[str, Peer]) -> None:
    server, a = peers["server"], peers["dev-a"]
    assert server.subscribe("ef/v1/+/telemetry") and server.subscribe("ef/v1/+/desired")
    for topic, payload in (("ef/v1/dev-b/telemetry", b"forged"), ("ef/v1/dev-a/desired", b"self-assigned")):
        info = a.client.publish(topic, payload, qos=1)  # the broker drops it (Mosquitto may also disconnect)
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(WAIT_S)
    again = Peer(broker, "dev-a", PASSWORDS["dev-a"])  # a fresh session, so "genuine" surely comes after
    assert again.connected()
    again.publish("ef/v1/dev-a/telemetry", b"genuine")
    server.wait(lambda: any(p == b"genuine" for _t, p in server.received), "the device's own telemetry")
    again.close()
    assert server.received == [("ef/v1/dev-a/telemetry", b"genuine")]


@pytest.mark.parametrize(("user", "password"), [("dev-a", "wrong"), ("nobody", "pass-a"), (None, None),
                                                (SERVER_USER, "guess")])
def test_wrong_credentials_are_refused(broker: SecuredBroker, user: str | None, password: str | None) -> None:
    peer = Peer(broker, user, password)
    try:
        assert peer.connected() is False
    finally:
        peer.close()


def test_a_revoked_device_is_refused_after_the_broker_reloads(broker: SecuredBroker) -> None:
    before = Peer(broker, "dev-b", PASSWORDS["dev-b"])
    assert before.connected()
    before.close()
    broker.provision(revoked=("dev-b",))
    refused = Peer(broker, "dev-b", PASSWORDS["dev-b"])
    try:
        refused.wait(lambda: refused.connack, "CONNACK after revocation")
    finally:
        refused.close()
    if refused.connack[0]:  # Mosquitto reloads on SIGHUP asynchronously: retry a few times, bounded
        for _ in range(20):
            again = Peer(broker, "dev-b", PASSWORDS["dev-b"])
            ok = again.connected()
            again.close()
            if not ok:
                break
        else:
            pytest.fail("the revoked device could still log in")
    still = Peer(broker, "dev-a", PASSWORDS["dev-a"])
    assert still.connected()
    still.close()


def _fence(server: Peer, a: Peer, b_telemetry: bytes, b_desired: bytes) -> None:
    """Offer dev-b a message each way, then wait until dev-a's messages, sent after them, have gone through."""
    server.publish("ef/v1/dev-b/desired", b_desired)
    a.publish("ef/v1/dev-a/telemetry", b"fence")
    server.publish("ef/v1/dev-a/desired", b"fence")
    server.wait(lambda: (("ef/v1/dev-a/telemetry", b"fence") in server.received), "dev-a's telemetry")
    a.wait(lambda: (("ef/v1/dev-a/desired", b"fence") in a.received), "dev-a's desired state")
    assert all(p != b_telemetry for _t, p in server.received)


def test_a_device_revoked_while_connected_can_no_longer_publish_or_receive(
        broker: SecuredBroker, peers: dict[str, Peer]) -> None:
    server, a, b = peers["server"], peers["dev-a"], peers["dev-b"]
    assert server.subscribe("ef/v1/+/telemetry")
    assert a.subscribe("ef/v1/dev-a/desired") and b.subscribe("ef/v1/dev-b/desired")
    b.publish("ef/v1/dev-b/telemetry", b"before")
    server.publish("ef/v1/dev-b/desired", b"desired-before")
    server.wait(lambda: ("ef/v1/dev-b/telemetry", b"before") in server.received, "telemetry before revocation")
    b.wait(lambda: ("ef/v1/dev-b/desired", b"desired-before") in b.received, "desired state before revocation")

    broker.provision(revoked=("dev-b",))
    b.wait(lambda: b.disconnects > 0, "the broker to close the revoked device's connection")
    b.client.publish("ef/v1/dev-b/telemetry", b"after", qos=1)  # paho queues it; a reconnect is refused
    _fence(server, a, b"after", b"desired-after")
    assert ("ef/v1/dev-b/desired", b"desired-after") not in b.received
    assert not any(b.connack[1:]), "the revoked device logged in again"
    assert a.disconnects == 0 and server.disconnects == 0


class _Lines:
    """The lines a child process writes to a pipe, collected on a thread."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, text: str) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: any(text in line for line in self.lines), WAIT_S), \
                f"no line with {text!r} in {self.lines}"


def test_c_clients_of_a_device_revoked_while_connected_are_cut_off(broker: SecuredBroker, peers: dict[str, Peer],
                                                                   mosquitto_clients: None) -> None:
    server, a = peers["server"], peers["dev-a"]
    assert server.subscribe("ef/v1/+/telemetry") and a.subscribe("ef/v1/dev-a/desired")
    server.publish("ef/v1/dev-b/desired", b"desired-before", retain=True)
    login = ["-h", broker.host, "-p", str(broker.port), "-q", "1", "-u", "dev-b", "-P", PASSWORDS["dev-b"]]
    sub = subprocess.Popen(["mosquitto_sub", *login, "-t", "ef/v1/dev-b/desired"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    pub = subprocess.Popen(["mosquitto_pub", *login, "-t", "ef/v1/dev-b/telemetry", "-l"], stdin=subprocess.PIPE,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert sub.stdout is not None and sub.stderr is not None and pub.stdin is not None and pub.stderr is not None
        received, sub_errors, pub_errors = _Lines(sub.stdout), _Lines(sub.stderr), _Lines(pub.stderr)
        received.wait_for("desired-before")
        pub.stdin.write("before\n")
        pub.stdin.flush()
        server.wait(lambda: ("ef/v1/dev-b/telemetry", b"before") in server.received, "telemetry before revocation")

        broker.provision(revoked=("dev-b",))
        sub.wait(timeout=30)  # cut off; its reconnect is refused and mosquitto_sub gives up
        sub_errors.wait_for("not authorised")
        pub_errors.wait_for("not authorised")  # mosquitto_pub -l keeps trying to reconnect, refused each time
        with contextlib.suppress(BrokenPipeError):
            pub.stdin.write("after\n")
            pub.stdin.flush()
        _fence(server, a, b"after", b"desired-after")
        assert sub.returncode != 0 and received.lines == ["desired-before"]
    finally:
        for process in (sub, pub):
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


def test_the_embedded_acl_refuses_a_user_no_longer_in_the_password_file(tmp_path: Path) -> None:
    access = BrokerAccess(tmp_path / "auth", SERVER_PASSWORD)
    access.sync((d, HASHES[d], False) for d in PASSWORDS)
    context = BaseContext()
    context.config = DeviceTopicAcl.Config(password_file=str(access.passwd_path))
    acl = DeviceTopicAcl(context)
    session = Session()
    session.username = "dev-b"

    def may(action: Action, topic: str) -> bool | None:
        return asyncio.run(acl.topic_filtering(session=session, topic=topic, action=action))

    assert may(Action.PUBLISH, "ef/v1/dev-b/telemetry") and may(Action.RECEIVE, "ef/v1/dev-b/desired")
    access.sync((d, HASHES[d], d == "dev-b") for d in PASSWORDS)  # revoked: the same session may do nothing
    assert not may(Action.PUBLISH, "ef/v1/dev-b/telemetry") and not may(Action.RECEIVE, "ef/v1/dev-b/desired")
    session.username = "dev-a"
    assert may(Action.PUBLISH, "ef/v1/dev-a/telemetry")


@pytest.fixture(params=["embedded", "mosquitto"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalFleet]:
    """A real `edgefleet server`: with its embedded broker, or with a secured Mosquitto whose files it writes."""
    fleet = LocalFleet(tmp_path)
    mosquitto: SecureMosquitto | None = None
    try:
        if request.param == "embedded":
            fleet.start_server()
        else:
            request.getfixturevalue("mosquitto_binary")
            mosquitto = SecureMosquitto(tmp_path / "mosquitto", SERVER_PASSWORD)
            mosquitto.start()
            fleet.start_replica("a", db_url=f"sqlite:///{tmp_path / 'server.db'}", mqtt_url=mosquitto.server_url,
                                auth_dir=mosquitto.auth_dir)
        yield fleet
    finally:
        fleet.close()
        if mosquitto is not None:
            mosquitto.stop()


def _logged_in(credentials: dict[str, str]) -> Peer:
    """A device's connection, retried as the agent retries: the broker may reload its users after ``device add``
    has returned (a busy server answers the add before the broker's password file is re-read)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        peer = Peer(parse_mqtt_url(credentials["mqtt_url"]), credentials["mqtt_username"],
                    credentials["mqtt_password"])
        if peer.connected():
            return peer
        peer.close()
        assert time.monotonic() < deadline, f"{credentials['mqtt_username']} was never let in"
        time.sleep(0.5)


def test_revoking_through_the_server_cuts_off_the_devices_open_connection(served: LocalFleet) -> None:
    logins = {d: json.loads(served.provision(d).read_text()) for d in ("dev-a", "dev-b")}
    peers: dict[str, Peer] = {}
    try:
        for device, credentials in logins.items():
            peers[device] = _logged_in(credentials)
            assert peers[device].subscribe(f"ef/v1/{device}/desired")
        revoked = served.cli("device", "revoke", "dev-b")
        assert revoked.returncode == 0, revoked.stderr
        b = peers["dev-b"]
        b.wait(lambda: b.disconnects > 0, "the broker to close the revoked device's connection")
        assert not any(b.connack[1:]), "the revoked device logged in again"
        assert peers["dev-a"].disconnects == 0
    finally:
        for peer in peers.values():
            peer.close()


def test_mosquitto_c_clients_obey_the_same_rules(mosquitto_secured: SecuredBroker) -> None:
    broker = mosquitto_secured
    base = ["-h", broker.host, "-p", str(broker.port), "-q", "1"]
    server = Peer(broker, SERVER_USER, SERVER_PASSWORD)
    assert server.connected() and server.subscribe("ef/v1/+/telemetry")
    server.publish("ef/v1/dev-b/desired", b"for-b", retain=True)
    sub = subprocess.run(["mosquitto_sub", *base, "-u", "dev-a", "-P", "pass-a", "-t", "ef/v1/dev-b/desired",
                          "-C", "1", "-W", "2"], capture_output=True, text=True, timeout=30, check=False)
    assert "for-b" not in sub.stdout
    wrong = subprocess.run(["mosquitto_pub", *base, "-u", "dev-a", "-P", "nope", "-t", "ef/v1/dev-a/telemetry",
                            "-m", "x"], capture_output=True, text=True, timeout=30, check=False)
    assert wrong.returncode != 0 and "not authori" in (wrong.stderr + wrong.stdout).lower()
    for topic, payload in (("ef/v1/dev-b/telemetry", "forged"), ("ef/v1/dev-a/telemetry", "genuine")):
        done = subprocess.run(["mosquitto_pub", *base, "-u", "dev-a", "-P", "pass-a", "-t", topic, "-m", payload],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
    server.wait(lambda: any(p == b"genuine" for _t, p in server.received), "the genuine message")
    assert [p for _t, p in server.received] == [b"genuine"]
    server.close()


def test_the_rules_and_the_password_format() -> None:
    assert allowed("dev-a", "ef/v1/dev-a/desired", "subscribe")
    assert allowed("dev-a", "ef/v1/dev-a/telemetry", "publish")
    assert not allowed("dev-a", "ef/v1/dev-a/telemetry", "subscribe")
    assert not allowed("dev-a", "ef/v1/dev-a/desired", "publish")
    assert not allowed("dev-a", "ef/v1/dev-b/desired", "receive")
    assert not allowed("dev-a", "ef/v1/+/desired", "subscribe")
    assert not allowed(None, "ef/v1/dev-a/desired", "subscribe")
    assert allowed(SERVER_USER, "$share/edgefleet/ef/v1/+/telemetry", "subscribe")
    encoded = hash_password("secret")
    assert encoded.startswith("$7$101$") and verify_password("secret", encoded)
    assert not verify_password("Secret", encoded) and not verify_password("secret", "$7$bad")
    if shutil.which("mosquitto_passwd"):  # the broker's own tool agrees with our verifier
        tmp = Path(subprocess.run(["mktemp"], capture_output=True, text=True, check=True).stdout.strip())
        subprocess.run(["mosquitto_passwd", "-b", str(tmp), "alice", "secret"], check=True, capture_output=True)
        assert verify_password("secret", tmp.read_text().strip().split(":", 1)[1])
        tmp.unlink()


