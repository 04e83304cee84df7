"""REST endpoint for one device's telemetry: what it stored, summed per model version (typed responses)."""

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from edgefleet.core.gates import CohortStats
from edgefleet.server.store import Store


class Latency(BaseModel):
    """Quantiles of the merged latency histograms, in ms; null when no window was inferred."""

    p50: float | None
    p95: float | None
    p99: float | None


class Cohort(BaseModel):
    """Summed telemetry of one model version (``CohortStats``)."""

    devices: int
    windows: int = Field(description="inference windows")
    labelled: int = Field(description="windows that came with a label")
    correct: int = Field(description="labelled windows inferred right")
    accuracy: float | None = Field(description="correct / labelled; null when nothing was labelled")
    errors: int
    latency_p95_ms: float | None
    mean_confidence: float | None
    escalations: int | None
    shadow_windows: int | None
    shadow_agree: int | None
    shadow_agreement: float | None = Field(default=None, description="shadow_agree / shadow_windows")


class ModelTelemetry(Cohort):
    model: str = Field(description="NAME@VERSION")
    latency_ms: Latency
    as_shadow: Cohort | None = Field(default=None, description="what it did as a shadow candidate, if it was one")


class DeviceTelemetry(BaseModel):
    device: str
    batches: int = Field(description="raw telemetry batches stored (not yet rolled up)")
    gaps: int = Field(description="telemetry sequence numbers never received")
    models: list[ModelTelemetry] = Field(description="one entry per model version that ran, by name")


def latency(stats: CohortStats) -> Latency:
    hist = stats.latency
    return Latency(p50=hist.quantile(0.5), p95=hist.quantile(0.95), p99=hist.quantile(0.99))


def telemetry_router(store: Store) -> APIRouter:
    router = APIRouter(prefix="/api/v1/devices")

    @router.get("/{device_id}/telemetry", responses={404: {"description": "unknown device"}})
    def device_telemetry(device_id: str, since: float = 0.0) -> DeviceTelemetry:
        """The device's stored telemetry since ``since`` (unix seconds), summed per model version."""
        totals = store.device_totals(device_id, since)
        if totals is None:
            raise HTTPException(404, f"unknown device {device_id!r}")
        refs = sorted({*totals.models, *totals.shadow})  # a model that only ran as a shadow is listed too
        models = [ModelTelemetry(model=ref, **stats.to_json(), latency_ms=latency(stats),
                                 as_shadow=Cohort(**totals.shadow[ref].to_json()) if ref in totals.shadow else None)
                  for ref, stats in ((r, totals.models.get(r) or CohortStats()) for r in refs)]
        return DeviceTelemetry(device=device_id, batches=totals.batches, gaps=totals.gaps, models=models)

    return router
