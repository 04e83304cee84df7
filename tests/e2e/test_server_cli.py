"""`edgefleet server` with bad settings, as a user runs it: one line on stderr that names the flag, exit code 2,
nothing started; from a flag or from its EDGEFLEET_... variable alike."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def server(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", "server", "--data-dir", str(tmp_path / "srv"),
                           "--port", "0", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, check=False)


@pytest.mark.parametrize(("args", "env", "needle"), [
    (["--tick", "0"], {}, "--tick must be more than 0"),
    ([], {"EDGEFLEET_TICK_S": "-2"}, "--tick must be more than 0"),
    (["--replica", "a/b"], {}, "--replica 'a/b'"),
    ([], {"EDGEFLEET_REPLICA": "has space"}, "--replica 'has space'"),
    (["--operator-token", "short"], {}, "--operator-token must be at least"),
    (["--broker-auth-dir", "auth"], {}, "--broker-auth-dir is for an external Mosquitto"),
    (["--mqtt-url", "mqtt://127.0.0.1:1883"], {"EDGEFLEET_BROKER_AUTH_DIR": "auth"}, "credentials in --mqtt-url"),
    (["--device-mqtt-url", "tcp://broker"], {}, "invalid MQTT URL"),
])
def test_a_bad_server_setting_is_one_line_and_exit_code_2(tmp_path: Path, args: list[str], env: dict[str, str],
                                                           needle: str) -> None:
    result = server(tmp_path, *args, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "srv").exists()  # refused before anything was created


@pytest.mark.parametrize(("args", "env"), [(["--tick", "soon"], {}), ([], {"EDGEFLEET_MQTT5": "maybe"})])
def test_a_value_of_the_wrong_type_is_a_usage_error(tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
    result = server(tmp_path, *args, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "Invalid value" in result.stderr
