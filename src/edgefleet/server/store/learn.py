"""The learning loop in the store: monitors and their alerts, hard examples and their labels.

A monitor's state changes by compare-and-set (:meth:`LearnStore.transition_monitor`), so that of several
replicas evaluating the same monitor one raises (or clears) its alert. Hard examples are kept per model name up
to a bound, the oldest dropped first.

An upstream answer (a label of lower trust) and the device's own hard example of the same window arrive apart (the
answer at once, the example with the next telemetry batch): one row is kept, found by device, model, local label,
time (within :data:`SAME_WINDOW_S`) and values (:func:`_same_window`). An operator's label is never replaced by an
upstream one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import delete, func, select, update

from edgefleet.errors import DataError, StoreError
from edgefleet.learn.fielddata import GROUND_TRUTH_SOURCES, UPSTREAM, decode
from edgefleet.server.store.core import StoreBase
from edgefleet.server.store.learn_tables import AlertRow, HardExampleRow, MonitorRow

HARD_EXAMPLES_PER_MODEL = 5000
"""Hard examples kept per model name (every version together); the oldest go first."""
SAME_WINDOW_S = 2.0
"""How far apart (seconds) a device's hard example and an upstream answer of the same window may be stamped."""


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
        of each model name beyond :attr:`hard_examples_per_model`; how many were stored (an example whose window
        an upstream answer already brought is not stored twice)."""
        received = time.time()
        items = []
        with self.session() as s:
            for r in rows:
                item = HardExampleRow(**dict(r), received=received)
                if _twin(s, item, labelled_by=UPSTREAM) is None:
                    items.append(item)
            if items:
                s.add_all(items)
                s.flush()
                self._bound(s, {i.name for i in items})
        return len(items)

    def add_upstream_answers(self, rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
        """Keep the upstream model's answers (rows of :func:`edgefleet.learn.fielddata.upstream_row`) as labels of
        lower trust: on the device's hard example of the same window when it is stored (unless an operator
        labelled it), else as a new example; counts ``stored``, ``labelled`` (existing examples), ``kept``
        (operator labels left as they were)."""
        counts = {"stored": 0, "labelled": 0, "kept": 0}
        now = time.time()
        with self.session() as s:
            added = []
            for r in rows:
                item = HardExampleRow(**dict(r), label_source=UPSTREAM, labelled_at=now, received=now)
                twin = _twin(s, item, labelled_by=None)
                if twin is None:
                    added.append(item)
                elif twin.label_source in GROUND_TRUTH_SOURCES:
                    counts["kept"] += 1
                else:
                    twin.label, twin.label_source, twin.labelled_at = item.label, UPSTREAM, now
                    counts["labelled"] += 1
            if added:
                s.add_all(added)
                s.flush()
                self._bound(s, {i.name for i in added})
            counts["stored"] = len(added)
        return counts

    def _bound(self, s: Any, names: Iterable[str]) -> None:
        for name in sorted(set(names)):
            count = s.scalar(select(func.count()).select_from(HardExampleRow).where(HardExampleRow.name == name))
            excess = int(count or 0) - self.hard_examples_per_model
            if excess > 0:
                oldest = select(HardExampleRow.id).where(HardExampleRow.name == name) \
                    .order_by(HardExampleRow.ts, HardExampleRow.id).limit(excess)
                doomed = list(s.scalars(oldest))
                s.execute(delete(HardExampleRow).where(HardExampleRow.id.in_(doomed)))

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
        """(device, model ref, predicted, label) of the hard examples ``devices`` sent since ``since_ts`` that have a
        ground-truth label (upstream labels are of lower trust: never a gate's evidence)."""
        ids = sorted(set(devices))
        out: list[tuple[str, str, str, str]] = []
        with self.session() as s:
            for i in range(0, len(ids), 500):
                out += [(d, m, p, str(lbl)) for d, m, p, lbl in s.execute(
                    select(HardExampleRow.device, HardExampleRow.model, HardExampleRow.predicted, HardExampleRow.label)
                    .where(HardExampleRow.device.in_(ids[i:i + 500]), HardExampleRow.ts >= since_ts,
                           HardExampleRow.label.is_not(None),
                           HardExampleRow.label_source.in_(GROUND_TRUTH_SOURCES)))]
        return out

    def field_labels(self, name: str, devices: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
        """(model ref, predicted, label) of every hard example of model ``name`` (of ``devices``) with a ground-truth
        label."""
        query = select(HardExampleRow.model, HardExampleRow.predicted, HardExampleRow.label).where(
            HardExampleRow.name == name, HardExampleRow.label.is_not(None),
            HardExampleRow.label_source.in_(GROUND_TRUTH_SOURCES))
        if devices is not None:
            query = query.where(HardExampleRow.device.in_(sorted(set(devices))))
        with self.session() as s:
            return [(m, p, str(lbl)) for m, p, lbl in s.execute(query)]


def _twin(s: Any, item: HardExampleRow, *, labelled_by: str | None) -> HardExampleRow | None:
    """The stored example of ``item``'s window (same device, model, local label, time within SAME_WINDOW_S and
    values), only among those labelled by ``labelled_by`` when given."""
    query = select(HardExampleRow).where(
        HardExampleRow.device == item.device, HardExampleRow.model == item.model,
        HardExampleRow.predicted == item.predicted, HardExampleRow.ts >= item.ts - SAME_WINDOW_S,
        HardExampleRow.ts <= item.ts + SAME_WINDOW_S).order_by(HardExampleRow.id).limit(50)
    if labelled_by is not None:
        query = query.where(HardExampleRow.label_source == labelled_by)
    for row in s.scalars(query):
        if _same_window(row, item):
            return row  # type: ignore[no-any-return]
    return None


def _same_window(a: HardExampleRow, b: HardExampleRow) -> bool:
    """Whether two stored examples hold the same window (up to their encodings' rounding: int8 keeps about 0.4% of
    the largest value, float16 0.05%)."""
    if list(a.shape) != list(b.shape):
        return False
    try:
        x, y = decode(a), decode(b)
    except DataError:
        return False
    top = float(max(abs(x).max(initial=0.0), abs(y).max(initial=0.0)))
    return bool(abs(x - y).max(initial=0.0) <= 0.01 * top + 1e-6)
