"""A TCP proxy on 127.0.0.1 that counts the bytes it relays each way: what a broker or server received from
a client and sent to it, independently of the client's own counters (:mod:`edgefleet.transport.wire`)."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class CountingProxy:
    """Relays every connection to ``upstream`` (host, port); ``upstream_bytes``: client -> upstream,
    ``downstream_bytes``: upstream -> client, over all connections."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.upstream_bytes = 0
        self.downstream_bytes = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = int(self._server.getsockname()[1])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)

    def start(self) -> CountingProxy:
        self._accept.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
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
                self.connections += 1
            for source, sink, up in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(target=self._pipe, args=(source, sink, up), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pipe(self, source: socket.socket, sink: socket.socket, up: bool) -> None:
        source.settimeout(None)
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                with self._lock:
                    if up:
                        self.upstream_bytes += len(data)
                    else:
                        self.downstream_bytes += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.upstream_bytes, self.downstream_bytes

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self._accept.join(timeout=2)
        for thread in self._threads:
            thread.join(timeout=2)

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
