"""Envelope encryption of model keys: a key pair per device, and the server's master key for keys at rest.

A model member is encrypted with a :class:`~edgefleet.bundle.encrypt.ModelKey` (see :mod:`edgefleet.bundle.encrypt`).
That key travels to a device only *wrapped for it*: each device holds an X25519 key pair made on the device
(:func:`generate_device_key`; the private key never leaves it) and reports the public key. To wrap, the server
makes an ephemeral X25519 key pair, derives a key-encryption key with HKDF-SHA256 from the shared secret
(salt: both public keys) and seals the model key with AES-256-GCM, the associated data naming the device and
the bundle (:func:`wrap_for_device`). Only that device can unwrap it, and only for that bundle
(:func:`unwrap_for_device`): a key wrapped for another device, or moved under another bundle, is refused with
``decrypt_failed``.

Wrapped key (base64 text): ``version (1) || ephemeral public key (32) || nonce (12) || AES-GCM(model key) (48)``.

At rest on the server a model key is sealed with the server's master key (:func:`seal_at_rest`, AES-256-GCM,
the associated data naming the bundle): ``version (1) || nonce (12) || AES-GCM(model key) (48)``, base64.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgefleet.bundle.encrypt import KEY_BYTES, NONCE_BYTES, ModelKey
from edgefleet.errors import BundleError, ConfigError

WRAP_VERSION = 1
SEAL_VERSION = 1
X25519_BYTES = 32
_WRAP_INFO = b"edgefleet model key wrap v1"
_WRAPPED_BYTES = 1 + X25519_BYTES + NONCE_BYTES + KEY_BYTES + 16
_SEALED_BYTES = 1 + NONCE_BYTES + KEY_BYTES + 16


def generate_device_key() -> tuple[bytes, bytes]:
    """A new device key pair: (private, public), 32 raw bytes each."""
    private = X25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def public_from_private(private: bytes) -> bytes:
    """The public key of a raw X25519 private key."""
    return _private(private).public_key().public_bytes_raw()


def key_text(raw: bytes) -> str:
    """Base64 text of a raw key (as files and messages carry it)."""
    return base64.b64encode(raw).decode()


def parse_public_key(text: str) -> bytes:
    """A device public key from its base64 text; ConfigError for anything but 32 bytes."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError("a device public key is base64 text") from exc
    if len(raw) != X25519_BYTES:
        raise ConfigError(f"a device public key is {X25519_BYTES} bytes, got {len(raw)}")
    return raw


def wrap_aad(device_id: str, bundle_sha256: str) -> bytes:
    """The associated data that ties a wrapped key to one device and one bundle."""
    return f"edgefleet wrapped key v1\x00{device_id}\x00{bundle_sha256}".encode()


def wrap_for_device(key: ModelKey, device_public: bytes, device_id: str, bundle_sha256: str) -> str:
    """``key`` wrapped so that only the holder of ``device_public``'s private key opens it, for this bundle."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    try:
        shared = ephemeral.exchange(_public(device_public))
    except ValueError as exc:  # a low-order point: no shared secret
        raise BundleError("the device public key is unusable", reason="decrypt_failed") from exc
    kek = _kek(shared, ephemeral_public, device_public)
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(kek).encrypt(nonce, key.raw, wrap_aad(device_id, bundle_sha256))
    return key_text(bytes([WRAP_VERSION]) + ephemeral_public + nonce + sealed)


def unwrap_for_device(wrapped: str, device_private: bytes, device_id: str, bundle_sha256: str) -> ModelKey:
    """The model key a server wrapped for this device and bundle; BundleError(reason="decrypt_failed") else."""
    blob = _decode(wrapped, _WRAPPED_BYTES, WRAP_VERSION, "wrapped model key")
    ephemeral_public = blob[1:1 + X25519_BYTES]
    nonce = blob[1 + X25519_BYTES:1 + X25519_BYTES + NONCE_BYTES]
    private = _private(device_private)
    own_public = private.public_key().public_bytes_raw()
    try:
        kek = _kek(private.exchange(_public(ephemeral_public)), ephemeral_public, own_public)
        raw = AESGCM(kek).decrypt(nonce, blob[1 + X25519_BYTES + NONCE_BYTES:], wrap_aad(device_id, bundle_sha256))
    except (InvalidTag, ValueError) as exc:
        raise BundleError("the model key was not wrapped for this device and bundle",
                          reason="decrypt_failed") from exc
    return ModelKey(raw)


def seal_at_rest(key: ModelKey, master: bytes, bundle_sha256: str) -> str:
    """``key`` sealed with the server's master key, for storing beside the bundle ``bundle_sha256``."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(_master(master)).encrypt(nonce, key.raw, _seal_aad(bundle_sha256))
    return key_text(bytes([SEAL_VERSION]) + nonce + sealed)


def open_at_rest(sealed: str, master: bytes, bundle_sha256: str) -> ModelKey:
    """A model key sealed by :func:`seal_at_rest`; BundleError(reason="decrypt_failed") with another master key."""
    blob = _decode(sealed, _SEALED_BYTES, SEAL_VERSION, "sealed model key")
    try:
        raw = AESGCM(_master(master)).decrypt(blob[1:1 + NONCE_BYTES], blob[1 + NONCE_BYTES:], _seal_aad(bundle_sha256))
    except InvalidTag as exc:
        raise BundleError("the stored model key does not open with this server's master key",
                          reason="decrypt_failed") from exc
    return ModelKey(raw)


def _seal_aad(bundle_sha256: str) -> bytes:
    return f"edgefleet sealed key v1\x00{bundle_sha256}".encode()


def _kek(shared: bytes, ephemeral_public: bytes, device_public: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=ephemeral_public + device_public,
                info=_WRAP_INFO).derive(shared)


def _decode(text: str, size: int, version: int, what: str) -> bytes:
    try:
        blob = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BundleError(f"{what} is not base64", reason="decrypt_failed") from exc
    if len(blob) != size or blob[0] != version:
        raise BundleError(f"{what} is malformed ({len(blob)} bytes)", reason="decrypt_failed")
    return blob


def _private(raw: bytes) -> X25519PrivateKey:
    if len(raw) != X25519_BYTES:
        raise ConfigError(f"a device private key is {X25519_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def _public(raw: bytes) -> X25519PublicKey:
    if len(raw) != X25519_BYTES:
        raise BundleError(f"an X25519 public key is {X25519_BYTES} bytes, got {len(raw)}", reason="decrypt_failed")
    return X25519PublicKey.from_public_bytes(raw)


def _master(raw: bytes) -> bytes:
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"the model master key is {KEY_BYTES} bytes, got {len(raw)}")
    return raw
