"""REST endpoints for rollouts: create, list, status (with the audit trail), pause, resume, abort, promote."""


from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from edgefleet.server.orchestrator import Orchestrator, rollout_json
from edgefleet.server.rehearsal_api import rehearsal_router
from edgefleet.server.store import Store
from edgefleet.server.trust import rollback_admitted


class GateIn(BaseModel):
    expr: str = Field(max_length=2000, description="e.g. accuracy_drop > 5% OR latency_increase > 20%")
    action: Literal["abort", "pause"] = "abort"


class RolloutIn(BaseModel):
    model: str = Field(max_length=140, description="the candidate, name@version")
    select: dict[str, str] = Field(default_factory=dict, max_length=64, description="tags every target carries")
    profile: str | None = Field(default=None, max_length=64)
    waves: list[str] = Field(default_factory=lambda: ["100%"], min_length=1, max_length=100,
                             description="cumulative counts (5) or percentages (10%)")
    gates: list[str | GateIn] = Field(default_factory=list, max_length=32)
    mode: str = Field(default="canary", max_length=32, description="canary, shadow or ab")
    window_s: float = Field(default=60.0, ge=0, le=30 * 86400)
    install_timeout_s: float = Field(default=300.0, ge=0, le=30 * 86400)
    unknown_timeout_s: float = Field(default=600.0, ge=0, le=30 * 86400)
    baseline_s: float = Field(default=3600.0, ge=0, le=30 * 86400)
    min_windows: int = Field(default=10, ge=0, le=10**9, description="observations each cohort needs to judge")
    confidence: float = Field(default=0.95, ge=0.5, lt=1.0, description="two-sided confidence of gate decisions")
    inconclusive_timeout_s: float = Field(default=600.0, ge=0, le=30 * 86400)
    on_inconclusive: Literal["pause", "abort", "proceed"] = "pause"
    rollback_order: str | None = Field(default=None, max_length=128 * 1024,
                                       description="base64 signed rollback order: lets devices go back to an older "
                                                   "release (`edgefleet bundle rollback-order`)")


class PromoteIn(BaseModel):
    """A canary rollout of a shadow rollout's candidate; unset options keep their defaults."""

    waves: list[str] = Field(default_factory=lambda: ["100%"], min_length=1, max_length=100)
    gates: list[str | GateIn] = Field(default_factory=list, max_length=32,
                                      description="none: the shadow rollout's gates a canary can judge")
    window_s: float | None = Field(default=None, ge=0, le=30 * 86400)
    install_timeout_s: float | None = Field(default=None, ge=0, le=30 * 86400)
    unknown_timeout_s: float | None = Field(default=None, ge=0, le=30 * 86400)
    inconclusive_timeout_s: float | None = Field(default=None, ge=0, le=30 * 86400)
    on_inconclusive: Literal["pause", "abort", "proceed"] | None = None
    baseline_s: float | None = Field(default=None, ge=0, le=30 * 86400)
    min_windows: int | None = Field(default=None, ge=0, le=10**9)
    confidence: float | None = Field(default=None, ge=0.5, lt=1.0)


class CommandIn(BaseModel):
    note: str = Field(default="", max_length=500)


class DecisionOut(BaseModel):
    """One entry of a rollout's audit trail."""

    step: int
    kind: str = Field(description="assign, hold, pause, resume, rollback, done, ...")
    at: float
    wave: int
    reason: str = Field(description="why, in one line")
    actor: str
    devices: list[str]
    model: str | None
    role: str = Field(description="active or shadow")
    values: dict[str, Any] = Field(description="what it rests on: metrics, intervals, each gate's verdict")


class RolloutOut(BaseModel):
    """A rollout's status: plan, phase, progress; with the audit trail where asked for (not in lists)."""

    id: str
    candidate: str
    phase: str
    created: float
    updated: float
    wave: int = Field(description="the current wave, from 1 (0: none started)")
    waves: int
    mode: str | None
    targets: int
    control: int
    moved: int
    reason: str
    skipped: list[dict[str, Any]] = Field(description="selected devices left out, each with its reason")
    plan: dict[str, Any]
    promoted_from: str | None
    treatment_devices: list[str] | None = Field(default=None, description="A/B only")
    control_devices: list[str] | None = Field(default=None, description="A/B only")
    decisions: list[DecisionOut] | None = None
    wave_devices: dict[int, list[str]] | None = Field(default=None, description="the devices each wave moved")


def rollout_out(data: dict[str, Any]) -> RolloutOut:
    return RolloutOut.model_validate(data)


def rollout_router(orchestrator: Orchestrator, store: Store) -> APIRouter:
    router = APIRouter(prefix="/api/v1/rollouts")

    @router.post("", status_code=201, response_model_exclude_unset=True)
    def create(body: RolloutIn) -> RolloutOut:
        spec = body.model_dump()
        spec["candidate"] = spec.pop("model")
        order = spec.pop("rollback_order")
        with rollback_admitted(store, spec, order):  # an older release needs a signed rollback order
            row = orchestrator.create(spec)
        return rollout_out(rollout_json(row, store))

    @router.get("", response_model_exclude_unset=True)
    def list_rollouts() -> list[RolloutOut]:
        return [rollout_out(rollout_json(r, store, audit=False)) for r in store.list_rollouts()]

    @router.get("/{rollout_id}", response_model_exclude_unset=True)
    def status(rollout_id: str) -> RolloutOut:
        row = store.get_rollout(rollout_id)
        if row is None:
            raise HTTPException(404, f"unknown rollout {rollout_id!r}")
        return rollout_out(rollout_json(row, store))

    @router.post("/{rollout_id}/promote", status_code=201, response_model_exclude_unset=True)
    def promote(rollout_id: str, body: PromoteIn) -> RolloutOut:
        """Start a canary rollout of a shadow-passed rollout's candidate."""
        row = orchestrator.promote(rollout_id, body.model_dump())
        return rollout_out(rollout_json(row, store))

    @router.post("/{rollout_id}/{action}", response_model_exclude_unset=True)
    def command(rollout_id: str, action: Literal["pause", "resume", "abort"], body: CommandIn | None = None
                ) -> RolloutOut:
        row = orchestrator.command(rollout_id, action, "operator", body.note if body else "")
        return rollout_out(rollout_json(row, store))

    router.include_router(rehearsal_router(store))  # POST /rehearsal-profiles: edgefleet.server.rehearsal_api
    return router
