"""Move rows from the store's outbox to Kafka, at least once, one replica at a time.

A round: renew the export lease (:meth:`~edgefleet.server.store.export.ExportStore.claim_export`; a replica without
it stands by), read the oldest queued rows, send them all, wait for the broker to acknowledge every one, then
delete them from the outbox. While busy, the next round's rows are read during the acknowledgements. A round
that fails or is not acknowledged within ``timeout_s`` leaves its rows queued: the producer is closed, and the
next round, after a backoff, sends them again (a consumer drops the copies by ``id``). The producer asks for
``acks=all`` and idempotence, so a retry inside one producer session never duplicates a message; a broker that
refuses idempotent producers gets a plain one, said once in the log.

The exporter runs in its own thread with its own event loop; the store is called from worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from edgefleet.errors import EdgefleetError
from edgefleet.server.export.envelope import envelope, headers
from edgefleet.server.export.settings import KafkaSettings
from edgefleet.server.store import Store
from edgefleet.server.store.export import Queued
from edgefleet.transport.retry import Backoff

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_POLL_S = 0.1
"""How often an idle exporter looks for new rows."""
READ_AHEAD_ROUNDS = 20
"""Full rounds read ahead (by id) before a read starts over from the outbox's oldest row."""
PARTITION_CACHE = 100_000
"""(topic, key) -> partition entries kept before the cache starts over."""


class KafkaExporter:
    """The Kafka export of one server replica; ``start`` enables the export in the store and runs it."""

    def __init__(self, store: Store, settings: KafkaSettings, holder: str, *, backoff_cap_s: float = 5.0) -> None:
        self.store = store
        self.settings = settings
        self.holder = holder
        self.idempotent = settings.idempotent
        self.counts = {"exported": 0, "nonconforming": 0, "failed_rounds": 0}
        self.holding = False
        self.broker_up: bool | None = None
        self.last_error: str | None = None
        self.last_ack: float | None = None
        self._round_started: float | None = None
        self._backoff = Backoff(base_s=0.25, cap_s=backoff_cap_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._partitions: dict[tuple[str, bytes], tuple[int, int]] = {}
        from aiokafka.partitioner import DefaultPartitioner

        self._partitioner = DefaultPartitioner()

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        # one line per change of state from here (``_failed``) instead of aiokafka's line per connection attempt
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        self.store.enable_export(True)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="kafka-export", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # figures -----------------------------------------------------------------------------------
    def figures(self) -> dict[str, float]:
        """Numbers for ``/metrics``: lag and backlog (shared by every replica), this replica's counts."""
        backlog = self.store.export_backlog()
        with self._lock:
            counts = dict(self.counts)
        return {"lag_seconds": backlog.lag_s(time.time()), "pending": float(backlog.pending),
                "lease_held": float(self.holding), "broker_up": float(bool(self.broker_up)),
                **{k: float(v) for k, v in counts.items()}}

    def status(self) -> dict[str, Any]:
        """The export's state for operators and the dashboard (``GET /api/v1/export/status``)."""
        backlog = self.store.export_backlog()
        now = time.time()
        with self._lock:
            counts = dict(self.counts)
        return {"enabled": backlog.enabled, "bootstrap": self.settings.bootstrap, "replica": self.holder,
                "holder": backlog.holder if backlog.lease_until >= now else None, "lease_held": self.holding,
                "broker_up": self.broker_up, "idempotent": self.idempotent, "pending": backlog.pending,
                "lag_s": round(backlog.lag_s(now), 3), "exported_total": backlog.exported, "replica_counts": counts,
                "last_ack": self.last_ack, "last_error": self.last_error,
                "waiting_s": round(now - started, 3) if (started := self._round_started) is not None else 0.0,
                "topics": {t: self.settings.topic(t) for t in ("telemetry", "events", "alerts", "decisions",
                                                               "hard_examples")}}

    # the loop ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        from aiokafka.errors import KafkaError

        producer: Any = None
        ahead: asyncio.Future[list[Queued]] | None = None  # the next round, read while this one is acknowledged
        streak = 0  # full rounds read ahead since the last read from the outbox's start
        claimed = 0.0  # when the lease was last taken or renewed (renewed a third of the way through)
        try:
            while not self._stop.is_set():
                try:
                    if not self.holding or time.monotonic() - claimed > self.settings.lease_s / 3:
                        self.holding = await _in_thread(self.store.claim_export, self.holder,
                                                        self.settings.lease_s)
                        claimed = time.monotonic()
                    if not self.holding:
                        await self._close(producer)
                        producer = None
                        await self._sleep(min(1.0, self.settings.lease_s / 3))
                        continue
                    rows = await ahead if ahead is not None else \
                        await _in_thread(self.store.pending_exports, self.settings.batch)
                    ahead = None
                    if not rows:
                        streak = 0
                        await self._sleep(IDLE_POLL_S)
                        continue
                    self._round_started = time.time()
                    if producer is None:
                        producer = await self._producer()
                    if len(rows) == self.settings.batch and streak < READ_AHEAD_ROUNDS:
                        # busy: read the next rows (after these, by id) while these are acknowledged; every
                        # READ_AHEAD_ROUNDS the read starts over, so that a row committed late under a lower id
                        # (PostgreSQL) is not passed over for long
                        ahead = asyncio.ensure_future(_in_thread(self.store.pending_exports, self.settings.batch,
                                                                 rows[-1].id))
                        streak += 1
                    else:
                        streak = 0
                    nonconforming = await self._unless_stopped(
                        asyncio.wait_for(self._send(producer, rows), self.settings.timeout_s))
                    if nonconforming is None:
                        break  # stopping: the round's rows stay queued for the next exporter
                    await _in_thread(self.store.mark_exported, [r.id for r in rows])
                    self._acknowledged(len(rows), nonconforming)
                except (KafkaError, OSError, TimeoutError, EdgefleetError) as exc:  # a round failed: retried
                    self.holding = self.holding and time.monotonic() - claimed < self.settings.lease_s / 2
                    await _settle(ahead)
                    ahead = None
                    streak = 0
                    await self._failed(exc, producer)
                    producer = None
        finally:
            await _settle(ahead)
            await self._close(producer)
            with contextlib.suppress(EdgefleetError):
                self.store.release_export(self.holder)
            self.holding = False

    async def _send(self, producer: Any, rows: list[Queued]) -> int:
        """Send a round and wait for every acknowledgement; how many rows did not conform to their schema.

        Rows go out in record batches, one per topic and partition at a time, submitted in the round's order
        (a key's partition is the producer's own, murmur2 of the key, so a device's order holds): one future
        per batch instead of one per message, which is most of the producer's cost at ingest rates."""
        waiting = []
        nonconforming = 0
        open_batches: dict[tuple[str, int], Any] = {}
        for row in rows:
            value, conforms = envelope(row)
            nonconforming += not conforms
            topic, key = self.settings.topic(row.topic), row.key.encode()
            partition = await self._partition(producer, topic, key)
            batch = open_batches.get((topic, partition))
            if batch is None:
                batch = open_batches[(topic, partition)] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None, headers=headers(row)) is None:  # full
                waiting.append(await producer.send_batch(batch, topic, partition=partition))
                batch = open_batches[(topic, partition)] = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None, headers=headers(row)) is None:
                    raise EdgefleetError(f"export row {row.id} does not fit in a Kafka record batch")
        for (topic, partition), batch in open_batches.items():
            waiting.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*waiting)
        return nonconforming

    async def _partition(self, producer: Any, topic: str, key: bytes) -> int:
        """The partition the producer's default partitioner gives ``key`` (cached per topic and key)."""
        known = await producer.partitions_for(topic)  # the producer's metadata: a set, no request once known
        cached = self._partitions.get((topic, key))
        if cached is None or cached[0] != len(known):  # sorted only on a miss, not per message
            partitions = sorted(known)
            cached = (len(partitions), self._partitioner(key, partitions, partitions))
            if len(self._partitions) > PARTITION_CACHE:
                self._partitions.clear()
            self._partitions[(topic, key)] = cached
        return cached[1]

    async def _unless_stopped(self, work: Awaitable[T]) -> T | None:
        """``work``'s result, or None once :meth:`stop` is called (``work`` is then cancelled)."""
        task = asyncio.ensure_future(work)
        while not task.done():
            if self._stop.is_set():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                return None
            await asyncio.wait([task], timeout=0.05)
        return task.result()

    def _acknowledged(self, n: int, nonconforming: int) -> None:
        with self._lock:
            self.counts["exported"] += n
            self.counts["nonconforming"] += nonconforming
        if nonconforming:
            log.warning("exported %d message(s) that do not conform to the schema version they carry", nonconforming)
        if self.broker_up is not True:
            log.info("Kafka export: broker %s acknowledged", self.settings.bootstrap)
        self.broker_up, self.last_error, self.last_ack, self._round_started = True, None, time.time(), None
        self._backoff.reset()

    async def _failed(self, exc: BaseException, producer: Any) -> None:
        line = f"{type(exc).__name__}: {exc}".splitlines()[0][:300] if str(exc) else type(exc).__name__
        if isinstance(exc, TimeoutError):
            line = f"no acknowledgement within {self.settings.timeout_s:g} s"
        if line != self.last_error:
            log.warning("Kafka export to %s: %s (queued rows stay queued; retrying)", self.settings.bootstrap, line)
        with self._lock:
            self.counts["failed_rounds"] += 1
        self.broker_up, self.last_error, self._round_started = False, line, None
        await self._close(producer)
        await self._sleep(self._backoff.next_delay())

    async def _producer(self) -> Any:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError, UnknownError

        def make() -> Any:
            return AIOKafkaProducer(**self.settings.client_kwargs(), client_id=f"edgefleet-{self.holder}-export",
                                    partitioner=self._partitioner, acks="all", enable_idempotence=self.idempotent,
                                    linger_ms=5, max_batch_size=256 * 1024,
                                    request_timeout_ms=int(self.settings.timeout_s * 1000), retry_backoff_ms=200)

        producer = make()
        try:
            await producer.start()
        except UnknownError:
            await self._close(producer)
            if not self.idempotent:
                raise
            log.warning("Kafka broker %s refused an idempotent producer (InitProducerId): exporting without "
                        "idempotence; consumers still drop copies by id", self.settings.bootstrap)
            self.idempotent = False
            producer = make()
            try:
                await producer.start()
            except KafkaError:
                await self._close(producer)
                raise
        except BaseException:
            await self._close(producer)
            raise
        return producer

    async def _close(self, producer: Any) -> None:
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5.0)

    async def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _in_thread(fn: Any, *args: Any) -> Awaitable[Any]:
    return asyncio.to_thread(fn, *args)


async def _settle(future: asyncio.Future[Any] | None) -> None:
    """Let a read ahead that is no longer wanted finish (it only reads), whatever it raises."""
    if future is not None:
        with contextlib.suppress(Exception):
            await future
