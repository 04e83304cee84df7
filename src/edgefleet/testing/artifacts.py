"""A minimal artifact server (HTTP with Range) for agent tests that need no control plane."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


class ArtifactServer:
    """Serves ``artifacts[path]`` on 127.0.0.1, honouring ``Range: bytes=N-``; counts requests per path."""

    def __init__(self, artifacts: dict[str, bytes] | None = None, token: str = "test-token") -> None:
        self.artifacts = dict(artifacts or {})
        self.token = token
        self.requests: list[tuple[str, str | None]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append((self.path, self.headers.get("Range")))
                if self.headers.get("Authorization") != f"Bearer {owner.token}":
                    self.send_error(403)
                    return
                data = owner.artifacts.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes=") and ranged.endswith("-"):
                    start = int(ranged[6:-1])
                    if start >= len(data):
                        self.send_error(416)
                        return
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *_args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> ArtifactServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
