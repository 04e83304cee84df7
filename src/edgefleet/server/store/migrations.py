"""Schema migrations: a ``schema_version`` table and a list of numbered steps in code.

Why not Alembic: the schema is small and owned by one package; a numbered list of steps, each a few DDL
statements that run on SQLite and PostgreSQL alike, is tested by the same contract suite as the rest of
the store, needs no migration scripts directory at run time, and takes a PostgreSQL advisory lock so that
replicas starting together migrate once. A fresh database is created at the newest version directly.

Versions: 1 = the walking skeleton (models, devices, telemetry, events); 2 = rollouts, waves, decisions,
telemetry roll-ups, and the devices' broker password hash, shadow and desired-revision columns; 3 = the trust
log (pinned keys, key statements, rollback orders); 4 = encrypted models: a model's sealed key and a device's
public key; 5 = a device's hardware id; 6 = monitors, alerts and hard examples with their labels; 7 = the Kafka
export's outbox, its shared state and the triggers that queue rows into it (:mod:`.export_tables`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Connection, insert, inspect, select, text
from sqlalchemy.engine import Engine

from edgefleet.server.schema import Base, SchemaVersion
from edgefleet.server.store import learn_tables  # noqa: F401  (registers the version 6 tables)
from edgefleet.server.store.export_tables import install_triggers

LATEST = 7
_LOCK_KEY = 0x45460005  # pg_advisory_lock key: "EF" and issue 5


def _v2(conn: Connection) -> None:
    columns = {c["name"] for c in inspect(conn).get_columns("devices")}
    for name, ddl in (("desired_shadow_id", "INTEGER REFERENCES model_versions(id)"), ("mqtt_password_hash", "TEXT"),
                      ("desired_rev", "INTEGER NOT NULL DEFAULT 0"), ("published_rev", "INTEGER NOT NULL DEFAULT 0")):
        if name not in columns:
            conn.execute(text(f"ALTER TABLE devices ADD COLUMN {name} {ddl}"))
    Base.metadata.create_all(conn)  # the new tables only: existing ones are left alone


def _v3(conn: Connection) -> None:
    Base.metadata.create_all(conn)  # the trust log; existing tables are left alone


def _v4(conn: Connection) -> None:
    for table, name, ddl in (("model_versions", "model_key_sealed", "TEXT"), ("devices", "public_key", "VARCHAR(64)")):
        if name not in {c["name"] for c in inspect(conn).get_columns(table)}:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}"))


def _v5(conn: Connection) -> None:
    if "hardware" not in {c["name"] for c in inspect(conn).get_columns("devices")}:
        conn.execute(text("ALTER TABLE devices ADD COLUMN hardware VARCHAR(64)"))


def _v6(conn: Connection) -> None:
    Base.metadata.create_all(conn)  # monitors, alerts, hard examples; existing tables are left alone


def _v7(conn: Connection) -> None:
    Base.metadata.create_all(conn)  # the export's outbox and state; existing tables are left alone
    install_triggers(conn)


STEPS: dict[int, Callable[[Connection], None]] = {2: _v2, 3: _v3, 4: _v4, 5: _v5, 6: _v6, 7: _v7}


def current_version(conn: Connection) -> int:
    """The database's schema version: 0 when empty, 1 for a skeleton database without a version table."""
    tables = set(inspect(conn).get_table_names())
    if "schema_version" not in tables:
        return 1 if "devices" in tables else 0
    return int(conn.scalar(select(SchemaVersion.version).order_by(SchemaVersion.version.desc()).limit(1)) or 0)


def migrate(engine: Engine) -> int:
    """Bring the database to :data:`LATEST`; return the version it was at."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        found = current_version(conn)
        if found == 0:
            Base.metadata.create_all(conn)
            install_triggers(conn)
            conn.execute(insert(SchemaVersion), [{"version": LATEST, "applied": time.time()}])
            return 0
        for version in range(found + 1, LATEST + 1):
            STEPS[version](conn)
            conn.execute(insert(SchemaVersion), [{"version": version, "applied": time.time()}])
        return found
