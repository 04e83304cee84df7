"""Batched rewrites of the broker's credential files: one sync serves every request made while it waited.

Each ``device add`` changes the broker's password file, but a sync rewrites the whole file (and the ACL and the
CRL) from the store, which costs time in proportion to the fleet: one sync per add made provisioning N devices
O(N^2). :class:`BrokerSync` runs the sync on its own thread instead. A request made while a sync is running is
served by the next one, which starts no sooner after the last one than that one took (``min_interval_s`` at
least), so that syncing takes at most about half of one core however fast devices are added; an idle syncer
starts at once.

Two ways to ask:

- :meth:`BrokerSync.sync` waits until a sync that started after the call has finished (and raises its error):
  for revocations, which must have taken effect when the operator's command returns;
- :meth:`BrokerSync.sync_soon` waits the same way only while syncs are cheap (the last one took under
  ``cheap_s``): a small fleet's new device can log in as soon as ``device add`` returns, and a large fleet's
  adds return without waiting for a rewrite of every other device's line (the device is admitted within about
  one sync's time; a refused first connection is retried by the agent).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

CHEAP_S = 0.025
"""A sync that took less than this is waited for by :meth:`BrokerSync.sync_soon`."""
WAIT_S = 30.0
"""The longest :meth:`BrokerSync.sync` waits for its sync."""


class BrokerSync:
    """Runs ``sync`` on a background thread, coalescing requests (see the module docstring)."""

    def __init__(self, sync: Callable[[], object], *, min_interval_s: float = 0.0, cheap_s: float = CHEAP_S,
                 name: str = "broker-sync") -> None:
        self._sync = sync
        self.min_interval_s = min_interval_s
        self.cheap_s = cheap_s
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._error: BaseException | None = None
        self._last_s = 0.0
        self._ended_at = 0.0
        self._closed = False
        self.runs = 0
        """How many syncs ran (a measure of the batching)."""
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def last_duration_s(self) -> float:
        return self._last_s

    def request(self) -> int:
        """Ask for a sync; the ticket to :meth:`wait` for."""
        with self._cond:
            self._requested += 1
            self._cond.notify_all()
            return self._requested

    def wait(self, ticket: int, timeout_s: float = WAIT_S) -> bool:
        """Wait (bounded) until the sync serving ``ticket`` has finished; False on timeout. Raises the error of
        the latest sync if it failed (a later sync that succeeded has written everything an earlier one had to)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._done < ticket:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._cond.wait(left)
            error = self._error
        if error is not None:
            raise error
        return True

    def sync(self, timeout_s: float = WAIT_S) -> None:
        """Request a sync and wait until it has finished (see :meth:`wait`)."""
        self.wait(self.request(), timeout_s)

    def sync_soon(self, timeout_s: float = 1.0) -> None:
        """Request a sync; wait for it only while syncs are cheap."""
        ticket = self.request()
        if self._last_s < self.cheap_s:
            self.wait(ticket, timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Run what was requested, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._done == self._requested and not self._closed:
                    self._cond.wait()
                if self._done == self._requested:
                    return  # closed, nothing left
            pause = max(self.min_interval_s, self._last_s) - (time.monotonic() - self._ended_at)
            if pause > 0:
                time.sleep(pause)  # requests made meanwhile join this sync
            with self._cond:
                upto = self._requested
            started = time.monotonic()
            error: BaseException | None = None
            try:
                self._sync()
            except Exception as exc:  # reported to the waiters; the next request tries again
                log.warning("broker credential sync failed: %s", exc)
                error = exc
            ended = time.monotonic()
            with self._cond:
                self._last_s, self._ended_at = ended - started, ended
                self.runs += 1
                self._error = error
                self._done = upto
                self._cond.notify_all()
