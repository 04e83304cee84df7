"""REST endpoints of measured device profiles (edgefleet.server.measured): facts, latency per model, scaling."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from edgefleet.server.measured import measured_profiles
from edgefleet.server.store import Store

# a Unix time in seconds: 0 (everything) up to the year 5138, so the store's integer columns can compare it
Since = Query(0.0, ge=0.0, le=1e11, description="only telemetry after this Unix time, seconds")


def profiles_router(store: Store) -> APIRouter:
    router = APIRouter(prefix="/api/v1/profiles")

    @router.get("/measured")
    def all_measured(since: float = Since) -> list[dict[str, Any]]:
        """Every device profile with devices: their reported facts, each model's measured latency against the
        build host's, and the profile's scaling (device latency / host latency)."""
        return [p.to_json() for p in measured_profiles(store, since_ts=since)]

    @router.get("/{name}/measured")
    def one_measured(name: str, since: float = Since) -> dict[str, Any]:
        """One profile's measured figures (``devices`` 0 and ``scaling`` null when none of its devices reported)."""
        return measured_profiles(store, name[:64], since_ts=since)[0].to_json()

    return router
