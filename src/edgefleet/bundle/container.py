"""The bundle container: one file of fixed, length-prefixed members, parsed in memory only.

Layout (all integers big-endian)::

    b"EFBUNDLE"  u8 format  u16 member count
    repeated:    u16 name length, name (UTF-8), u64 size, bytes

Members are never written to disk by name. The reader accepts only the known member names, each at
most once, caps every size before reading it, and requires the file to end exactly after the last
member, so a truncated, padded or spliced file is refused. A bundle holds the manifest, the signatures
and exactly one model member: ``model.onnx`` in the clear or ``model.onnx.enc`` (AES-256-GCM), or, for a bundle
whose manifest names the LiteRT runtime, ``model.tflite`` (in the clear).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from edgefleet.errors import BundleError

MAGIC = b"EFBUNDLE"
FORMAT = 1
MANIFEST = "manifest.json"
SIGNATURES = "signatures.json"
MODEL = "model.onnx"
MODEL_ENC = "model.onnx.enc"
MODEL_TFLITE = "model.tflite"
REQUIRED = (MANIFEST, SIGNATURES, MODEL)
ORDER = (MANIFEST, SIGNATURES, MODEL, MODEL_ENC, MODEL_TFLITE)
KNOWN = frozenset(ORDER)

_HEADER = struct.Struct(">8sBH")
_NAME_LEN = struct.Struct(">H")
_SIZE = struct.Struct(">Q")


@dataclass(frozen=True)
class Limits:
    """Size caps checked before any member is read."""

    max_member_bytes: int = 256 * 1024 * 1024
    max_manifest_bytes: int = 4 * 1024 * 1024
    max_signature_bytes: int = 64 * 1024


def write_container(members: Mapping[str, bytes]) -> bytes:
    """Serialize members in a fixed order (manifest, signatures, model)."""
    unknown = set(members) - KNOWN
    if unknown:
        raise BundleError(f"unknown bundle member {sorted(unknown)[0]!r}", reason="unexpected_member")
    order = [name for name in ORDER if name in members]
    parts = [_HEADER.pack(MAGIC, FORMAT, len(order))]
    for name in order:
        encoded = name.encode()
        parts += [_NAME_LEN.pack(len(encoded)), encoded, _SIZE.pack(len(members[name])), members[name]]
    return b"".join(parts)


def read_container(data: bytes, limits: Limits = Limits()) -> dict[str, bytes]:
    """Parse a container, raising BundleError (with a ``reason``) on anything unexpected."""
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise BundleError("bundle is truncated: no header", reason="truncated")
    magic, fmt, count = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise BundleError("not an edgefleet bundle (bad magic bytes)", reason="malformed")
    if fmt != FORMAT:
        raise BundleError(f"unsupported bundle format {fmt}", reason="malformed")
    if count > len(KNOWN):
        raise BundleError(f"bundle declares {count} members; at most {len(KNOWN)} exist", reason="malformed")
    offset = _HEADER.size
    members: dict[str, bytes] = {}
    for _ in range(count):
        name, offset = _read_name(view, offset)
        if name in members:
            raise BundleError(f"duplicate bundle member {name!r}", reason="duplicate_member")
        if offset + _SIZE.size > len(view):
            raise BundleError("bundle is truncated inside a member header", reason="truncated")
        (size,) = _SIZE.unpack_from(view, offset)
        offset += _SIZE.size
        cap = _cap(name, limits)
        if size > cap:
            raise BundleError(f"bundle member {name!r} is {size} bytes, over the {cap} limit", reason="oversized")
        if offset + size > len(view):
            raise BundleError(f"bundle is truncated inside member {name!r}", reason="truncated")
        members[name] = bytes(view[offset : offset + size])
        offset += size
    if offset != len(view):
        raise BundleError(f"bundle has {len(view) - offset} unexpected trailing bytes", reason="malformed")
    for name in (MANIFEST, SIGNATURES):
        if name not in members:
            raise BundleError(f"bundle member {name!r} is missing", reason="missing_member")
    models = [name for name in (MODEL, MODEL_ENC, MODEL_TFLITE) if name in members]
    if not models:
        raise BundleError(f"bundle member {MODEL!r} is missing", reason="missing_member")
    if len(models) > 1:
        raise BundleError(f"bundle holds more than one model ({', '.join(models)})", reason="unexpected_member")
    return members


def model_member(members: Mapping[str, bytes]) -> str:
    """The name of the model member a parsed container holds."""
    return next((name for name in (MODEL_ENC, MODEL_TFLITE) if name in members), MODEL)


def _read_name(view: memoryview, offset: int) -> tuple[str, int]:
    if offset + _NAME_LEN.size > len(view):
        raise BundleError("bundle is truncated inside a member header", reason="truncated")
    (length,) = _NAME_LEN.unpack_from(view, offset)
    offset += _NAME_LEN.size
    if length == 0 or length > 64 or offset + length > len(view):
        raise BundleError("bundle member name is empty, too long or truncated", reason="malformed")
    try:
        name = bytes(view[offset : offset + length]).decode()
    except UnicodeDecodeError as exc:
        raise BundleError("bundle member name is not UTF-8", reason="malformed") from exc
    if name not in KNOWN:
        raise BundleError(f"unexpected bundle member {name[:64]!r}", reason="unexpected_member")
    return name, offset + length


def _cap(name: str, limits: Limits) -> int:
    if name == MANIFEST:
        return limits.max_manifest_bytes
    if name == SIGNATURES:
        return limits.max_signature_bytes
    return limits.max_member_bytes
