"""The control plane's REST API (FastAPI): models, devices, deployments, artifacts, telemetry."""

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from edgefleet import __version__
from edgefleet.bundle.signing import PublicKey
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import BundleError, EdgefleetError, StoreError
from edgefleet.server.aggregate import sequence_gaps, summarize
from edgefleet.server.artifacts import ArtifactStore
from edgefleet.server.schema import Device, ModelVersion
from edgefleet.server.store import Store
from edgefleet.transport import topics
from edgefleet.transport.messages import DesiredState, ModelRef

MAX_BUNDLE_BYTES = 256 * 1024 * 1024


@dataclass
class ServerContext:
    """Everything the API needs, wired by ``server.main``."""

    store: Store
    artifacts: ArtifactStore
    trusted_keys: dict[str, PublicKey]
    operator_token: str
    public_url: str
    device_mqtt_url: str
    publish_desired: Callable[[DesiredState], None]


class DeviceIn(BaseModel):
    id: str = Field(pattern=topics.DEVICE_ID.pattern)
    tags: dict[str, str] = Field(default_factory=dict)
    profile: str | None = None


class DeploymentIn(BaseModel):
    model: str = Field(description="name@version")
    devices: list[str] = Field(default_factory=list)
    select: dict[str, str] = Field(default_factory=dict, description="tags every chosen device carries")


def sha256_text(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def create_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="edgefleet control plane", version=__version__)

    def bearer(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "missing bearer token")
        return token

    def operator(token: Annotated[str, Depends(bearer)]) -> None:
        if not hmac.compare_digest(token, ctx.operator_token):
            raise HTTPException(403, "operator token required")

    Operator = Depends(operator)

    @app.exception_handler(EdgefleetError)
    async def _edgefleet_error(_request: Request, exc: EdgefleetError) -> JSONResponse:
        status = 409 if isinstance(exc, StoreError) else 422
        return JSONResponse({"detail": str(exc), "reason": getattr(exc, "reason", None)}, status_code=status)

    @app.get("/api/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.post("/api/v1/models", dependencies=[Operator], status_code=201)
    async def push_model(request: Request) -> dict[str, Any]:
        data = await request.body()
        if len(data) > MAX_BUNDLE_BYTES:
            raise HTTPException(413, "bundle too large")
        try:
            accepted = decide(data, TrustState(keys=ctx.trusted_keys))
        except BundleError as exc:
            raise HTTPException(422, f"bundle refused ({exc.reason}): {exc}") from exc
        digest = ctx.artifacts.put(data)
        row = ctx.store.add_model(accepted.manifest, digest, len(data), accepted.key_id)
        return model_json(row)

    @app.get("/api/v1/models", dependencies=[Operator])
    def list_models() -> list[dict[str, Any]]:
        return [model_json(m) for m in ctx.store.list_models()]

    @app.post("/api/v1/devices", dependencies=[Operator], status_code=201)
    def add_device(body: DeviceIn) -> dict[str, Any]:
        token, password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        ctx.store.add_device(Device(id=body.id, token_sha256=sha256_text(token),
                                    mqtt_password_sha256=sha256_text(password), tags=body.tags,
                                    profile=body.profile, created=time.time(), revoked=False))
        return {"device_id": body.id, "server_url": ctx.public_url, "mqtt_url": ctx.device_mqtt_url,
                "mqtt_username": body.id, "mqtt_password": password, "token": token,
                "trusted_keys": {k: v.to_text() for k, v in ctx.trusted_keys.items()}}

    @app.get("/api/v1/devices", dependencies=[Operator])
    def list_devices() -> list[dict[str, Any]]:
        return [device_json(d) for d in ctx.store.list_devices()]

    @app.get("/api/v1/devices/{device_id}", dependencies=[Operator])
    def show_device(device_id: str) -> dict[str, Any]:
        return device_json(known_device(device_id))

    @app.post("/api/v1/devices/{device_id}/revoke", dependencies=[Operator])
    def revoke_device(device_id: str) -> dict[str, Any]:
        known_device(device_id)
        ctx.store.set_revoked(device_id)
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
        for device_id in ids:
            ctx.publish_desired(DesiredState(device=device_id, model=model_ref(model)))
        return {"model": body.model, "devices": ids}

    @app.get("/api/v1/devices/{device_id}/telemetry", dependencies=[Operator])
    def device_telemetry(device_id: str) -> dict[str, Any]:
        known_device(device_id)
        batches = ctx.store.telemetry(device_id)
        return {"device": device_id, "batches": len(batches), "gaps": sequence_gaps(b.seq for b in batches),
                "models": [s.to_json() for s in summarize(batches).values()]}

    @app.get("/api/v1/devices/{device_id}/events", dependencies=[Operator])
    def device_events(device_id: str) -> list[dict[str, Any]]:
        known_device(device_id)
        return [e.model_dump(mode="json") for e in ctx.store.events(device_id)]

    @app.get("/api/v1/artifacts/{digest}")
    def artifact(digest: str, token: Annotated[str, Depends(bearer)]) -> FileResponse:
        path = ctx.artifacts.path(digest)
        if not hmac.compare_digest(token, ctx.operator_token):
            device = device_for_token(token)
            desired = ctx.store.model_by_id(device.desired_model_id) if device.desired_model_id else None
            if desired is None or desired.sha256 != digest:
                raise HTTPException(403, "artifact is not assigned to this device")
        if path is None:
            raise HTTPException(404, "no such artifact")
        return FileResponse(path, media_type="application/octet-stream", headers={"ETag": f'"{digest}"'})

    def known_device(device_id: str) -> Device:
        device = ctx.store.get_device(device_id)
        if device is None:
            raise HTTPException(404, f"unknown device {device_id!r}")
        return device

    def device_for_token(token: str) -> Device:
        device = ctx.store.device_by_token(sha256_text(token))
        if device is None or device.revoked:
            raise HTTPException(403, "unknown or revoked device token")
        return device

    def device_json(d: Device) -> dict[str, Any]:
        desired = ctx.store.model_by_id(d.desired_model_id) if d.desired_model_id else None
        return {"id": d.id, "tags": d.tags, "profile": d.profile, "revoked": d.revoked,
                "desired": f"{desired.name}@{desired.version}" if desired else None,
                "reported": d.reported, "last_seen": d.last_seen}

    return app


def model_ref(model: ModelVersion) -> ModelRef:
    return ModelRef(name=model.name, version=model.version, release=model.release, sha256=model.sha256,
                    size=model.size, url=f"/api/v1/artifacts/{model.sha256}")


def model_json(m: ModelVersion) -> dict[str, Any]:
    return {"name": m.name, "version": m.version, "release": m.release, "sha256": m.sha256, "size": m.size,
            "key_id": m.key_id, "created": m.created, "metrics": m.manifest.get("metrics", {})}
