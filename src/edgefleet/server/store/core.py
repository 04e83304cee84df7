"""The server's store: one class over SQLAlchemy, SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.core.manifest import Manifest
from edgefleet.errors import ConfigError, StoreError
from edgefleet.server.schema import Base, Device, EventRow, ModelVersion, TelemetryRow
from edgefleet.transport.messages import Event, TelemetryBatch


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'edgefleet.db').resolve()}"


class Store:
    """Models, devices, telemetry and events. Every method is one short transaction."""

    def __init__(self, url: str) -> None:
        try:
            self.engine: Engine = create_engine(url, pool_pre_ping=True)
        except (SQLAlchemyError, ValueError) as exc:
            raise ConfigError(f"bad database URL {url!r}: {exc}") from exc
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open database: {str(exc).splitlines()[0]}") from exc

    @contextmanager
    def session(self) -> Iterator[Session]:
        session = self._sessions()
        try:
            yield session
            session.commit()
        except IntegrityError:
            session.rollback()
            raise
        except SQLAlchemyError as exc:
            session.rollback()
            raise StoreError(f"database error: {str(exc).splitlines()[0]}") from exc
        finally:
            session.close()

    # models -----------------------------------------------------------------------------------
    def add_model(self, manifest: Manifest, sha256: str, size: int, key_id: str) -> ModelVersion:
        row = ModelVersion(name=manifest.name, version=manifest.version, release=manifest.release,
                           sha256=sha256, size=size, key_id=key_id,
                           manifest=manifest.model_dump(mode="json"), created=time.time())
        try:
            with self.session() as s:
                s.add(row)
        except IntegrityError as exc:
            raise StoreError(f"model {manifest.ref} or an identical bundle is already registered") from exc
        return row

    def find_model(self, name: str, version: str) -> ModelVersion | None:
        with self.session() as s:
            return s.scalar(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version))

    def model_by_id(self, model_id: int) -> ModelVersion | None:
        with self.session() as s:
            return s.get(ModelVersion, model_id)

    def model_by_sha(self, sha256: str) -> ModelVersion | None:
        with self.session() as s:
            return s.scalar(select(ModelVersion).where(ModelVersion.sha256 == sha256))

    def list_models(self) -> list[ModelVersion]:
        with self.session() as s:
            return list(s.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.release)))

    # devices ----------------------------------------------------------------------------------
    def add_device(self, device: Device) -> Device:
        try:
            with self.session() as s:
                s.add(device)
        except IntegrityError as exc:
            raise StoreError(f"device {device.id!r} already exists") from exc
        return device

    def get_device(self, device_id: str) -> Device | None:
        with self.session() as s:
            return s.get(Device, device_id)

    def device_by_token(self, token_sha256: str) -> Device | None:
        with self.session() as s:
            return s.scalar(select(Device).where(Device.token_sha256 == token_sha256))

    def list_devices(self) -> list[Device]:
        with self.session() as s:
            return list(s.scalars(select(Device).order_by(Device.id)))

    def set_desired(self, device_ids: list[str], model_id: int | None) -> None:
        with self.session() as s:
            for device_id in device_ids:
                device = s.get(Device, device_id)
                if device is None:
                    raise StoreError(f"unknown device {device_id!r}")
                device.desired_model_id = model_id

    def set_revoked(self, device_id: str) -> None:
        with self.session() as s:
            device = s.get(Device, device_id)
            if device is None:
                raise StoreError(f"unknown device {device_id!r}")
            device.revoked = True

    def record_reported(self, device_id: str, reported: dict[str, Any]) -> bool:
        with self.session() as s:
            device = s.get(Device, device_id)
            if device is None:
                return False
            device.reported = reported
            device.last_seen = time.time()
            return True

    # telemetry and events ---------------------------------------------------------------------
    def add_telemetry(self, batch: TelemetryBatch) -> bool:
        """Store a batch; False when (device, seq) was already stored (a redelivery)."""
        row = TelemetryRow(device=batch.device, seq=batch.seq, ts=batch.ts, model=batch.model,
                           payload=batch.model_dump(mode="json"), received=time.time())
        return self._insert_once(row, batch.device)

    def add_event(self, item: Event) -> bool:
        row = EventRow(device=item.device, seq=item.seq, ts=item.ts, kind=item.kind, name=item.name,
                       detail=dict(item.detail))
        return self._insert_once(row, item.device)

    def telemetry(self, device_id: str, since_ts: float = 0.0) -> list[TelemetryBatch]:
        with self.session() as s:
            rows = s.scalars(select(TelemetryRow).where(TelemetryRow.device == device_id, TelemetryRow.ts >= since_ts)
                             .order_by(TelemetryRow.seq))
            return [TelemetryBatch.model_validate(r.payload) for r in rows]

    def events(self, device_id: str) -> list[Event]:
        with self.session() as s:
            rows = s.scalars(select(EventRow).where(EventRow.device == device_id).order_by(EventRow.seq))
            return [Event(device=r.device, seq=r.seq, ts=r.ts, kind=r.kind,  # type: ignore[arg-type]
                          name=r.name, detail=r.detail) for r in rows]

    def _insert_once(self, row: TelemetryRow | EventRow, device_id: str) -> bool:
        try:
            with self.session() as s:
                s.add(row)
                device = s.get(Device, device_id)
                if device is not None:
                    device.last_seen = time.time()
        except IntegrityError:
            return False
        return True


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
