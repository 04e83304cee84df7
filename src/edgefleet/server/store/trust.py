"""The trust log in the store: pinned keys, key statements and rollback orders, in the order they were added.

The store only keeps the log; what it means (the server's keyring, what devices are sent) is decided in
:mod:`edgefleet.server.trust`. Adding a record runs a caller's check on the log as it is inside the same
transaction (under a PostgreSQL advisory lock, so replicas add one at a time), like
:meth:`RolloutStore.advance_rollout`'s ``compute``.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterable

from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import IntegrityError

from edgefleet.server.schema import Device, TrustRecord
from edgefleet.server.store.core import StoreBase

_LOCK_KEY = 0x45460007  # pg_advisory_xact_lock key: "EF" and issue 7
TrustCheck = Callable[[list[TrustRecord]], bool]


class TrustStore(StoreBase):
    """The trust log."""

    def trust_log(self) -> list[TrustRecord]:
        """Every record, oldest first; ``body`` holds the record's bytes in base64."""
        with self.session() as s:
            return list(s.scalars(select(TrustRecord).order_by(TrustRecord.id)))

    def pin_keys(self, keys: Iterable[tuple[str, str]]) -> int:
        """Add (key id, public key text) pins not yet in the log; return how many were added."""
        added = 0
        for key_id, public in keys:
            added += self.add_trust_record("pin", key_id, public.encode(), check=lambda _log: True)
        return added

    def add_trust_record(self, kind: str, subject: str, body: bytes, *, check: TrustCheck, signer: str | None = None,
                         release: int | None = None, fan_out: bool = False) -> bool:
        """Append a record unless the same bytes are already in the log or ``check(log)`` says False (it raises
        to refuse); with ``fan_out`` every device's desired state is marked for publishing again, in the same
        transaction. Return whether it was added."""
        digest = hashlib.sha256(body).hexdigest()
        try:
            with self.session() as s:
                if self.dialect == "postgresql":
                    s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
                log = list(s.scalars(select(TrustRecord).order_by(TrustRecord.id)))
                if any(r.sha256 == digest for r in log) or not check(log):
                    return False
                s.add(TrustRecord(kind=kind, subject=subject, release=release, sha256=digest,
                                  body=base64.b64encode(body).decode(), signer=signer, created=time.time()))
                if fan_out:
                    s.execute(update(Device).values(desired_rev=Device.desired_rev + 1)
                              .execution_options(synchronize_session=False))
        except IntegrityError:  # a replica added the same bytes meanwhile (SQLite has no advisory lock)
            return False
        return True

    def remove_trust_record(self, body: bytes) -> None:
        """Drop the record of these bytes (a rollback order whose rollout could not be created)."""
        digest = hashlib.sha256(body).hexdigest()
        with self.session() as s:
            s.execute(delete(TrustRecord).where(TrustRecord.sha256 == digest))
