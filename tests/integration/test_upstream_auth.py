"""The upstream tier serves devices of the fleet only: ``serve-model --pki`` (a real process) speaks HTTPS with a
fleet certificate and answers a device that presents its certificate, while no certificate, another CA's
certificate and plain HTTP are refused; with ``--device-tokens`` a request without a listed token is refused
(401/403) and one with it answered; the agent's escalator (open_escalator) presents the device's certificate
and token from its credentials; a non-loopback address without TLS is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.escalation import HttpUpstream, encode_request, open_escalator
from edgefleet.bundle.pack import write_bundle
from edgefleet.bundle.signing import PUBLIC_KEY_FILE, write_keypair
from edgefleet.errors import TransportError
from edgefleet.server.pki import FleetCA
from edgefleet.testing import synthetic
from edgefleet.testing.agents import signed_bundle
from edgefleet.transport.mqtt_url import MqttEndpoint, MqttTls
from edgefleet.upstream.auth import DeviceTokens, UpstreamTls
from edgefleet.upstream.service import BackgroundService, load_upstream

pytestmark = pytest.mark.integration


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    write_bundle(directory / "big.bundle", signed_bundle(write_keypair(directory), "2.0.0", 1))
    return directory


def files(directory: Path, name: str, cert_pem: str, key_pem: str, ca: Path) -> MqttTls:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.pem").write_text(cert_pem)
    (directory / f"{name}.key").write_text(key_pem)
    return MqttTls(ca, directory / f"{name}.pem", directory / f"{name}.key")


def window(channel: int) -> bytes:
    x = np.zeros((1, synthetic.CHANNELS, synthetic.WINDOW), dtype=np.float32)
    x[0, channel] = 3.0
    return encode_request(x, "clf@1.0.0", "alpha", 0.3)


@pytest.fixture
def served_tls(keys: Path, tmp_path: Path) -> Iterator[tuple[str, FleetCA]]:
    """``edgefleet serve-model --pki`` on a fleet CA (as the server's DATA_DIR/pki holds it); yields URL and CA."""
    ca = FleetCA(tmp_path / "pki")
    info = tmp_path / "upstream.json"
    process = subprocess.Popen([sys.executable, "-m", "edgefleet", "serve-model", str(keys / "big.bundle"),
                                "--pub", str(keys / PUBLIC_KEY_FILE), "--port", "0", "--pki", str(ca.directory),
                                "--info-file", str(info)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "NO_COLOR": "1"})
    try:
        wait_for(lambda: info.exists() or process.poll() is not None, 60)
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        yield str(json.loads(info.read_text())["url"]), ca
    finally:
        process.terminate()
        process.wait(10)


def test_a_device_with_its_fleet_certificate_gets_answers_and_others_are_refused(
        served_tls: tuple[str, FleetCA], tmp_path: Path) -> None:
    url, ca = served_tls
    assert url.startswith("https://")
    issued = ca.issue("dev-1")
    device = files(tmp_path / "dev", "dev-1", issued.cert_pem, issued.key_pem, ca.ca_path)
    upstream = HttpUpstream(url, tls=device)
    try:
        answer = upstream.infer(window(2), 10.0)
        assert answer.label == "gamma" and answer.model == "clf@2.0.0"
    finally:
        upstream.close()

    no_cert = HttpUpstream(url, tls=MqttTls(ca.ca_path))  # trusts the service, presents nothing
    foreign_ca = FleetCA(tmp_path / "other-pki")
    other = foreign_ca.issue("dev-1")  # the same identity, signed by another CA
    foreign = HttpUpstream(url, tls=files(tmp_path / "other", "dev-1", other.cert_pem, other.key_pem, ca.ca_path))
    plain = HttpUpstream(url.replace("https://", "http://"))
    for refused in (no_cert, foreign, plain):
        try:
            with pytest.raises(TransportError):
                refused.infer(window(1), 10.0)
        finally:
            refused.close()
    with pytest.raises(httpx.HTTPError):  # nor does the service pass for anyone without the fleet CA
        httpx.post(f"{url}/v1/infer", content=window(1), timeout=10)


def test_device_tokens_are_required_when_listed(keys: Path, tmp_path: Path) -> None:
    """No token: 401; an unlisted one: 403; a listed one (in clear or as sha256:HEX): answered; a token removed
    from the file is refused without a restart."""
    import hashlib

    listed = tmp_path / "tokens"
    listed.write_text("# devices allowed upstream\ntoken-of-dev-1\nsha256:"
                      + hashlib.sha256(b"token-of-dev-2").hexdigest() + "\n")
    service = BackgroundService(load_upstream(keys / "big.bundle", keys / PUBLIC_KEY_FILE),
                                tokens=DeviceTokens(listed))
    url = service.start()
    clients = {name: HttpUpstream(url, token=token) for name, token in
               (("none", None), ("other", "token-of-dev-9"), ("dev-1", "token-of-dev-1"), ("dev-2", "token-of-dev-2"))}
    try:
        with pytest.raises(TransportError, match="401"):
            clients["none"].infer(window(0), 10.0)
        with pytest.raises(TransportError, match="403"):
            clients["other"].infer(window(0), 10.0)
        assert clients["dev-1"].infer(window(0), 10.0).label == "alpha"
        assert clients["dev-2"].infer(window(1), 10.0).label == "beta"
        listed.write_text("token-of-dev-2\n")
        with pytest.raises(TransportError, match="403"):
            clients["dev-1"].infer(window(0), 10.0)
    finally:
        for client in clients.values():
            client.close()
        service.stop()


def test_the_agents_escalator_presents_its_certificate_and_token(keys: Path, tmp_path: Path) -> None:
    """open_escalator builds the client from the agent's credentials: the fleet CA and device certificate of a
    TLS server, and the device token; the service requires both here."""
    ca = FleetCA(tmp_path / "pki")
    server = ca.issue("127.0.0.1", hosts=["127.0.0.1"])
    service_files = files(tmp_path / "svc", "upstream", server.cert_pem, server.key_pem, ca.ca_path)
    assert service_files.cert_file is not None and service_files.key_file is not None
    (tmp_path / "tokens").write_text("device-token\n")
    service = BackgroundService(load_upstream(keys / "big.bundle", keys / PUBLIC_KEY_FILE),
                                tls=UpstreamTls(service_files.cert_file, service_files.key_file, ca.ca_path),
                                tokens=DeviceTokens(tmp_path / "tokens"))
    url = service.start()
    issued = ca.issue("dev-1")
    config = AgentConfig(device_id="dev-1", server_url="https://127.0.0.1:9", mqtt=MqttEndpoint("127.0.0.1", 9),
                         token="device-token", trusted_keys={}, data_dir=tmp_path / "agent", upstream_url=url,
                         tls=files(tmp_path / "agent" / "tls", "client", issued.cert_pem, issued.key_pem, ca.ca_path),
                         escalation_deadline_s=10.0)
    escalator = open_escalator(config)
    assert escalator is not None
    try:
        x = np.zeros((1, synthetic.CHANNELS, synthetic.WINDOW), dtype=np.float32)
        x[0, 1] = 3.0
        answer = escalator.resolve(x, "clf@1.0.0", "alpha", 0.3)
        assert answer is not None and answer.label == "beta", escalator.take_counts()
    finally:
        escalator.close()
        service.stop()


def test_a_non_loopback_address_without_tls_is_refused(keys: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "edgefleet", "serve-model", str(keys / "big.bundle"), "--pub",
                             str(keys / PUBLIC_KEY_FILE), "--host", "0.0.0.0", "--port", "0"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode != 0
    assert "--insecure" in result.stderr and "Traceback" not in result.stderr
