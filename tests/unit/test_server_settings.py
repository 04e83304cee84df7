"""`edgefleet server` settings: every server setting is a flag that also reads its EDGEFLEET_... variable (the
flag wins), and ServerSettings refuses bad values with one line naming the flag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import edgefleet.server.main as server_main
from edgefleet.cli import app
from edgefleet.errors import ConfigError
from edgefleet.server.main import ServerSettings

ENV_VARS = ("EDGEFLEET_REPLICA", "EDGEFLEET_OPERATOR_TOKEN", "EDGEFLEET_ARTIFACT_DIR", "EDGEFLEET_BROKER_AUTH_DIR",
            "EDGEFLEET_DEVICE_MQTT_URL", "EDGEFLEET_MQTT5", "EDGEFLEET_TICK_S")
TOKEN = "t" * 24
MQTT = "mqtt://edgefleet-server:secret@127.0.0.1:1883"


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[ServerSettings]:
    """The settings `edgefleet server` would run with (run_server is replaced; nothing starts)."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    runs: list[ServerSettings] = []
    monkeypatch.setattr(server_main, "run_server", runs.append)
    return runs


def serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, ["server", "--data-dir", str(tmp_path / "srv"), *args], env=env)


def test_defaults_match_a_single_server_with_an_embedded_broker(tmp_path: Path, started: list[ServerSettings]) -> None:
    assert serve(tmp_path).exit_code == 0
    (settings,) = started
    assert settings == ServerSettings(data_dir=tmp_path / "srv")
    assert (settings.replica, settings.operator_token, settings.artifact_dir, settings.broker_auth_dir,
            settings.device_mqtt_url, settings.mqtt5, settings.tick_s) == ("server", None, None, None, None, True, 1.0)


def test_flags_set_every_server_setting(tmp_path: Path, started: list[ServerSettings]) -> None:
    result = serve(tmp_path, "--mqtt-url", MQTT, "--replica", "replica-a", "--operator-token", TOKEN,
                   "--artifact-dir", str(tmp_path / "art"), "--broker-auth-dir", str(tmp_path / "auth"),
                   "--device-mqtt-url", "mqtt://broker.example:8883", "--no-mqtt5", "--tick", "0.2")
    assert result.exit_code == 0, result.output
    (s,) = started
    assert (s.replica, s.operator_token, s.artifact_dir, s.broker_auth_dir, s.device_mqtt_url, s.mqtt5, s.tick_s) \
        == ("replica-a", TOKEN, tmp_path / "art", tmp_path / "auth", "mqtt://broker.example:8883", False, 0.2)


def test_environment_variables_set_them_too_and_flags_win(tmp_path: Path, started: list[ServerSettings]) -> None:
    env = {"EDGEFLEET_REPLICA": "from-env", "EDGEFLEET_OPERATOR_TOKEN": TOKEN,
           "EDGEFLEET_ARTIFACT_DIR": str(tmp_path / "art"), "EDGEFLEET_BROKER_AUTH_DIR": str(tmp_path / "auth"),
           "EDGEFLEET_DEVICE_MQTT_URL": "mqtt://devices:1883", "EDGEFLEET_MQTT5": "0", "EDGEFLEET_TICK_S": "0.5"}
    assert serve(tmp_path, "--mqtt-url", MQTT, env=env).exit_code == 0
    assert serve(tmp_path, "--mqtt-url", MQTT, "--replica", "from-flag", "--mqtt5", "--tick", "2", env=env
                 ).exit_code == 0
    from_env, overridden = started
    assert (from_env.replica, from_env.operator_token, from_env.artifact_dir, from_env.broker_auth_dir,
            from_env.device_mqtt_url, from_env.mqtt5, from_env.tick_s) \
        == ("from-env", TOKEN, tmp_path / "art", tmp_path / "auth", "mqtt://devices:1883", False, 0.5)
    assert (overridden.replica, overridden.mqtt5, overridden.tick_s) == ("from-flag", True, 2.0)
    assert overridden.operator_token == TOKEN  # no flag given: the variable still counts


def test_help_names_each_flag_and_its_variable() -> None:
    text = CliRunner().invoke(app, ["server", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--replica", "--operator-token", "--artifact-dir", "--broker-auth-dir", "--device-mqtt-url",
                 "--mqtt5", "--no-mqtt5", "--tick"):
        assert flag in text
    for name in ENV_VARS:
        assert name in text


@pytest.mark.parametrize(("changes", "message"), [
    ({"replica": ""}, "--replica"),
    ({"replica": "a/b"}, "--replica"),
    ({"replica": "x" * 65}, "--replica"),
    ({"operator_token": "short"}, "--operator-token"),
    ({"operator_token": "with a space in the middle"}, "--operator-token"),
    ({"tick_s": 0.0}, "--tick"),
    ({"tick_s": -1.0}, "--tick"),
    ({"tick_s": float("nan")}, "--tick"),
    ({"tick_s": 1e9}, "--tick"),
    ({"port": 70000}, "--port"),
    ({"mqtt_url": "http://broker:1883"}, "invalid MQTT URL"),
    ({"device_mqtt_url": "broker:1883"}, "invalid MQTT URL"),
    ({"broker_auth_dir": Path("auth")}, "--broker-auth-dir is for an external Mosquitto"),
    ({"broker_auth_dir": Path("auth"), "mqtt_url": "mqtt://127.0.0.1:1883"}, "credentials in --mqtt-url"),
])
def test_bad_values_are_refused_naming_the_flag(changes: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        ServerSettings(data_dir=tmp_path, **changes)
    assert "\n" not in str(info.value)


def test_a_file_where_a_directory_belongs_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"--artifact-dir .* is not a directory"):
        ServerSettings(data_dir=tmp_path / "srv", artifact_dir=tmp_path / "file")


def test_a_bad_variable_is_refused_like_a_bad_flag(tmp_path: Path, started: list[ServerSettings]) -> None:
    result = serve(tmp_path, env={"EDGEFLEET_TICK_S": "0"})
    assert isinstance(result.exception, ConfigError) and "--tick" in str(result.exception)
    result = serve(tmp_path, env={"EDGEFLEET_MQTT5": "maybe"})
    assert result.exit_code == 2 and "--mqtt5" in result.output
    result = serve(tmp_path, env={"EDGEFLEET_TICK_S": "soon"})
    assert result.exit_code == 2
    assert started == []
