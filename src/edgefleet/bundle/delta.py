"""Weight-level delta between two bundles: send the graph and the initializers that changed, not the model.

``diff(A, B)`` cuts B's model into graph elements (nodes, initializers, inputs, outputs, value infos:
the contents of the length-delimited fields directly inside ``ModelProto.graph``, found on the wire by
``bundle.protowire``). Every element of at least ``MIN_REUSE`` bytes whose bytes also occur in A's model
becomes a *hole* that names A's element by index; the rest of B's model (the framing, and the elements
that changed) stays as literal *skeleton* bytes. ``apply(A, delta)`` splices A's elements back into the
holes, so the rebuilt model is byte-identical to B's without re-serializing any protobuf, and refuses
it unless it hashes to the SHA-256 in B's manifest and the rebuilt bundle to B's file digest. The
device then runs ``decide`` on the rebuilt bundle as on any other (:func:`accept_delta`).

Delta file (integers big-endian)::

    b"EFDELTA\\0" u8 format, 32-byte SHA-256 of A's model, 32-byte SHA-256 of B's bundle file,
    u64 B's bundle size, u32 manifest size, u32 signatures size, u64 skeleton size, u32 hole count,
    u64 body size, body

The body is zlib (with A's manifest as preset dictionary) of: the holes as varint pairs (literal
skeleton bytes before the hole, then the A element index as a zigzag step from the previous index + 1),
B's manifest, B's signatures, the skeleton. Every size is capped before anything is allocated. When the
delta would exceed ``max_fraction`` of B's size, or a bundle is encrypted, ``diff`` returns B whole,
and ``apply`` passes a whole bundle through unchanged.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from edgefleet.bundle.container import MAGIC as BUNDLE_MAGIC
from edgefleet.bundle.container import MANIFEST, MODEL, MODEL_ENC, SIGNATURES, Limits, read_container, write_container
from edgefleet.bundle.protowire import graph_elements, read_varint
from edgefleet.core.manifest import Manifest
from edgefleet.core.update import AcceptedBundle, TrustState, decide
from edgefleet.errors import BundleError

MAGIC = b"EFDELTA\x00"
FORMAT = 1
MIN_REUSE = 32  # bytes: a shorter element costs about as much to name as to send
DEFAULT_MAX_FRACTION = 0.5
_HEADER = struct.Struct(">8sB32s32sQIIQIQ")
_MAX_HOLES = 1 << 24


@dataclass(frozen=True)
class DeltaFile:
    """The decoded contents of a delta file."""

    base_model_sha256: bytes
    target_bundle_sha256: bytes
    target_bundle_size: int
    manifest: bytes
    signatures: bytes
    skeleton: bytes
    holes: tuple[tuple[int, int], ...]
    """(literal skeleton bytes before the hole, index of A's graph element that fills it)."""

    def encode(self, base_manifest: bytes) -> bytes:
        """Serialize, compressing against ``base_manifest`` (A's manifest bytes)."""
        parts, previous = bytearray(), -1
        for literal, index in self.holes:
            step = index - previous - 1
            parts += _varint(literal) + _varint(step * 2 if step >= 0 else -step * 2 - 1)
            previous = index
        compressor = zlib.compressobj(6, zdict=_dictionary(base_manifest))
        body = compressor.compress(bytes(parts) + self.manifest + self.signatures + self.skeleton) + compressor.flush()
        header = _HEADER.pack(MAGIC, FORMAT, self.base_model_sha256, self.target_bundle_sha256,
                              self.target_bundle_size, len(self.manifest), len(self.signatures), len(self.skeleton),
                              len(self.holes), len(body))
        return header + body

    @staticmethod
    def header(data: bytes) -> tuple[Any, ...]:
        """The header's fields, checked for magic and format only."""
        if len(data) < _HEADER.size:
            raise BundleError("delta is truncated: no header", reason="truncated")
        fields = _HEADER.unpack_from(data, 0)
        if fields[0] != MAGIC or fields[1] != FORMAT:
            raise BundleError("not an edgefleet delta (bad magic bytes or format)", reason="malformed")
        return tuple(fields)

    @classmethod
    def decode(cls, data: bytes, base_manifest: bytes, limits: Limits = Limits()) -> DeltaFile:
        """Parse a delta file, capping every size first; BundleError on anything unexpected."""
        _, _, base, target, bundle_size, n_manifest, n_sigs, n_skeleton, n_holes, n_body = cls.header(data)
        if n_manifest > limits.max_manifest_bytes or n_sigs > limits.max_signature_bytes:
            raise BundleError("delta's manifest or signatures are over the size limit", reason="oversized")
        if n_skeleton > limits.max_member_bytes or bundle_size > limits.max_member_bytes + (1 << 24):
            raise BundleError("delta's target is over the size limit", reason="oversized")
        if n_holes > _MAX_HOLES:
            raise BundleError(f"delta names {n_holes} holes, over the {_MAX_HOLES} limit", reason="oversized")
        if _HEADER.size + n_body != len(data):
            kind = "truncated" if _HEADER.size + n_body > len(data) else "malformed"
            raise BundleError("delta body size does not match the file", reason=kind)
        cap = n_holes * 20 + n_manifest + n_sigs + n_skeleton
        body = _inflate(data[_HEADER.size :], base_manifest, cap)
        holes, pos, previous = [], 0, -1
        for _ in range(n_holes):
            literal, pos = read_varint(body, pos, len(body))
            zigzag, pos = read_varint(body, pos, len(body))
            previous += 1 + (zigzag >> 1 if zigzag % 2 == 0 else -((zigzag + 1) >> 1))
            holes.append((literal, previous))
        if len(body) - pos != n_manifest + n_sigs + n_skeleton:
            raise BundleError("delta body does not hold the sizes its header declares", reason="malformed")
        manifest, pos = body[pos : pos + n_manifest], pos + n_manifest
        signatures, skeleton = body[pos : pos + n_sigs], body[pos + n_sigs :]
        return cls(base, target, bundle_size, manifest, signatures, skeleton, tuple(holes))


@dataclass(frozen=True)
class Diff:
    """What ``diff`` produced: a delta, or B whole (``is_delta`` False) with the reason in ``note``."""

    data: bytes
    is_delta: bool
    full_bytes: int
    delta_bytes: int | None
    note: str

    @property
    def fraction(self) -> float:
        return len(self.data) / self.full_bytes if self.full_bytes else 1.0


def diff(a: bytes, b: bytes, *, max_fraction: float = DEFAULT_MAX_FRACTION, limits: Limits = Limits()) -> Diff:
    """A delta from bundle ``a`` to bundle ``b``, or ``b`` whole when a delta would not pay off."""
    a_members, b_members = read_container(a, limits), read_container(b, limits)
    if MODEL_ENC in a_members or MODEL_ENC in b_members:
        return Diff(b, False, len(b), None, "an encrypted model has no weight-level delta: sending B whole")
    try:
        delta = _build(a_members, b_members, b)
    except BundleError as exc:
        return Diff(b, False, len(b), None, f"the models cannot be diffed ({exc}): sending B whole")
    if len(delta) > max_fraction * len(b):
        return Diff(b, False, len(b), len(delta), f"the delta would be {len(delta) / len(b):.0%} of B, over "
                                                  f"{max_fraction:.0%}: sending B whole")
    return Diff(delta, True, len(b), len(delta), f"delta is {len(delta) / len(b):.1%} of B")


def apply(a: bytes, delta: bytes, *, limits: Limits = Limits()) -> bytes:
    """Rebuild bundle B from bundle ``a`` and ``delta`` (a whole bundle passes through unchanged).

    The rebuilt model must hash to the SHA-256 recorded in B's manifest and the rebuilt file to B's
    digest (reason ``hash_mismatch``); the caller still runs ``decide`` on the result.
    """
    if delta.startswith(BUNDLE_MAGIC):
        return delta
    a_members = read_container(a, limits)
    if MODEL not in a_members:
        raise BundleError("the base bundle's model is encrypted; a delta cannot apply to it", reason="malformed")
    base_model = a_members[MODEL]
    if hashlib.sha256(base_model).digest() != DeltaFile.header(delta)[2]:
        raise BundleError("delta was made against another base model", reason="delta_base_mismatch")
    parsed = DeltaFile.decode(delta, a_members[MANIFEST], limits)
    digest = Manifest.from_bytes(parsed.manifest).members.get(MODEL)
    if digest is None or digest.size > limits.max_member_bytes:
        raise BundleError("delta's manifest names no clear model within the size limit", reason="malformed")
    model = _splice(base_model, parsed, digest.size)
    if hashlib.sha256(model).hexdigest() != digest.sha256:
        raise BundleError("rebuilt model does not match its signed SHA-256", reason="hash_mismatch")
    bundle = write_container({MANIFEST: parsed.manifest, SIGNATURES: parsed.signatures, MODEL: model})
    if len(bundle) != parsed.target_bundle_size or hashlib.sha256(bundle).digest() != parsed.target_bundle_sha256:
        raise BundleError("rebuilt bundle does not match the target's digest", reason="hash_mismatch")
    return bundle


def accept_delta(a: bytes, delta: bytes, state: TrustState, **decide_options: Any) -> AcceptedBundle:
    """The device's path for a delta: rebuild B from the active bundle ``a``, then ``decide`` on it."""
    return decide(apply(a, delta, limits=state.limits), state, **decide_options)


def _build(a_members: dict[str, bytes], b_members: dict[str, bytes], b: bytes) -> bytes:
    a_model, b_model = a_members[MODEL], b_members[MODEL]
    by_digest: dict[bytes, int] = {}
    for index, (start, end) in enumerate(graph_elements(a_model)):
        by_digest.setdefault(hashlib.sha256(a_model[start:end]).digest(), index)
    skeleton, holes, cursor = bytearray(), [], 0
    for start, end in graph_elements(b_model):
        found = by_digest.get(hashlib.sha256(b_model[start:end]).digest()) if end - start >= MIN_REUSE else None
        if found is None:
            continue
        skeleton += b_model[cursor:start]
        holes.append((start - cursor, found))
        cursor = end
    skeleton += b_model[cursor:]
    delta = DeltaFile(hashlib.sha256(a_model).digest(), hashlib.sha256(b).digest(), len(b), b_members[MANIFEST],
                      b_members[SIGNATURES], bytes(skeleton), tuple(holes))
    return delta.encode(a_members[MANIFEST])


def _splice(base_model: bytes, delta: DeltaFile, size: int) -> bytes:
    elements = graph_elements(base_model)
    total = len(delta.skeleton)
    for _, index in delta.holes:
        if not 0 <= index < len(elements):
            raise BundleError(f"delta names base element {index}; the base has {len(elements)}", reason="malformed")
        total += elements[index][1] - elements[index][0]
    if total != size or sum(literal for literal, _ in delta.holes) > len(delta.skeleton):
        raise BundleError("delta does not rebuild a model of the size its manifest declares", reason="hash_mismatch")
    out, cursor = bytearray(), 0
    for literal, index in delta.holes:
        out += delta.skeleton[cursor : cursor + literal]
        cursor += literal
        start, end = elements[index]
        out += base_model[start:end]
    out += delta.skeleton[cursor:]
    return bytes(out)


def _inflate(body: bytes, base_manifest: bytes, cap: int) -> bytes:
    inflater = zlib.decompressobj(zdict=_dictionary(base_manifest))
    try:
        out = inflater.decompress(body, cap + 1)  # bounded: a zip bomb stops at the declared size
    except zlib.error as exc:
        raise BundleError(f"delta body does not decompress: {exc}", reason="malformed") from exc
    if len(out) > cap or inflater.unconsumed_tail:
        raise BundleError("delta body inflates past its declared size", reason="oversized")
    if not inflater.eof or inflater.unused_data:
        raise BundleError("delta body is unfinished or padded", reason="malformed")
    return out


def _dictionary(base_manifest: bytes) -> bytes:
    return (base_manifest or b"\x00")[-32768:]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
