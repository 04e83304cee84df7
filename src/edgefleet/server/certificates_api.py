"""Device certificates over the API: what ``device add`` hands a device, and ``device renew``.

A device's certificate (:mod:`edgefleet.server.pki`) names the device id as its Common Name, which the brokers
take as its MQTT user name; the per-device topic rules are unchanged. Renewing issues a new certificate and
leaves the old one valid until it expires (the device switches when it receives its new credentials), unless
``revoke_previous`` is asked for (a key that leaked).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from edgefleet.server.broker_auth import SERVER_USER
from edgefleet.server.pki import FleetCA
from edgefleet.server.store import Store


class RenewIn(BaseModel):
    revoke_previous: bool = False


class CertificateOut(BaseModel):
    device_id: str
    ca_cert: str = Field(description="the fleet CA (PEM)")
    client_cert: str
    client_key: str
    cert_serial: str = Field(description="hex")
    cert_not_after: float = Field(description="unix seconds")


def device_certificate(ca: FleetCA, device_id: str) -> dict[str, Any]:
    """Credentials fields for a new certificate of ``device_id``: the CA to trust, the certificate and its key."""
    if device_id == SERVER_USER:
        raise HTTPException(422, f"{SERVER_USER!r} is the server's own identity, not a device id")
    issued = ca.issue(device_id)
    return {"ca_cert": ca.ca_pem, "client_cert": issued.cert_pem, "client_key": issued.key_pem,
            "cert_serial": f"{issued.serial:x}", "cert_not_after": issued.not_after}


def certificates_router(ca: FleetCA, store: Store, sync_broker: Callable[[], None]) -> APIRouter:
    """``POST /api/v1/devices/{id}/certificate``: renew a device's certificate (operator only)."""
    router = APIRouter()

    @router.post("/api/v1/devices/{device_id}/certificate")
    def renew(device_id: str, body: RenewIn | None = None) -> CertificateOut:
        device = store.get_device(device_id)
        if device is None:
            raise HTTPException(404, f"unknown device {device_id!r}")
        if device.revoked:
            raise HTTPException(409, f"device {device_id!r} is revoked: it gets no new certificate")
        fields = device_certificate(ca, device_id)
        if body is not None and body.revoke_previous:
            ca.revoke(device_id, keep=int(fields["cert_serial"], 16))
            sync_broker()
        return CertificateOut.model_validate({"device_id": device_id, **fields})

    return router
