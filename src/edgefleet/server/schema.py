"""The server's tables (SQLAlchemy 2.0); the same schema serves SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
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
    # since schema version 4: an encrypted model's key, sealed with the server's master key (never in clear)
    model_key_sealed: Mapped[str | None] = mapped_column(Text, nullable=True)


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
    # since schema version 2: the shadow candidate, and a revision counter so that every replica can tell
    # whether the device's desired state was published after its last change
    mqtt_password_hash: Mapped[str | None] = mapped_column(Text, nullable=True, doc="Mosquitto $7$ format")
    desired_shadow_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    desired_rev: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    published_rev: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # since schema version 5: the hardware id given at provisioning (None: generic)
    hardware: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # since schema version 4: the X25519 public key the device reported; model keys are wrapped for it
    public_key: Mapped[str | None] = mapped_column(String(64), nullable=True)


class TelemetryRow(Base):
    """One telemetry batch; (device, seq) makes redelivery idempotent."""

    __tablename__ = "telemetry"

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    ts: Mapped[float] = mapped_column(Float)
    model: Mapped[str | None] = mapped_column(String(140), nullable=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    received: Mapped[float] = mapped_column(Float)


class TelemetryRollup(Base):
    """Telemetry batches older than the raw retention, summed per device, model and hour (downsampled).

    Each compaction pass adds its own rows (no read-modify-write), so replicas compacting at once never
    count a batch twice: the raw rows are claimed by ``DELETE ... RETURNING``.
    """

    __tablename__ = "telemetry_rollup"
    __table_args__ = (Index("ix_rollup_device_bucket", "device", "bucket"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(140))
    bucket: Mapped[int] = mapped_column(BigInteger, doc="start of the hour, seconds since the epoch")
    batches: Mapped[int] = mapped_column(Integer)
    first_seq: Mapped[int] = mapped_column(BigInteger)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class EventRow(Base):
    """One device event (update step, refusal, alert)."""

    __tablename__ = "events"

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    ts: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


class SchemaVersion(Base):
    """One row per applied migration."""

    __tablename__ = "schema_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    applied: Mapped[float] = mapped_column(Float)


class RolloutRow(Base):
    """A rollout: its plan, the state machine's state, and when it next needs a step.

    ``version`` is SQLAlchemy's optimistic version counter: an update from a replica that read an older
    state matches no row and fails, so a step is taken once even where row locks are not available.
    """

    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_phase", "phase"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    candidate: Mapped[str] = mapped_column(String(140))
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    phase: Mapped[str] = mapped_column(String(16))
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    wake_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012


class RolloutWave(Base):
    """The devices one wave of a rollout moved, and when."""

    __tablename__ = "rollout_waves"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer, primary_key=True)
    started: Mapped[float] = mapped_column(Float)
    devices: Mapped[list[str]] = mapped_column(JSON)


class DecisionRow(Base):
    """The audit trail: every decision a rollout took, with the values that caused it.

    (rollout_id, step_no, idx) is unique, so a step recorded twice is a database error, never a duplicate.
    """

    __tablename__ = "rollout_decisions"
    __table_args__ = (UniqueConstraint("rollout_id", "step_no", "idx"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"), index=True)
    step_no: Mapped[int] = mapped_column(Integer)
    idx: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    at: Mapped[float] = mapped_column(Float)
    wave: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)

class TrustRecord(Base):
    """One entry of the server's trust log (since schema version 3), replayed in ``id`` order.

    ``pin``: a key the server was started with (``--trusted-key``); ``rotate`` and ``revoke``: a verified key
    statement, sent to every device in its desired state; ``rollback``: a verified rollback order, put into the
    desired state of the devices told to run that release. ``subject`` is the key id (pin, the new key of a
    rotation, the revoked key) or the model name (rollback).
    """

    __tablename__ = "trust_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(String(140))
    release: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    body: Mapped[str] = mapped_column(Text)
    signer: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created: Mapped[float] = mapped_column(Float)
