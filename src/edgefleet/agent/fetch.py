"""Artifact download over HTTP: resumable with Range, capped in size, every failure a TransportError."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from edgefleet.agent.lean import allow_openssl
from edgefleet.errors import TransportError


class Fetcher(Protocol):
    """Fetch one artifact, resuming into ``part_file`` where possible; TransportError on any failure."""

    def fetch(self, url: str, part_file: Path, max_bytes: int) -> bytes: ...


class ArtifactFetcher:
    """Fetches artifacts from the control plane with the device's bearer token."""

    def __init__(self, server_url: str, token: str, *, timeout_s: float = 30.0) -> None:
        self.server_url = server_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = timeout_s

    def fetch(self, url: str, part_file: Path, max_bytes: int) -> bytes:
        """Download ``url`` (relative to the server) into ``part_file``, resuming what is there; return it all."""
        allow_openssl()  # httpx makes an SSL context for every client, http:// too (edgefleet.agent.lean)
        import httpx  # only when a download starts: the agent's resident memory stays small

        try:
            return self._fetch(url, part_file, max_bytes)
        except httpx.HTTPError as exc:
            raise TransportError(f"download of {url} failed: {exc}") from exc
        except OSError as exc:
            raise TransportError(f"cannot write download {part_file}: {exc.strerror}") from exc

    def _fetch(self, url: str, part_file: Path, max_bytes: int) -> bytes:
        import httpx

        part_file.parent.mkdir(parents=True, exist_ok=True)
        have = part_file.stat().st_size if part_file.exists() else 0
        if have >= max_bytes:
            part_file.unlink()
            have = 0
        headers = dict(self._headers)
        if have:
            headers["Range"] = f"bytes={have}-"
        full_url = url if url.startswith("http") else f"{self.server_url}{url}"
        with httpx.stream("GET", full_url, headers=headers, timeout=self._timeout) as response:
            if response.status_code == 416:  # our partial file is not a prefix of this artifact
                part_file.unlink(missing_ok=True)
                raise TransportError(f"server refused to resume {url}; will start over")
            if response.status_code not in (200, 206):
                raise TransportError(f"download of {url} refused: HTTP {response.status_code} "
                                     f"{response.read().decode(errors='replace')[:200]}")
            mode = "ab" if response.status_code == 206 else "wb"
            written = have if mode == "ab" else 0
            with part_file.open(mode) as handle:
                for chunk in response.iter_bytes(64 * 1024):
                    written += len(chunk)
                    if written > max_bytes:
                        handle.truncate(0)
                        raise TransportError(f"artifact {url} is larger than the announced {max_bytes} bytes")
                    handle.write(chunk)
        return part_file.read_bytes()


class InMemoryFetcher:
    """The fetcher's in-memory twin: serves artifacts from a dict, for tests and the fleet simulator."""

    def __init__(self, artifacts: dict[str, bytes] | None = None) -> None:
        self.artifacts = dict(artifacts or {})

    def fetch(self, url: str, part_file: Path, max_bytes: int) -> bytes:
        data = self.artifacts.get(url)
        if data is None:
            raise TransportError(f"download of {url} refused: HTTP 404")
        if len(data) > max_bytes:
            raise TransportError(f"artifact {url} is larger than the announced {max_bytes} bytes")
        return data
