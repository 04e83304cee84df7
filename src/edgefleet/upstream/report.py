"""The upstream model's answers, reported to the control plane as labels of lower trust.

Every window a device escalates (live, or later from its queue) reaches the upstream model with the device, the
model that was unsure, the local answer and the time. :class:`AnswerReporter` keeps each answer with its window in a
bounded buffer (the oldest dropped first) and a background thread posts them in batches to
``POST /api/v1/fielddata/upstream`` (:meth:`edgefleet.client.ControlPlane.report_upstream_answers`), where they are
stored as hard examples labelled ``upstream``: never a gate's evidence, and in a dataset only when asked. A failed
post is retried with backoff; the service never waits on the control plane.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
from collections.abc import Callable
from typing import Any, Protocol

from edgefleet.errors import EdgefleetError

log = logging.getLogger(__name__)

BATCH = 200
"""Answers per post (the endpoint takes at most 500)."""


class AnswerSink(Protocol):
    """Where batches of answers go (a ControlPlane): raises an EdgefleetError when they did not arrive."""

    def report_upstream_answers(self, answers: list[dict[str, Any]]) -> Any: ...


class AnswerReporter:
    """A bounded buffer of answers and the thread that posts them every ``interval_s``."""

    def __init__(self, sink: AnswerSink, *, max_items: int = 10_000, interval_s: float = 1.0,
                 retry_cap_s: float = 30.0, on_close: Callable[[], None] | None = None) -> None:
        self.sink = sink
        self.interval_s = interval_s
        self.retry_cap_s = retry_cap_s
        self.counts = {"reported": 0, "dropped": 0, "failed_posts": 0, "anonymous": 0}
        self._buffer: collections.deque[dict[str, Any]] = collections.deque(maxlen=max(1, max_items))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._on_close = on_close
        self._thread = threading.Thread(target=self._loop, name="upstream-report", daemon=True)
        self._thread.start()

    def add(self, request: Any, answer: dict[str, Any]) -> None:
        """Keep one answer: ``request`` is the ``/v1/infer`` body (model, device, shape, data, local, ts)."""
        device = getattr(request, "device", None)
        local = getattr(request, "local", None) or {}
        if not device or not request.model or request.ts is None:
            with self._lock:
                self.counts["anonymous"] += 1  # no device or time: nothing a label could be tied to
            return
        record = {"model": request.model, "device": device, "ts": float(request.ts), "shape": list(request.shape),
                  "data": request.data, "local_label": str(local.get("label", ""))[:128],
                  "local_confidence": min(max(float(local.get("confidence", 0.0) or 0.0), 0.0), 1.0),
                  "label": answer["label"], "confidence": min(max(float(answer["confidence"]), 0.0), 1.0),
                  "upstream_model": answer.get("model", "")}
        with self._lock:
            if len(self._buffer) == self._buffer.maxlen:
                self.counts["dropped"] += 1
            self._buffer.append(record)

    def pending(self) -> int:
        with self._lock:
            return len(self._buffer)

    def flush(self) -> bool:
        """Post everything buffered now; False when a post failed (what it held stays buffered)."""
        while True:
            with self._lock:
                batch = [self._buffer[i] for i in range(min(BATCH, len(self._buffer)))]
            if not batch:
                return True
            try:
                self.sink.report_upstream_answers(batch)
            except EdgefleetError as exc:
                log.info("upstream answers not reported yet: %s", exc)
                with self._lock:
                    self.counts["failed_posts"] += 1
                return False
            with self._lock:
                for _ in batch:
                    if self._buffer:
                        self._buffer.popleft()
                self.counts["reported"] += len(batch)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after one last flush."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout_s)
        self.flush()
        if self._on_close is not None:
            self._on_close()

    def _loop(self) -> None:
        attempt = 0
        while not self._closed.is_set():
            delay = self.interval_s if attempt == 0 else random.uniform(
                0.0, min(self.retry_cap_s, self.interval_s * 2 ** min(attempt, 16)))
            self._wake.wait(delay)
            if self._closed.is_set():
                return
            attempt = 0 if self.flush() else attempt + 1


def control_plane_reporter(server: str, token: str, **options: Any) -> AnswerReporter:
    """A reporter posting to the control plane at ``server`` with an operator ``token``."""
    from edgefleet.client import ControlPlane

    api = ControlPlane(server, token)
    return AnswerReporter(api, on_close=api.close, **options)
