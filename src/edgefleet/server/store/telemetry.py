"""Telemetry and events in the store: idempotent batch inserts, per-device/per-model aggregates, gap counts,
retention and downsampling into hourly roll-ups."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgefleet.core.gates import CohortStats
from edgefleet.core.telemetry import LatencyHistogram, add_bins
from edgefleet.server.schema import Device, EventRow, TelemetryRollup, TelemetryRow
from edgefleet.server.store.core import StoreBase
from edgefleet.transport.messages import Event, TelemetryBatch

DeviceModelStats = dict[str, dict[str, CohortStats]]
_CHUNK = 500
_SUMMED = ("windows", "labelled", "correct", "skipped", "errors", "shadow_windows", "shadow_agree", "shadow_errors",
           "imputed", "incomplete", "uncertain")


@dataclass(frozen=True)
class DeviceTotals:
    """One device's stored telemetry summed per model version ("NAME@VERSION")."""

    batches: int  # raw batches (those not yet rolled up)
    gaps: int  # sequence numbers missing, raw and rolled up
    models: dict[str, CohortStats]  # what each model that ran on the device did
    shadow: dict[str, CohortStats]  # what each shadow candidate did beside it


class TelemetryStore(StoreBase):
    """Telemetry batches keyed by (device, seq), so a redelivered batch is stored once."""

    def add_telemetry(self, batch: TelemetryBatch) -> bool:
        """Store a batch; False when (device, seq) was already stored (a redelivery)."""
        return bool(self.add_telemetry_many([batch])[0])

    def add_telemetry_many(self, batches: Sequence[TelemetryBatch], raw: Sequence[bytes] | None = None
                           ) -> list[bool]:
        """Store many batches in one transaction; per batch, True if new, False if a duplicate.

        ``raw``: the JSON each batch was validated from (stored as is, saving a serialization).
        """
        if not batches:
            return []
        now = time.time()
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        for i, b in enumerate(batches):
            if (b.device, b.seq) not in rows:
                payload = raw[i].decode() if raw is not None else b.model_dump_json()
                rows[(b.device, b.seq)] = {"device": b.device, "seq": b.seq, "ts": b.ts, "model": b.model,
                                           "payload": payload, "received": now}
        if self.dialect == "postgresql":
            inserted = self._insert_telemetry_pg(list(rows.values()))
        else:
            for row in rows.values():
                row["payload"] = json.loads(row["payload"])
            inserted = self._insert_ignore(TelemetryRow, list(rows.values()))
        seen: set[tuple[str, int]] = set()
        result = []
        for b in batches:
            key = (b.device, b.seq)
            result.append(key in inserted and key not in seen)
            seen.add(key)
        return result

    def add_event(self, item: Event) -> bool:
        row = {"device": item.device, "seq": item.seq, "ts": item.ts, "kind": item.kind, "name": item.name,
               "detail": dict(item.detail)}
        return (item.device, item.seq) in self._insert_ignore(EventRow, [row])

    def _insert_telemetry_pg(self, rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
        """PostgreSQL: one statement for the whole batch, its payloads sent as one JSON array parsed server-side."""
        with self.session() as s:
            found = s.execute(text(
                "INSERT INTO telemetry (device, seq, ts, model, payload, received) "
                "SELECT e->>'device', CAST(e->>'seq' AS bigint), CAST(e->>'ts' AS float8), e->>'model', "
                "CAST(e AS json), :received FROM jsonb_array_elements(CAST(:payloads AS jsonb)) AS e "
                "ON CONFLICT DO NOTHING RETURNING device, seq"),
                {"payloads": "[" + ",".join(r["payload"] for r in rows) + "]", "received": time.time()})
            new = {(r[0], int(r[1])) for r in found}
            devices = sorted({d for d, _ in new})
            if devices:
                s.execute(text("UPDATE devices SET last_seen = :now WHERE id = ANY(CAST(:ids AS varchar[]))"),
                          {"now": time.time(), "ids": devices})
        return new

    def _insert_ignore(self, table: type[TelemetryRow] | type[EventRow], rows: list[dict[str, Any]]
                       ) -> set[tuple[str, int]]:
        """INSERT ... ON CONFLICT DO NOTHING RETURNING the keys that were new; touches the devices' last_seen."""
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        t = table.__table__  # type: Any
        stmt = insert(t).on_conflict_do_nothing(index_elements=["device", "seq"]).returning(t.c.device, t.c.seq)
        try:
            with self.session() as s:
                new = {(r[0], int(r[1])) for r in s.execute(stmt, rows)} if len(rows) > 1 else \
                    {(r[0], int(r[1])) for r in s.execute(stmt.values(rows[0]))}
                devices = sorted({d for d, _ in new})
                for i in range(0, len(devices), _CHUNK):
                    s.execute(update(Device).where(Device.id.in_(devices[i:i + _CHUNK])).values(last_seen=time.time()))
        except IntegrityError:  # pragma: no cover - ON CONFLICT makes this unreachable
            return set()
        return new

    def telemetry(self, device_id: str, since_ts: float = 0.0) -> list[TelemetryBatch]:
        """Raw batches of one device (still within the raw retention), oldest first."""
        with self.session() as s:
            rows = s.scalars(select(TelemetryRow).where(TelemetryRow.device == device_id, TelemetryRow.ts >= since_ts)
                             .order_by(TelemetryRow.seq))
            return [TelemetryBatch.model_validate(r.payload) for r in rows]

    def events(self, device_id: str) -> list[Event]:
        with self.session() as s:
            rows = s.scalars(select(EventRow).where(EventRow.device == device_id).order_by(EventRow.seq))
            return [Event(device=r.device, seq=r.seq, ts=r.ts, kind=r.kind,  # type: ignore[arg-type]
                          name=r.name, detail=r.detail) for r in rows]

    def refused_models(self, device_ids: Iterable[str], since_ts: float = 0.0) -> dict[str, set[str]]:
        """Model refs each device refused or rolled back from (from its events)."""
        out: dict[str, set[str]] = {}
        ids = list(device_ids)
        with self.session() as s:
            for i in range(0, len(ids), _CHUNK):
                rows = s.execute(select(EventRow.device, EventRow.detail).where(
                    EventRow.device.in_(ids[i:i + _CHUNK]), EventRow.ts >= since_ts,
                    EventRow.name.in_(("refused", "rolled_back"))))
                for device, detail in rows:
                    ref = (detail or {}).get("refused") or (detail or {}).get("from") or (detail or {}).get("target")
                    if isinstance(ref, str):
                        out.setdefault(device, set()).add(ref)
        return out

    # aggregates -------------------------------------------------------------------------------
    def device_model_stats(self, device_ids: Iterable[str] | None, since_ts: float = 0.0
                           ) -> tuple[DeviceModelStats, DeviceModelStats]:
        """Per device and model, the summed telemetry since ``since_ts`` (raw rows and roll-ups); the second
        mapping holds what devices reported for their shadow candidate."""
        primary: DeviceModelStats = {}
        shadow: DeviceModelStats = {}
        with self.session() as s:
            for chunk in _chunks(device_ids):
                _fold_stats(s, chunk, since_ts, primary, shadow)
        return primary, shadow

    def device_totals(self, device_id: str, since_ts: float = 0.0) -> DeviceTotals | None:
        """One device's stored telemetry since ``since_ts`` summed per model version (raw batches and hourly
        roll-ups alike), with its raw batch count and sequence gaps; None for a device the store does not know.
        One transaction."""
        primary: DeviceModelStats = {}
        shadow: DeviceModelStats = {}
        with self.session() as s:
            if s.scalar(select(Device.id).where(Device.id == device_id)) is None:
                return None
            _fold_stats(s, [device_id], since_ts, primary, shadow)
            batches = s.scalar(select(func.count()).select_from(TelemetryRow).where(
                TelemetryRow.device == device_id, TelemetryRow.ts >= since_ts))
            gaps = _sequence_gaps(s, device_id)
        return DeviceTotals(batches=int(batches or 0), gaps=gaps, models=primary.get(device_id, {}),
                            shadow=shadow.get(device_id, {}))

    def model_stats(self, model: str, since_ts: float = 0.0) -> tuple[CohortStats, int]:
        """Every device's telemetry for one model summed, and how many devices sent some."""
        primary, _ = self.device_model_stats(None, since_ts)
        total = CohortStats()
        devices = 0
        for per_model in primary.values():
            if model in per_model:
                total.add(per_model[model])
                devices += 1
        return total, devices

    def sequence_gaps(self, device_id: str) -> int:
        """Telemetry sequence numbers missing between the lowest and highest one received (raw and rolled up)."""
        with self.session() as s:
            return _sequence_gaps(s, device_id)

    # retention --------------------------------------------------------------------------------
    def compact_telemetry(self, older_than_ts: float) -> int:
        """Move raw batches older than ``older_than_ts`` into hourly roll-ups; return how many were moved."""
        with self.session() as s:
            claimed = list(s.execute(delete(TelemetryRow).where(TelemetryRow.ts < older_than_ts).returning(
                TelemetryRow.device, TelemetryRow.model, TelemetryRow.ts, TelemetryRow.seq, TelemetryRow.payload)))
            groups: dict[tuple[str, str, int], dict[str, Any]] = {}
            for device, model, ts, seq, payload in claimed:
                key = (device, model or "", int(ts // 3600 * 3600))
                group = groups.setdefault(key, {"batches": 0, "first_seq": seq, "last_seq": seq, "payload": {}})
                group["batches"] += 1
                group["first_seq"], group["last_seq"] = min(group["first_seq"], seq), max(group["last_seq"], seq)
                group["payload"] = merge_payloads(group["payload"], payload)
            s.add_all(TelemetryRollup(device=d, model=m, bucket=b, **g) for (d, m, b), g in groups.items())
        return len(claimed)

    def purge_telemetry(self, older_than_ts: float) -> int:
        """Drop roll-ups and events older than ``older_than_ts`` (the long retention)."""
        with self.session() as s:
            rolled: Any = s.execute(delete(TelemetryRollup).where(TelemetryRollup.bucket < older_than_ts - 3600))
            events: Any = s.execute(delete(EventRow).where(EventRow.ts < older_than_ts))
        return int(rolled.rowcount or 0) + int(events.rowcount or 0)


def merge_payloads(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Sum two telemetry payloads (counts, histograms, bins, classes); keeps the shadow model's name."""
    out = dict(total)
    for key in _SUMMED:
        if isinstance(part.get(key), int):
            out[key] = int(out.get(key) or 0) + part[key]
    for key in ("latency_ms", "shadow_latency_ms"):
        hist = LatencyHistogram.from_json(out.get(key) or {})
        with contextlib.suppress(TypeError, ValueError):
            hist.merge(LatencyHistogram.from_json(part.get(key) or {}))
        out[key] = hist.to_json()
    out["confidence"] = add_bins(list(out.get("confidence") or []), list(part.get("confidence") or []))
    for key in ("escalations", "alerts"):
        counters = dict(out.get(key) or {}) if isinstance(out.get(key) or {}, dict) else {}
        part_counters = part.get(key)
        if isinstance(part_counters, int):
            part_counters = {"sent": part_counters}
        for name, n in dict(part_counters or {}).items():
            if isinstance(n, int):
                counters[name] = counters.get(name, 0) + n
        out[key] = counters
    classes = dict(out.get("classes") or {})
    for name, n in dict(part.get("classes") or {}).items():
        classes[name] = classes.get(name, 0) + int(n)
    out["classes"] = classes
    if part.get("shadow_model"):
        out["shadow_model"] = part["shadow_model"]
    return out


def _fold_stats(s: Session, devices: list[str] | None, since_ts: float, primary: DeviceModelStats,
                shadow: DeviceModelStats) -> None:
    """Within a transaction: add the raw batches and roll-ups since ``since_ts`` of ``devices`` (None: all) into
    ``primary`` (per device, the model that ran) and ``shadow`` (per device, the shadow candidate)."""

    def fold(device: str, payload: dict[str, Any], model: str | None) -> None:
        if model:
            _stats(primary, device, model).add_batch(payload)
        shadow_model = payload.get("shadow_model")
        if isinstance(shadow_model, str) and shadow_model:
            _stats(shadow, device, shadow_model).add_batch(payload, shadow=True)

    raw = select(TelemetryRow.device, TelemetryRow.model, TelemetryRow.payload).where(TelemetryRow.ts >= since_ts)
    rolled = select(TelemetryRollup.device, TelemetryRollup.model, TelemetryRollup.payload).where(
        TelemetryRollup.bucket >= int(since_ts // 3600 * 3600))
    if devices is not None:
        raw = raw.where(TelemetryRow.device.in_(devices))
        rolled = rolled.where(TelemetryRollup.device.in_(devices))
    for device, model, payload in s.execute(raw):
        fold(device, payload, model)
    for device, model, payload in s.execute(rolled):
        fold(device, payload, model or None)


def _sequence_gaps(s: Session, device_id: str) -> int:
    lo, hi, n = s.execute(select(func.min(TelemetryRow.seq), func.max(TelemetryRow.seq), func.count())
                          .where(TelemetryRow.device == device_id)).one()
    rlo, rhi, rn = s.execute(select(func.min(TelemetryRollup.first_seq), func.max(TelemetryRollup.last_seq),
                                    func.coalesce(func.sum(TelemetryRollup.batches), 0))
                             .where(TelemetryRollup.device == device_id)).one()
    lows = [v for v in (lo, rlo) if v is not None]
    highs = [v for v in (hi, rhi) if v is not None]
    if not lows:
        return 0
    return int(max(highs) - min(lows) + 1 - (n + int(rn)))


def _stats(table: DeviceModelStats, device: str, model: str) -> CohortStats:
    per_device = table.setdefault(device, {})
    if model not in per_device:
        per_device[model] = CohortStats(devices=1)
    return per_device[model]


def _chunks(ids: Iterable[str] | None) -> Iterable[list[str] | None]:
    if ids is None:
        yield None
        return
    items = sorted(set(ids))
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]
