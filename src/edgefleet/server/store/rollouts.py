"""Rollouts in the store: create, advance exactly once across replicas, the audit trail.

A step is taken inside one transaction that (1) locks the rollout's row (``SELECT ... FOR UPDATE SKIP
LOCKED`` on PostgreSQL: a replica that finds it locked skips it), (2) writes the new state with an optimistic
version check (a replica that read an older state fails and rolls back: the guard where row locks do not
exist, as on SQLite), (3) records the decisions under a unique (rollout, step, index), and (4) changes the
devices' desired models. Either all of it happens once, or none of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from edgefleet.core.rollout import FINAL, Decision
from edgefleet.errors import StoreError
from edgefleet.server.schema import DecisionRow, ModelVersion, RolloutRow, RolloutWave
from edgefleet.server.store.core import StoreBase, assign_desired


@dataclass(frozen=True)
class Advance:
    """What one step changes: the machine's new state and what it decided."""

    state: dict[str, Any]
    phase: str
    step_no: int
    wake_at: float | None
    decisions: Sequence[Decision]


class RolloutStore(StoreBase):
    """Rollouts, their waves and decisions."""

    def create_rollout(self, rollout_id: str, candidate: str, plan: dict[str, Any], first: Advance,
                       actor: str) -> None:
        now = time.time()
        try:
            with self.session() as s:
                row = RolloutRow(id=rollout_id, candidate=candidate, plan=plan, state=first.state, phase=first.phase,
                                 created=now, updated=now, wake_at=first.wake_at)
                s.add(row)
                s.flush()
                self._record(s, rollout_id, first, actor)
        except IntegrityError as exc:
            raise StoreError(f"rollout {rollout_id} already exists") from exc

    def advance_rollout(self, rollout_id: str, compute: Callable[[RolloutRow], Advance | None], actor: str, *,
                        skip_locked: bool = True) -> Advance | None:
        """Lock the rollout, let ``compute`` decide, and write the result; None if locked, unchanged or lost.

        ``skip_locked=False`` waits for another replica's step instead of skipping (operator commands).
        """
        query = select(RolloutRow).where(RolloutRow.id == rollout_id)
        if self.dialect == "postgresql":
            query = query.with_for_update(skip_locked=skip_locked)
        try:
            with self.session() as s:
                row = s.scalar(query)
                if row is None or row.phase in FINAL:
                    return None
                result = compute(row)
                if result is None:
                    return None
                row.state, row.phase, row.wake_at, row.updated = result.state, result.phase, result.wake_at, time.time()
                s.flush()  # the version check: StaleDataError if another replica moved it meanwhile
                self._record(s, rollout_id, result, actor)
                return result
        except (StaleDataError, IntegrityError):
            return None
        except StoreError as exc:
            if "could not serialize" in str(exc) or "locked" in str(exc):
                return None
            raise

    def get_rollout(self, rollout_id: str) -> RolloutRow | None:
        with self.session() as s:
            return s.get(RolloutRow, rollout_id)

    def list_rollouts(self) -> list[RolloutRow]:
        with self.session() as s:
            return list(s.scalars(select(RolloutRow).order_by(RolloutRow.created)))

    def active_rollouts(self) -> list[RolloutRow]:
        with self.session() as s:
            return list(s.scalars(select(RolloutRow).where(RolloutRow.phase.not_in(FINAL))
                                  .order_by(RolloutRow.created)))

    def decisions(self, rollout_id: str) -> list[DecisionRow]:
        with self.session() as s:
            return list(s.scalars(select(DecisionRow).where(DecisionRow.rollout_id == rollout_id)
                                  .order_by(DecisionRow.step_no, DecisionRow.idx)))

    def waves(self, rollout_id: str) -> list[RolloutWave]:
        with self.session() as s:
            return list(s.scalars(select(RolloutWave).where(RolloutWave.rollout_id == rollout_id)
                                  .order_by(RolloutWave.wave)))

    def _record(self, s: Session, rollout_id: str, result: Advance, actor: str) -> None:
        """Write the decisions (audit trail) and carry out their device assignments, in ``s``'s transaction."""
        ids: dict[str, int] = {}

        def model_id(ref: str | None) -> int | None:
            if ref is None:
                return None
            if ref not in ids:
                name, _, version = ref.partition("@")
                found = s.scalar(select(ModelVersion.id).where(ModelVersion.name == name,
                                                               ModelVersion.version == version))
                if found is None:
                    raise StoreError(f"unknown model {ref}")
                ids[ref] = found
            return ids[ref]

        for idx, decision in enumerate(result.decisions):
            s.add(DecisionRow(rollout_id=rollout_id, step_no=result.step_no, idx=idx, kind=decision.kind,
                              at=decision.at, wave=decision.wave, reason=decision.reason, actor=actor,
                              detail=_jsonable(decision.to_json())))
            shadow = decision.role == "shadow"
            if decision.kind == "assign" and decision.devices:
                assign_desired(s, list(decision.devices), model_id(decision.model), shadow=shadow)
                if decision.model is not None:
                    s.merge(RolloutWave(rollout_id=rollout_id, wave=decision.wave, started=decision.at,
                                        devices=list(decision.devices)))
            elif decision.kind == "rollback":
                by_target: dict[str | None, list[str]] = {}
                for device, ref in decision.restore.items():
                    by_target.setdefault(ref, []).append(device)
                for ref, devices in by_target.items():
                    assign_desired(s, sorted(devices), model_id(ref), shadow=shadow)
        s.flush()


def _jsonable(value: Any) -> Any:
    """Decision values as plain JSON (NaN and infinities become None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value
