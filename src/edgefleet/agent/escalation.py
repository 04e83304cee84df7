"""Tiered inference: windows the device is unsure of go to a bigger model upstream, with a deadline.

``Escalator.resolve`` is called by the inference pipeline on the sensor thread for each uncertain window:

- a token bucket (``rate_per_s``, ``burst``) bounds escalations; without a token the window is not escalated
  (``dropped_budget``) and the local answer stands;
- while the upstream is known to be down, the window goes straight to the persistent queue (``queued``), so
  the sensor loop never waits on a dead peer;
- otherwise it is sent (``sent``) and awaited for ``deadline_s``: an answer in time is used (``answered``);
  after the deadline the local answer stands and a later answer is only counted (``late``); a failure
  (``failed``) queues the window and marks the upstream down;
- a background thread retries the queue, oldest first, with exponential backoff and jitter; a success
  (``delivered``) marks the upstream up again. The queue lives in ``escalations.db`` in the agent's data
  directory (SQLite, WAL), survives restarts, and drops its oldest entry when full (``dropped_queue``).

Counters are taken (and reset) with each telemetry batch; ``pending`` is the queue's length at that moment.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.lean import allow_openssl
from edgefleet.errors import TransportError
from edgefleet.transport.mqtt_url import MqttTls, tls_context

log = logging.getLogger(__name__)

QUEUE_FILE = "escalations.db"
IDLE_POLL_S = 1.0
DRAIN_SPACING_S = 0.02  # at most ~50 queued escalations a second once the upstream is back
COUNTERS = ("sent", "answered", "late", "failed", "queued", "dropped_budget", "dropped_queue", "delivered")


@dataclass(frozen=True)
class UpstreamAnswer:
    """What the upstream model said about one window."""

    label: str
    confidence: float
    model: str = ""


class Upstream(Protocol):
    """The upstream model: one request body in, one answer out, TransportError for any failure."""

    def infer(self, body: bytes, timeout_s: float) -> UpstreamAnswer: ...


class HttpUpstream:
    """``POST {url}/v1/infer`` on an ``edgefleet serve-model`` service.

    With ``tls`` (the device's fleet files) an ``https://`` upstream is verified against the fleet CA and shown
    the device's certificate; the device ``token`` goes along as ``Authorization: Bearer``, over HTTPS or to a
    loopback address only (never in clear text across a network)."""

    def __init__(self, url: str, *, tls: MqttTls | None = None, token: str | None = None) -> None:
        allow_openssl()  # httpx makes an SSL context for every client, http:// too (edgefleet.agent.lean)
        import httpx

        self.url = url.rstrip("/")
        headers = {"content-type": "application/json"}
        parts = urlsplit(self.url)
        if token and (parts.scheme == "https" or _loopback(parts.hostname or "")):
            headers["authorization"] = f"Bearer {token}"
        verify: Any = True
        if tls is not None and parts.scheme == "https":
            verify = tls_context(tls)
        self._client = httpx.Client(headers=headers, verify=verify)

    def infer(self, body: bytes, timeout_s: float) -> UpstreamAnswer:
        import httpx

        try:
            response = self._client.post(f"{self.url}/v1/infer", content=body, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise TransportError(f"upstream {self.url} unreachable: {exc}") from exc
        if response.status_code != 200:
            raise TransportError(f"upstream {self.url} answered {response.status_code}: {response.text[:200]}")
        try:
            data = response.json()
            return UpstreamAnswer(str(data["label"]), float(data["confidence"]), str(data.get("model", "")))
        except (ValueError, KeyError, TypeError) as exc:
            raise TransportError(f"upstream {self.url} answered nonsense: {exc}") from exc

    def close(self) -> None:
        self._client.close()


def encode_request(x: np.ndarray, model: str, local_label: str, local_confidence: float, device: str = "") -> bytes:
    """The JSON body of ``/v1/infer``: the model input as little-endian float32 in base64, the local answer, the
    time and the device (the upstream reports its answer for that device's window: a label of lower trust)."""
    data = np.ascontiguousarray(x, dtype="<f4")
    body: dict[str, Any] = {"model": model, "shape": list(data.shape), "dtype": "float32",
                            "data": base64.b64encode(data.tobytes()).decode("ascii"),
                            "local": {"label": local_label, "confidence": round(local_confidence, 5)},
                            "ts": round(time.time(), 3)}
    if device:
        body["device"] = device
    return json.dumps(body, separators=(",", ":")).encode()


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = max(0.0, rate_per_s)
        self.burst = max(1.0, burst)
        self._tokens = self.burst
        self._clock = clock
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class EscalationQueue:
    """Escalations waiting for the upstream, oldest first, in SQLite; bounded, dropping the oldest."""

    def __init__(self, path: Path, max_items: int = 1000) -> None:
        self.max_items = max(1, max_items)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS escalations (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "created REAL NOT NULL, body BLOB NOT NULL)")

    def push(self, body: bytes) -> int:
        """Queue ``body``; returns how many old entries were dropped to make room."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO escalations (created, body) VALUES (?, ?)", (time.time(), body))
                (count,) = self._db.execute("SELECT count(*) FROM escalations").fetchone()
                dropped = max(0, int(count) - self.max_items)
                if dropped:
                    self._db.execute("DELETE FROM escalations WHERE id IN (SELECT id FROM escalations "
                                     "ORDER BY id LIMIT ?)", (dropped,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return dropped

    def oldest(self) -> tuple[int, bytes] | None:
        with self._lock:
            row = self._db.execute("SELECT id, body FROM escalations ORDER BY id LIMIT 1").fetchone()
        return (int(row[0]), bytes(row[1])) if row else None

    def remove(self, item_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM escalations WHERE id = ?", (item_id,))

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT count(*) FROM escalations").fetchone()
        return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass(frozen=True)
class EscalationPolicy:
    """Deadline, rate budget, queue bound and retry pacing; ``escalate_below`` overrides the manifest's."""

    deadline_s: float = 0.25
    rate_per_s: float = 1.0
    burst: float = 5.0
    queue_max: int = 1000
    request_timeout_s: float = 5.0
    retry_base_s: float = 0.5
    retry_cap_s: float = 30.0
    escalate_below: float | None = None


class _Job:
    __slots__ = ("abandoned", "done")

    def __init__(self) -> None:
        self.abandoned = False
        self.done = False


class Escalator:
    """Sends uncertain windows upstream within a deadline and a budget; queues them while it is down."""

    def __init__(self, upstream: Upstream, data_dir: Path, policy: EscalationPolicy = EscalationPolicy(), *,
                 clock: Callable[[], float] = time.monotonic, device: str = "") -> None:
        self.upstream = upstream
        self.device = device
        self.policy = policy
        self.queue = EscalationQueue(data_dir / QUEUE_FILE, policy.queue_max)
        self._bucket = TokenBucket(policy.rate_per_s, policy.burst, clock)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._up = len(self.queue) == 0  # with a backlog from an earlier run, let the retry thread probe first
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="escalate")
        self._retry = threading.Thread(target=self._retry_loop, name="escalation-retry", daemon=True)
        self._retry.start()

    @property
    def escalate_below(self) -> float | None:
        return self.policy.escalate_below

    @property
    def upstream_up(self) -> bool:
        return self._up

    def resolve(self, x: np.ndarray, model: str, local_label: str, local_confidence: float) -> UpstreamAnswer | None:
        """The upstream's answer for window ``x`` if it came in time; None means: use the local answer."""
        if self._closed.is_set():
            return None
        if not self._bucket.take():
            self._count("dropped_budget")
            return None
        body = encode_request(x, model, local_label, local_confidence, self.device)
        if not self._up:
            self._enqueue(body)
            return None
        job = _Job()
        self._count("sent")
        future = self._pool.submit(self._send_live, body, job)
        try:
            answer = future.result(timeout=self.policy.deadline_s)
        except FutureTimeout:
            with self._lock:
                if not job.done:
                    job.abandoned = True
                    return None
            answer = future.result()
        except TransportError:
            return None
        self._count("answered")
        return answer

    def take_counts(self) -> dict[str, int]:
        """Counters since the previous call (zeros left out) and the queue's current length as ``pending``."""
        with self._lock:
            counts = {k: v for k, v in self._counts.items() if v}
            self._counts = dict.fromkeys(COUNTERS, 0)
        pending = len(self.queue)
        if pending:
            counts["pending"] = pending
        return counts

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the retry thread and release the queue (what is queued stays on disk)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._retry.join(timeout=timeout_s)
        close = getattr(self.upstream, "close", None)
        if callable(close):
            close()
        self.queue.close()

    # internals ----------------------------------------------------------------------------------
    def _send_live(self, body: bytes, job: _Job) -> UpstreamAnswer:
        timeout = max(self.policy.request_timeout_s, self.policy.deadline_s)
        try:
            answer = self.upstream.infer(body, timeout)
        except TransportError as exc:
            log.info("escalation failed, queued: %s", exc)
            self._count("failed")
            self._up = False
            self._enqueue(body)
            raise
        with self._lock:
            job.done = True
            if job.abandoned:
                self._counts["late"] += 1
        return answer

    def _enqueue(self, body: bytes) -> None:
        if self._closed.is_set():
            return
        dropped = self.queue.push(body)
        with self._lock:
            self._counts["queued"] += 1
            self._counts["dropped_queue"] += dropped
        self._wake.set()

    def _retry_loop(self) -> None:
        attempt = 0
        delay = IDLE_POLL_S
        while not self._closed.is_set():
            self._wake.wait(timeout=delay)
            self._wake.clear()
            if self._closed.is_set():
                return
            item = self.queue.oldest()
            if item is None:
                attempt, delay = 0, IDLE_POLL_S
                continue
            item_id, body = item
            try:
                self.upstream.infer(body, self.policy.request_timeout_s)
            except Exception as exc:  # TransportError; anything else must not kill the thread either
                log.debug("upstream still down: %s", exc)
                self._up = False
                attempt += 1
                delay = random.uniform(0.0, min(self.policy.retry_cap_s,
                                                self.policy.retry_base_s * 2 ** min(attempt, 30)))
                continue
            if self._closed.is_set():
                return
            self.queue.remove(item_id)
            self._count("delivered")
            self._up = True
            attempt, delay = 0, DRAIN_SPACING_S

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_escalator(config: AgentConfig) -> Escalator | None:
    """The agent's escalator to the ``serve-model`` service at ``config.upstream_url``; None without one."""
    if not config.upstream_url:
        return None
    policy = EscalationPolicy(deadline_s=config.escalation_deadline_s, rate_per_s=config.escalation_rate_per_s,
                              burst=config.escalation_burst, queue_max=config.escalation_queue_max,
                              escalate_below=config.escalate_below)
    upstream = HttpUpstream(config.upstream_url, tls=config.tls, token=config.token)  # the device's identity
    return Escalator(upstream, config.data_dir, policy, device=config.device_id)
