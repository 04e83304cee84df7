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

    def delta(self, base: str, target: str) -> Path | None:
        """A weight-level delta from bundle ``base`` to bundle ``target``, built once and kept beside them.

        When a delta would not pay off (see ``bundle.delta.diff``) the file holds ``target`` whole, which the
        device's delta path accepts as it is. None when either bundle is unknown.
        """
        base_path, target_path = self.path(base), self.path(target)
        if base_path is None or target_path is None:
            return None
        path = self.root / "deltas" / f"{base}-{target}"
        if not path.is_file():
            from edgefleet.bundle.delta import diff

            atomic_write(path, diff(base_path.read_bytes(), target_path.read_bytes()).data)
        return path

    def path(self, digest: str) -> Path | None:
        """The file for ``digest``, or None when the digest is malformed or unknown."""
        if not _SHA256.match(digest):
            return None
        path = self.root / digest
        return path if path.is_file() else None
