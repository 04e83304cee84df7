"""parse_mqtt_url accepts mqtt://[user:pass@]host[:port] and rejects everything else with a ConfigError."""

from __future__ import annotations

import socket

import pytest

from edgefleet.errors import ConfigError
from edgefleet.transport.mqtt_url import MqttEndpoint, MqttTls, parse_mqtt_url
from edgefleet.transport.ports import free_port


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1884", MqttEndpoint("127.0.0.1", 1884)),
        ("mqtt://broker.local", MqttEndpoint("broker.local", 1883)),
        ("mqtt://broker.local/", MqttEndpoint("broker.local", 1883)),
        ("mqtt://dev-1:s3cret@10.0.0.2:2883", MqttEndpoint("10.0.0.2", 2883, "dev-1", "s3cret")),
        ("mqtt://dev%401:p%3Ass@host:1", MqttEndpoint("host", 1, "dev@1", "p:ss")),
        ("mqtt://only-user@host", MqttEndpoint("host", 1883, "only-user", None)),
        ("mqtt://[::1]:1883", MqttEndpoint("::1", 1883)),
        ("  mqtt://host:65535 ", MqttEndpoint("host", 65535)),
        ("mqtts://host", MqttEndpoint("host", 8883, tls=MqttTls())),
        ("mqtts://dev-1@10.0.0.2:9883", MqttEndpoint("10.0.0.2", 9883, "dev-1", tls=MqttTls())),
    ],
)
def test_parses_valid_urls(url: str, expected: MqttEndpoint) -> None:
    assert parse_mqtt_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://host:1883",
        "ws://host:8883",
        "host:1883",
        "mqtt://",
        "mqtt://:1883",
        "mqtt://host:0",
        "mqtt://host:65536",
        "mqtt://host:abc",
        "mqtt://host:-1",
        "mqtt://host:1883/topic",
        "mqtt://host:1883?x=1",
        "mqtt://:pw@host",
    ],
)
def test_rejects_invalid_urls_with_one_line(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_mqtt_url(url)
    assert "\n" not in str(info.value)


def test_errors_never_show_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse_mqtt_url("mqtt://dev:topsecret@host:99999")
    assert "topsecret" not in str(info.value)


def test_url_leaves_out_credentials_and_round_trips() -> None:
    endpoint = parse_mqtt_url("mqtt://dev:pw@example.org:2000")
    assert endpoint.url == "mqtt://example.org:2000"
    assert "pw" not in repr(endpoint)
    assert parse_mqtt_url(endpoint.url) == MqttEndpoint("example.org", 2000)
    assert MqttEndpoint("::1", 1883).url == "mqtt://[::1]:1883"


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_wait_for_port_gives_up_with_a_transport_error() -> None:
    from edgefleet.errors import TransportError
    from edgefleet.transport.ports import wait_for_port

    with pytest.raises(TransportError, match="did not accept"):
        wait_for_port("127.0.0.1", free_port(), timeout_s=0.2)


def test_a_tls_endpoint_keeps_its_scheme_but_not_its_files_or_credentials_in_its_address() -> None:
    """What a device is told to dial says mqtts:// (TLS) and nothing else: no password, no local file paths."""
    from pathlib import Path

    endpoint = MqttEndpoint("h", 8883, "u", "p", tls=MqttTls(Path("/ca.pem"), Path("/c.pem"), Path("/c.key")))
    assert endpoint.url == "mqtts://h:8883"
    assert endpoint.address == MqttEndpoint("h", 8883, tls=MqttTls())
    assert "password=***" in repr(endpoint)
