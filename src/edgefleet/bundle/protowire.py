"""Just enough of the protobuf wire format to find where a model's graph elements lie in its bytes.

A weight-level delta must rebuild the target model byte for byte, and protobuf serialization is not
canonical across libraries and versions, so the delta never re-serializes: it splices byte ranges.
This module finds those ranges (the contents of the length-delimited fields directly inside
``ModelProto.graph``: nodes, initializers, inputs, outputs, value infos) without parsing them.
Anything that is not well-formed wire data raises BundleError(reason="malformed").
"""

from __future__ import annotations

from collections.abc import Iterator

from edgefleet.errors import BundleError

GRAPH_FIELD = 7  # ModelProto.graph
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
# GraphProto field -> the field holding its name: node.name, initializer (TensorProto).name, value infos' name
_NAME_FIELDS = {1: 3, 5: 8, 11: 1, 12: 1, 13: 1}


def read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise BundleError("protobuf varint is truncated or too long", reason="malformed")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def write_varint(value: int) -> bytes:
    """Encode a non-negative integer as a base-128 varint."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def zigzag(value: int) -> int:
    """Map a signed integer to an unsigned one (0, -1, 1, -2 ... -> 0, 1, 2, 3 ...)."""
    return value * 2 if value >= 0 else -value * 2 - 1


def unzigzag(value: int) -> int:
    return value >> 1 if value % 2 == 0 else -((value + 1) >> 1)


def fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) for each field in ``data[start:end]``."""
    pos = start
    while pos < end:
        key, pos = read_varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise BundleError("protobuf field number 0", reason="malformed")
        if wire == _VARINT:
            _, after = read_varint(data, pos, end)
        elif wire == _FIXED64:
            after = pos + 8
        elif wire == _FIXED32:
            after = pos + 4
        elif wire == _LENGTH:
            length, pos = read_varint(data, pos, end)
            after = pos + length
        else:
            raise BundleError(f"protobuf wire type {wire} is not supported here", reason="malformed")
        if after > end:
            raise BundleError("protobuf field runs past its message", reason="malformed")
        yield number, wire, pos, after
        pos = after


def graph_elements(model: bytes) -> list[tuple[int, int, int]]:
    """(graph field number, start, end) of every length-delimited field's contents directly inside the graph(s)."""
    spans: list[tuple[int, int, int]] = []
    for number, wire, start, end in fields(model, 0, len(model)):
        if number == GRAPH_FIELD and wire == _LENGTH:
            spans += [(n, s, e) for n, w, s, e in fields(model, start, end) if w == _LENGTH]
    return spans


def element_name(model: bytes, field: int, start: int, end: int) -> bytes | None:
    """The name inside a graph element (node, initializer, value info), or None when it has none."""
    name_field = _NAME_FIELDS.get(field)
    if name_field is None:
        return None
    for number, wire, s, e in fields(model, start, end):
        if number == name_field and wire == _LENGTH:
            return model[s:e] or None
    return None
