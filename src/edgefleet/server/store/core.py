"""The store's base: engine, sessions and migrations, models and devices (SQLite default, PostgreSQL by URL)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Row, bindparam, create_engine, event, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.pool import StaticPool

from edgefleet.bundle.manifest import Manifest
from edgefleet.errors import ConfigError, StoreError
from edgefleet.server.schema import Device, ModelVersion
from edgefleet.server.store.migrations import migrate


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'edgefleet.db').resolve()}"


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (the driver edgefleet depends on)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


class StoreBase:
    """Engine, short transactions, models and devices. Every public method is one transaction."""

    def __init__(self, url: str) -> None:
        url = normalize_url(url)
        try:
            if url.startswith("sqlite"):
                self.engine: Engine = create_engine(url, poolclass=StaticPool) if ":memory:" in url else \
                    create_engine(url)
            else:
                self.engine = create_engine(url, pool_recycle=300, pool_size=8, max_overflow=8)
        except (SQLAlchemyError, ValueError, ImportError) as exc:
            raise ConfigError(f"bad database URL {_redact(url)!r}: {exc}") from exc
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            self.migrated_from = migrate(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open database: {str(exc).splitlines()[0]}") from exc

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        session = self._sessions()
        try:
            yield session
            session.commit()
        except (IntegrityError, StaleDataError):
            session.rollback()
            raise
        except SQLAlchemyError as exc:
            session.rollback()
            raise StoreError(f"database error: {str(exc).splitlines()[0]}") from exc
        finally:
            session.close()

    # models -----------------------------------------------------------------------------------
    def add_model(self, manifest: Manifest, sha256: str, size: int, key_id: str, *,
                  model_key_sealed: str | None = None) -> ModelVersion:
        """Register a verified bundle; an encrypted one with its model key sealed by the master key."""
        row = ModelVersion(name=manifest.name, version=manifest.version, release=manifest.release,
                           sha256=sha256, size=size, key_id=key_id, model_key_sealed=model_key_sealed,
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

    def model_by_ref(self, ref: str) -> ModelVersion | None:
        name, _, version = ref.partition("@")
        return self.find_model(name, version)

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

    def assigned_artifacts(self, token_sha256: str) -> set[str] | None:
        """The artifact digests a device token may fetch (its active and shadow models); None for a token of
        no device, or of a revoked one. One query: this runs for every download."""
        with self.session() as s:
            device = s.scalar(select(Device).where(Device.token_sha256 == token_sha256))
            if device is None or device.revoked:
                return None
            ids = [m for m in (device.desired_model_id, device.desired_shadow_id) if m is not None]
            if not ids:
                return set()
            return set(s.scalars(select(ModelVersion.sha256).where(ModelVersion.id.in_(ids))))

    def list_devices(self) -> list[Device]:
        with self.session() as s:
            return list(s.scalars(select(Device).order_by(Device.id)))

    def set_desired(self, device_ids: list[str], model_id: int | None, *, shadow: bool = False) -> None:
        """Point devices at a model (or their shadow slot at one); bumps each device's desired revision."""
        with self.session() as s:
            assign_desired(s, device_ids, model_id, shadow=shadow)

    def desired_unpublished(self, limit: int = 100_000) -> list[Row[Any]]:
        """Devices whose desired state changed since it was last published: rows of id, desired_model_id,
        desired_shadow_id, desired_rev, revoked, reported (the bundle it runs, for deltas) and public_key (model
        keys are wrapped for it); plain rows, not ORM objects: this runs every tick."""
        with self.session() as s:
            return list(s.execute(select(Device.id, Device.desired_model_id, Device.desired_shadow_id,
                                         Device.desired_rev, Device.revoked, Device.reported, Device.public_key)
                                  .where(Device.desired_rev > Device.published_rev).limit(limit)))

    def device_standing(self) -> dict[str, bool]:
        """Every device id and whether it is revoked (one light query)."""
        with self.session() as s:
            return {d: bool(r) for d, r in s.execute(select(Device.id, Device.revoked))}

    def device_views(self) -> list[Row[Any]]:
        """Every device's id, tags, profile, desired_model_id, reported, revoked and hardware, as plain rows."""
        with self.session() as s:
            return list(s.execute(select(Device.id, Device.tags, Device.profile, Device.desired_model_id,
                                         Device.reported, Device.revoked, Device.hardware).order_by(Device.id)))

    def mark_published(self, device_id: str, rev: int) -> None:
        self.mark_published_many([(device_id, rev)])

    def mark_published_many(self, revisions: list[tuple[str, int]]) -> None:
        """Record that these (device, desired revision) pairs reached the broker."""
        if not revisions:
            return
        table: Any = Device.__table__
        if self.dialect == "postgresql":
            with self.session() as s:
                s.execute(text("UPDATE devices AS d SET published_rev = v.rev FROM unnest(CAST(:ids AS varchar[]), "
                               "CAST(:revs AS integer[])) AS v(id, rev) WHERE d.id = v.id AND d.published_rev < v.rev"),
                          {"ids": [d for d, _ in revisions], "revs": [r for _, r in revisions]})
            return
        with self.session() as s:
            s.connection().execute(
                update(table).where(table.c.id == bindparam("device"), table.c.published_rev < bindparam("rev"))
                .values(published_rev=bindparam("rev")),
                [{"device": d, "rev": r} for d, r in revisions])

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
            key = reported.get("public_key")
            if isinstance(key, str) and key != device.public_key and not device.revoked:
                device.public_key = key  # the device's own key pair (its MQTT identity publishes only its topics)
                if device.desired_model_id is not None or device.desired_shadow_id is not None:
                    device.desired_rev += 1  # published again, with model keys wrapped for the new key
            return True


def assign_desired(s: Session, device_ids: list[str], model_id: int | None, *, shadow: bool = False) -> None:
    """Within a transaction: set the active (or shadow) desired model of each device and bump its revision."""
    column = "desired_shadow_id" if shadow else "desired_model_id"
    ids = sorted(set(device_ids))
    if ids and s.get_bind().dialect.name == "postgresql":  # one statement, one array parameter
        changed: Any = s.execute(text(f"UPDATE devices SET {column} = :model, desired_rev = desired_rev + 1 "
                                      "WHERE id = ANY(CAST(:ids AS varchar[]))"), {"model": model_id, "ids": ids})
        if changed.rowcount == len(ids):
            return
        found = set(s.scalars(select(Device.id).where(Device.id.in_(ids))))
        raise StoreError(f"unknown device {sorted(set(ids) - found)[0]!r}")
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        result: Any = s.execute(update(Device).where(Device.id.in_(chunk))
                                .values({column: model_id, "desired_rev": Device.desired_rev + 1})
                                .execution_options(synchronize_session=False))
        if result.rowcount != len(chunk):
            found = set(s.scalars(select(Device.id).where(Device.id.in_(chunk))))
            raise StoreError(f"unknown device {sorted(set(chunk) - found)[0]!r}")


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"
