"""BrokerSync batches the broker's credential rewrites: requests made while a sync runs share the next one, a
waiter returns only after a sync that started after its request, and a failure reaches the waiters."""

from __future__ import annotations

import threading
import time

import pytest

from edgefleet.server.broker_sync import BrokerSync


class SlowSync:
    """A sync that takes ``seconds`` and records how many requests had been made when it started."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.requests = 0
        self.seen: list[int] = []
        self.fail = False

    def __call__(self) -> None:
        self.seen.append(self.requests)
        time.sleep(self.seconds)
        if self.fail:
            raise OSError("disk full")


class GatedSync:
    """A sync that blocks until ``gate`` is set (after its first run unless ``hold_all``)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.runs = 0

    def __call__(self) -> None:
        self.runs += 1
        self.started.set()
        assert self.gate.wait(10)


def test_requests_during_a_sync_share_the_next_one() -> None:
    work = GatedSync()
    syncer = BrokerSync(work)
    try:
        first = threading.Thread(target=syncer.sync)
        first.start()
        assert work.started.wait(10)  # one sync is running (and held)
        threads = [threading.Thread(target=syncer.sync) for _ in range(40)]
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        assert syncer.runs == 0 and all(t.is_alive() for t in threads)  # all waiting
        work.gate.set()
        for thread in [first, *threads]:
            thread.join(10)
        assert not any(t.is_alive() for t in threads)
        assert work.runs == 2  # 41 requests, each waited for: the running sync and one more
    finally:
        syncer.close()


def test_sync_waits_for_a_sync_that_started_after_the_request() -> None:
    work = SlowSync(0.1)
    syncer = BrokerSync(work)
    try:
        syncer.request()  # a sync starts and runs for 0.1 s
        time.sleep(0.02)
        work.requests = 1
        syncer.sync()
        assert work.seen[-1] == 1  # not served by the sync that was already running
        assert syncer.runs == 2
    finally:
        syncer.close()


def test_sync_soon_does_not_wait_once_syncs_are_expensive() -> None:
    work = SlowSync(0.2)
    syncer = BrokerSync(work, cheap_s=0.1)
    try:
        syncer.sync_soon()  # nothing known yet: waited for, and measured at 0.2 s or more
        assert syncer.runs == 1 and syncer.last_duration_s >= 0.2
        gated = GatedSync()
        syncer._sync = gated  # the next sync blocks until released
        syncer.sync_soon()
        assert not gated.gate.is_set()  # returned while its sync has not ended
        gated.gate.set()
        syncer.sync()
        assert gated.runs >= 1
    finally:
        syncer.close()


def test_a_failed_sync_is_raised_to_its_waiters_and_the_next_one_retries() -> None:
    work = SlowSync(0.0)
    work.fail = True
    syncer = BrokerSync(work)
    try:
        with pytest.raises(OSError, match="disk full"):
            syncer.sync()
        work.fail = False
        syncer.sync()
        assert syncer.runs == 2
    finally:
        syncer.close()


def test_close_runs_what_was_requested() -> None:
    work = SlowSync(0.05)
    syncer = BrokerSync(work)
    syncer.request()
    time.sleep(0.01)
    syncer.request()
    syncer.close()
    assert syncer.runs == 2
