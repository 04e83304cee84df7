"""Tables of the learning loop (since schema version 6): monitors, the fleet alerts they raise, and the hard
examples devices send, with the ground-truth labels posted for them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from edgefleet.server.schema import Base


class MonitorRow(Base):
    """A condition on a model's fleet, judged continuously; ``state`` is ok, firing or unknown."""

    __tablename__ = "monitors"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    expr: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(64), index=True, doc="model name (every version)")
    select: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    webhook: Mapped[str | None] = mapped_column(Text, nullable=True)
    pause_rollouts: Mapped[bool] = mapped_column(Boolean, default=False)
    window_s: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), default="unknown")
    changed: Mapped[float] = mapped_column(Float, doc="when the state last changed")
    checked: Mapped[float | None] = mapped_column(Float, nullable=True)
    explanation: Mapped[str] = mapped_column(Text, default="")
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created: Mapped[float] = mapped_column(Float)


class AlertRow(Base):
    """One firing of a monitor: raised when its condition held, cleared when it recovered."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    monitor: Mapped[str] = mapped_column(String(32), index=True)
    model: Mapped[str] = mapped_column(String(64))
    expr: Mapped[str] = mapped_column(Text)
    raised: Mapped[float] = mapped_column(Float)
    cleared: Mapped[float | None] = mapped_column(Float, nullable=True)
    explanation: Mapped[str] = mapped_column(Text)
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    paused: Mapped[list[str]] = mapped_column(JSON, default=list, doc="rollouts this alert paused")


class HardExampleRow(Base):
    """One low-confidence model input a device sent, as it came (encoded), and its label once one is posted."""

    __tablename__ = "hard_examples"
    __table_args__ = (Index("ix_hard_examples_name_ts", "name", "ts"),
                      Index("ix_hard_examples_device_ts", "device", "ts"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), doc="model name")
    model: Mapped[str] = mapped_column(String(140), doc="NAME@VERSION that predicted")
    device: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float)
    predicted: Mapped[str] = mapped_column(String(128))
    confidence: Mapped[float] = mapped_column(Float)
    shape: Mapped[list[int]] = mapped_column(JSON)
    encoding: Mapped[str] = mapped_column(String(16))
    data: Mapped[str] = mapped_column(Text)
    scale: Mapped[float | None] = mapped_column(Float, nullable=True)
    received: Mapped[float] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(128), nullable=True)
    label_source: Mapped[str | None] = mapped_column(String(32), nullable=True, doc="operator, range, ...")
    labelled_at: Mapped[float | None] = mapped_column(Float, nullable=True)
