"""A small copy/insert byte diff (the idea of xdelta and rsync): target = runs copied from source + new bytes.

The delta's manifest and graph framing are long runs identical to the base's with a few changed bytes
between them; zlib alone pays a token per 258 matched bytes, this pays one op per run. Ops are varints:
``length << 1 | 1`` then the source offset as a zigzag step from the end of the previous copy, or
``length << 1`` then that many literal bytes. :func:`patch` checks every offset and caps the output, so
garbage ops raise BundleError and never read outside the source.
"""

from __future__ import annotations

from edgefleet.bundle.protowire import read_varint, unzigzag, write_varint, zigzag
from edgefleet.errors import BundleError

BLOCK = 12  # shortest run worth a copy op
_DENSE_INDEX_BYTES = 1 << 20  # index every source offset up to this size, every BLOCK-th beyond it


def diff(source: bytes, target: bytes) -> bytes:
    """Ops that rebuild ``target`` from ``source``."""
    step = 1 if len(source) <= _DENSE_INDEX_BYTES else BLOCK
    index: dict[bytes, int] = {}
    for pos in range(0, len(source) - BLOCK + 1, step):
        index.setdefault(source[pos : pos + BLOCK], pos)
    ops, pending, t, last = bytearray(), 0, 0, 0
    while t + BLOCK <= len(target):
        key = target[t : t + BLOCK]
        s = last if source[last : last + BLOCK] == key else index.get(key)
        if s is None:
            t += 1
            continue
        while t > pending and s > 0 and source[s - 1] == target[t - 1]:
            t, s = t - 1, s - 1
        length = _common(source, s, target, t)
        ops += _insert(target[pending:t]) + write_varint(length << 1 | 1) + write_varint(zigzag(s - last))
        t, last, pending = t + length, s + length, t + length
    ops += _insert(target[pending:])
    return bytes(ops)


def patch(source: bytes, ops: bytes, cap: int) -> bytes:
    """Rebuild the target from ``source`` and ``ops``; at most ``cap`` bytes, or BundleError."""
    out, pos, last = bytearray(), 0, 0
    while pos < len(ops):
        head, pos = read_varint(ops, pos, len(ops))
        length = head >> 1
        if len(out) + length > cap:
            raise BundleError("copy/insert ops build more than the declared size", reason="malformed")
        if head & 1:
            step, pos = read_varint(ops, pos, len(ops))
            start = last + unzigzag(step)
            if start < 0 or start + length > len(source):
                raise BundleError("copy op reaches outside its source", reason="malformed")
            out += source[start : start + length]
            last = start + length
        else:
            if pos + length > len(ops):
                raise BundleError("insert op runs past the ops", reason="malformed")
            out += ops[pos : pos + length]
            pos += length
    return bytes(out)


def _common(source: bytes, s: int, target: bytes, t: int) -> int:
    """Length of the common run of source[s:] and target[t:]."""
    length, chunk = 0, 256
    limit = min(len(source) - s, len(target) - t)
    while length + chunk <= limit:
        a, b = s + length, t + length
        if source[a : a + chunk] != target[b : b + chunk]:
            break
        length += chunk
    while length < limit and source[s + length] == target[t + length]:
        length += 1
    return length


def _insert(data: bytes) -> bytes:
    return write_varint(len(data) << 1) + data if data else b""
