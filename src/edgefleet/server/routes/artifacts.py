"""Bundle artifacts and weight deltas: for the operator, and for each device only the models assigned to it."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse

from edgefleet.errors import BundleError
from edgefleet.server.auth import bearer_token
from edgefleet.server.context import ServerContext
from edgefleet.server.routes.devices import sha256_text


def bearer(request: Request) -> str:
    """The bearer token (operator or device); 401 without one."""
    token = bearer_token(request)
    if token is None:
        raise HTTPException(401, "missing bearer token")
    return token


BINARY: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
          "description": "the bytes"}}
"""The OpenAPI response of an endpoint that sends a file (not JSON)."""


def artifacts_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter(prefix="/api/v1/artifacts")

    def authorize(token: str, digest: str) -> None:
        """The operator, or a device this artifact is assigned to; anyone else is refused."""
        if hmac.compare_digest(token.encode(), ctx.operator_token.encode()):
            return
        assigned = ctx.store.assigned_artifacts(sha256_text(token))
        if assigned is None:
            raise HTTPException(403, "unknown or revoked device token")
        if digest not in assigned:
            raise HTTPException(403, "artifact is not assigned to this device")

    @router.get("/{digest}", response_model=None, response_class=FileResponse, responses=BINARY)
    def artifact(digest: str, token: Annotated[str, Depends(bearer)]) -> FileResponse:
        path = ctx.artifacts.path(digest)
        authorize(token, digest)
        if path is None:
            raise HTTPException(404, "no such artifact")
        return FileResponse(path, media_type="application/octet-stream", headers={"ETag": f'"{digest}"'})

    @router.get("/{digest}/delta/{base}", response_model=None, response_class=FileResponse, responses=BINARY)
    def artifact_delta(digest: str, base: str, token: Annotated[str, Depends(bearer)]) -> FileResponse:
        """Only the weights that changed from ``base`` (a bundle the device runs) to ``digest``."""
        authorize(token, digest)
        if ctx.store.model_by_sha(base) is None:
            raise HTTPException(404, "no such base artifact")
        try:
            path = ctx.artifacts.delta(base, digest)
        except BundleError as exc:
            raise HTTPException(422, f"no delta between these bundles: {exc}") from exc
        if path is None:
            raise HTTPException(404, "no such artifact")
        return FileResponse(path, media_type="application/octet-stream")

    return router
