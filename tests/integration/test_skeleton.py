"""The walking skeleton with real processes: server, broker, agents, HTTP download, MQTT telemetry.

Runs once against Mosquitto started by the fixture and once against the server's embedded amqtt broker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.bundle.container import MODEL, read_container, write_container
from edgefleet.processes import wait_until
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport.mqtt_url import MqttEndpoint

pytestmark = pytest.mark.integration


@pytest.fixture(params=["mosquitto", "embedded"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalFleet]:
    mqtt_url = None
    if request.param == "mosquitto":
        endpoint: MqttEndpoint = request.getfixturevalue("mosquitto_broker")
        mqtt_url = endpoint.url
    local = LocalFleet(tmp_path, mqtt_url=mqtt_url)
    try:
        local.start_server()
        yield local
    finally:
        local.close()


def test_model_reaches_devices_and_telemetry_comes_back(fleet: LocalFleet) -> None:
    api = fleet.api
    assert api is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    devices = ["dev-a", "dev-b"]
    for device in devices:
        fleet.provision(device)
    api.deploy("clf@1.0.0", devices)
    agents = [fleet.start_agent(d, shard=f"{i}/2") for i, d in enumerate(devices)]

    def windows(device: str) -> int:  # of the model it installed (the install may take a while on a busy host)
        return sum(m["windows"] for m in api.telemetry(device)["models"] if m["model"] == "clf@1.0.0")

    wait_until(lambda: all(windows(d) > 10 for d in devices), 90, "more than 10 windows from every device")
    for agent in agents:  # SIGTERM: a device's agent stops cleanly, sending what it has
        assert agent.stop(30) == 0, agent.log_tail()
    for device in devices:
        reported = api.device(device)["reported"]
        assert reported["active"] == "clf@1.0.0"
        telemetry = api.telemetry(device)
        assert telemetry["gaps"] == 0
        (summary,) = [m for m in telemetry["models"] if m["model"] == "clf@1.0.0"]
        assert summary["windows"] > 10
        assert summary["accuracy"] == 1.0  # the synthetic model is exact on clean data
        assert summary["latency_ms"]["p99"] is not None
        names = [e["name"] for e in api.events(device)]
        assert names[:6] == ["downloading", "verifying", "staged", "health_checking", "activating", "activated"]


def test_agent_refuses_a_tampered_artifact_keeps_its_model_and_says_why(fleet: LocalFleet) -> None:
    api = fleet.api
    assert api is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    second = api.push_model(fleet.bundle("1.1.0", 2))
    fleet.provision("dev-t")
    api.deploy("clf@1.0.0", ["dev-t"])
    agent = fleet.start_agent("dev-t", speed=20.0)
    wait_until(lambda: (api.device("dev-t")["reported"] or {}).get("active") == "clf@1.0.0", 30, "version 1")

    # Someone with write access to the artifact store flips one byte of the model after signing.
    artifact = fleet.root / "server" / "artifacts" / second["sha256"]
    members = read_container(artifact.read_bytes())
    model = bytearray(members[MODEL])
    model[len(model) // 2] ^= 0x01
    artifact.write_bytes(write_container({**members, MODEL: bytes(model)}))
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() != second["sha256"]

    api.deploy("clf@1.1.0", ["dev-t"])
    wait_until(lambda: any(e["name"] == "refused" for e in api.events("dev-t")), 30, "the refusal event")
    refused = next(e for e in api.events("dev-t") if e["name"] == "refused")
    assert refused["detail"]["reason"] == "hash_mismatch"
    wait_until(lambda: "hash_mismatch" in ((api.device("dev-t")["reported"] or {}).get("last_error") or ""), 15,
               "the reported error")
    reported = api.device("dev-t")["reported"]
    assert reported["active"] == "clf@1.0.0"

    # and it keeps inferring with version 1
    before = _windows(api.telemetry("dev-t"), "clf@1.0.0")
    wait_until(lambda: _windows(api.telemetry("dev-t"), "clf@1.0.0") > before, 15, "more windows on version 1")
    assert agent.running


def _windows(telemetry: dict[str, object], model: str) -> int:
    models = telemetry["models"]
    assert isinstance(models, list)
    return sum(int(m["windows"]) for m in models if m["model"] == model)
