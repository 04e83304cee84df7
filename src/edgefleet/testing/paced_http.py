"""An HTTP server on 127.0.0.1 that sends its bodies at a chosen pace and records every request's headers.

For tests of the agent's download limits (a trickling or endless peer) and of where its token goes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


@dataclass(frozen=True)
class Recorded:
    """One request as the server saw it."""

    path: str
    authorization: str | None
    range: str | None


class PacedServer:
    """Serves ``artifacts[path]`` in ``chunk_bytes`` pieces, ``interval_s`` apart; 404 for anything else.

    ``announce`` overrides a path's Content-Length (a server that lies about its size). A client that hangs up
    ends the response; closing the server ends every response at its next pause.
    """

    def __init__(self, artifacts: dict[str, bytes] | None = None, *, chunk_bytes: int = 64 * 1024,
                 interval_s: float = 0.0, announce: dict[str, int] | None = None) -> None:
        self.artifacts = dict(artifacts or {})
        self.chunk_bytes = chunk_bytes
        self.interval_s = interval_s
        self.announce = dict(announce or {})
        self.requests: list[Recorded] = []
        self.hung_up: list[str] = []
        """Paths whose client closed the connection before the whole body was sent."""
        self._closing = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(Recorded(self.path, self.headers.get("Authorization"),
                                               self.headers.get("Range")))
                data = owner.artifacts.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(owner.announce.get(self.path, len(data))))
                self.end_headers()
                try:
                    for start in range(0, len(data), owner.chunk_bytes):
                        if start and owner.interval_s and owner._closing.wait(owner.interval_s):
                            return
                        self.wfile.write(data[start:start + owner.chunk_bytes])
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    owner.hung_up.append(self.path)

            def log_message(self, *_args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def paths(self) -> list[str]:
        return [request.path for request in self.requests]

    def __enter__(self) -> PacedServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
