"""Encrypted models end to end with a real server and real agents: `model push --model-key` checks the key and
keeps it only sealed; each device gets the key wrapped for its own key pair in its desired state; the agent
decrypts in memory, health-checks through a pipe, infers, is updated (encrypted bundles go whole, no delta) and
restores the model at its next start; no plaintext model, initializer or model key is ever on the agent's disk
or in its temp directory, nor the model key on the server's. A revoked device gets no new key; a wrong model
key at push and a key wrapped for another device are refused with one line while the old model keeps running."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.bundle.encrypt import write_model_key
from edgefleet.bundle.keywrap import parse_public_key, wrap_for_device
from edgefleet.processes import wait_until
from edgefleet.server.broker_auth import SERVER_USER
from edgefleet.testing import synthetic
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport import topics
from edgefleet.transport.mqtt_url import parse_mqtt_url

pytestmark = pytest.mark.integration
WAIT_S = 60.0
BIAS = {"1.0.0": [0.0314159, 0.0, -0.0271828, 0.0], "1.0.1": [0.0123457, -0.0234568, 0.0345679, -0.0456791],
        "1.0.2": [0.0567891, 0.0, 0.0, -0.0678912]}
"""Distinctive initializers: their float32 bytes appear in the plaintext model only."""


class ServerTap:
    """The server's own MQTT login on the fleet's embedded broker: reads and writes retained desired states."""

    def __init__(self, fleet: LocalFleet) -> None:
        server_dir = fleet.root / "server"
        endpoint = parse_mqtt_url(json.loads((server_dir / "server.json").read_text())["mqtt_url"])
        self._messages: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"encrypted-tap-{time.time_ns()}")
        self._client.username_pw_set(SERVER_USER, (server_dir / "broker" / "server.secret").read_text().strip())
        self._client.on_connect = lambda *_: self._connected.set()
        self._client.on_message = self._on_message
        self._client.connect(endpoint.host, endpoint.port)
        self._client.loop_start()
        assert self._connected.wait(15), "the tap never connected"
        self._client.subscribe(topics.device_filter("desired"), qos=1)

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._messages[message.topic] = bytes(message.payload)

    def desired(self, device: str) -> dict[str, Any] | None:
        with self._lock:
            payload = self._messages.get(topics.desired(device))
        return json.loads(payload) if payload else None

    def publish_desired(self, device: str, state: dict[str, Any]) -> None:
        self._client.publish(topics.desired(device), json.dumps(state).encode(), qos=1, retain=True) \
            .wait_for_publish(10)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def tap(fleet: LocalFleet) -> Iterator[ServerTap]:
    server_tap = ServerTap(fleet)
    yield server_tap
    server_tap.close()


def model(version: str) -> bytes:
    return synthetic.channel_mean_model(bias=BIAS[version])


def reported(fleet: LocalFleet, device: str) -> dict[str, Any]:
    assert fleet.api is not None
    return fleet.api.device(device)["reported"] or {}


def windows(fleet: LocalFleet, device: str, ref: str) -> int:
    assert fleet.api is not None
    return sum(int(m["windows"]) for m in fleet.api.telemetry(device)["models"] if m["model"] == ref)


def secrets_on_disk(roots: list[Path], needles: dict[str, bytes], *, since: float = 0.0,
                    skip: Path | None = None) -> list[str]:
    """``what in path`` for every needle found in a file under ``roots`` changed since ``since`` (outside
    ``skip``), bounded in count and size."""
    found, seen = [], 0
    for root in roots:
        for path in root.rglob("*") if root.exists() else []:
            if seen >= 20_000:
                break
            if (skip is not None and path.is_relative_to(skip)) or path.is_symlink() or not path.is_file():
                continue
            try:
                info = path.stat()
                if info.st_size > 64 * 1024 * 1024 or info.st_mtime < since:
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            seen += 1
            found += [f"{what} in {path}" for what, needle in needles.items() if needle in data]
    return found


def start(fleet: LocalFleet, device: str) -> Any:
    tmp = fleet.root / "tmp" / device
    tmp.mkdir(parents=True, exist_ok=True)
    return fleet.start_agent(device, env={"TMPDIR": str(tmp), "TMP": str(tmp), "TEMP": str(tmp)})


def test_an_encrypted_model_is_pushed_rolled_out_updated_and_restored_without_plaintext_on_disk(
        fleet: LocalFleet, tap: ServerTap) -> None:
    began = time.time()
    api = fleet.api
    assert api is not None
    key_file, wrong_file = fleet.root / "model.key", fleet.root / "wrong.key"
    model_key, _ = write_model_key(key_file), write_model_key(wrong_file)
    bundles = {v: fleet.root / f"clf-{v}.bundle" for v in BIAS}
    for release, (version, path) in enumerate(bundles.items(), start=1):
        path.write_bytes(fleet.bundle(version, release, model(version), encrypt_key=model_key))

    # push: a wrong key and no key are refused with one line; the right key is taken and kept sealed
    wrong = fleet.cli("model", "push", str(bundles["1.0.0"]), "--model-key", str(wrong_file))
    assert wrong.returncode != 0 and "decrypt_failed" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
    keyless = fleet.cli("model", "push", str(bundles["1.0.0"]))
    assert keyless.returncode != 0 and "no model key" in keyless.stderr
    assert len(keyless.stderr.strip().splitlines()) == 1
    pushed = fleet.cli("model", "push", str(bundles["1.0.0"]), "--model-key", str(key_file), "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["encrypted"] is True

    # two devices report their own public keys; the rollout wraps the model key for each of them
    for device in ("dev-a", "dev-b"):
        fleet.provision(device, {"site": "lab"})
    agents = {device: start(fleet, device) for device in ("dev-a", "dev-b")}
    wait_until(lambda: all(reported(fleet, d).get("public_key") for d in agents), WAIT_S, "the devices' public keys")
    public = {d: reported(fleet, d)["public_key"] for d in agents}
    assert public["dev-a"] != public["dev-b"]
    api.create_rollout("clf@1.0.0", waves=["100%"], select={"site": "lab"})
    wait_until(lambda: all(reported(fleet, d).get("running") == "clf@1.0.0" for d in agents), WAIT_S,
               "the encrypted model running on both devices")
    wait_until(lambda: windows(fleet, "dev-a", "clf@1.0.0") > 0, WAIT_S, "inference with the encrypted model")
    first = tap.desired("dev-a")
    assert first is not None and first["model"]["wrapped_key"] and first["model"]["wrapped_key"] != \
        (tap.desired("dev-b") or {})["model"]["wrapped_key"]

    # a revoked device receives no new key: the next release is wrapped for dev-a only, and sent whole
    api.revoke_device("dev-b")
    before_b = tap.desired("dev-b")
    pushed = fleet.cli("model", "push", str(bundles["1.0.1"]), "--model-key", str(key_file))
    assert pushed.returncode == 0, pushed.stderr
    api.create_rollout("clf@1.0.1", waves=["100%"], select={"site": "lab"})
    wait_until(lambda: reported(fleet, "dev-a").get("running") == "clf@1.0.1", WAIT_S, "the encrypted update")
    wait_until(lambda: windows(fleet, "dev-a", "clf@1.0.1") > 0, WAIT_S, "inference with the update")
    target = (tap.desired("dev-a") or {})["model"]
    assert target["version"] == "1.0.1" and target["wrapped_key"] and "delta_url" not in target
    assert not [e for e in api.events("dev-a") if e["name"] == "delta_applied"]
    assert tap.desired("dev-b") == before_b  # nothing new published for the revoked device
    assert reported(fleet, "dev-b").get("active") == "clf@1.0.0"

    # a restart restores the encrypted model from its slot, with the wrapped key kept beside it
    agents["dev-a"].stop()
    restarted = time.time()
    agents["dev-a"] = start(fleet, "dev-a")
    wait_until(lambda: reported(fleet, "dev-a").get("ts", 0) > restarted, WAIT_S, "the restarted agent's report")
    assert reported(fleet, "dev-a").get("running") == "clf@1.0.1" and agents["dev-a"].running
    assert "restore_failed" not in [e["name"] for e in api.events("dev-a")]

    # a key wrapped for another device is refused with one line; the old model keeps running
    agents["dev-a"].stop()
    pushed = fleet.cli("model", "push", str(bundles["1.0.2"]), "--model-key", str(key_file), "--json")
    assert pushed.returncode == 0, pushed.stderr
    api.deploy("clf@1.0.2", ["dev-a"])
    wait_until(lambda: ((tap.desired("dev-a") or {}).get("model") or {}).get("version") == "1.0.2", WAIT_S,
               "the desired state of 1.0.2")
    forged = tap.desired("dev-a")
    assert forged is not None
    sha = json.loads(pushed.stdout)["sha256"]
    forged["model"]["wrapped_key"] = wrap_for_device(model_key, parse_public_key(public["dev-b"]), "dev-b", sha)
    tap.publish_desired("dev-a", forged)
    agents["dev-a"] = start(fleet, "dev-a")
    wait_until(lambda: any(e["name"] == "refused" for e in api.events("dev-a")), WAIT_S, "the refusal")
    refusal = [e for e in api.events("dev-a") if e["name"] == "refused"][-1]["detail"]
    assert refusal["reason"] == "decrypt_failed" and refusal["refused"] == "clf@1.0.2"
    last_error = reported(fleet, "dev-a").get("last_error") or ""
    assert "not wrapped for this device" in last_error and "\n" not in last_error
    assert reported(fleet, "dev-a").get("running") == "clf@1.0.1" and agents["dev-a"].running
    count = windows(fleet, "dev-a", "clf@1.0.1")
    wait_until(lambda: windows(fleet, "dev-a", "clf@1.0.1") > count, WAIT_S, "the old model still inferring")

    # nothing in clear on disk: no model, no distinctive initializer, no model key
    needles = {"the model key": model_key.raw, "the model key's text": model_key.to_text().encode()}
    for version in BIAS:
        needles[f"model {version}"] = model(version)
        needles[f"the initializer of {version}"] = np.asarray(BIAS[version], dtype=np.float32).tobytes()
    for process in agents.values():
        process.stop()
    agent_dirs = [fleet.root / "agents" / d for d in agents] + [fleet.root / "tmp"]
    assert secrets_on_disk(agent_dirs, needles) == []
    assert secrets_on_disk([Path(tempfile.gettempdir())], needles, since=began, skip=fleet.root) == []
    server_needles = {k: v for k, v in needles.items() if "key" in k}  # the server opened the models in memory
    assert secrets_on_disk([fleet.root / "server"], server_needles) == []
