"""The download port's limits, on its in-memory twin: what the desired state announces is not trusted alone."""

from __future__ import annotations

import errno
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgefleet.agent.fetch import (
    ArtifactFetcher,
    Body,
    DownloadCancelled,
    DownloadLimits,
    Fetcher,
    InMemoryFetcher,
    same_origin,
)
from edgefleet.errors import BundleError, TransportError

DATA = bytes(range(256)) * 64  # 16 KiB
URL = "/artifacts/a"
GIB = 1024**3


class ShrinkingDisk(InMemoryFetcher):
    """A disk whose free space is used up by someone else while the download runs."""

    def __init__(self, free: list[int], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.free = free

    def free_bytes(self, directory: Path) -> int:
        return self.free.pop(0) if len(self.free) > 1 else self.free[0]


def test_a_size_over_the_configured_maximum_is_refused_before_any_byte(tmp_path: Path) -> None:
    fetcher = InMemoryFetcher({URL: DATA})
    with pytest.raises(BundleError) as refused:
        fetcher.fetch(URL, tmp_path / "a.part", 10 * GIB)
    assert refused.value.reason == "too_large"
    assert fetcher.requests == [] and not (tmp_path / "a.part").exists()


def test_a_size_over_the_free_space_less_the_reserve_is_refused_before_any_byte(tmp_path: Path) -> None:
    fetcher = ShrinkingDisk([len(DATA) + 1000], artifacts={URL: DATA}, limits=DownloadLimits(reserve_bytes=2000))
    with pytest.raises(OSError) as full:
        fetcher.fetch(URL, tmp_path / "a.part", len(DATA))
    assert full.value.errno == errno.ENOSPC and fetcher.requests == []


def test_free_space_falling_under_the_reserve_stops_the_download_midway(tmp_path: Path) -> None:
    big = bytes(6 * 1024 * 1024)
    fetcher = ShrinkingDisk([64 * 1024 * 1024, 1024], artifacts={URL: big},
                            limits=DownloadLimits(reserve_bytes=4096))
    with pytest.raises(OSError) as full:
        fetcher.fetch(URL, tmp_path / "a.part", len(big))
    assert full.value.errno == errno.ENOSPC
    assert (tmp_path / "a.part").stat().st_size < len(big)


class EndlessPeer(Fetcher):
    """A peer that announces no length and never stops sending."""

    @contextmanager
    def _open(self, url: str, offset: int, timeout_s: float) -> Iterator[Body]:
        yield Body(False, iter(lambda: b"z" * 1000, b""))


def test_a_peer_announcing_more_than_the_desired_state_is_refused_before_the_body(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="announces"):
        InMemoryFetcher({URL: DATA}).fetch(URL, tmp_path / "a.part", len(DATA) - 1)


def test_endless_data_stops_at_the_announced_size_and_is_not_kept(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="larger than the announced"):
        EndlessPeer().fetch(URL, tmp_path / "a.part", 5500)
    assert (tmp_path / "a.part").stat().st_size == 0


def test_the_hash_is_taken_while_streaming_and_a_resumed_download_covers_its_prefix(tmp_path: Path) -> None:
    part = tmp_path / "a.part"
    part.write_bytes(DATA[:5000])  # what arrived before the link dropped
    fetcher = InMemoryFetcher({URL: DATA}, chunk_bytes=1000)
    done = fetcher.fetch(URL, part, len(DATA))
    assert fetcher.requests == [(URL, 5000)]
    assert done.sha256 == hashlib.sha256(DATA).hexdigest() and part.read_bytes() == DATA


def test_a_peer_slower_than_the_minimum_rate_is_abandoned_after_the_grace_period(tmp_path: Path) -> None:
    fetcher = InMemoryFetcher({URL: DATA}, chunk_bytes=1, delay_s=0.02,
                              limits=DownloadLimits(min_rate_bps=10_000, grace_s=0.2))
    with pytest.raises(TransportError, match="too slow"):
        fetcher.fetch(URL, tmp_path / "a.part", len(DATA))
    assert 0 < (tmp_path / "a.part").stat().st_size < len(DATA)  # kept: the next attempt resumes


def test_a_download_past_its_deadline_is_abandoned(tmp_path: Path) -> None:
    fetcher = InMemoryFetcher({URL: DATA}, chunk_bytes=64, delay_s=0.01,
                              limits=DownloadLimits(deadline_s=0.3, min_rate_bps=0))
    with pytest.raises(TransportError, match="deadline"):
        fetcher.fetch(URL, tmp_path / "a.part", len(DATA))


def test_a_cancel_event_ends_the_download_at_its_next_chunk(tmp_path: Path) -> None:
    cancel = threading.Event()
    fetcher = InMemoryFetcher({URL: DATA}, chunk_bytes=16, delay_s=0.01, limits=DownloadLimits(min_rate_bps=0))
    timer = threading.Timer(0.2, cancel.set)
    timer.start()
    try:
        with pytest.raises(DownloadCancelled):
            fetcher.fetch(URL, tmp_path / "a.part", len(DATA), cancel=cancel)
    finally:
        timer.cancel()
    assert (tmp_path / "a.part").stat().st_size < len(DATA)


@pytest.mark.parametrize(("url", "same"), [
    ("http://server:8000/a", True), ("HTTP://SERVER:8000/a", True), ("http://server:8001/a", False),
    ("https://server:8000/a", False), ("http://other:8000/a", False), ("http://server:8000@other:8000/a", False),
    ("http://server/a", False),
])
def test_same_origin_compares_scheme_host_and_port(url: str, same: bool) -> None:
    assert same_origin(url, "http://server:8000") is same
    assert same_origin("https://host/x", "https://host:443/api") and same_origin("http://h:80/", "http://h")


@pytest.mark.parametrize(("url", "token"), [
    ("/artifacts/x", True), ("artifacts/x", True), ("http://server:8000/artifacts/x", True),
    ("@cdn.example/x", True), ("http://cdn.example:8000/x", False), ("http://server:8000@cdn.example/x", False),
])
def test_the_token_goes_only_to_the_servers_own_origin(url: str, token: bool) -> None:
    full, headers = ArtifactFetcher("http://server:8000", "secret").resolve(url)
    assert ("Authorization" in headers) is token, full
    assert full.startswith("http://server:8000/") is token  # a path is the server's, even "@host/x"
    assert headers.get("Authorization") in (None, "Bearer secret")


def test_urls_other_than_http_are_refused() -> None:
    with pytest.raises(TransportError, match="only http"):
        ArtifactFetcher("http://server:8000", "secret").resolve("file:///etc/passwd")


def test_a_download_of_unknown_length_ends_with_the_peer_and_is_capped(tmp_path: Path) -> None:
    """A delta whose size the desired state does not give: the bundle's size is only its cap."""
    fetcher = InMemoryFetcher({URL: DATA}, chunk_bytes=1000)
    done = fetcher.fetch(URL, tmp_path / "d.part", len(DATA) * 4, exact=False)
    assert done.size == len(DATA) and done.sha256 == hashlib.sha256(DATA).hexdigest()
    with pytest.raises(TransportError, match="larger than the announced"):
        EndlessPeer().fetch(URL, tmp_path / "e.part", 5500, exact=False)
