"""Ed25519 keys, key ids and signatures over canonical manifest bytes.

``cryptography`` is imported where a key signs or verifies, not with this module: a process that only holds
public keys (the edge agent between updates) does not load it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgefleet.errors import ConfigError, SignatureError

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key and its id (the first 16 hex digits of SHA-256 of its raw bytes)."""

    raw: bytes

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def to_text(self) -> str:
        return base64.b64encode(self.raw).decode()

    @classmethod
    def from_text(cls, text: str) -> PublicKey:
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except ValueError as exc:
            raise ConfigError("public key is not base64 text") from exc
        if len(raw) != 32:
            raise ConfigError(f"public key must be 32 bytes of Ed25519, got {len(raw)}")
        return cls(raw)

    def verify(self, signature: bytes, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key held by whoever builds bundles."""

    raw: bytes

    @classmethod
    def generate(cls) -> SigningKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        return cls(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption()))

    @property
    def public(self) -> PublicKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.from_private_bytes(self.raw)
        return PublicKey(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def sign(self, message: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.raw).sign(message)


def write_keypair(directory: Path, *, overwrite: bool = False) -> SigningKey:
    """Create ``signing.key`` (mode 0600) and ``signing.pub`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / PRIVATE_KEY_FILE
    if private_path.exists() and not overwrite:
        raise ConfigError(f"{private_path} exists; refusing to overwrite a signing key")
    key = SigningKey.generate()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(key.raw).decode() + "\n")
    (directory / PUBLIC_KEY_FILE).write_text(key.public.to_text() + "\n")
    return key


def load_signing_key(path: Path) -> SigningKey:
    """Read a private key written by :func:`write_keypair`."""
    try:
        raw = base64.b64decode(path.read_text().strip(), validate=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc}") from exc
    if len(raw) != 32:
        raise ConfigError(f"{path} is not an Ed25519 signing key")
    return SigningKey(raw)


def load_public_key(path: Path) -> PublicKey:
    """Read a public key written by :func:`write_keypair`."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read public key {path}: {exc.strerror}") from exc
    return PublicKey.from_text(text)


def verify_any(signatures: Mapping[str, bytes], message: bytes, trusted: Mapping[str, PublicKey],
               revoked: Collection[str] = frozenset(), *, what: str = "bundle") -> str:
    """Return the id of a trusted, unrevoked key whose signature over ``message`` verifies, or raise.

    Reasons: ``revoked_key`` when only revoked keys signed (even if they are also pinned), ``unknown_key``
    when no trusted key signed, ``bad_signature`` when a trusted key's signature does not verify.
    """
    known = [key_id for key_id in signatures if key_id in trusted and key_id not in revoked]
    if not known:
        if any(key_id in revoked for key_id in signatures):
            raise SignatureError(f"{what} is signed by a revoked key", reason="revoked_key")
        raise SignatureError(f"{what} is signed by no trusted key", reason="unknown_key")
    for key_id in known:
        if trusted[key_id].verify(signatures[key_id], message):
            return key_id
    raise SignatureError(f"{what} signature does not verify", reason="bad_signature")
