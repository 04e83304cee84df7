"""The control plane's REST API (FastAPI): models, devices, deployments, rollouts, artifacts, telemetry, metrics.

Operators authenticate with the operator token; devices with their own token, and a device may fetch only
the artifacts of the models assigned to it (active or shadow). Every request is counted (``/metrics``) and
bad input (malformed JSON, oversized bodies, unknown devices, wrong credentials) is rejected and counted.
Request bodies pass :mod:`edgefleet.server.limits` first: authenticated, capped and checked before any route
reads them.
"""


import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from edgefleet import __version__
from edgefleet.bundle.encrypt import ModelKey
from edgefleet.bundle.signing import PublicKey
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import BundleError, EdgefleetError, StoreError
from edgefleet.server.artifacts import ArtifactStore
from edgefleet.server.broker_auth import BrokerAccess, hash_password
from edgefleet.server.broker_sync import BrokerSync
from edgefleet.server.certificates_api import certificates_router, device_certificate
from edgefleet.server.export.api import export_router
from edgefleet.server.fielddata_api import fielddata_router
from edgefleet.server.keys_api import keys_router
from edgefleet.server.limits import Limits, RequestLimits
from edgefleet.server.metrics import CONTENT_TYPE, Metrics
from edgefleet.server.model_keys import ModelKeys
from edgefleet.server.monitors_api import monitors_router
from edgefleet.server.orchestrator import Orchestrator, model_ref
from edgefleet.server.pki import FleetCA
from edgefleet.server.rollout_api import rollout_router
from edgefleet.server.schema import Device, ModelVersion
from edgefleet.server.store import Store
from edgefleet.server.telemetry_api import telemetry_router
from edgefleet.server.trust import server_keyring
from edgefleet.transport import topics

__all__ = ["MODEL_KEY_HEADER", "ServerContext", "create_app", "model_ref"]
MODEL_KEY_HEADER = "X-Edgefleet-Model-Key"
"""An encrypted bundle's model key (base64) on ``POST /api/v1/models``; it is stored only sealed."""


@dataclass
class ServerContext:
    """Everything the API needs, wired by ``server.main``."""

    store: Store
    artifacts: ArtifactStore
    trusted_keys: dict[str, PublicKey]
    operator_token: str
    public_url: str
    device_mqtt_url: str
    orchestrator: Orchestrator
    metrics: Metrics
    access: BrokerAccess | None = None
    limits: Limits = field(default_factory=Limits)
    model_keys: ModelKeys | None = None
    """Seals the keys of encrypted models pushed with one (None: encrypted bundles are refused)."""
    pki: FleetCA | None = None
    """With ``--tls``: the fleet CA that issues each device its certificate."""

    syncer: BrokerSync | None = field(default=None, repr=False)
    """Batches the rewrites of the broker's files (:mod:`edgefleet.server.broker_sync`); made on first use."""

    def sync_broker(self, *, soon: bool = False) -> None:
        """Rewrite the broker's password, ACL and CRL files from the store (new or revoked devices): waited for,
        or with ``soon`` (a new device) waited for only while syncs are cheap; adds made during a sync share the
        next one, so that adding N devices does not rewrite N lines N times."""
        access = self.access
        if access is None:
            return
        if self.syncer is None:
            self.syncer = BrokerSync(lambda: access.sync(
                (d.id, d.mqtt_password_hash, d.revoked) for d in self.store.list_devices()))
        if soon:
            self.syncer.sync_soon()
        else:
            self.syncer.sync()


class DeviceIn(BaseModel):
    id: str = Field(pattern=topics.DEVICE_ID.pattern, max_length=64)
    tags: dict[str, Annotated[str, Field(max_length=128)]] = Field(default_factory=dict, max_length=64)
    profile: str | None = Field(default=None, max_length=64)
    hardware: str = Field(default="generic", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64,
                          description="hardware id: bundles packed for other hardware skip this device")


class DeploymentIn(BaseModel):
    model: str = Field(description="name@version", max_length=140)
    devices: list[str] = Field(default_factory=list, max_length=100_000)
    select: dict[str, str] = Field(default_factory=dict, description="tags every chosen device carries")


def sha256_text(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def create_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="edgefleet control plane", version=__version__)
    app.add_middleware(RequestLimits, limits=ctx.limits, operator_token=ctx.operator_token)  # inside the count

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        ctx.metrics.http(request.method, getattr(route, "path", "unmatched"), response.status_code)
        return response

    def bearer(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "missing bearer token")
        return token

    def operator(token: Annotated[str, Depends(bearer)]) -> None:
        if not hmac.compare_digest(token.encode(), ctx.operator_token.encode()):
            raise HTTPException(403, "operator token required")

    Operator = Depends(operator)

    @app.exception_handler(EdgefleetError)
    async def _edgefleet_error(_request: Request, exc: EdgefleetError) -> JSONResponse:
        status = 409 if isinstance(exc, StoreError) else 422
        if isinstance(exc, StoreError) and str(exc).startswith("unknown "):
            status = 404
        return JSONResponse({"detail": str(exc), "reason": getattr(exc, "reason", None)}, status_code=status)

    @app.get("/api/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/api/v1/models", dependencies=[Operator], status_code=201)
    async def push_model(request: Request) -> dict[str, Any]:
        data = await request.body()  # RequestLimits caps it while it streams in
        header = request.headers.get(MODEL_KEY_HEADER)
        key = ModelKey.from_text(header) if header else None  # ConfigError: 422 with one line
        try:  # an encrypted model is opened with its key and checked like a clear one, in memory only
            accepted = decide(data, TrustState.from_keyring(server_keyring(ctx.store), hardware=None),  # any hardware
                              decryption_key=key)
        except BundleError as exc:
            raise HTTPException(422, f"bundle refused ({exc.reason}): {exc}") from exc
        sealed = sealed_key(key, accepted.manifest.encryption is not None, accepted.sha256)
        digest = ctx.artifacts.put(data)
        row = ctx.store.add_model(accepted.manifest, digest, len(data), accepted.key_id, model_key_sealed=sealed)
        return model_json(row)

    def sealed_key(key: ModelKey | None, encrypted: bool, digest: str) -> str | None:
        """An encrypted bundle's key sealed with the master key, to be stored (never the key in clear)."""
        if key is None:
            return None
        if not encrypted:
            raise HTTPException(422, "the bundle is not encrypted: a model key goes only with an encrypted bundle")
        if ctx.model_keys is None:
            raise HTTPException(422, "this server keeps no model keys (no master key): encrypted bundles refused")
        return ctx.model_keys.seal(key, digest)

    @app.get("/api/v1/models", dependencies=[Operator])
    def list_models() -> list[dict[str, Any]]:
        return [model_json(m) for m in ctx.store.list_models()]

    @app.get("/api/v1/models/{name}/{version}/telemetry", dependencies=[Operator])
    def model_telemetry(name: str, version: str, since: float = 0.0) -> dict[str, Any]:
        if ctx.store.find_model(name, version) is None:
            raise HTTPException(404, f"unknown model {name}@{version}")
        stats, devices = ctx.store.model_stats(f"{name}@{version}", since)
        from edgefleet.core.cohorts import CohortStats

        as_shadow = CohortStats()  # what it did beside the active model, with its agreement (E14)
        for per_model in ctx.store.device_model_stats(None, since)[1].values():
            if f"{name}@{version}" in per_model:
                as_shadow.add(per_model[f"{name}@{version}"])
        return {"model": f"{name}@{version}", "devices": devices, **stats.to_json(),
                "as_shadow": as_shadow.to_json() if as_shadow.devices else None}

    @app.post("/api/v1/devices", dependencies=[Operator], status_code=201)
    def add_device(body: DeviceIn) -> dict[str, Any]:
        token, password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        ctx.store.add_device(Device(id=body.id, token_sha256=sha256_text(token),
                                    mqtt_password_sha256=sha256_text(password),
                                    mqtt_password_hash=hash_password(password), tags=body.tags,
                                    profile=body.profile, hardware=body.hardware, created=time.time(),
                                    revoked=False))
        ctx.sync_broker(soon=True)  # batched with other adds (server.broker_sync)
        certificate = device_certificate(ctx.pki, body.id) if ctx.pki is not None else {}  # once it is new
        return {**certificate, "device_id": body.id, "server_url": ctx.public_url, "mqtt_url": ctx.device_mqtt_url,
                "mqtt_username": body.id, "mqtt_password": password, "token": token, "tags": body.tags,
                "profile": body.profile,
                "hardware": body.hardware,
                "trusted_keys": {k: v.to_text() for k, v in server_keyring(ctx.store).trusted().items()}}

    @app.get("/api/v1/devices", dependencies=[Operator])
    def list_devices() -> list[dict[str, Any]]:
        models = {m.id: m for m in ctx.store.list_models()}
        return [device_json(d, models) for d in ctx.store.list_devices()]

    @app.get("/api/v1/devices/{device_id}", dependencies=[Operator])
    def show_device(device_id: str) -> dict[str, Any]:
        return device_json(known_device(device_id))

    @app.post("/api/v1/devices/{device_id}/revoke", dependencies=[Operator])
    def revoke_device(device_id: str) -> dict[str, Any]:
        known_device(device_id)
        ctx.store.set_revoked(device_id)
        if ctx.pki is not None:
            ctx.pki.revoke(device_id)  # the CRL (new connections) and an ACL deny (open ones), at the sync
        ctx.sync_broker()
        return device_json(known_device(device_id))

    @app.post("/api/v1/deployments", dependencies=[Operator])
    def deploy(body: DeploymentIn) -> dict[str, Any]:
        name, _, version = body.model.partition("@")
        model = ctx.store.find_model(name, version)
        if model is None:
            raise HTTPException(404, f"unknown model {body.model}")
        chosen = [d for d in ctx.store.list_devices() if not d.revoked and (
            d.id in body.devices or (body.select and all(d.tags.get(k) == v for k, v in body.select.items())))]
        missing = set(body.devices) - {d.id for d in chosen}
        if missing:
            raise HTTPException(404, f"unknown or revoked device {sorted(missing)[0]!r}")
        if not chosen:
            raise HTTPException(422, "no device matches")
        ids = [d.id for d in chosen]
        ctx.store.set_desired(ids, model.id)
        ctx.orchestrator.publish_pending()
        return {"model": body.model, "devices": ids}

    @app.get("/api/v1/devices/{device_id}/events", dependencies=[Operator])
    def device_events(device_id: str) -> list[dict[str, Any]]:
        known_device(device_id)
        return [e.model_dump(mode="json") for e in ctx.store.events(device_id)]

    @app.get("/api/v1/artifacts/{digest}", response_model=None)
    def artifact(digest: str, token: Annotated[str, Depends(bearer)]) -> FileResponse:
        path = ctx.artifacts.path(digest)
        authorize_artifact(token, digest)
        if path is None:
            raise HTTPException(404, "no such artifact")
        return FileResponse(path, media_type="application/octet-stream", headers={"ETag": f'"{digest}"'})

    @app.get("/api/v1/artifacts/{digest}/delta/{base}", response_model=None)
    def artifact_delta(digest: str, base: str, token: Annotated[str, Depends(bearer)]) -> FileResponse:
        """Only the weights that changed from ``base`` (a bundle the device runs) to ``digest``."""
        authorize_artifact(token, digest)
        if ctx.store.model_by_sha(base) is None:
            raise HTTPException(404, "no such base artifact")
        try:
            path = ctx.artifacts.delta(base, digest)
        except BundleError as exc:
            raise HTTPException(422, f"no delta between these bundles: {exc}") from exc
        if path is None:
            raise HTTPException(404, "no such artifact")
        return FileResponse(path, media_type="application/octet-stream")

    def authorize_artifact(token: str, digest: str) -> None:
        """The operator, or a device this artifact is assigned to; anyone else is refused."""
        if hmac.compare_digest(token.encode(), ctx.operator_token.encode()):
            return
        assigned = ctx.store.assigned_artifacts(sha256_text(token))
        if assigned is None:
            raise HTTPException(403, "unknown or revoked device token")
        if digest not in assigned:
            raise HTTPException(403, "artifact is not assigned to this device")

    def known_device(device_id: str) -> Device:
        device = ctx.store.get_device(device_id)
        if device is None:
            raise HTTPException(404, f"unknown device {device_id!r}")
        return device

    def device_json(d: Device, models: dict[int, ModelVersion] | None = None) -> dict[str, Any]:
        def ref(model_id: int | None) -> str | None:
            if model_id is None:
                return None
            m = models.get(model_id) if models is not None else ctx.store.model_by_id(model_id)
            return f"{m.name}@{m.version}" if m else None

        return {"id": d.id, "tags": d.tags, "profile": d.profile, "revoked": d.revoked,
                "hardware": d.hardware or "generic",
                "desired": ref(d.desired_model_id), "shadow": ref(d.desired_shadow_id),
                "reported": d.reported, "last_seen": d.last_seen}

    app.include_router(rollout_router(ctx.orchestrator, ctx.store), dependencies=[Operator])
    app.include_router(telemetry_router(ctx.store), dependencies=[Operator])
    app.include_router(monitors_router(ctx.store, ctx.orchestrator, ctx.metrics), dependencies=[Operator])
    app.include_router(fielddata_router(ctx.store), dependencies=[Operator])
    app.include_router(keys_router(ctx.store, ctx.orchestrator, ctx.trusted_keys), dependencies=[Operator])
    app.include_router(export_router(ctx.store, ctx.metrics.export_status), dependencies=[Operator])
    if ctx.pki is not None:
        app.include_router(certificates_router(ctx.pki, ctx.store, ctx.sync_broker), dependencies=[Operator])
    return app


def model_json(m: ModelVersion) -> dict[str, Any]:
    return {"name": m.name, "version": m.version, "release": m.release, "sha256": m.sha256, "size": m.size,
            "key_id": m.key_id, "created": m.created, "metrics": m.manifest.get("metrics", {}),
            "encrypted": m.model_key_sealed is not None}
