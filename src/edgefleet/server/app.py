"""The control plane's REST API (FastAPI) and its dashboard: one router per resource, included in one place.

Operators authenticate with the operator token (bearer), or in the dashboard with a session cookie plus a CSRF
header (:mod:`edgefleet.server.auth`); devices with their own token, and a device may fetch only the artifacts
of the models assigned to it (active or shadow). Every request is counted (``/metrics``) and bad input
(malformed JSON, oversized bodies, unknown devices, wrong credentials) is rejected and counted. Request bodies
pass :mod:`edgefleet.server.limits` first: authenticated, capped and checked before any route reads them.

Routers: ``server/routes/`` (system, models, devices and deployments, artifacts), the ``*_api.py`` modules
(rollouts, telemetry, monitors, field data, keys, certificates) and ``server/ui`` (the dashboard, ``/ui``).
Add a router to :func:`routers` below.
"""

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from edgefleet import __version__
from edgefleet.errors import EdgefleetError, StoreError
from edgefleet.server.auth import OperatorAuth, Sessions
from edgefleet.server.certificates_api import certificates_router
from edgefleet.server.context import ServerContext
from edgefleet.server.export.api import export_router
from edgefleet.server.fielddata_api import fielddata_router
from edgefleet.server.keys_api import keys_router
from edgefleet.server.limits import RequestLimits
from edgefleet.server.monitors_api import monitors_router
from edgefleet.server.orchestrator import model_ref
from edgefleet.server.profiles_api import profiles_router
from edgefleet.server.rollout_api import rollout_router
from edgefleet.server.routes.artifacts import artifacts_router
from edgefleet.server.routes.devices import DeploymentIn, DeviceIn, devices_router, sha256_text
from edgefleet.server.routes.models import MODEL_KEY_HEADER, models_router
from edgefleet.server.routes.system import system_router
from edgefleet.server.telemetry_api import telemetry_router
from edgefleet.server.ui import ui_router

__all__ = ["MODEL_KEY_HEADER", "DeploymentIn", "DeviceIn", "ServerContext", "create_app", "model_ref",
           "sha256_text"]


def routers(ctx: ServerContext) -> list[tuple[APIRouter, bool]]:
    """Every router of the server, each with whether it needs the operator (the dependency is added here)."""
    included: list[tuple[APIRouter, bool]] = [
        (system_router(ctx), False),
        (models_router(ctx), True),
        (devices_router(ctx), True),
        (artifacts_router(ctx), False),  # operator or an assigned device, checked per artifact
        (rollout_router(ctx.orchestrator, ctx.store), True),
        (telemetry_router(ctx.store), True),
        (profiles_router(ctx.store), True),
        (monitors_router(ctx.store, ctx.orchestrator, ctx.metrics), True),
        (fielddata_router(ctx.store), True),
        (keys_router(ctx.store, ctx.orchestrator, ctx.trusted_keys), True),
        (export_router(ctx.store, ctx.metrics.export_status), True),
    ]
    if ctx.pki is not None:
        included.append((certificates_router(ctx.pki, ctx.store, ctx.sync_broker), True))
    return included


def create_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="edgefleet control plane", version=__version__)
    app.add_middleware(RequestLimits, limits=ctx.limits, operator_token=ctx.operator_token)  # inside the count
    auth = OperatorAuth(ctx.operator_token, Sessions(ctx.operator_token))

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        ctx.metrics.http(request.method, getattr(route, "path", "unmatched"), response.status_code)
        return response

    @app.exception_handler(EdgefleetError)
    async def _edgefleet_error(_request: Request, exc: EdgefleetError) -> JSONResponse:
        status = 409 if isinstance(exc, StoreError) else 422
        if isinstance(exc, StoreError) and str(exc).startswith("unknown "):
            status = 404
        return JSONResponse({"detail": str(exc), "reason": getattr(exc, "reason", None)}, status_code=status)

    operator = [Depends(auth)]
    for router, needs_operator in routers(ctx):
        app.include_router(router, dependencies=operator if needs_operator else None)
    ui_router(app, ctx, auth)  # the dashboard under /ui: its own login, then the same operator check
    return app
