"""The agent's durable state in one SQLite file: model slots, trusted release counters, update state, outbox.

Every change is one transaction (WAL, synchronous=FULL), so a kill -9 at any point leaves either the state
before it or the state after it. Bundle files live beside the database, named by their SHA-256, and are
written crash-safely before any slot points at them.

A database that cannot write (disk full, I/O error) raises OSError, as a file would (``ENOSPC`` for SQLite's
"database or disk is full", else ``EIO``), so that callers handle one kind of storage failure. The outbox never
raises for it: :meth:`AgentState.enqueue` refuses the message and counts it (``outbox_refused``).

The outbox has two lanes: alerts (:data:`PRIORITY_ALERT`) are sent before anything queued at the normal
priority, and when the outbox is full the oldest message of the lowest priority goes first: no alert is dropped
while any telemetry could be.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.storage import atomic_write

_SCHEMA = """
CREATE TABLE IF NOT EXISTS slots (name TEXT PRIMARY KEY, sha256 TEXT NOT NULL, ref TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (model TEXT PRIMARY KEY, highest INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
                                   payload BLOB NOT NULL, created REAL NOT NULL);
"""
_OUTBOX_PRIORITY = """
ALTER TABLE outbox ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
"""
_OUTBOX_ORDER = "CREATE INDEX IF NOT EXISTS outbox_order ON outbox (priority DESC, id)"
PRIORITY_NORMAL, PRIORITY_ALERT = 0, 1
"""Outbox lanes: telemetry and update events at the normal priority, alerts above it."""
SLOTS = ("active", "previous", "candidate", "shadow")
DEVICE_KEY_FILE = "device.key"
"""The device's X25519 private key (base64, mode 0600): made at the first start, it never leaves the device."""
DEVICE_PUB_FILE = "device.pub"
WRAPPED_KEY = "wrapped_key:"
"""Key-value prefix: ``wrapped_key:<bundle sha256>`` is an encrypted bundle's model key, wrapped for this device."""
DEFAULT_OUTBOX_BYTES = 64 * 1024 * 1024
_SQLITE_FULL = 13
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    """A model the agent holds: its bundle's SHA-256 and ``name@version``."""

    sha256: str
    ref: str


@dataclass(frozen=True)
class OutboxItem:
    id: int
    topic: str
    payload: bytes


class AgentState:
    """Thread-safe access to the agent's SQLite state."""

    def __init__(self, data_dir: Path, *, outbox_max_bytes: int = DEFAULT_OUTBOX_BYTES) -> None:
        self.data_dir = data_dir
        self.outbox_max_bytes = outbox_max_bytes
        self.bundles_dir = data_dir / "bundles"
        self.bundles_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._refused_unsaved = 0
        self.refusals_recovered = 0
        self.last_refusal: str | None = None
        self._db = sqlite3.connect(data_dir / "agent.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        if "priority" not in {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}:
            self._db.executescript(_OUTBOX_PRIORITY)  # a state from before the alert lane
        self._db.execute(_OUTBOX_ORDER)
        self.priority_queued = False
        """Set when a message above the normal priority is queued; cleared by :meth:`pending` (a sender reading
        a long backlog stops to read again)."""

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # slots ------------------------------------------------------------------------------------
    def slot(self, name: str) -> Slot | None:
        row = self._one("SELECT sha256, ref FROM slots WHERE name = ?", (name,))
        return Slot(row[0], row[1]) if row else None

    def stage(self, slot: Slot) -> None:
        self._write([("INSERT OR REPLACE INTO slots VALUES ('candidate', ?, ?)", (slot.sha256, slot.ref))])

    def activate_candidate(self, model: str, release: int) -> None:
        """candidate -> active, active -> previous, and raise the model's trusted release: one transaction."""
        self._write([
            ("DELETE FROM slots WHERE name = 'previous'", ()),
            ("UPDATE slots SET name = 'previous' WHERE name = 'active'", ()),
            ("UPDATE slots SET name = 'active' WHERE name = 'candidate'", ()),
            ("INSERT INTO releases VALUES (?, ?) ON CONFLICT(model) DO UPDATE SET highest = "
             "max(highest, excluded.highest)", (model, release)),
        ])

    def drop_candidate(self) -> None:
        self._write([("DELETE FROM slots WHERE name = 'candidate'", ())])

    def roll_back(self) -> Slot | None:
        """previous -> active; the failed active model is dropped. Returns the new active slot, or None."""
        previous = self.slot("previous")
        if previous is None:
            return None
        self._write([
            ("DELETE FROM slots WHERE name = 'active'", ()),
            ("UPDATE slots SET name = 'active' WHERE name = 'previous'", ()),
        ])
        return previous

    def set_shadow(self, slot: Slot | None) -> None:
        statements: list[tuple[str, tuple[Any, ...]]] = [("DELETE FROM slots WHERE name = 'shadow'", ())]
        if slot is not None:
            statements.append(("INSERT INTO slots VALUES ('shadow', ?, ?)", (slot.sha256, slot.ref)))
        self._write(statements)

    def highest_releases(self) -> dict[str, int]:
        with self._lock, self._translated():
            return dict(self._db.execute("SELECT model, highest FROM releases").fetchall())

    def bundle_path(self, sha256: str) -> Path:
        return self.bundles_dir / f"{sha256}.bundle"

    def save_bundle(self, sha256: str, data: bytes) -> Path:
        path = self.bundle_path(sha256)
        atomic_write(path, data)
        return path

    def adopt_bundle(self, sha256: str, source: Path) -> Path:
        """Move a finished download (already fsynced) into place as the bundle ``sha256``: no copy is written."""
        path = self.bundle_path(sha256)
        os.replace(source, path)
        dir_fd = os.open(self.bundles_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return path

    # wrapped model keys ------------------------------------------------------------------------
    def keep_wrapped_key(self, sha256: str, wrapped: str) -> None:
        """Keep an encrypted bundle's wrapped model key beside its slot (wrapped: only this device opens it)."""
        self.put(WRAPPED_KEY + sha256, wrapped)

    def wrapped_key(self, sha256: str) -> str | None:
        value = self.get(WRAPPED_KEY + sha256)
        return value if isinstance(value, str) else None

    def forget_wrapped_keys(self, keep: set[str]) -> None:
        """Drop the wrapped keys of bundles the agent no longer holds."""
        with self._lock, self._translated():
            keys = [row[0] for row in self._db.execute("SELECT key FROM kv WHERE key LIKE ?", (WRAPPED_KEY + "%",))]
        doomed = [(key,) for key in keys if key.removeprefix(WRAPPED_KEY) not in keep]
        if doomed:
            self._write([("DELETE FROM kv WHERE key = ?", key) for key in doomed])

    # key-value --------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        row = self._one("SELECT value FROM kv WHERE key = ?", (key,))
        return json.loads(row[0]) if row else default

    def put(self, key: str, value: Any) -> None:
        self._write([("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))])

    def put_all(self, values: dict[str, Any]) -> None:
        """Several keys in one transaction."""
        if values:
            self._write([("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))
                         for key, value in values.items()])

    # outbox -----------------------------------------------------------------------------------
    def enqueue(self, topic: str, counter: str, make_payload: Callable[[int], bytes], *,
                priority: int = PRIORITY_NORMAL) -> int | None:
        """Take the next sequence number of ``counter``, build the payload with it, and queue it in the lane of
        ``priority``: atomically.

        When the queue would exceed ``outbox_max_bytes`` the oldest messages of the lowest priority are dropped
        and counted. When the
        database cannot write (disk full, I/O error) the message is refused, counted in ``outbox_refused``
        (kept in memory until a message is queued again) and None returned: the caller goes on without it.
        """
        try:
            with self._lock, self._translated():
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    seq = self._bump(counter, 1, first=0)
                    payload = make_payload(seq)
                    self._db.execute("INSERT INTO outbox (topic, payload, created, priority) VALUES (?, ?, ?, ?)",
                                     (topic, payload, time.time(), priority))
                    queued = self._bump("outbox_bytes", len(payload), first=len(payload))
                    while queued > self.outbox_max_bytes:
                        oldest = self._db.execute(
                            "SELECT id, length(payload) FROM outbox ORDER BY priority, id LIMIT 1").fetchone()
                        if oldest is None:
                            break
                        self._db.execute("DELETE FROM outbox WHERE id = ?", (oldest[0],))
                        queued = self._bump("outbox_bytes", -oldest[1], first=0)
                        self._bump("outbox_dropped", 1, first=1)
                    if self._refused_unsaved:
                        self._bump("outbox_refused", self._refused_unsaved, first=self._refused_unsaved)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
                self.refusals_recovered += self._refused_unsaved
                self._refused_unsaved = 0
                if priority > PRIORITY_NORMAL:
                    self.priority_queued = True
        except OSError as exc:
            with self._lock:
                self._refused_unsaved += 1
                self.last_refusal = str(exc)
                first = self._refused_unsaved == 1
            if first:  # one line per episode: the rest are counted
                log.warning("outbox refuses messages (counted until it can write again): %s", exc)
            return None
        return seq

    @property
    def outbox_refused(self) -> int:
        """Messages the outbox refused (it could not write), since the state was created."""
        with self._lock:
            unsaved = self._refused_unsaved
        return self.counter("outbox_refused") + unsaved

    def take_refusals_recovered(self) -> int:
        """How many refused messages were counted durably since the last call (the outbox writes again)."""
        with self._lock:
            recovered, self.refusals_recovered = self.refusals_recovered, 0
        return recovered

    def counter(self, name: str) -> int:
        row = self._one("SELECT value FROM counters WHERE name = ?", (name,))
        return int(row[0]) if row else 0

    def _bump(self, name: str, delta: int, *, first: int) -> int:
        """Add ``delta`` to a counter inside the caller's transaction (``first`` when it is new)."""
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        value = int(row[0]) + delta if row else first
        self._db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (name, value))
        return value

    def pending(self, limit: int = 100) -> list[OutboxItem]:
        """The next messages to send: the highest priority first, each lane in the order it was queued."""
        with self._lock, self._translated():
            self.priority_queued = False
            rows = self._db.execute("SELECT id, topic, payload FROM outbox ORDER BY priority DESC, id LIMIT ?",
                                    (limit,)).fetchall()
        return [OutboxItem(r[0], r[1], bytes(r[2])) for r in rows]

    def pending_count(self) -> int:
        row = self._one("SELECT count(*) FROM outbox", ())
        return int(row[0]) if row else 0

    def delivered(self, item_id: int) -> None:
        self._write([
            ("UPDATE counters SET value = value - coalesce((SELECT length(payload) FROM outbox WHERE id = ?), 0) "
             "WHERE name = 'outbox_bytes'", (item_id,)),
            ("DELETE FROM outbox WHERE id = ?", (item_id,)),
        ])

    # helpers ----------------------------------------------------------------------------------
    def _one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        with self._lock, self._translated():
            row: tuple[Any, ...] | None = self._db.execute(sql, args).fetchone()
            return row

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock, self._translated():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        """Undo the open transaction, if SQLite has not already (it rolls back itself on a full disk)."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("rollback failed: %s", exc)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """SQLite's storage failures as OSError (see the module docstring); misuse passes untouched."""
        try:
            yield
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
            if isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
                raise
            code = errno.ENOSPC if getattr(exc, "sqlite_errorcode", 0) & 0xFF == _SQLITE_FULL else errno.EIO
            raise OSError(code, f"agent state {self.data_dir / 'agent.db'}: {exc}") from exc


def device_public_key(data_dir: Path) -> str:
    """The device's X25519 public key (base64): the key pair is made here at the first start (the private key
    in ``DATA_DIR/device.key``, mode 0600); later starts only read the public key (no ``cryptography`` loaded)."""
    private_path, public_path = data_dir / DEVICE_KEY_FILE, data_dir / DEVICE_PUB_FILE
    if private_path.is_file() and public_path.is_file():
        return public_path.read_text().strip()
    from edgefleet.bundle import keywrap

    if private_path.is_file():  # stopped between the two writes
        public = keywrap.public_from_private(device_private_key(data_dir))
    else:
        private, public = keywrap.generate_device_key()
        atomic_write(private_path, (keywrap.key_text(private) + "\n").encode(), mode=0o600)
    text = keywrap.key_text(public)
    atomic_write(public_path, (text + "\n").encode())
    return text


def device_private_key(data_dir: Path) -> bytes:
    """The raw private key of :func:`device_public_key`'s pair; OSError or ValueError when it is unreadable."""
    return base64.b64decode((data_dir / DEVICE_KEY_FILE).read_text().strip(), validate=True)


def describe(state: AgentState) -> dict[str, Any]:
    """A plain summary of the state for ``edgefleet agent status``."""
    slots = {name: (slot.ref if (slot := state.slot(name)) else None) for name in SLOTS}
    return {**slots, "update_state": state.get("update_state", "idle"), "last_error": state.get("last_error"),
            "pending_update": (state.get("pending_update") or {}).get("version"),
            "releases": state.highest_releases(), "outbox_pending": state.pending_count(),
            "outbox_dropped": state.counter("outbox_dropped"), "outbox_refused": state.outbox_refused,
            "failed_models": state.get("failed_models", [])}
