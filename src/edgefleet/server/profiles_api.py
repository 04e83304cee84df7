"""REST endpoints of measured device profiles (edgefleet.server.measured): facts, latency per model, scaling."""

from __future__ import annotations

from fastapi import APIRouter, Query

from edgefleet.server.measured import MeasuredProfile, measured_profiles
from edgefleet.server.store import Store

# a Unix time in seconds: 0 (everything) up to the year 5138, so the store's integer columns can compare it
Since = Query(0.0, ge=0.0, le=1e11, description="only telemetry after this Unix time, seconds")


def profiles_router(store: Store) -> APIRouter:
    router = APIRouter(prefix="/api/v1/profiles")

    @router.get("/measured")
    def all_measured(since: float = Since) -> list[MeasuredProfile]:
        """Every device profile with devices: their reported facts, each model's measured latency against the
        build host's, and the profile's scaling (device latency / host latency)."""
        return measured_profiles(store, since_ts=since)

    @router.get("/{name}/measured")
    def one_measured(name: str, since: float = Since) -> MeasuredProfile:
        """One profile's measured figures (``devices`` 0 and ``scaling`` null when none of its devices reported)."""
        return measured_profiles(store, name[:64], since_ts=since)[0]

    return router
