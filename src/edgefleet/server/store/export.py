"""The Kafka export in the store: the outbox the triggers fill, the lease that lets one replica export at a time,
and the figures behind the export lag.

Delivery is at least once: a replica reads the oldest queued rows (:meth:`ExportStore.pending_exports`), sends
them, and deletes them only once the broker acknowledged every one (:meth:`ExportStore.mark_exported`), by id,
never by range (on PostgreSQL a lower id may commit after a higher one was read). A replica exports only while it
holds the lease (:meth:`ExportStore.claim_export`), a compare-and-set on one row that expires unless renewed: a
replica that dies is replaced by another after ``ttl_s``; what it had sent but not marked is sent again, under
the same ``msg_id``, so a consumer that deduplicates on it sees each row once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, or_, select, text, update

from edgefleet.server.store.core import StoreBase
from edgefleet.server.store.export_tables import EXPORT_NAME, ExportOutboxRow, ExportStateRow

_CHUNK = 500


@dataclass(frozen=True)
class Queued:
    """One outbox row, as the exporter sends it."""

    id: int
    topic: str
    key: str
    seq: int
    msg_id: str
    version: int
    data: str
    created: float


@dataclass(frozen=True)
class ExportBacklog:
    """The shared export state: on or off, the lease holder, what waits and since when, what went out."""

    enabled: bool
    holder: str | None
    lease_until: float
    pending: int
    oldest: float | None
    exported: int

    def lag_s(self, now: float) -> float:
        """Age of the oldest message not yet acknowledged by the broker (0 when none waits)."""
        return max(0.0, now - self.oldest) if self.oldest is not None else 0.0


class ExportStore(StoreBase):
    """The outbox and the lease of the Kafka export."""

    def enable_export(self, enabled: bool = True) -> None:
        """Start (or stop) queuing exported rows; stopping also drops what is queued."""
        with self.session() as s:
            row = s.get(ExportStateRow, EXPORT_NAME)
            if row is None:
                s.add(ExportStateRow(name=EXPORT_NAME, enabled=int(enabled), holder=None, lease_until=0.0,
                                     exported=0, updated=time.time()))
            else:
                row.enabled, row.updated = int(enabled), time.time()
            if not enabled:
                s.execute(delete(ExportOutboxRow))

    def claim_export(self, holder: str, ttl_s: float, now: float | None = None) -> bool:
        """Take or renew the export lease for ``ttl_s``; False while another replica holds an unexpired one."""
        now = time.time() if now is None else now
        table = ExportStateRow
        with self.session() as s:
            result: Any = s.execute(update(table).where(
                table.name == EXPORT_NAME, table.enabled == 1,
                or_(table.holder == holder, table.holder.is_(None), table.lease_until < now))
                .values(holder=holder, lease_until=now + ttl_s, updated=now))
            return bool(result.rowcount)

    def release_export(self, holder: str) -> None:
        """Give the lease up (on a clean stop) so another replica takes over at once."""
        with self.session() as s:
            s.execute(update(ExportStateRow).where(ExportStateRow.name == EXPORT_NAME,
                                                   ExportStateRow.holder == holder)
                      .values(holder=None, lease_until=0.0, updated=time.time()))

    def pending_exports(self, limit: int = 2000, after: int = 0) -> list[Queued]:
        """The oldest queued rows (those with an id over ``after``), in queue order."""
        o = ExportOutboxRow
        with self.session() as s:
            rows = s.execute(select(o.id, o.topic, o.key, o.seq, o.msg_id, o.version, o.data, o.created)
                             .where(o.id > after).order_by(o.id).limit(limit))
            return [Queued(int(r[0]), r[1], r[2], int(r[3]), r[4], int(r[5]), r[6], float(r[7])) for r in rows]

    def mark_exported(self, ids: list[int]) -> int:
        """Delete rows the broker acknowledged and count them as exported; returns how many were still queued
        (fewer when another replica marked some first)."""
        if not ids:
            return 0
        done = 0
        with self.session() as s:
            if self.dialect == "postgresql":
                result: Any = s.execute(text("DELETE FROM export_outbox WHERE id = ANY(CAST(:ids AS bigint[]))"),
                                        {"ids": ids})
                done = int(result.rowcount or 0)
            else:
                for i in range(0, len(ids), _CHUNK):
                    result = s.execute(delete(ExportOutboxRow).where(ExportOutboxRow.id.in_(ids[i:i + _CHUNK])))
                    done += int(result.rowcount or 0)
            s.execute(update(ExportStateRow).where(ExportStateRow.name == EXPORT_NAME)
                      .values(exported=ExportStateRow.exported + done))
        return done

    def export_backlog(self) -> ExportBacklog:
        """The export's shared state and backlog, in one transaction."""
        o = ExportOutboxRow
        with self.session() as s:
            state = s.get(ExportStateRow, EXPORT_NAME)
            pending = int(s.scalar(select(func.count()).select_from(o)) or 0)
            oldest = s.scalar(select(o.created).order_by(o.id).limit(1))
        if state is None:
            return ExportBacklog(False, None, 0.0, pending, oldest, 0)
        return ExportBacklog(bool(state.enabled), state.holder, float(state.lease_until), pending, oldest,
                             int(state.exported))

    def queue_export(self, topic: str, key: str, seq: int, msg_id: str, version: int, data: str,
                     created: float | None = None) -> None:
        """Queue one message by hand (what the triggers do for stored rows): re-exports, repairs and tests."""
        with self.session() as s:
            s.add(ExportOutboxRow(topic=topic, key=key, seq=seq, msg_id=msg_id, version=version, data=data,
                                  created=time.time() if created is None else created))
