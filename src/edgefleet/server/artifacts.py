"""Content-addressed artifact files: each stored under its SHA-256."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from edgefleet.storage import atomic_write

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactStore:
    """A directory of immutable blobs named by their SHA-256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / digest
        if not path.exists():
            atomic_write(path, data)
        return digest

    def path(self, digest: str) -> Path | None:
        """The file for ``digest``, or None when the digest is malformed or unknown."""
        if not _SHA256.match(digest):
            return None
        path = self.root / digest
        return path if path.is_file() else None
