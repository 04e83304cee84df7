"""Local action: a consumer on the device (a Unix socket server here, a hook script) receives every prediction
and alert of a running agent; the sensor loop never waits on it (a full queue drops and counts); hooks are
rate-limited; the settings come from flags or EDGEFLEET_LOCAL_* variables."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.local_action import (
    HOOK_BURST,
    HookSink,
    LocalAction,
    LocalActionConfig,
    LocalSink,
    MemorySink,
)
from edgefleet.agent.sources import Reading, SensorSource
from edgefleet.agent.state import AgentState, Slot
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import ConfigError
from edgefleet.processes import wait_until
from edgefleet.testing.agents import signed_bundle
from edgefleet.testing.synthetic import CHANNELS, HOP, WINDOW
from edgefleet.transport.mqtt_url import MqttEndpoint

KEY = SigningKey.generate()
PER_CLASS = 60  # samples of each class in a row


class Readings(SensorSource):
    def __init__(self, readings: list[Reading]) -> None:
        super().__init__()
        self._readings = readings

    def _raw(self) -> Any:
        yield from self._readings


def _stream() -> list[Reading]:
    """alpha, then gamma (alerting), then delta (alerting), PER_CLASS samples each."""
    out = []
    for klass in (0, 2, 3):
        values = np.zeros(CHANNELS, dtype=np.float32)
        values[klass] = 3.0
        out += [Reading(values.copy(), klass) for _ in range(PER_CLASS)]
    return out


def _agent(data_dir: Path, local: LocalActionConfig, broker: MqttEndpoint) -> Agent:
    data = signed_bundle(KEY, "1.0.0", 1, thresholds={"alert:gamma": 0.5, "alert:delta": 0.5})
    accepted = decide(data, TrustState(keys={KEY.public.key_id: KEY.public}))
    state = AgentState(data_dir)
    state.save_bundle(accepted.sha256, data)
    state.stage(Slot(accepted.sha256, accepted.manifest.ref))
    state.activate_candidate(accepted.manifest.name, accepted.manifest.release)
    state.close()
    return Agent(AgentConfig(device_id="dev-local", server_url="http://127.0.0.1:9",
                             mqtt=broker, token="t",
                             trusted_keys={KEY.public.key_id: KEY.public}, data_dir=data_dir,
                             telemetry_interval_s=3600.0, local_action=local))


class SocketServer:
    """A local consumer: a Unix socket server (datagram or stream) collecting the JSON messages it receives."""

    def __init__(self, path: Path, kind: str) -> None:
        self.messages: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM if kind == "dgram" else socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._kind = kind
        self._stop = threading.Event()
        if kind == "stream":
            self._sock.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        if self._kind == "dgram":
            while not self._stop.is_set():
                try:
                    self.messages.append(json.loads(self._sock.recv(65536)))
                except TimeoutError:
                    continue
            return
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn, conn.makefile("rb") as lines:
                for line in lines:
                    self.messages.append(json.loads(line))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.mark.parametrize("kind", ["dgram", "stream"])
def test_a_unix_socket_consumer_receives_every_prediction_and_alert(tmp_path: Path, kind: str,
                                                                    mosquitto_broker: MqttEndpoint) -> None:
    server = SocketServer(tmp_path / "act.sock", kind)
    agent = _agent(tmp_path / "agent", LocalActionConfig(socket=tmp_path / "act.sock", socket_kind=kind),
                   mosquitto_broker)
    try:
        agent.start()
        agent.run(Readings(_stream()))
        expected = (3 * PER_CLASS - WINDOW) // HOP + 1
        wait_until(lambda: len(server.messages) >= expected + 2, 10, "every message at the consumer")
    finally:
        agent.stop()
        server.close()
    predictions = [m for m in server.messages if m["kind"] == "prediction"]
    alerts = [m for m in server.messages if m["kind"] == "alert"]
    assert len(predictions) == expected
    assert [m["seq"] for m in server.messages] == list(range(expected + 2))  # nothing missed, in order
    assert {p["label"] for p in predictions} == {"alpha", "gamma", "delta"}
    assert all(p["model"] == "clf@1.0.0" and p["device"] == "dev-local" for p in predictions)
    assert sum(1 for p in predictions if p.get("alert")) >= 2 * (PER_CLASS // HOP) - 2
    assert sorted(a["reason"] for a in alerts) == ["class:delta", "class:gamma"]  # the events the cloud gets too


def test_a_hook_script_gets_each_alert_on_stdin(tmp_path: Path, mosquitto_broker: MqttEndpoint) -> None:
    out = tmp_path / "hook-out"
    out.mkdir()
    hook = tmp_path / "on-alert.sh"
    hook.write_text(f'#!/bin/sh\ncat > "{out}/alert-$$.json"\n')
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    agent = _agent(tmp_path / "agent", LocalActionConfig(hook=hook), mosquitto_broker)
    try:
        agent.start()
        agent.run(Readings(_stream()))
        wait_until(lambda: len(list(out.glob("*.json"))) >= 2 and all(p.read_text().endswith("\n")
                                                                        for p in out.glob("*.json")),
                   10, "both alerts at the hook")
    finally:
        agent.stop()
    alerts = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert sorted(a["reason"] for a in alerts) == ["class:delta", "class:gamma"]
    assert all(a["kind"] == "alert" and a["model"] == "clf@1.0.0" for a in alerts)


def test_hooks_are_rate_limited_and_counted(tmp_path: Path) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\ncat > /dev/null\n")
    hook.chmod(0o755)
    now = [100.0]
    sink = HookSink(hook, rate_per_s=0.5, clock=lambda: now[0])
    for _ in range(HOOK_BURST + 3):
        sink.send("alert", b'{"kind":"alert"}\n')
    assert sink.sent + sink.limited == HOOK_BURST + 3 and sink.limited >= 3
    sink.close()


class BlockedSink(LocalSink):
    """A sink that cannot deliver until released: the sender thread waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def _send(self, kind: str, line: bytes) -> bool:
        self.release.wait(10)
        return True


def test_a_stuck_consumer_never_blocks_the_loop_and_drops_are_counted() -> None:
    blocked = BlockedSink()
    memory = MemorySink()
    local = LocalAction("d1", [blocked, memory], queue=4)
    local.start()
    started = time.monotonic()
    for i in range(100):
        local.alert({"reason": "x", "windows": i})
    assert time.monotonic() - started < 1.0  # the loop handed 100 messages over without waiting
    blocked.release.set()
    local.close()
    counts = local.counts()
    assert counts["handed"] == 100 and counts["dropped"] >= 100 - 4 - 1
    seqs = [m["seq"] for _, m in memory.messages]
    assert len(seqs) == 100 - counts["dropped"] and seqs == sorted(seqs)  # gaps in seq show what was missed


def test_settings_come_from_the_environment_and_bad_ones_are_one_line(tmp_path: Path) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    config = LocalActionConfig(socket=tmp_path / "s.sock", socket_kind="stream", mqtt_url="mqtt://127.0.0.1:1883",
                               hook=hook, hook_rate_per_s=2.0, predictions=False)
    assert LocalActionConfig.from_environ(config.to_environ()) == config
    assert not LocalActionConfig.from_environ({}).enabled
    for environ, needle in (({"EDGEFLEET_LOCAL_SOCKET_KIND": "seqpacket"}, "dgram or stream"),
                            ({"EDGEFLEET_LOCAL_HOOK": str(tmp_path / "none")}, "not an executable"),
                            ({"EDGEFLEET_LOCAL_HOOK_RATE": "fast"}, "must be a number"),
                            ({"EDGEFLEET_LOCAL_MQTT_URL": "mqtts://127.0.0.1"}, "mqtt://, not mqtts://")):
        with pytest.raises(ConfigError, match=needle):
            LocalActionConfig.from_environ(environ)
    assert os.access(hook, os.X_OK)
