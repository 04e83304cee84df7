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


def graph_elements(model: bytes) -> list[tuple[int, int]]:
    """Byte spans of every length-delimited field's contents directly inside the model's graph(s)."""
    spans: list[tuple[int, int]] = []
    for number, wire, start, end in fields(model, 0, len(model)):
        if number == GRAPH_FIELD and wire == _LENGTH:
            spans += [(s, e) for _, w, s, e in fields(model, start, end) if w == _LENGTH]
    return spans
