"""Request limits on a real ``edgefleet server`` process: a body is authenticated before it is read and capped
while it streams, so hundreds of MB sent chunked (generated as they go, never held by the test) leave the
server's peak memory where it was; deep JSON and too many uploads at once are refused; the server keeps serving."""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.bundle.signing import PUBLIC_KEY_FILE, write_keypair
from edgefleet.client import ControlPlane
from edgefleet.errors import EdgefleetError
from edgefleet.processes import ManagedProcess, ProcessGroup, wait_until
from edgefleet.transport.ports import free_port

pytestmark = pytest.mark.integration
MIB = 1024 * 1024
UPLOAD_CAP_MB = 8
HUGE = 400 * MIB
MEMORY_BOUND_KB = 100 * 1024


@dataclass
class Server:
    port: int
    pid: int
    token: str
    process: ManagedProcess

    def status(self) -> int:
        return ControlPlane(f"http://127.0.0.1:{self.port}", self.token)._http.get("/api/v1/health").status_code

    def peak_rss_kb(self) -> int:
        """VmHWM: the process's peak resident memory so far."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the server's memory")
    root = tmp_path_factory.mktemp("limits")
    write_keypair(root / "keys")
    port = free_port()
    args = [sys.executable, "-m", "edgefleet", "server", "--data-dir", str(root / "srv"), "--port", str(port),
            "--trusted-key", str(root / "keys" / PUBLIC_KEY_FILE), "--max-upload-mb", str(UPLOAD_CAP_MB),
            "--max-json-kb", "64", "--max-uploads", "2"]
    with ProcessGroup() as group:
        process = group.start(ManagedProcess(args, root / "server.log"))

        def ready() -> bool:
            if not process.running:
                raise EdgefleetError(f"server exited: {process.log_tail(10)}")
            return (root / "srv" / "server.json").exists()

        wait_until(ready, 60, "the server to start")
        info = json.loads((root / "srv" / "server.json").read_text())
        token = (root / "srv" / "operator.token").read_text().strip()
        yield Server(port, int(info["pid"]), token, process)


@dataclass
class Answer:
    status: int
    detail: str
    sent: int
    """Body bytes the test got into the socket before the server answered."""


def request(port: int, path: str, *, token: str | None = None, total: int = 0, chunk: int = 64 * 1024,
            body: bytes | None = None, content_type: str = "application/octet-stream",
            timeout_s: float = 60.0) -> Answer:
    """POST ``body`` (with a Content-Length), or ``total`` bytes chunked, produced chunk by chunk; stop sending as
    soon as the server answers, and return its answer."""
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    head += [f"Authorization: Bearer {token}"] if token else []
    head += [f"Content-Length: {len(body)}"] if body is not None else ["Transfer-Encoding: chunked"]
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sock.setblocking(False)
        frame = body if body is not None else b"%x\r\n" % chunk + b"0" * chunk + b"\r\n"
        frames = 1 if body is not None else total // chunk
        sent, offset, deadline = 0, 0, time.monotonic() + timeout_s
        while frames and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                break
            if not writable:
                continue
            try:
                offset += sock.send(frame[offset:])
            except (BrokenPipeError, ConnectionResetError):
                break
            if offset == len(frame):
                sent, offset, frames = sent + (len(body) if body is not None else chunk), 0, frames - 1
        if not frames and body is None:
            sock.setblocking(True)
            sock.sendall(b"0\r\n\r\n")
        return _answer(sock, sent, deadline)
    finally:
        sock.close()


def _answer(sock: socket.socket, sent: int, deadline: float) -> Answer:
    sock.setblocking(True)
    sock.settimeout(max(1.0, deadline - time.monotonic()))
    data = b""
    while b"\r\n\r\n" not in data or len(data) < _length(data):
        more = sock.recv(65536)
        if not more:
            break
        data += more
    head, _, payload = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return Answer(status, json.loads(payload).get("detail", ""), sent)


def _length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return len(data)


def test_a_huge_chunked_upload_without_a_token_is_refused_before_its_body_is_read(server: Server) -> None:
    before = server.peak_rss_kb()
    for path in ("/api/v1/models", "/api/v1/devices"):
        answer = request(server.port, path, total=HUGE)
        assert answer.status == 401 and answer.detail == "missing bearer token"
        assert answer.sent < HUGE  # answered while the client was still sending
    wrong = request(server.port, "/api/v1/models", token="not-the-operator", total=HUGE)
    assert wrong.status == 403 and wrong.sent < HUGE
    assert server.peak_rss_kb() - before < MEMORY_BOUND_KB
    assert server.status() == 200


def test_a_huge_chunked_upload_with_the_token_stops_at_the_size_cap(server: Server) -> None:
    before = server.peak_rss_kb()
    answer = request(server.port, "/api/v1/models", token=server.token, total=HUGE)
    assert answer.status == 413 and f"over {UPLOAD_CAP_MB * MIB} bytes" in answer.detail
    assert UPLOAD_CAP_MB * MIB <= answer.sent < HUGE
    declared = request(server.port, "/api/v1/models", token=server.token, body=b"0" * (UPLOAD_CAP_MB * MIB + 1))
    assert declared.status == 413
    json_over = request(server.port, "/api/v1/devices", token=server.token, total=4 * MIB,
                        content_type="application/json")
    assert json_over.status == 413 and "over 65536 bytes" in json_over.detail
    assert server.peak_rss_kb() - before < MEMORY_BOUND_KB
    assert server.status() == 200


def test_deeply_nested_json_is_refused_and_ordinary_json_still_works(server: Server) -> None:
    deep = b"[" * 5000 + b"]" * 5000
    answer = request(server.port, "/api/v1/devices", token=server.token, body=deep, content_type="application/json")
    assert answer.status == 400 and "nested 5000 deep" in answer.detail
    inside_strings = json.dumps({"id": "dev-1", "tags": {"note": "[[[[{{{{" * 10}}).encode()
    ok = request(server.port, "/api/v1/devices", token=server.token, body=inside_strings,
                 content_type="application/json")
    assert ok.status == 201, ok.detail


def test_uploads_beyond_the_concurrent_limit_get_429_until_one_ends(server: Server) -> None:
    def start_upload() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(f"POST /api/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
                     f"Transfer-Encoding: chunked\r\n\r\n10\r\n{'0' * 16}\r\n".encode())
        return sock  # the body never ends: the upload holds its slot until the connection closes

    def one_more() -> int:
        return request(server.port, "/api/v1/models", token=server.token, body=b"not a bundle").status

    held = [start_upload(), start_upload()]
    try:
        wait_until(lambda: one_more() == 429, 20, "a third upload to be refused")
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: one_more() == 422, 20, "uploads to be served again")  # 422: not a bundle
