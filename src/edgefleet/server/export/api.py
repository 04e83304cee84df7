"""``GET /api/v1/export/status``: the Kafka export's state as JSON, for operators and the dashboard."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from edgefleet.server.store import Store


class ExportStatusOut(BaseModel):
    """The Kafka export's state (the exporter's fields are null on a replica that exports nothing)."""

    enabled: bool
    bootstrap: str | None
    replica: str | None
    holder: str | None
    """The replica holding the export lease now (None: nobody)."""
    lease_held: bool
    broker_up: bool | None
    pending: int
    lag_s: float
    """Age of the oldest queued row, seconds."""
    exported_total: int
    last_error: str | None
    idempotent: bool | None = None
    replica_counts: dict[str, int] | None = None
    """This replica's exported, nonconforming and failed-round counts."""
    last_ack: float | None = None
    waiting_s: float | None = None
    """How long the round in flight has waited for its acknowledgements."""
    topics: dict[str, str] | None = None
    """Stream -> Kafka topic."""


def export_router(store: Store, status: Callable[[], dict[str, Any]] | None) -> APIRouter:
    """``status``: the running exporter's (None where this replica exports nothing: the shared backlog only)."""
    router = APIRouter()

    @router.get("/api/v1/export/status")
    def export_status() -> ExportStatusOut:
        if status is not None:
            return ExportStatusOut(**status())
        backlog = store.export_backlog()
        now = time.time()
        return ExportStatusOut(enabled=backlog.enabled, bootstrap=None, replica=None,
                               holder=backlog.holder if backlog.lease_until >= now else None, lease_held=False,
                               broker_up=None, pending=backlog.pending, lag_s=round(backlog.lag_s(now), 3),
                               exported_total=backlog.exported, last_error=None)

    return router
