"""The `edgefleet` command as a user runs it: bad input gives one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def edgefleet(*args: str, timeout: float = 60, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", *args], capture_output=True, text=True,
                          timeout=timeout, input=stdin)


def assert_one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert needle in result.stderr


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    result = edgefleet("keys", "init", "--dir", str(directory))
    assert result.returncode == 0, result.stderr
    assert (directory / "signing.key").stat().st_mode & 0o777 == 0o600
    return directory


def test_keys_init_refuses_to_overwrite(keys: Path) -> None:
    assert_one_line_error(edgefleet("keys", "init", "--dir", str(keys)), "refusing to overwrite")


def test_bundle_verify_refuses_a_file_that_is_not_a_bundle(keys: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"\x89PNG not a bundle")
    assert_one_line_error(edgefleet("bundle", "verify", str(junk), "--pub", str(keys / "signing.pub")),
                          "not an edgefleet bundle")


def test_bundle_pack_refuses_a_file_that_is_not_onnx(keys: Path, tmp_path: Path) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"definitely not protobuf")
    result = edgefleet("bundle", "pack", str(fake), "--name", "m", "--version", "1.0.0",
                       "--key", str(keys / "signing.key"), "--out", str(tmp_path / "m.bundle"))
    assert_one_line_error(result, "ONNX")
    assert not (tmp_path / "m.bundle").exists()


def test_bad_option_values_are_usage_errors(tmp_path: Path) -> None:
    result = edgefleet("server", "--data-dir", str(tmp_path), "--port", "eighty")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_server_without_a_trusted_key_says_so(tmp_path: Path) -> None:
    assert_one_line_error(edgefleet("server", "--data-dir", str(tmp_path), "--port", "0"), "no trusted signing key")


def test_agent_with_malformed_credentials_says_so(tmp_path: Path) -> None:
    creds = tmp_path / "creds.json"
    creds.write_text("{not json")
    result = edgefleet("agent", "--credentials", str(creds), "--data-dir", str(tmp_path / "a"), "--source", "jsonl:-")
    assert_one_line_error(result, "not JSON")
    creds.write_text(json.dumps({"device_id": "d1"}))
    result = edgefleet("agent", "--credentials", str(creds), "--data-dir", str(tmp_path / "a"), "--source", "jsonl:-")
    assert_one_line_error(result, "lack a valid")


def test_agent_with_an_unknown_source_says_so(tmp_path: Path, keys: Path) -> None:
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"device_id": "d1", "server_url": "http://127.0.0.1:9", "mqtt_url": "mqtt://127.0.0.1:9",
                                 "token": "t", "trusted_keys": {"k": (keys / "signing.pub").read_text().strip()}}))
    result = edgefleet("agent", "--credentials", str(creds), "--data-dir", str(tmp_path / "a"),
                       "--source", "bluetooth:00:11:22")
    assert_one_line_error(result, "unknown sensor source")


def test_the_agent_imports_neither_torch_nor_sktime() -> None:
    code = ("import sys, edgefleet.cli, edgefleet.agent.agent, edgefleet.agent.sources; "
            "print(sorted(m for m in ('torch', 'sktime', 'sklearn') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
