"""The server's tables (SQLAlchemy 2.0); the same schema serves SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ModelVersion(Base):
    """One signed bundle the server accepted."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    release: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[str] = mapped_column(String(32))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    created: Mapped[float] = mapped_column(Float)


class Device(Base):
    """A provisioned device, its secrets (hashed), what it should run and what it reported."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), index=True)
    mqtt_password_sha256: Mapped[str] = mapped_column(String(64))
    tags: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    profile: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created: Mapped[float] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    desired_model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    reported: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)


class TelemetryRow(Base):
    """One telemetry batch; (device, seq) makes redelivery idempotent."""

    __tablename__ = "telemetry"

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    ts: Mapped[float] = mapped_column(Float)
    model: Mapped[str | None] = mapped_column(String(140), nullable=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    received: Mapped[float] = mapped_column(Float)


class EventRow(Base):
    """One device event (update step, refusal, alert)."""

    __tablename__ = "events"

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    ts: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
