"""Health and Prometheus metrics: open to anyone (no operator token)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel

from edgefleet import __version__
from edgefleet.server.context import ServerContext
from edgefleet.server.metrics import CONTENT_TYPE


class Health(BaseModel):
    status: str
    version: str


def system_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.get("/api/v1/health")
    def health() -> Health:
        return Health(status="ok", version=__version__)

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    return router
