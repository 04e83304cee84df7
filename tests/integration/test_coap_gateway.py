"""Constrained devices over CoAP: `edgefleet coap-gateway` beside a real server (embedded broker, SQLite), driven
with Debian's `coap-client` as a device without Python or MQTT would.

Proven here: a device GETs its desired state with its own credentials and is refused (4.01) with another
device's; a telemetry batch POSTed over CoAP reaches the server's store (the device's telemetry API sums it); a
body for another device, a malformed body and an unknown path are refused with their codes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.processes import ManagedProcess, wait_until
from edgefleet.server.coap import Refusal, read_request
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport.messages import DesiredState, parse

pytestmark = pytest.mark.integration
MODEL = "clf@1.0.0"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def coap_client() -> str | None:
    """libcoap's client: Debian installs it as coap-client-notls (and -openssl, -gnutls) with no plain name."""
    return next((path for name in ("coap-client", "coap-client-notls", "coap-client-openssl")
                 if (path := shutil.which(name))), None)


def coap(method: str, url: str, body: str | None = None) -> tuple[str, str]:
    """Run coap-client; (its output, the response code it printed or '' for a 2.xx answer)."""
    args = [coap_client() or "coap-client", "-m", method, "-B", "10"]
    if body is not None:
        args += ["-t", "json", "-e", body]
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=30, check=False)
    text = (done.stdout + done.stderr).strip()
    code = next((word for word in text.split() if len(word) == 4 and word[1] == "." and word[0] in "45"), "")
    return text, code


@pytest.fixture
def gateway(fleet: LocalFleet) -> Iterator[str]:
    if coap_client() is None:
        pytest.fail("coap-client is missing: `make services` installs libcoap3-bin")
    mqtt_url = json.loads((fleet.root / "server" / "server.json").read_text())["mqtt_url"]
    port = free_udp_port()
    info = fleet.root / "coap.json"
    process = fleet.group.start(ManagedProcess.edgefleet(
        ["coap-gateway", "--mqtt-url", mqtt_url, "--port", str(port), "--info-file", str(info)],
        fleet.root / "logs" / "coap.log"))

    def ready() -> bool:
        assert process.running, process.log_tail(10)
        return info.exists()

    wait_until(ready, 30, "the CoAP gateway to listen")
    yield json.loads(info.read_text())["coap_url"]


def credentials(fleet: LocalFleet, device: str) -> dict[str, Any]:
    return dict(json.loads((fleet.root / "devices" / f"{device}.json").read_text()))


def test_desired_state_with_own_credentials_and_refused_with_another(fleet: LocalFleet, gateway: str) -> None:
    """The broker decides: the device's own password reads its state; a second device's password is refused."""
    assert fleet.api is not None
    fleet.provision("mcu-01")
    fleet.provision("mcu-02")
    fleet.api.push_model(fleet.bundle("1.0.0", 1))
    fleet.api.deploy(MODEL, ["mcu-01"])
    own = credentials(fleet, "mcu-01")
    other = credentials(fleet, "mcu-02")
    url = f"{gateway}/d/mcu-01/desired"

    answer: list[str] = []

    def deployed() -> bool:
        text, code = coap("get", f"{url}?password={own['mqtt_password']}")
        answer[:] = [text, code]
        return code == "" and '"model"' in text and MODEL.split("@")[1] in text

    wait_until(deployed, 30, "the desired state over CoAP")
    state = parse(DesiredState, answer[0].encode())
    assert state.device == "mcu-01" and state.model is not None and state.model.ref == MODEL

    text, code = coap("get", f"{url}?password={other['mqtt_password']}")
    assert code == "4.01", text
    assert '"model"' not in text
    _, code = coap("get", url)  # no password at all
    assert code == "4.01"


def test_telemetry_posted_over_coap_reaches_the_store(fleet: LocalFleet, gateway: str) -> None:
    """A batch POSTed as the device is published as the device and counted by the server; wrong bodies refused."""
    assert fleet.api is not None
    fleet.provision("mcu-03")
    password = credentials(fleet, "mcu-03")["mqtt_password"]
    url = f"{gateway}/d/mcu-03/telemetry?password={password}"
    batch = {"device": "mcu-03", "seq": 0, "ts": time.time(), "model": MODEL, "windows": 7, "labelled": 7,
             "correct": 6, "classes": {"idle": 7}}
    text, code = coap("post", url, json.dumps(batch))
    assert code == "", text

    def counted() -> bool:
        models = fleet.api.telemetry("mcu-03")["models"] if fleet.api else []
        return any(m["model"] == MODEL and m["windows"] == 7 for m in models)

    wait_until(counted, 30, "the CoAP batch in the device's telemetry")

    text, code = coap("post", url, json.dumps({**batch, "device": "mcu-01", "seq": 1}))
    assert code == "4.03", text
    text, code = coap("post", url, json.dumps({"device": "mcu-03", "seq": "x"}))
    assert code == "4.00", text
    _, code = coap("get", f"{gateway}/d/mcu-03/nothing?password={password}")
    assert code == "4.04"


@pytest.mark.parametrize(("path", "query", "method", "code"), [
    (("d", "dev", "desired"), ("password=x",), "GET", None),
    (("d", "dev", "telemetry"), ("password=x",), "POST", None),
    (("d", "dev", "desired"), ("password=x",), "POST", "4.05"),
    (("d", "dev", "telemetry"), ("password=x",), "GET", "4.05"),
    (("d", "dev", "desired"), (), "GET", "4.01"),
    (("d", "dev", "desired"), ("password=",), "GET", "4.01"),
    (("d", "../x", "desired"), ("password=x",), "GET", "4.04"),
    (("x", "dev", "desired"), ("password=x",), "GET", "4.04"),
    (("d", "dev"), ("password=x",), "GET", "4.04"),
])
def test_read_request(path: tuple[str, ...], query: tuple[str, ...], method: str, code: str | None) -> None:
    """The gateway's pure reading of a request: path, method and password, or the code it answers."""
    if code is None:
        asked = read_request(path, query, method)
        assert (asked.device, asked.channel, asked.password) == (path[1], path[2], "x")
        return
    with pytest.raises(Refusal) as refused:
        read_request(path, query, method)
    assert str(refused.value.code).startswith(code)


def test_gateway_without_the_coap_extra_is_one_line(tmp_path: Path) -> None:
    """The command names its extra when aiocoap is missing (simulated by hiding it from the import system)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import importlib.util, sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'aiocoap' or name.startswith('aiocoap.'):\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Hide())\n")
    env = {**os.environ, "PYTHONPATH": str(hide)}
    done = subprocess.run([sys.executable, "-m", "edgefleet", "coap-gateway", "--mqtt-url", "mqtt://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "[coap]" in lines[0] and "pip install 'edgefleet[coap]'" in lines[0], done.stderr
