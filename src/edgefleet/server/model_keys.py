"""The server's side of encrypted models: model keys sealed at rest, and wrapped for each device on the way out.

``edgefleet model push --model-key FILE`` sends an encrypted bundle's model key with it; the server checks that it
opens the model and stores it only sealed with the server's master key (:func:`edgefleet.bundle.keywrap.
seal_at_rest`). The master key is 32 random bytes, base64: ``EDGEFLEET_MODEL_MASTER_KEY`` when set (replicas that
share a database must share it), else ``DATA_DIR/model-master.key`` (mode 0600), created at the first start.
Whenever a desired state names an encrypted model, the key is unsealed in memory and wrapped for the device's
reported public key (:func:`edgefleet.bundle.keywrap.wrap_for_device`); a revoked device, or one that has not
reported a key yet, gets none (a device reporting its key later gets its desired state again, with the key).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import threading
from pathlib import Path

from edgefleet.bundle.encrypt import KEY_BYTES, ModelKey
from edgefleet.bundle.keywrap import open_at_rest, parse_public_key, seal_at_rest, wrap_for_device
from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.server.schema import ModelVersion
from edgefleet.storage import atomic_write

log = logging.getLogger(__name__)
MASTER_KEY_ENV = "EDGEFLEET_MODEL_MASTER_KEY"
MASTER_KEY_FILE = "model-master.key"


class ModelKeys:
    """Seals model keys for the store and wraps them for devices; unsealed keys are cached in memory only."""

    def __init__(self, master: bytes) -> None:
        if len(master) != KEY_BYTES:
            raise ConfigError(f"the model master key is {KEY_BYTES} bytes, got {len(master)}")
        self._master = master
        self._open: dict[str, ModelKey] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, data_dir: Path) -> ModelKeys:
        """The master key from ``EDGEFLEET_MODEL_MASTER_KEY``, else ``DATA_DIR/model-master.key`` (made if absent)."""
        text = os.environ.get(MASTER_KEY_ENV, "").strip()
        where = MASTER_KEY_ENV
        path = data_dir / MASTER_KEY_FILE
        if not text:
            where = str(path)
            if not path.exists():
                atomic_write(path, (base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n").encode(),
                             mode=0o600)
            text = path.read_text().strip()
        try:
            return cls(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"{where}: the model master key is not base64") from exc

    def seal(self, key: ModelKey, bundle_sha256: str) -> str:
        return seal_at_rest(key, self._master, bundle_sha256)

    def wrap_for(self, model: ModelVersion, device_id: str, public_key: str | None, *,
                 revoked: bool = False) -> str | None:
        """``model``'s key wrapped for the device (None: the model is clear, the device revoked or keyless, or the
        key cannot be opened, which is logged)."""
        if model.model_key_sealed is None or revoked or not public_key:
            return None
        try:
            with self._lock:
                key = self._open.get(model.sha256)
                if key is None:
                    key = self._open[model.sha256] = open_at_rest(model.model_key_sealed, self._master, model.sha256)
            return wrap_for_device(key, parse_public_key(public_key), device_id, model.sha256)
        except EdgefleetError as exc:
            log.warning("no model key for %s on %s: %s", f"{model.name}@{model.version}", device_id, exc)
            return None
