"""OpenSSL stays out of the agent process unless it needs TLS (edgefleet.agent.lean): the real process entry with
a plain configuration never loads ``ssl`` or ``_hashlib``; an ``https://`` server loads them up front; an HTTP
client (an update's download, the tiered-inference upstream) lifts the block and works; and paho-mqtt, imported
without ``ssl``, still reconnects after the broker resets its connection."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent import lean
from edgefleet.bundle.signing import SigningKey
from edgefleet.testing.artifacts import ArtifactServer
from edgefleet.transport.ports import free_port

OPENSSL = ("ssl", "_ssl", "_hashlib")


def python(code: str, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize(("urls", "expected"), [
    (("http://server:8000", "mqtt://broker:1883", None, "jsonl:-"), False),
    (("npz:/data/x.npz?speed=inf", "mqtt://u:p@b", "http://up/"), False),
    ((None, None), False),
    (("https://server:8443",), True),
    (("http://server", None, "HTTPS://upstream/v1"), True),
    (("mqtts://broker:8883",), True),
    (("http://a", "wss://broker/mqtt"), True),
    (("https-ish:/not-a-url", "httpsx://x"), False),
])
def test_only_a_url_that_speaks_tls_needs_openssl_up_front(urls: tuple[str | None, ...], expected: bool) -> None:
    assert lean.needs_openssl(urls) is expected


def test_the_block_makes_ssl_unimportable_keeps_hashlib_working_and_lifts_cleanly() -> None:
    code = """
import sys
from edgefleet.agent import lean
assert lean.keep_openssl_out() and lean.openssl_kept_out()
import hashlib, hmac, random, uuid, urllib.request, http.client  # each imports ssl or _hashlib optionally
assert hashlib.sha256(b"abc").hexdigest().startswith("ba7816bf") and hashlib.sha256.__module__ == "_sha256"
for name in ("ssl", "_hashlib"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(name + " imported while kept out")
print(sorted(m for m in ("ssl", "_ssl", "_hashlib") if sys.modules.get(m) is not None))
lean.allow_openssl()
lean.allow_openssl()  # idempotent
import ssl, _hashlib
assert not lean.openssl_kept_out() and ssl.create_default_context() is not None
print(sorted(m for m in ("ssl", "_ssl", "_hashlib") if sys.modules.get(m) is not None))
"""
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "['_hashlib', '_ssl', 'ssl']"]


def test_keeping_openssl_out_changes_nothing_where_it_is_loaded_already() -> None:
    import ssl  # noqa: F401  # loaded in this test process anyway (httpx, the server)

    assert lean.keep_openssl_out() is False
    assert not lean.openssl_kept_out() and all(sys.modules.get(name) is not None for name in ("ssl", "_ssl"))


# the real agent process ----------------------------------------------------------------------------------
AGENT = """
import atexit, json, runpy, sys
def _report():
    import paho.mqtt.client as mqtt
    print("LEAN " + json.dumps({"loaded": sorted(m for m in ("ssl", "_ssl", "_hashlib") if sys.modules.get(m)),
                                "paho_ssl": getattr(mqtt.ssl, "__name__", None),
                                "httpx": sys.modules.get("httpx") is not None}), flush=True)
atexit.register(_report)
sys.argv = ["edgefleet.agent", *sys.argv[1:]]
runpy.run_module("edgefleet.agent", run_name="__main__", alter_sys=True)  # as python -m edgefleet.agent
"""


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({"device_id": "d1", "server_url": "http://127.0.0.1:9",
                                "mqtt_url": f"mqtt://127.0.0.1:{free_port()}", "token": "t",
                                "trusted_keys": {"k": SigningKey.generate().public.to_text()}}))
    return path


def run_agent(credentials: Path, data_dir: Path, *flags: str) -> tuple[list[str], str, bool]:
    """Run the agent process offline on an empty stream; what it had loaded when it exited."""
    result = python(AGENT, "--credentials", str(credentials), "--data-dir", str(data_dir), "--source", "jsonl:-",
                    "--duration", "1", *flags)
    lines = [line for line in result.stdout.splitlines() if line.startswith("LEAN ")]
    assert result.returncode == 0 and lines, result.stderr[-2000:]
    report = json.loads(lines[-1][5:])
    return report["loaded"], report["paho_ssl"], report["httpx"]


def test_the_agent_process_with_plain_mqtt_and_http_never_loads_openssl(credentials: Path, tmp_path: Path) -> None:
    loaded, paho_ssl, httpx = run_agent(credentials, tmp_path / "agent")
    assert loaded == [] and not httpx
    assert paho_ssl == "_NoTls"  # paho got the stand-in for its socket error clauses (edgefleet.transport.link)


def test_an_https_server_loads_openssl_up_front(credentials: Path, tmp_path: Path) -> None:
    loaded, paho_ssl, _ = run_agent(credentials, tmp_path / "agent", "--server", "https://127.0.0.1:9")
    assert {"ssl", "_ssl"} <= set(loaded) and paho_ssl == "ssl"  # paho itself could do TLS


def test_the_tiered_inference_upstream_lifts_the_block_for_its_http_client(credentials: Path,
                                                                           tmp_path: Path) -> None:
    loaded, paho_ssl, httpx = run_agent(credentials, tmp_path / "agent", "--upstream", "http://127.0.0.1:9")
    assert httpx and "ssl" in loaded and paho_ssl == "_NoTls"  # MQTT stays plain; paho was imported before


def test_an_update_download_over_http_works_with_openssl_kept_out(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    code = """
import sys
from pathlib import Path
from edgefleet.agent import lean
assert lean.keep_openssl_out()
from edgefleet.agent.fetch import ArtifactFetcher
got = ArtifactFetcher(sys.argv[1], "test-token").fetch("/a/model.bundle", Path(sys.argv[2]), 256000)
print(got.size, sys.modules.get("ssl") is not None)
"""
    with ArtifactServer({"/a/model.bundle": data}) as server:
        result = python(code, server.url, str(tmp_path / "part"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(len(data)), "True"]


# paho-mqtt without ssl -------------------------------------------------------------------------------------
@pytest.fixture
def resetting_broker() -> Iterator[tuple[int, list[float]]]:
    """Accepts, answers CONNECT with a CONNACK, then resets the connection (RST) a moment later; records accepts."""
    server = socket.create_server(("127.0.0.1", 0))
    accepts: list[float] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepts.append(time.monotonic())
            conn.recv(1024)
            conn.sendall(bytes([0x20, 2, 0, 0]))
            time.sleep(0.2)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], accepts
    server.close()


def test_paho_without_ssl_reconnects_after_the_broker_resets_the_connection(
        resetting_broker: tuple[int, list[float]]) -> None:
    port, accepts = resetting_broker
    code = """
import sys, time
from edgefleet.agent import lean
assert lean.keep_openssl_out()
from edgefleet.transport.link import MqttLink
from edgefleet.transport.mqtt_url import MqttEndpoint
link = MqttLink(MqttEndpoint("127.0.0.1", int(sys.argv[1])), "lean-test")
link.start(5)
time.sleep(2.5)  # reset after 0.2 s; paho reconnects after its 1 s minimum delay
print(link._client._thread is not None and link._client._thread.is_alive())
link.stop()
"""
    result = python(code, str(port))
    assert "AttributeError" not in result.stderr, result.stderr[-2000:]  # the network thread's death, unpatched
    assert result.returncode == 0 and result.stdout.strip() == "True" and len(accepts) >= 2
