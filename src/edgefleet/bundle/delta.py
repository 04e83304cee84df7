"""Weight-level delta between two bundles: send the graph and the initializers that changed, not the model.

``diff(A, B)`` cuts B's model into graph elements (nodes, initializers, inputs, outputs, value infos:
the contents of the length-delimited fields directly inside ``ModelProto.graph``, found on the wire by
``bundle.protowire``). An element of at least ``MIN_REUSE`` bytes becomes a *hole* that names an element
of A's model by index: a COPY hole when A has the same bytes, an ADD hole when A has an element of the
same kind, name and length (a retrained weight), whose byte-wise difference then rides in the skeleton.
Everything else (the framing, small elements, elements that changed shape) stays as literal *skeleton*
bytes. ``apply(A, delta)`` splices A's elements back, so the rebuilt model is byte-identical to B's
without re-serializing any protobuf, and refuses it unless it hashes to the SHA-256 in B's manifest and
the rebuilt bundle to B's file digest. The device then runs ``decide`` on it (``core.update.accept_delta``).

Delta file::

    b"EFDELTA\0", u8 format, the first 16 bytes of the SHA-256 of A's model and of B's bundle file, then
    varints: B's bundle size, manifest size, signatures size, skeleton size, hole count, structure
    stream size, metadata stream size; the structure stream; the metadata stream

The structure stream is zlib of the holes (varint pairs: ``literal bytes << 1 | kind``, then the A
element index as a zigzag step from the previous index + 1) and of copy/insert ops
(``bundle.copydiff``) that rebuild B's skeleton from A's; the metadata stream is zlib of the ops that
rebuild B's signatures and manifest from A's. Each zlib stream uses the tail of its base as preset
dictionary. Every size is capped before anything is allocated, and inflation stops at the declared size.
When the delta would exceed ``max_fraction`` of B, or a bundle is encrypted, ``diff`` returns B whole,
and ``apply`` passes a whole bundle through unchanged.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgefleet.bundle import copydiff
from edgefleet.bundle.container import MAGIC as BUNDLE_MAGIC
from edgefleet.bundle.container import MANIFEST, MODEL, MODEL_ENC, SIGNATURES, Limits, read_container, write_container
from edgefleet.bundle.manifest import Manifest
from edgefleet.bundle.protowire import element_name, graph_elements, read_varint, unzigzag, write_varint, zigzag
from edgefleet.errors import BundleError

MAGIC = b"EFDELTA\x00"
FORMAT = 1
MIN_REUSE = 32  # bytes: a shorter element costs about as much to name as to send
DEFAULT_MAX_FRACTION = 0.5
COPY, ADD = 0, 1
ID_BYTES = 16
_FIXED = struct.Struct(f">8sB{ID_BYTES}s{ID_BYTES}s")
_SIZES = 7
_MAX_HOLES = 1 << 24
_WINDOW = 32768  # zlib's largest preset dictionary


@dataclass(frozen=True)
class Base:
    """What both sides derive from bundle A: its model's elements, its skeleton and its metadata."""

    model: bytes
    elements: list[tuple[int, int, int]]
    skeleton: bytes
    metadata: bytes

    @classmethod
    def of(cls, members: Mapping[str, bytes]) -> Base:
        if MODEL not in members:
            raise BundleError("the base bundle's model is encrypted; a delta cannot apply to it", reason="malformed")
        model = members[MODEL]
        elements = graph_elements(model)
        skeleton, cursor = bytearray(), 0
        for _, start, end in elements:
            if end - start >= MIN_REUSE:
                skeleton += model[cursor:start]
                cursor = end
        skeleton += model[cursor:]
        return cls(model, elements, bytes(skeleton), members[SIGNATURES] + members[MANIFEST])


@dataclass(frozen=True)
class DeltaFile:
    """The decoded contents of a delta file."""

    base_model_id: bytes
    """The first ID_BYTES of the SHA-256 of A's model: which base this delta applies to."""
    target_bundle_id: bytes
    """The first ID_BYTES of the SHA-256 of B's bundle file."""
    target_bundle_size: int
    manifest: bytes
    signatures: bytes
    skeleton: bytes
    holes: tuple[tuple[int, int, int], ...]
    """(literal skeleton bytes before the hole, index of A's element, COPY or ADD)."""

    def encode(self, base: Base) -> bytes:
        """Serialize against ``base``."""
        holes, previous = bytearray(), -1
        for literal, index, kind in self.holes:
            holes += write_varint(literal << 1 | kind) + write_varint(zigzag(index - previous - 1))
            previous = index
        structure = _deflate(bytes(holes) + copydiff.diff(base.skeleton, self.skeleton), base.skeleton)
        metadata = _deflate(copydiff.diff(base.metadata, self.signatures + self.manifest), base.metadata)
        sizes = (self.target_bundle_size, len(self.manifest), len(self.signatures), len(self.skeleton),
                 len(self.holes), len(structure), len(metadata))
        fixed = _FIXED.pack(MAGIC, FORMAT, self.base_model_id, self.target_bundle_id)
        return fixed + b"".join(write_varint(size) for size in sizes) + structure + metadata

    @staticmethod
    def header(data: bytes) -> tuple[bytes, bytes, list[int], int]:
        """(base model id, target bundle id, the seven sizes, offset of the first stream)."""
        if len(data) < _FIXED.size:
            raise BundleError("delta is truncated: no header", reason="truncated")
        magic, fmt, base_id, target_id = _FIXED.unpack_from(data, 0)
        if magic != MAGIC or fmt != FORMAT:
            raise BundleError("not an edgefleet delta (bad magic bytes or format)", reason="malformed")
        sizes, pos = [], _FIXED.size
        for _ in range(_SIZES):
            size, pos = read_varint(data, pos, min(len(data), pos + 10))
            sizes.append(size)
        return base_id, target_id, sizes, pos

    @classmethod
    def decode(cls, data: bytes, base: Base, limits: Limits = Limits()) -> DeltaFile:
        """Parse a delta file, capping every size first; BundleError on anything unexpected."""
        base_id, target_id, sizes, pos = cls.header(data)
        bundle_size, n_manifest, n_sigs, n_skeleton, n_holes, n_structure, n_metadata = sizes
        if n_manifest > limits.max_manifest_bytes or n_sigs > limits.max_signature_bytes:
            raise BundleError("delta's manifest or signatures are over the size limit", reason="oversized")
        if n_skeleton > limits.max_member_bytes or bundle_size > limits.max_member_bytes + (1 << 24):
            raise BundleError("delta's target is over the size limit", reason="oversized")
        if n_holes > _MAX_HOLES:
            raise BundleError(f"delta names {n_holes} holes, over the {_MAX_HOLES} limit", reason="oversized")
        if pos + n_structure + n_metadata != len(data):
            kind = "truncated" if pos + n_structure + n_metadata > len(data) else "malformed"
            raise BundleError("delta stream sizes do not match the file", reason=kind)
        structure = _inflate(data[pos : pos + n_structure], base.skeleton, n_holes * 20 + 3 * n_skeleton + 64)
        ops = _inflate(data[pos + n_structure :], base.metadata, 3 * (n_sigs + n_manifest) + 64)
        holes, cursor, previous = [], 0, -1
        for _ in range(n_holes):
            head, cursor = read_varint(structure, cursor, len(structure))
            step, cursor = read_varint(structure, cursor, len(structure))
            previous += 1 + unzigzag(step)
            holes.append((head >> 1, previous, head & 1))
        skeleton = copydiff.patch(base.skeleton, structure[cursor:], n_skeleton)
        metadata = copydiff.patch(base.metadata, ops, n_sigs + n_manifest)
        if len(skeleton) != n_skeleton or len(metadata) != n_sigs + n_manifest:
            raise BundleError("delta streams do not hold the sizes its header declares", reason="malformed")
        return cls(base_id, target_id, bundle_size, metadata[n_sigs:], metadata[:n_sigs], skeleton, tuple(holes))


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
        delta = _build(Base.of(a_members), b_members, b)
    except BundleError as exc:
        return Diff(b, False, len(b), None, f"the models cannot be diffed ({exc}): sending B whole")
    if len(delta) > max_fraction * len(b):
        return Diff(b, False, len(b), len(delta), f"the delta would be {len(delta) / len(b):.0%} of B, over "
                                                  f"{max_fraction:.0%}: sending B whole")
    return Diff(delta, True, len(b), len(delta), f"delta is {len(delta) / len(b):.1%} of B")


def apply(a: bytes, delta: bytes, *, limits: Limits = Limits()) -> bytes:
    """Rebuild bundle B from bundle ``a`` and ``delta`` (a whole bundle passes through unchanged).

    The rebuilt model must hash to the SHA-256 recorded in B's manifest and the rebuilt file to B's
    digest (reason ``hash_mismatch``); a delta made against another base model is refused with
    ``delta_base_mismatch``. The caller still runs ``decide`` on the result.
    """
    if delta.startswith(BUNDLE_MAGIC):
        return delta
    a_members = read_container(a, limits)
    if MODEL in a_members and _id(a_members[MODEL]) != DeltaFile.header(delta)[0]:
        raise BundleError("delta was made against another base model", reason="delta_base_mismatch")
    base = Base.of(a_members)
    parsed = DeltaFile.decode(delta, base, limits)
    digest = Manifest.from_bytes(parsed.manifest).members.get(MODEL)
    if digest is None or digest.size > limits.max_member_bytes:
        raise BundleError("delta's manifest names no clear model within the size limit", reason="malformed")
    model = _splice(base, parsed, digest.size)
    if hashlib.sha256(model).hexdigest() != digest.sha256:
        raise BundleError("rebuilt model does not match its signed SHA-256", reason="hash_mismatch")
    bundle = write_container({MANIFEST: parsed.manifest, SIGNATURES: parsed.signatures, MODEL: model})
    if len(bundle) != parsed.target_bundle_size or _id(bundle) != parsed.target_bundle_id:
        raise BundleError("rebuilt bundle does not match the target's digest", reason="hash_mismatch")
    return bundle


def _build(base: Base, b_members: dict[str, bytes], b: bytes) -> bytes:
    a_model, b_model = base.model, b_members[MODEL]
    by_digest: dict[bytes, int] = {}
    by_name: dict[tuple[int, bytes, int], int] = {}
    for index, (field, start, end) in enumerate(base.elements):
        if end - start >= MIN_REUSE:
            by_digest.setdefault(hashlib.sha256(a_model[start:end]).digest(), index)
            name = element_name(a_model, field, start, end)
            if name is not None:
                by_name.setdefault((field, name, end - start), index)
    skeleton, holes, cursor = bytearray(), [], 0
    for field, start, end in graph_elements(b_model):
        if end - start < MIN_REUSE:
            continue
        found = by_digest.get(hashlib.sha256(b_model[start:end]).digest())
        kind = COPY
        if found is None:
            name = element_name(b_model, field, start, end)
            found, kind = by_name.get((field, name, end - start)) if name is not None else None, ADD
        if found is None:
            continue
        skeleton += b_model[cursor:start]
        holes.append((start - cursor, found, kind))
        if kind == ADD:
            _, a_start, a_end = base.elements[found]
            skeleton += _bytewise(b_model[start:end], a_model[a_start:a_end], -1)
        cursor = end
    skeleton += b_model[cursor:]
    delta = DeltaFile(_id(a_model), _id(b), len(b), b_members[MANIFEST],
                      b_members[SIGNATURES], bytes(skeleton), tuple(holes))
    return delta.encode(base)


def _splice(base: Base, delta: DeltaFile, size: int) -> bytes:
    elements, skeleton = base.elements, delta.skeleton
    total = len(skeleton)
    for _, index, kind in delta.holes:
        if not 0 <= index < len(elements):
            raise BundleError(f"delta names base element {index}; the base has {len(elements)}", reason="malformed")
        total += (elements[index][2] - elements[index][1]) if kind == COPY else 0
    if total != size:
        raise BundleError("delta does not rebuild a model of the size its manifest declares", reason="hash_mismatch")
    out, cursor = bytearray(), 0
    for literal, index, kind in delta.holes:
        _, start, end = elements[index]
        if cursor + literal + (end - start if kind == ADD else 0) > len(skeleton):
            raise BundleError("delta's holes run past its skeleton", reason="malformed")
        out += skeleton[cursor : cursor + literal]
        cursor += literal
        if kind == COPY:
            out += base.model[start:end]
        else:
            out += _bytewise(skeleton[cursor : cursor + end - start], base.model[start:end], 1)
            cursor += end - start
    out += skeleton[cursor:]
    return bytes(out)


def _bytewise(x: bytes, y: bytes, sign: int) -> bytes:
    """``x + sign * y`` byte by byte, modulo 256."""
    a, b = np.frombuffer(x, dtype=np.uint8), np.frombuffer(y, dtype=np.uint8)
    return (a + b if sign > 0 else a - b).tobytes()


def _id(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:ID_BYTES]


def _deflate(data: bytes, dictionary: bytes) -> bytes:
    compressor = zlib.compressobj(9, zdict=dictionary[-_WINDOW:] or b"\x00")
    return compressor.compress(data) + compressor.flush()


def _inflate(stream: bytes, dictionary: bytes, cap: int) -> bytes:
    inflater = zlib.decompressobj(zdict=dictionary[-_WINDOW:] or b"\x00")
    try:
        out = inflater.decompress(stream, cap + 1)  # bounded: a zip bomb stops at the declared size
    except zlib.error as exc:
        raise BundleError(f"delta stream does not decompress: {exc}", reason="malformed") from exc
    if len(out) > cap or inflater.unconsumed_tail:
        raise BundleError("delta stream inflates past its declared size", reason="oversized")
    if not inflater.eof or inflater.unused_data:
        raise BundleError("delta stream is unfinished or padded", reason="malformed")
    return out
