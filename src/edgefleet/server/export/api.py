"""``GET /api/v1/export/status``: the Kafka export's state as JSON, for operators and the dashboard."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter

from edgefleet.server.store import Store


def export_router(store: Store, status: Callable[[], dict[str, Any]] | None) -> APIRouter:
    """``status``: the running exporter's (None where this replica exports nothing: the shared backlog only)."""
    router = APIRouter()

    @router.get("/api/v1/export/status")
    def export_status() -> dict[str, Any]:
        if status is not None:
            return status()
        backlog = store.export_backlog()
        now = time.time()
        return {"enabled": backlog.enabled, "bootstrap": None, "replica": None,
                "holder": backlog.holder if backlog.lease_until >= now else None, "lease_held": False,
                "broker_up": None, "pending": backlog.pending, "lag_s": round(backlog.lag_s(now), 3),
                "exported_total": backlog.exported, "last_error": None}

    return router
