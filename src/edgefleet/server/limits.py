"""Request limits enforced before the API does any work: pure ASGI middleware in front of the routes.

For a request that carries a body (a ``Content-Length`` over zero, or ``Transfer-Encoding``), in this order:

1. Authentication before the body: every route that reads a body is an operator route, so such a request must
   present the operator token. Without a bearer token it gets 401, with another one 403; its body is never read
   (and a client that sent ``Expect: 100-continue`` is never told to send it).
2. Size: a declared ``Content-Length`` over the route's cap gets 413 at once; a streamed (chunked) body is
   counted as it arrives and refused with 413 as soon as it passes the cap, so no more than the cap is held.
3. Bundle uploads (``POST /api/v1/models``, cap :attr:`Limits.max_upload_bytes`): at most
   :attr:`Limits.max_uploads` at once; one more gets 429 with ``Retry-After``.
4. JSON bodies (every other route, cap :attr:`Limits.max_json_bytes`) are read whole here and refused with 400
   when nested deeper than :attr:`Limits.max_json_depth` (Python's parser would recurse on them), then handed
   to the app.

A refusal is one line of JSON, ``{"detail": "..."}``, as the API's own errors are.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MIB = 1024 * 1024
UPLOAD_ROUTES = frozenset({("POST", "/api/v1/models")})
"""(method, path) of the routes whose body is an uploaded bundle, streamed to the app rather than JSON."""


@dataclass(frozen=True)
class Limits:
    """What one server accepts per request; each is a flag of ``edgefleet server``."""

    max_upload_bytes: int = 256 * MIB
    """A bundle upload's body (``--max-upload-mb``)."""
    max_json_bytes: int = MIB
    """Any other request's body (``--max-json-kb``)."""
    max_json_depth: int = 32
    """Nesting of arrays and objects in a JSON body (``--max-json-depth``)."""
    max_uploads: int = 2
    """Bundle uploads served at once (``--max-uploads``)."""


class _TooLarge(Exception):
    """Raised from ``receive`` when a streamed body passes its cap."""


class RequestLimits:
    """The middleware; ``operator_token`` is the only token that may send a body."""

    def __init__(self, app: ASGIApp, *, limits: Limits, operator_token: str) -> None:
        self.app = app
        self.limits = limits
        self._token = operator_token.encode()
        self._uploads = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not _has_body(headers):
            await self.app(scope, receive, send)
            return
        refusal = self._unauthorized(headers)
        if refusal is None:
            upload = (scope["method"], scope["path"]) in UPLOAD_ROUTES
            cap = self.limits.max_upload_bytes if upload else self.limits.max_json_bytes
            refusal = _declared_over(headers, cap)
            if refusal is None and upload:
                await self._upload(scope, receive, send, cap)
                return
            if refusal is None:
                await self._json(scope, receive, send, cap)
                return
        await refusal(scope, receive, send)

    def _unauthorized(self, headers: Headers) -> JSONResponse | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _refuse(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.encode(), self._token):
            return _refuse(403, "operator token required")
        return None

    async def _upload(self, scope: Scope, receive: Receive, send: Send, cap: int) -> None:
        if self._uploads >= self.limits.max_uploads:
            await _refuse(429, f"{self._uploads} uploads in progress; try again shortly",
                          {"Retry-After": "5"})(scope, receive, send)
            return
        self._uploads += 1
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > cap:
                raise _TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if started:  # the app answered before it read the whole body; nothing more to say
                return
            await _refuse(413, f"upload over {cap} bytes")(scope, receive, send)
        finally:
            self._uploads -= 1

    async def _json(self, scope: Scope, receive: Receive, send: Send, cap: int) -> None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                await _refuse(413, f"request body over {cap} bytes")(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        depth = json_depth(body)
        if depth > self.limits.max_json_depth:
            await _refuse(400, f"JSON nested {depth} deep, over the limit of {self.limits.max_json_depth}")(
                scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


def json_depth(body: bytes) -> int:
    """How deep arrays and objects nest in ``body`` (JSON, possibly malformed), in linear time."""
    brackets = _STRINGS.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\Z)', re.DOTALL)
"""A JSON string, or an unterminated one up to the end (so a match never fails and restarts: linear)."""
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def _has_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0").strip() not in ("", "0")


def _declared_over(headers: Headers, cap: int) -> JSONResponse | None:
    declared = headers.get("content-length")
    if declared is None:
        return None
    if not declared.strip().isdigit():
        return _refuse(400, "malformed Content-Length")
    return _refuse(413, f"request body over {cap} bytes") if int(declared) > cap else None


def _refuse(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # The connection is closed after a refusal: the unread body must not be taken for the next request.
    return JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close", **(headers or {})})


def _replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[MutableMapping[str, Any]]]:
    """A ``receive`` that gives ``body`` once, then whatever the connection says next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
