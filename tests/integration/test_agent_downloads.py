"""Hostile download peers against real agent processes (embedded broker, local HTTP servers on 127.0.0.1):

- a desired state announcing 10 GB: refused before any byte, the old model active and inferring;
- a server that trickles one byte a second: abandoned by the minimum rate (small limits, set through the
  agent's EDGEFLEET_DOWNLOAD_* variables), the old model active; that server, another origin, never sees the
  device's token;
- a newer desired state cancels a slow download in progress and is installed at once;
- the fetcher sends its token to the configured server's origin only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.fetch import ArtifactFetcher
from edgefleet.bundle.signing import SigningKey
from edgefleet.processes import ManagedProcess, wait_until
from edgefleet.testing.agent_rig import DeviceRig, Watcher
from edgefleet.testing.agents import model_ref, signed_bundle
from edgefleet.testing.artifacts import ArtifactServer
from edgefleet.testing.paced_http import PacedServer
from edgefleet.transport.mqtt_url import MqttEndpoint

pytestmark = pytest.mark.integration
KEY = SigningKey.generate()
V1, V2, V3 = (signed_bundle(KEY, f"{n}.0.0", n) for n in (1, 2, 3))
T1, T2, T3 = (model_ref(data, f"{n}.0.0", n) for n, data in ((1, V1), (2, V2), (3, V3)))
SLOW_PATH = "/slow/v3.bundle"


@pytest.fixture
def artifacts() -> Iterator[ArtifactServer]:
    with ArtifactServer({T1.url: V1, T2.url: V2}) as server:  # the device's own server: wants its token
        yield server


@pytest.fixture
def trickle() -> Iterator[PacedServer]:
    """Another origin, sending V3 one byte a second (about 20 minutes for the whole bundle)."""
    with PacedServer({SLOW_PATH: V3}, chunk_bytes=1, interval_s=1.0) as server:
        yield server


@pytest.fixture
def rig(tmp_path: Path, embedded_broker: MqttEndpoint, artifacts: ArtifactServer,
        request: pytest.FixtureRequest) -> Iterator[tuple[DeviceRig, Watcher]]:
    name = "dl-" + request.node.name.removeprefix("test_")[:24].replace("_", "-")
    device = DeviceRig(tmp_path, embedded_broker, artifacts.url, artifacts.token, name, KEY.public)
    watcher = Watcher(embedded_broker, name)
    try:
        yield device, watcher
    finally:
        device.stop_all()
        watcher.close()


def running_v1(device: DeviceRig, watcher: Watcher, env: dict[str, str] | None = None) -> ManagedProcess:
    watcher.desire(T1)
    process = device.start(env)
    wait_until(lambda: device.state().get("active") == "clf@1.0.0" and device.state().get("update_state") == "idle",
               60, "version 1 to become active")
    return process


def assert_v1_runs_on(device: DeviceRig, watcher: Watcher, process: ManagedProcess) -> None:
    """Version 1 is the active model, and new telemetry batches from it keep arriving."""
    assert device.state().get("active") == "clf@1.0.0" and device.state().get("candidate") is None
    before = watcher.batches("clf@1.0.0")
    wait_until(lambda: watcher.batches("clf@1.0.0") >= before + 3, 30, "telemetry from version 1")
    assert process.running, process.log_tail()


def test_a_download_announcing_10_gb_is_refused_before_any_byte(
        rig: tuple[DeviceRig, Watcher], artifacts: ArtifactServer) -> None:
    device, watcher = rig
    process = running_v1(device, watcher)
    watcher.desire(T2.model_copy(update={"size": 10 * 1024**3, "url": "/artifacts/huge.bundle"}))
    wait_until(lambda: any(e.get("reason") == "too_large" for e in watcher.named("refused")), 30,
               "the 10 GB download to be refused")
    assert "/artifacts/huge.bundle" not in [path for path, _range in artifacts.requests]  # not one byte asked for
    wait_until(lambda: device.state().get("update_state") == "idle", 10, "the update state back to idle")
    assert "too_large" in device.state()["last_error"] and device.state().get("pending_update") is None
    assert_v1_runs_on(device, watcher, process)
    assert not list((device.data_dir / "downloads").glob("*"))


def test_a_trickling_server_is_abandoned_by_the_minimum_rate_and_never_sees_the_token(
        rig: tuple[DeviceRig, Watcher], artifacts: ArtifactServer, trickle: PacedServer) -> None:
    device, watcher = rig
    limits = {"EDGEFLEET_DOWNLOAD_MIN_RATE": "64", "EDGEFLEET_DOWNLOAD_GRACE_S": "2"}
    process = running_v1(device, watcher, limits)
    watcher.desire(T3.model_copy(update={"url": trickle.url + SLOW_PATH}))
    wait_until(lambda: "too slow" in str(device.state().get("last_error")), 30, "the trickle to be abandoned")
    assert device.state().get("update_state") in ("idle", "downloading")  # idle, or already retrying (backoff)
    assert trickle.paths() and all(r.authorization is None for r in trickle.requests)  # a foreign origin
    assert [r for r in artifacts.requests if r[0] == T1.url]  # the device's own server did get the token
    assert_v1_runs_on(device, watcher, process)


def test_a_newer_desired_state_cancels_a_slow_download(
        rig: tuple[DeviceRig, Watcher], trickle: PacedServer) -> None:
    device, watcher = rig
    process = running_v1(device, watcher, {"EDGEFLEET_DOWNLOAD_MIN_RATE": "0"})  # the trickle would go on
    watcher.desire(T3.model_copy(update={"url": trickle.url + SLOW_PATH}))
    wait_until(lambda: device.state().get("update_state") == "downloading" and trickle.paths(), 30,
               "the slow download to start")
    watcher.desire(T2)
    wait_until(lambda: device.state().get("active") == "clf@2.0.0" and device.state().get("update_state") == "idle",
               30, "version 2 to be installed (well before the slow download could end)")
    assert [e["cancelled"] for e in watcher.named("cancelled")] == ["clf@3.0.0"]
    wait_until(lambda: SLOW_PATH in trickle.hung_up, 10, "the slow server to see the device hang up")
    assert not (device.data_dir / "downloads" / f"{T3.sha256}.part").exists()  # the partial file collected
    assert process.running, process.log_tail()


def test_the_token_goes_to_the_configured_origin_only(tmp_path: Path) -> None:
    with PacedServer({"/a": V1}) as own, PacedServer({"/b": V1}) as foreign:
        fetcher = ArtifactFetcher(own.url, "device-token")
        for url, part in (("/a", "a"), (own.url + "/a", "b"), (foreign.url + "/b", "c"),
                          (own.url + "@" + foreign.url.removeprefix("http://") + "/b", "d")):
            assert fetcher.fetch(url, tmp_path / part, len(V1)).size == len(V1)
    assert [r.authorization for r in own.requests] == ["Bearer device-token"] * 2
    assert len(foreign.requests) == 2 and all("device-token" not in (r.authorization or "") for r in foreign.requests)
