"""Devices (provision, list, show, revoke, events) and deployments (pin a model version on chosen devices)."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from edgefleet.server.broker_auth import hash_password
from edgefleet.server.certificates_api import device_certificate
from edgefleet.server.context import ServerContext
from edgefleet.server.schema import Device, ModelVersion
from edgefleet.server.trust import server_keyring
from edgefleet.transport import topics


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


class DeviceOut(BaseModel):
    id: str
    tags: dict[str, str]
    profile: str | None
    revoked: bool
    hardware: str
    desired: str | None = Field(description="the model version it should run, NAME@VERSION")
    shadow: str | None = Field(description="the shadow candidate it should run beside it")
    reported: dict[str, Any] | None = Field(description="its last reported state")
    last_seen: float | None = Field(description="unix seconds of its last report or telemetry")


class DeviceCredentials(BaseModel):
    """What a new device needs (``device add`` writes it to a file); shown once."""

    device_id: str
    server_url: str
    mqtt_url: str
    mqtt_username: str
    mqtt_password: str
    token: str
    tags: dict[str, str]
    profile: str | None
    hardware: str
    trusted_keys: dict[str, str]
    ca_cert: str | None = Field(default=None, description="with --tls: the fleet CA")
    client_cert: str | None = None
    client_key: str | None = None
    cert_serial: str | None = None
    cert_not_after: float | None = None


class DeploymentOut(BaseModel):
    model: str
    devices: list[str]


class EventOut(BaseModel):
    device: str
    seq: int
    ts: float
    kind: str
    name: str
    detail: dict[str, str | int | float | None]


def sha256_text(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def device_out(ctx: ServerContext, d: Device, models: dict[int, ModelVersion] | None = None) -> DeviceOut:
    def ref(model_id: int | None) -> str | None:
        if model_id is None:
            return None
        m = models.get(model_id) if models is not None else ctx.store.model_by_id(model_id)
        return f"{m.name}@{m.version}" if m else None

    return DeviceOut(id=d.id, tags=d.tags, profile=d.profile, revoked=d.revoked, hardware=d.hardware or "generic",
                     desired=ref(d.desired_model_id), shadow=ref(d.desired_shadow_id), reported=d.reported,
                     last_seen=d.last_seen)


def devices_router(ctx: ServerContext) -> APIRouter:
    """The router; every route is an operator's (the caller adds the dependency)."""
    router = APIRouter(prefix="/api/v1")

    def known_device(device_id: str) -> Device:
        device = ctx.store.get_device(device_id)
        if device is None:
            raise HTTPException(404, f"unknown device {device_id!r}")
        return device

    @router.post("/devices", status_code=201, response_model_exclude_unset=True)
    def add_device(body: DeviceIn) -> DeviceCredentials:
        token, password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        ctx.store.add_device(Device(id=body.id, token_sha256=sha256_text(token),
                                    mqtt_password_sha256=sha256_text(password),
                                    mqtt_password_hash=hash_password(password), tags=body.tags,
                                    profile=body.profile, hardware=body.hardware, created=time.time(),
                                    revoked=False))
        ctx.sync_broker(soon=True)  # batched with other adds (server.broker_sync)
        certificate = device_certificate(ctx.pki, body.id) if ctx.pki is not None else {}  # once it is new
        return DeviceCredentials(
            **certificate, device_id=body.id, server_url=ctx.public_url, mqtt_url=ctx.device_mqtt_url,
            mqtt_username=body.id, mqtt_password=password, token=token, tags=body.tags, profile=body.profile,
            hardware=body.hardware,
            trusted_keys={k: v.to_text() for k, v in server_keyring(ctx.store).trusted().items()})

    @router.get("/devices")
    def list_devices() -> list[DeviceOut]:
        models = {m.id: m for m in ctx.store.list_models()}
        return [device_out(ctx, d, models) for d in ctx.store.list_devices()]

    @router.get("/devices/{device_id}")
    def show_device(device_id: str) -> DeviceOut:
        return device_out(ctx, known_device(device_id))

    @router.post("/devices/{device_id}/revoke")
    def revoke_device(device_id: str) -> DeviceOut:
        known_device(device_id)
        ctx.store.set_revoked(device_id)
        if ctx.pki is not None:
            ctx.pki.revoke(device_id)  # the CRL (new connections) and an ACL deny (open ones), at the sync
        ctx.sync_broker()
        return device_out(ctx, known_device(device_id))

    @router.get("/devices/{device_id}/events")
    def device_events(device_id: str) -> list[EventOut]:
        known_device(device_id)
        return [EventOut.model_validate(e.model_dump(mode="json")) for e in ctx.store.events(device_id)]

    @router.post("/deployments")
    def deploy(body: DeploymentIn) -> DeploymentOut:
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
        return DeploymentOut(model=body.model, devices=ids)

    return router
