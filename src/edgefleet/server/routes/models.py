"""Model versions: push a signed bundle, list them, their fleet telemetry, and their build reports."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, HTTPException, Request
from pydantic import BaseModel, Field

from edgefleet.bundle.encrypt import ModelKey
from edgefleet.core.cohorts import CohortStats
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import BundleError
from edgefleet.server.build_reports import BuildReports
from edgefleet.server.context import ServerContext
from edgefleet.server.schema import ModelVersion
from edgefleet.server.telemetry_api import Cohort
from edgefleet.server.trust import server_keyring

MODEL_KEY_HEADER = "X-Edgefleet-Model-Key"
"""An encrypted bundle's model key (base64) on ``POST /api/v1/models``; it is stored only sealed."""


class ModelOut(BaseModel):
    name: str
    version: str
    release: int
    sha256: str
    size: int = Field(description="bundle bytes")
    key_id: str = Field(description="the signing key")
    created: float
    metrics: dict[str, Any] = Field(description="the manifest's metrics (accuracy, latency... as built)")
    encrypted: bool


class FleetModelTelemetry(Cohort):
    """A model version's telemetry summed over every device that ran it."""

    model: str = Field(description="NAME@VERSION")
    as_shadow: Cohort | None = Field(default=None, description="what it did as a shadow candidate, if it was one")


class ReportStored(BaseModel):
    model: str
    candidates: int
    chosen: str | None


def model_out(m: ModelVersion) -> ModelOut:
    return ModelOut(name=m.name, version=m.version, release=m.release, sha256=m.sha256, size=m.size,
                    key_id=m.key_id, created=m.created, metrics=m.manifest.get("metrics", {}),
                    encrypted=m.model_key_sealed is not None)


def models_router(ctx: ServerContext) -> APIRouter:
    """The router; every route is an operator's (the caller adds the dependency)."""
    router = APIRouter(prefix="/api/v1/models")
    reports = BuildReports(ctx.artifacts.root / "reports")

    @router.post("", status_code=201)
    async def push_model(request: Request) -> ModelOut:
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
        return model_out(row)

    def sealed_key(key: ModelKey | None, encrypted: bool, digest: str) -> str | None:
        """An encrypted bundle's key sealed with the master key, to be stored (never the key in clear)."""
        if key is None:
            return None
        if not encrypted:
            raise HTTPException(422, "the bundle is not encrypted: a model key goes only with an encrypted bundle")
        if ctx.model_keys is None:
            raise HTTPException(422, "this server keeps no model keys (no master key): encrypted bundles refused")
        return ctx.model_keys.seal(key, digest)

    @router.get("")
    def list_models() -> list[ModelOut]:
        return [model_out(m) for m in ctx.store.list_models()]

    def known(name: str, version: str) -> str:
        if ctx.store.find_model(name, version) is None:
            raise HTTPException(404, f"unknown model {name}@{version}")
        return f"{name}@{version}"

    @router.get("/{name}/{version}/telemetry")
    def model_telemetry(name: str, version: str, since: float = 0.0) -> FleetModelTelemetry:
        ref = known(name, version)
        stats, devices = ctx.store.model_stats(ref, since)
        as_shadow = CohortStats()  # what it did beside the active model, with its agreement (E14)
        for per_model in ctx.store.device_model_stats(None, since)[1].values():
            if ref in per_model:
                as_shadow.add(per_model[ref])
        data = {"model": ref, "devices": devices, **stats.to_json(),
                "as_shadow": as_shadow.to_json() if as_shadow.devices else None}
        return FleetModelTelemetry.model_validate(data)

    @router.put("/{name}/{version}/report")
    def put_report(name: str, version: str, report: dict[str, Any] = Body(...)) -> ReportStored:
        """Attach a build report (``edgefleet build --report``'s REPORT.json) to a model version."""
        ref = known(name, version)
        reports.put(ref, report)  # ConfigError: 422 with one line
        return ReportStored(model=ref, candidates=len(report["candidates"]), chosen=report.get("chosen"))

    @router.get("/{name}/{version}/report", responses={404: {"description": "unknown model or no report"}})
    def get_report(name: str, version: str) -> dict[str, Any]:
        """The build report attached to a model version (REPORT.json as it was uploaded)."""
        ref = known(name, version)
        report = reports.get(ref)
        if report is None:
            raise HTTPException(404, f"no build report for {ref}")
        return report

    return router
