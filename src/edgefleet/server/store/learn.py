"""The learning loop in the store: monitors and their alerts, hard examples and their labels.

A monitor's state changes by compare-and-set (:meth:`LearnStore.transition_monitor`), so that of several
replicas evaluating the same monitor one raises (or clears) its alert. Hard examples are kept per model name up
to a bound, the oldest dropped first.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import delete, func, select, update

from edgefleet.errors import StoreError
from edgefleet.server.store.core import StoreBase
from edgefleet.server.store.learn_tables import AlertRow, HardExampleRow, MonitorRow

HARD_EXAMPLES_PER_MODEL = 5000
"""Hard examples kept per model name (every version together); the oldest go first."""


class LearnStore(StoreBase):
    """Monitors, alerts and field data (hard examples with labels)."""

    hard_examples_per_model = HARD_EXAMPLES_PER_MODEL

    # monitors ---------------------------------------------------------------------------------
    def add_monitor(self, row: MonitorRow) -> MonitorRow:
        with self.session() as s:
            s.add(row)
        return row

    def list_monitors(self) -> list[MonitorRow]:
        with self.session() as s:
            return list(s.scalars(select(MonitorRow).order_by(MonitorRow.created, MonitorRow.id)))

    def get_monitor(self, monitor_id: str) -> MonitorRow | None:
        with self.session() as s:
            return s.get(MonitorRow, monitor_id)

    def delete_monitor(self, monitor_id: str) -> None:
        """Drop a monitor (its alerts stay, cleared); StoreError for an unknown one."""
        with self.session() as s:
            gone: Any = s.execute(delete(MonitorRow).where(MonitorRow.id == monitor_id))
            if not gone.rowcount:
                raise StoreError(f"unknown monitor {monitor_id!r}")
            s.execute(update(AlertRow).where(AlertRow.monitor == monitor_id, AlertRow.cleared.is_(None))
                      .values(cleared=time.time()))

    def transition_monitor(self, monitor_id: str, expected: str, state: str, explanation: str,
                           values: Mapping[str, Any], now: float) -> bool:
        """Move a monitor from ``expected`` to ``state`` (the same state: just note the check); False when its
        state was not ``expected`` any more (another replica moved it first)."""
        changes: dict[str, Any] = {"state": state, "explanation": explanation[:2000], "values": dict(values),
                                   "checked": now}
        if state != expected:
            changes["changed"] = now
        with self.session() as s:
            result: Any = s.execute(update(MonitorRow).where(MonitorRow.id == monitor_id, MonitorRow.state == expected)
                                    .values(changes))
            return bool(result.rowcount)

    # alerts -----------------------------------------------------------------------------------
    def raise_alert(self, monitor: MonitorRow, explanation: str, values: Mapping[str, Any], now: float) -> AlertRow:
        row = AlertRow(monitor=monitor.id, model=monitor.model, expr=monitor.expr, raised=now, cleared=None,
                       explanation=explanation[:2000], values=dict(values), paused=[])
        with self.session() as s:
            s.add(row)
        return row

    def note_paused(self, alert_id: int, rollouts: list[str]) -> None:
        with self.session() as s:
            s.execute(update(AlertRow).where(AlertRow.id == alert_id).values(paused=rollouts))

    def clear_alerts(self, monitor_id: str, now: float) -> int:
        """Mark the monitor's open alerts cleared; how many."""
        with self.session() as s:
            result: Any = s.execute(update(AlertRow).where(AlertRow.monitor == monitor_id, AlertRow.cleared.is_(None))
                                    .values(cleared=now))
            return int(result.rowcount or 0)

    def list_alerts(self, *, active: bool = False, limit: int = 1000) -> list[AlertRow]:
        """Newest first; with ``active`` only those not cleared."""
        query = select(AlertRow).order_by(AlertRow.id.desc()).limit(limit)
        if active:
            query = query.where(AlertRow.cleared.is_(None))
        with self.session() as s:
            return list(s.scalars(query))

    # hard examples ----------------------------------------------------------------------------
    def add_hard_examples(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Store hard examples (the columns of :class:`HardExampleRow` but id and labels), then drop the oldest
        of each model name beyond :attr:`hard_examples_per_model`; how many were stored."""
        items = [HardExampleRow(**dict(r), received=time.time()) for r in rows]
        if not items:
            return 0
        with self.session() as s:
            s.add_all(items)
            s.flush()
            for name in sorted({i.name for i in items}):
                count = s.scalar(select(func.count()).select_from(HardExampleRow).where(HardExampleRow.name == name))
                excess = int(count or 0) - self.hard_examples_per_model
                if excess > 0:
                    oldest = select(HardExampleRow.id).where(HardExampleRow.name == name) \
                        .order_by(HardExampleRow.ts, HardExampleRow.id).limit(excess)
                    doomed = list(s.scalars(oldest))
                    s.execute(delete(HardExampleRow).where(HardExampleRow.id.in_(doomed)))
        return len(items)

    def hard_examples(self, name: str, *, version: str | None = None, device: str | None = None,
                      labelled: bool | None = None, since_ts: float = 0.0, limit: int = 100_000
                      ) -> list[HardExampleRow]:
        """A model's stored hard examples, oldest first, optionally of one version or device, labelled or not."""
        query = select(HardExampleRow).where(HardExampleRow.name == name, HardExampleRow.ts >= since_ts)
        if version is not None:
            query = query.where(HardExampleRow.model == f"{name}@{version}")
        if device is not None:
            query = query.where(HardExampleRow.device == device)
        if labelled is not None:
            query = query.where(HardExampleRow.label.is_not(None) if labelled else HardExampleRow.label.is_(None))
        with self.session() as s:
            return list(s.scalars(query.order_by(HardExampleRow.ts, HardExampleRow.id).limit(limit)))

    def hard_example(self, example_id: int) -> HardExampleRow | None:
        with self.session() as s:
            return s.get(HardExampleRow, example_id)

    def label_example(self, example_id: int, label: str, source: str = "operator") -> HardExampleRow:
        """Set one hard example's ground truth; StoreError for an unknown example."""
        with self.session() as s:
            row = s.get(HardExampleRow, example_id)
            if row is None:
                raise StoreError(f"unknown hard example {example_id}")
            row.label, row.label_source, row.labelled_at = label, source, time.time()
            return row

    def label_range(self, device: str, start_ts: float, end_ts: float, label: str, *, name: str | None = None,
                    source: str = "range") -> int:
        """Label every hard example of ``device`` (of model ``name``) sent from ``start_ts`` to ``end_ts``."""
        query = update(HardExampleRow).where(HardExampleRow.device == device, HardExampleRow.ts >= start_ts,
                                             HardExampleRow.ts <= end_ts)
        if name is not None:
            query = query.where(HardExampleRow.name == name)
        with self.session() as s:
            result: Any = s.execute(query.values(label=label, label_source=source, labelled_at=time.time()))
            return int(result.rowcount or 0)

    def device_field_labels(self, devices: Iterable[str], since_ts: float = 0.0
                            ) -> list[tuple[str, str, str, str]]:
        """(device, model ref, predicted, label) of the labelled hard examples ``devices`` sent since ``since_ts``."""
        ids = sorted(set(devices))
        out: list[tuple[str, str, str, str]] = []
        with self.session() as s:
            for i in range(0, len(ids), 500):
                out += [(d, m, p, str(lbl)) for d, m, p, lbl in s.execute(
                    select(HardExampleRow.device, HardExampleRow.model, HardExampleRow.predicted, HardExampleRow.label)
                    .where(HardExampleRow.device.in_(ids[i:i + 500]), HardExampleRow.ts >= since_ts,
                           HardExampleRow.label.is_not(None)))]
        return out

    def field_labels(self, name: str, devices: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
        """(model ref, predicted, label) of every labelled hard example of model ``name`` (of ``devices``)."""
        query = select(HardExampleRow.model, HardExampleRow.predicted, HardExampleRow.label).where(
            HardExampleRow.name == name, HardExampleRow.label.is_not(None))
        if devices is not None:
            query = query.where(HardExampleRow.device.in_(sorted(set(devices))))
        with self.session() as s:
            return [(m, p, str(lbl)) for m, p, lbl in s.execute(query)]
