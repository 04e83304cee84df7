"""Operator authentication: the bearer token (CLI, scripts) or the dashboard's session cookie with CSRF checks.

A session is a signed cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over HTTPS) that the dashboard's
login sets after checking the operator token. It holds no secret: ``v1.EXPIRES.NONCE.MAC`` where MAC is an
HMAC-SHA256 under a key derived from the operator token, so every replica that shares the token accepts it and
changing the token ends every session. A request authenticated by the cookie that changes state (any method
but GET, HEAD and OPTIONS) must also carry ``X-CSRF-Token``: an HMAC of the cookie that only pages served to the
logged-in browser contain. A bearer token needs no CSRF token (a browser never adds it on its own).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from fastapi import HTTPException, Request

__all__ = ["CSRF_HEADER", "SESSION_COOKIE", "OperatorAuth", "Sessions", "bearer_token"]

SESSION_COOKIE = "edgefleet_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def bearer_token(request: Request) -> str | None:
    """The ``Authorization: Bearer`` token, or None when there is none."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" and token else None


class Sessions:
    """Issues and checks dashboard session cookies and their CSRF tokens."""

    def __init__(self, operator_token: str, lifetime_s: float = 12 * 3600.0) -> None:
        self._key = hmac.new(operator_token.encode(), b"edgefleet dashboard session v1", hashlib.sha256).digest()
        self.lifetime_s = lifetime_s

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}|{value}".encode(), hashlib.sha256).hexdigest()

    def issue(self, now: float | None = None) -> str:
        """A new session cookie value, valid for ``lifetime_s``."""
        body = f"v1.{int((now or time.time()) + self.lifetime_s)}.{secrets.token_hex(8)}"
        return f"{body}.{self._mac('session', body)}"

    def valid(self, value: str | None, now: float | None = None) -> bool:
        """Whether ``value`` is a cookie this server issued that has not expired."""
        if not value or value.count(".") != 3:
            return False
        body, _, mac = value.rpartition(".")
        if not hmac.compare_digest(mac, self._mac("session", body)):
            return False
        expires = body.split(".")[1]
        return expires.isdigit() and int(expires) > (now or time.time())

    def csrf(self, value: str) -> str:
        """The CSRF token that goes with session cookie ``value``."""
        return self._mac("csrf", value)

    def csrf_ok(self, value: str, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented, self.csrf(value))


class OperatorAuth:
    """FastAPI dependency: the operator token as a bearer, or a valid session cookie (plus the CSRF header on
    state-changing requests). 401 when neither is presented, 403 when what was presented is wrong."""

    def __init__(self, operator_token: str, sessions: Sessions) -> None:
        self._token = operator_token.encode()
        self.sessions = sessions

    def token_ok(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._token)

    def __call__(self, request: Request) -> None:
        token = bearer_token(request)
        if token is not None:
            if not self.token_ok(token):
                raise HTTPException(403, "operator token required")
            return
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie is None or not self.sessions.valid(cookie):
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if request.method not in SAFE_METHODS and not self.sessions.csrf_ok(cookie, request.headers.get(CSRF_HEADER)):
            raise HTTPException(403, f"missing or wrong {CSRF_HEADER} header")
