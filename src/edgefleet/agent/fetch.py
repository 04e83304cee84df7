"""Artifact download: one port, :class:`Fetcher`, whose public :meth:`Fetcher.fetch` enforces every limit.

An implementation supplies one hook, ``_open`` (start the transfer at a byte offset, yield the body's chunks as
they arrive); ``fetch`` streams them to the partial file and hashes them on the way, so a finished download is
never read back to be hashed. The announced size comes from the desired state, which is not signed, so it is
not trusted alone. ``fetch`` refuses before the first byte, and stops mid-stream, when:

* the size is over :attr:`DownloadLimits.max_bytes` (a bundle this device will never take: ``BundleError``
  with reason ``too_large``);
* it does not fit the free space of the download's disk less :attr:`DownloadLimits.reserve_bytes`, or the
  free space falls under the reserve while it runs (``OSError`` ENOSPC, as a full disk would raise);
* the peer sends more than announced, is slower on average than :attr:`DownloadLimits.min_rate_bps` after
  :attr:`DownloadLimits.grace_s`, runs past :attr:`DownloadLimits.deadline_s` in all, or sends nothing for
  :attr:`DownloadLimits.read_timeout_s` (``TransportError``: tried again later, resuming the partial file);
* the caller's ``cancel`` event is set (a newer desired state): :class:`DownloadCancelled`.

The limits are checked as each chunk arrives, so a peer that sends nothing at all is caught by the read timeout.
Errors: ``TransportError`` for the network and the peer, ``BundleError`` for a size this device refuses,
``OSError`` for the local disk (full, or failing).

Credentials: :class:`ArtifactFetcher` sends its bearer token only to the origin (scheme, host, port) of the
configured server URL. An absolute URL elsewhere in a desired state (a CDN) is fetched without the token: what
arrives is checked against the announced SHA-256 and the bundle's signature, so it needs no credentials; the
token never leaves for a host the device was not configured with. Redirects are not followed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edgefleet.agent.lean import allow_openssl
from edgefleet.errors import BundleError, ConfigError, TransportError
from edgefleet.transport.mqtt_url import MqttTls, tls_context
from edgefleet.transport.wire import count_http_exchange

MIB = 1024 * 1024
_DISK_RECHECK_BYTES = 4 * MIB
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class DownloadLimits:
    """What one download may cost the device, whatever the desired state announces."""

    max_bytes: int = 512 * MIB
    """The largest bundle (or delta) this device downloads."""
    reserve_bytes: int = 32 * MIB
    """Free space left on the data directory's disk after a download (the state database and outbox need it)."""
    deadline_s: float = 3600.0
    """The longest one download attempt may take, in all."""
    min_rate_bps: float = 256.0
    """The slowest average rate (bytes per second) accepted once ``grace_s`` has passed."""
    grace_s: float = 30.0
    read_timeout_s: float = 30.0
    """The longest wait for the next chunk (and for the connection)."""


@dataclass(frozen=True)
class Download:
    """A finished download: the partial file now holds all ``size`` bytes, whose SHA-256 is ``sha256``."""

    path: Path
    size: int
    sha256: str


@dataclass
class Body:
    """A transfer in progress: ``resumed`` when it continues at the requested offset (else from byte 0)."""

    resumed: bool
    chunks: Iterator[bytes]
    length: int | None = None
    """The peer's announced length of what follows (Content-Length), when it gives one."""


class DownloadCancelled(TransportError):
    """The download was given up for a newer desired state."""


class ResumeRefused(TransportError):
    """The peer will not continue at the partial file's length (it is not a prefix of the artifact)."""


class Fetcher(ABC):
    """Downloads artifacts within :class:`DownloadLimits`; see the module docstring for what it refuses."""

    def __init__(self, limits: DownloadLimits | None = None) -> None:
        self.limits = limits or DownloadLimits()

    @abstractmethod
    def _open(self, url: str, offset: int, timeout_s: float) -> AbstractContextManager[Body]:
        """Start the transfer of ``url`` at ``offset`` (0: all of it); TransportError when the peer refuses.

        ``timeout_s`` bounds the connection and each wait for the next chunk.
        """

    def free_bytes(self, directory: Path) -> int:
        """Free space (for unprivileged writers) on the disk holding ``directory``."""
        return shutil.disk_usage(directory).free

    def fetch(self, url: str, part_file: Path, size: int, *, exact: bool = True,
              cancel: threading.Event | None = None) -> Download:
        """Download ``url`` (``size`` bytes announced) into ``part_file``, resuming what it holds.

        ``exact=False``: the length is not known and ``size`` is only the most accepted (a delta whose size the
        desired state does not give); such a download starts over rather than resume.
        """
        limits = self.limits
        if size < 1:
            raise BundleError(f"{url} announces {size} bytes", reason="malformed")
        if size > limits.max_bytes:
            raise BundleError(f"{url} announces {size} bytes; this device takes at most {limits.max_bytes}",
                              reason="too_large")
        part_file.parent.mkdir(parents=True, exist_ok=True)
        have = part_file.stat().st_size if part_file.exists() else 0
        if have > size or (have and not exact):
            part_file.unlink()
            have = 0
        if have == size and exact:  # complete already (killed before it was used): nothing to ask the peer for
            return Download(part_file, size, _hash_file(part_file, hashlib.sha256()).hexdigest())
        self._check_space(part_file.parent, size - have, url)
        if cancel is not None and cancel.is_set():
            raise DownloadCancelled(f"download of {url} cancelled for a newer desired state")
        started = time.monotonic()
        timeout = max(0.1, min(limits.read_timeout_s, limits.deadline_s))
        try:
            written, digest = self._transfer(url, part_file, have, size, started, timeout, cancel)
        except ResumeRefused:
            part_file.unlink(missing_ok=True)  # the next attempt starts over
            raise
        if written != size and (exact or not written):
            raise TransportError(f"download of {url} ended at {written} of {size} bytes")
        return Download(part_file, written, digest.hexdigest())

    def _transfer(self, url: str, part_file: Path, have: int, size: int, started: float, timeout: float,
                  cancel: threading.Event | None) -> tuple[int, hashlib._Hash]:
        with self._open(url, have, timeout) as body:
            if not body.resumed:
                have = 0
            if body.length is not None and have + body.length > size:
                raise TransportError(f"{url}: the server announces {have + body.length} bytes, "
                                     f"the desired state {size}")
            digest = _hash_file(part_file, hashlib.sha256()) if have else hashlib.sha256()
            return self._stream(url, body, part_file, have, size, digest, started, cancel), digest

    def _stream(self, url: str, body: Body, part_file: Path, have: int, size: int, digest: hashlib._Hash,
                started: float, cancel: threading.Event | None) -> int:
        """Append the body to the partial file (from scratch unless resumed), hashing and checking as it goes."""
        limits = self.limits
        written, received, next_disk_check = have, 0, _DISK_RECHECK_BYTES
        with part_file.open("ab" if have else "wb") as handle:
            for chunk in body.chunks:
                if cancel is not None and cancel.is_set():
                    raise DownloadCancelled(f"download of {url} cancelled for a newer desired state")
                written += len(chunk)
                received += len(chunk)
                if written > size:
                    handle.truncate(0)
                    raise TransportError(f"{url} is larger than the announced {size} bytes")
                handle.write(chunk)
                digest.update(chunk)
                if received >= next_disk_check:
                    next_disk_check += _DISK_RECHECK_BYTES
                    self._check_space(part_file.parent, 0, url)
                elapsed = time.monotonic() - started
                if elapsed > limits.deadline_s:
                    raise TransportError(f"download of {url} passed its {limits.deadline_s:g} s deadline "
                                         f"at {written} of {size} bytes")
                if elapsed > limits.grace_s and received < limits.min_rate_bps * elapsed:
                    raise TransportError(f"download of {url} is too slow: {received / elapsed:.0f} bytes/s "
                                         f"on average, under the minimum of {limits.min_rate_bps:g}")
            handle.flush()
            os.fsync(handle.fileno())
        return written

    def _check_space(self, directory: Path, needed: int, url: str) -> None:
        free = self.free_bytes(directory)
        if needed > free - self.limits.reserve_bytes:
            raise OSError(errno.ENOSPC, f"no space for {url}: {needed} bytes more, {free} free, "
                                       f"{self.limits.reserve_bytes} kept in reserve")


def same_origin(url: str, base: str) -> bool:
    """Whether ``url`` has the scheme, host and port of ``base`` (default ports filled in, case ignored)."""
    def origin(text: str) -> tuple[str, str, int | None]:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        try:
            port = parts.port
        except ValueError:
            port = -1  # malformed: matches nothing
        return scheme, (parts.hostname or "").lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)

    mine = origin(base)
    return bool(mine[1]) and origin(url) == mine


class ArtifactFetcher(Fetcher):
    """Fetches artifacts over HTTP(S) from the control plane, with the device's bearer token for that origin."""

    def __init__(self, server_url: str, token: str, *, limits: DownloadLimits | None = None,
                 tls: MqttTls | None = None) -> None:
        super().__init__(limits)
        self.server_url = server_url.rstrip("/")
        self._token = token
        self._tls = tls
        """With TLS credentials: https is verified against the fleet CA only, and the device's certificate shown."""

    def resolve(self, url: str) -> tuple[str, dict[str, str]]:
        """The absolute URL of ``url`` (a path is the server's) and the headers to send with it."""
        path = url if url.startswith("/") else f"/{url}"
        full = url if urlsplit(url).scheme else f"{self.server_url}{path}"
        if urlsplit(full).scheme.lower() not in _DEFAULT_PORTS:
            raise TransportError(f"download of {url} refused: only http and https URLs are fetched")
        headers = {"Accept-Encoding": "identity"}  # the bytes as announced: no decompression to inflate them
        if same_origin(full, self.server_url):
            headers["Authorization"] = f"Bearer {self._token}"
        return full, headers

    @contextmanager
    def _open(self, url: str, offset: int, timeout_s: float) -> Iterator[Body]:
        allow_openssl()  # httpx makes an SSL context for every client, http:// too (edgefleet.agent.lean)
        import httpx  # only when a download starts: the agent's resident memory stays small

        full, headers = self.resolve(url)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            try:
                verify = tls_context(self._tls) if self._tls is not None else True
            except ConfigError as exc:
                raise TransportError(f"download of {url} refused: {exc}") from exc
            with httpx.stream("GET", full, headers=headers, timeout=timeout_s, verify=verify) as response:
                try:
                    if response.status_code == 416:  # our partial file is not a prefix of this artifact
                        raise ResumeRefused(f"server refused to resume {url}; will start over")
                    if response.status_code not in (200, 206):
                        raise TransportError(f"download of {url} refused: HTTP {response.status_code}")
                    length = response.headers.get("Content-Length")
                    yield Body(response.status_code == 206, response.iter_bytes(),
                               int(length) if length and length.isdigit() else None)
                finally:  # the bytes on the wire, for the uplink figures (edgefleet.transport.wire)
                    count_http_exchange(response)
        except httpx.HTTPError as exc:
            raise TransportError(f"download of {url} failed: {type(exc).__name__} {exc}") from exc


class InMemoryFetcher(Fetcher):
    """The fetcher's in-memory twin: serves artifacts from a dict, in chunks, every limit enforced the same.

    ``delay_s`` waits before each chunk (a slow link, for tests of deadlines, rates and cancellation).
    """

    def __init__(self, artifacts: dict[str, bytes] | None = None, *, limits: DownloadLimits | None = None,
                 chunk_bytes: int = 64 * 1024, delay_s: float = 0.0) -> None:
        super().__init__(limits)
        self.artifacts = dict(artifacts or {})
        self.chunk_bytes = chunk_bytes
        self.delay_s = delay_s
        self.requests: list[tuple[str, int]] = []

    @contextmanager
    def _open(self, url: str, offset: int, timeout_s: float) -> Iterator[Body]:
        self.requests.append((url, offset))
        data = self.artifacts.get(url)
        if data is None:
            raise TransportError(f"download of {url} refused: HTTP 404")
        if offset >= len(data):
            raise ResumeRefused(f"server refused to resume {url}; will start over")

        def chunks() -> Iterator[bytes]:
            for start in range(offset, len(data), self.chunk_bytes):
                if self.delay_s:
                    time.sleep(self.delay_s)
                yield data[start:start + self.chunk_bytes]

        yield Body(True, chunks(), len(data) - offset)


def _hash_file(path: Path, digest: hashlib._Hash) -> hashlib._Hash:
    """``digest`` updated with the bytes of ``path`` (a resumed download's prefix), read in chunks."""
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(MIB), b""):
            digest.update(chunk)
    return digest
