"""REST endpoints for monitors (create, list, show, delete) and the fleet alerts they raise (list).

Making the router also attaches the server's :class:`~edgefleet.learn.monitors.MonitorRunner` to the
orchestrator, whose tick judges the monitors; a raised alert is counted in ``/metrics``
(``edgefleet_alerts_total``)."""

import secrets
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from edgefleet.learn.monitors import DEFAULT_WINDOW_S, MonitorRunner, MonitorSpec, attach
from edgefleet.server.metrics import Metrics
from edgefleet.server.orchestrator import Orchestrator
from edgefleet.server.store import Store
from edgefleet.server.store.learn_tables import AlertRow, MonitorRow


class MonitorIn(BaseModel):
    expr: str = Field(max_length=2000, description="e.g. drift_psi > 0.2 OR accuracy < 90% OR silent_for > 15m")
    model: str = Field(max_length=64, description="model NAME: every version of it is watched")
    select: dict[str, str] = Field(default_factory=dict, max_length=64, description="tags every watched device has")
    webhook: str | None = Field(default=None, max_length=2000, description="POSTed a JSON alert when it fires")
    pause_rollouts: bool = Field(default=False, description="firing pauses the running rollouts of the model")
    window_s: float = Field(default=DEFAULT_WINDOW_S, gt=0, le=30 * 86400, description="telemetry judged")


class MonitorOut(BaseModel):
    """A monitor and its last verdict."""

    id: str
    expr: str
    model: str = Field(description="model NAME: every version of it is watched")
    select: dict[str, str]
    webhook: str | None
    pause_rollouts: bool
    window_s: float
    state: str = Field(description="ok, firing or unknown")
    changed: float = Field(description="when the state last changed")
    checked: float | None
    explanation: str
    values: dict[str, Any]
    created: float


class AlertOut(BaseModel):
    """An alert a monitor raised; active until it clears."""

    id: int
    monitor: str
    model: str
    expr: str
    raised: float
    cleared: float | None
    active: bool
    explanation: str
    values: dict[str, Any]
    paused_rollouts: list[str]


class Deleted(BaseModel):
    deleted: str


def monitor_json(row: MonitorRow) -> dict[str, Any]:
    return {"id": row.id, "expr": row.expr, "model": row.model, "select": row.select, "webhook": row.webhook,
            "pause_rollouts": row.pause_rollouts, "window_s": row.window_s, "state": row.state,
            "changed": row.changed, "checked": row.checked, "explanation": row.explanation, "values": row.values,
            "created": row.created}


def alert_json(row: AlertRow) -> dict[str, Any]:
    return {"id": row.id, "monitor": row.monitor, "model": row.model, "expr": row.expr, "raised": row.raised,
            "cleared": row.cleared, "active": row.cleared is None, "explanation": row.explanation,
            "values": row.values, "paused_rollouts": row.paused}


def monitors_router(store: Store, orchestrator: Orchestrator, metrics: Metrics) -> APIRouter:
    router = APIRouter(prefix="/api/v1")
    attach(orchestrator, MonitorRunner(
        store, pause=lambda rollout, note: orchestrator.command(rollout, "pause", "monitor", note),
        on_alert=lambda alert: metrics.alerts.labels(alert.model).inc()))

    @router.post("/monitors", status_code=201)
    def create(body: MonitorIn) -> MonitorOut:
        spec = MonitorSpec(body.expr, body.model, body.select, body.webhook, body.pause_rollouts, body.window_s)
        gate = spec.check()  # ConfigError: 422 with one line
        if not any(m.name == body.model for m in store.list_models()):
            raise HTTPException(404, f"unknown model {body.model!r}")
        now = time.time()
        row = store.add_monitor(MonitorRow(id=secrets.token_hex(4), expr=gate.text, model=spec.model,
                                           select=dict(spec.select), webhook=spec.webhook,
                                           pause_rollouts=spec.pause_rollouts, window_s=spec.window_s,
                                           state="unknown", changed=now, checked=None, explanation="not judged yet",
                                           values={}, created=now))
        return MonitorOut(**monitor_json(row))

    @router.get("/monitors")
    def list_monitors() -> list[MonitorOut]:
        return [MonitorOut(**monitor_json(m)) for m in store.list_monitors()]

    @router.get("/monitors/{monitor_id}")
    def show(monitor_id: str) -> MonitorOut:
        row = store.get_monitor(monitor_id)
        if row is None:
            raise HTTPException(404, f"unknown monitor {monitor_id!r}")
        return MonitorOut(**monitor_json(row))

    @router.delete("/monitors/{monitor_id}")
    def delete(monitor_id: str) -> Deleted:
        store.delete_monitor(monitor_id)  # StoreError "unknown monitor": 404
        return Deleted(deleted=monitor_id)

    @router.get("/alerts")
    def alerts(active: bool = False, limit: int = Query(1000, ge=1, le=10_000)) -> list[AlertOut]:
        return [AlertOut(**alert_json(a)) for a in store.list_alerts(active=active, limit=max(1, min(limit, 10_000)))]

    return router
