"""Optional AES-256-GCM encryption of the model member, for fleets that want model confidentiality.

The encrypted member ``model.onnx.enc`` is ``nonce (12 bytes) || ciphertext || tag``. The associated
data binds it to the release (``name@version#release``), so a ciphertext cannot be moved under another
release's manifest. The manifest, which is signed, records the ciphertext's digest as the member digest
and the plaintext's digest and size under ``encryption``; the device decrypts only after the ciphertext
hash has verified, then checks the plaintext hash.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgefleet.errors import BundleError, ConfigError
from edgefleet.storage import atomic_write

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


@dataclass(frozen=True)
class ModelKey:
    """A 256-bit symmetric key that encrypts model members; shared by the packer and the devices."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_BYTES:
            raise ConfigError(f"a model key is {KEY_BYTES} bytes, got {len(self.raw)}")

    @classmethod
    def generate(cls) -> ModelKey:
        return cls(AESGCM.generate_key(bit_length=256))

    @property
    def key_id(self) -> str:
        """16 hex digits naming the key without revealing it."""
        return hashlib.sha256(b"edgefleet model key\x00" + self.raw).hexdigest()[:16]

    def to_text(self) -> str:
        return base64.b64encode(self.raw).decode()

    @classmethod
    def from_text(cls, text: str) -> ModelKey:
        try:
            return cls(base64.b64decode(text.strip(), validate=True))
        except ValueError as exc:
            raise ConfigError("model key is not base64 text") from exc


def write_model_key(path: Path) -> ModelKey:
    """Create a new model key file (mode 0600); refuses to overwrite one."""
    if path.exists():
        raise ConfigError(f"{path} exists; refusing to overwrite a model key")
    key = ModelKey.generate()
    atomic_write(path, (key.to_text() + "\n").encode(), mode=0o600)
    return key


def load_model_key(path: Path) -> ModelKey:
    """Read a key written by :func:`write_model_key`."""
    try:
        return ModelKey.from_text(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read model key {path}: {exc.strerror}") from exc


def release_aad(name: str, version: str, release: int) -> bytes:
    """The associated data that ties a ciphertext to one release."""
    return f"edgefleet model v1\x00{name}@{version}#{release}".encode()


def encrypt_model(plaintext: bytes, key: ModelKey, aad: bytes) -> bytes:
    """``nonce || AES-256-GCM(plaintext)`` with a fresh random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key.raw).encrypt(nonce, plaintext, aad)


def decrypt_model(blob: bytes, key: ModelKey | None, aad: bytes) -> bytes:
    """The plaintext model, or BundleError(reason="decrypt_failed") for a missing or wrong key."""
    if key is None:
        raise BundleError("the model is encrypted and no model key was given for it", reason="decrypt_failed")
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise BundleError("encrypted model member is too short", reason="decrypt_failed")
    try:
        return AESGCM(key.raw).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise BundleError("the model does not decrypt with the model key given", reason="decrypt_failed") from exc
