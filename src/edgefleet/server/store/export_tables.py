"""Tables of the Kafka export (since schema version 7): the outbox and the export's shared state.

Rows reach the outbox by database triggers on the tables whose rows are exported (:func:`install_triggers`), in
the same transaction as the row itself: a row stored is a row queued, whichever code path stored it. The
triggers queue only while the export is enabled (``export_state.enabled``, set by ``edgefleet server --kafka``).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Connection, Float, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from edgefleet.server.schema import Base

EXPORT_NAME = "kafka"
"""The one export state row (and lease) the Kafka exporters of every replica share."""

_ID = BigInteger().with_variant(Integer(), "sqlite")  # SQLite's rowid alias must be INTEGER


class ExportOutboxRow(Base):
    """One message waiting for the broker's acknowledgement; deleted once acknowledged."""

    __tablename__ = "export_outbox"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True, doc="export sequence number")
    topic: Mapped[str] = mapped_column(String(32), doc="telemetry, events, alerts, decisions or hard_examples")
    key: Mapped[str] = mapped_column(String(140), doc="message key: device, model or rollout")
    seq: Mapped[int] = mapped_column(BigInteger, doc="the row's own sequence number within its key")
    msg_id: Mapped[str] = mapped_column(String(200), doc="identity a consumer deduplicates on (within a topic)")
    version: Mapped[int] = mapped_column(Integer, doc="schema version of ``data`` when it was queued")
    data: Mapped[str] = mapped_column(Text, doc="the row as JSON")
    created: Mapped[float] = mapped_column(Float, doc="when it was queued (seconds since the epoch)")


class ExportStateRow(Base):
    """Whether the export is on, which replica holds its lease until when, and how many messages it exported."""

    __tablename__ = "export_state"
    __table_args__ = (Index("ix_export_state_holder", "holder"),)

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    enabled: Mapped[int] = mapped_column(Integer, default=0)
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    exported: Mapped[int] = mapped_column(BigInteger, default=0)
    updated: Mapped[float] = mapped_column(Float, default=0.0)


TRIGGER_VERSION = 1
"""The schema version the triggers below give every row they queue (``export_outbox.version``)."""

# per exported table: (trigger name, table, topic, key, seq, msg_id, data as a JSON object of the row's columns)
_SOURCES: list[tuple[str, str, str, str, str, str, list[tuple[str, str]]]] = [
    ("export_telemetry", "telemetry", "telemetry", "device", "seq", "{device} || '/' || {seq}", []),
    ("export_events", "events", "events", "device", "seq", "{device} || '/' || {seq}",
     [("device", "s"), ("seq", "s"), ("ts", "s"), ("kind", "s"), ("name", "s"), ("detail", "j")]),
    ("export_alerts", "alerts", "alerts", "model", "id", "{id} || '/raised'",
     [("id", "s"), ("monitor", "s"), ("model", "s"), ("expr", "s"), ("raised", "s"), ("cleared", "s"),
      ("explanation", "s"), ("values", "j"), ("paused", "j")]),
    ("export_decisions", "rollout_decisions", "decisions", "rollout_id", "id",
     "{rollout_id} || '/' || {step_no} || '/' || {idx}",
     [("rollout_id", "s"), ("step_no", "s"), ("idx", "s"), ("kind", "s"), ("at", "s"), ("wave", "s"),
      ("reason", "s"), ("actor", "s"), ("detail", "j")]),
    ("export_hard_examples", "hard_examples", "hard_examples", "device", "id", "{id}",
     [("id", "s"), ("name", "s"), ("model", "s"), ("device", "s"), ("ts", "s"), ("predicted", "s"),
      ("confidence", "s"), ("shape", "j"), ("encoding", "s"), ("data", "s"), ("scale", "s"), ("received", "s")]),
]
_ALERT_CLEARED = ("export_alerts_cleared", "alerts", "alerts", "model", "id", "{id} || '/cleared'",
                  _SOURCES[2][6])


def install_triggers(conn: Connection) -> None:
    """Create (or replace) the triggers that queue exported rows into the outbox, on SQLite or PostgreSQL."""
    postgres = conn.dialect.name == "postgresql"
    for source in [*_SOURCES, _ALERT_CLEARED]:
        name, table, topic, key, seq, msg_id, columns = source
        cleared = source is _ALERT_CLEARED
        for statement in (_postgres if postgres else _sqlite)(name, table, topic, key, seq, msg_id, columns,
                                                              cleared):
            conn.execute(text(statement))


def _sqlite(name: str, table: str, topic: str, key: str, seq: str, msg_id: str, columns: list[tuple[str, str]],
            cleared: bool) -> list[str]:
    def col(c: str) -> str:
        return f'NEW."{c}"'

    data = "NEW.payload" if not columns else "json_object(" + ", ".join(
        f"'{c}', " + (f"json({col(c)})" if kind == "j" else col(c)) for c, kind in columns) + ")"
    when = f"(SELECT enabled FROM export_state WHERE name = '{EXPORT_NAME}') = 1"
    event = "AFTER INSERT"
    if cleared:
        event = "AFTER UPDATE OF cleared"
        when += " AND OLD.cleared IS NULL AND NEW.cleared IS NOT NULL"
    return [f"DROP TRIGGER IF EXISTS {name}",
            f"CREATE TRIGGER {name} {event} ON {table} WHEN {when} BEGIN "
            "INSERT INTO export_outbox (topic, key, seq, msg_id, version, data, created) VALUES "
            f"('{topic}', {col(key)}, {col(seq)}, {msg_id.format(**{c: col(c) for c in _names(msg_id)})}, "
            f"{TRIGGER_VERSION}, {data}, (julianday('now') - 2440587.5) * 86400.0); END"]


def _postgres(name: str, table: str, topic: str, key: str, seq: str, msg_id: str, columns: list[tuple[str, str]],
              cleared: bool) -> list[str]:
    def col(c: str) -> str:
        return f'NEW."{c}"'

    data = "CAST(NEW.payload AS text)" if not columns else "CAST(json_build_object(" + ", ".join(
        f"'{c}', {col(c)}" for c, _ in columns) + ") AS text)"
    guard = f"EXISTS (SELECT 1 FROM export_state WHERE name = '{EXPORT_NAME}' AND enabled = 1)"
    event = "AFTER INSERT"
    if cleared:
        event = "AFTER UPDATE OF cleared"
        guard += " AND OLD.cleared IS NULL AND NEW.cleared IS NOT NULL"
    ids = msg_id.format(**{c: f"CAST({col(c)} AS text)" for c in _names(msg_id)})
    return [f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF {guard} THEN "
            "INSERT INTO export_outbox (topic, key, seq, msg_id, version, data, created) VALUES "
            f"('{topic}', {col(key)}, {col(seq)}, {ids}, {TRIGGER_VERSION}, {data}, "
            "extract(epoch from clock_timestamp())); END IF; RETURN NULL; END $$",
            f"CREATE OR REPLACE TRIGGER {name} {event} ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()"]


def _names(template: str) -> list[str]:
    import string

    return [field for _, field, _, _ in string.Formatter().parse(template) if field]
