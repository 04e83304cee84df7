"""Safe model loading: what a model member must pass before any runtime sees it.

Two layers, both raising BundleError with a ``reason``:

- :func:`sniff_model` looks at bytes only (standard library, no ONNX): it caps the size and refuses
  content that can run code when loaded or that is no ONNX protobuf at all, recognised by its magic
  bytes and never by a file name: pickle (protocol 2 to 5 start ``0x80 0x02..0x05``; the legacy torch
  format too), zip archives (torch's ``data.pkl`` inside), gzip/bz2/xz/zlib streams (joblib), ``.npy``.
  Reason ``unsafe_format``.
- :func:`check_onnx` parses the ModelProto with ``onnx`` (imported lazily, inside the function) and
  refuses every tensor stored as external data, reason ``external_data``: a bundle is one file, so there
  is nothing outside it for a reference to name, and an absolute path, a ``..`` or a symlink is refused
  exactly like a plain file name (CVE-2022-25882, CVE-2024-27318). Then ``onnx.checker`` runs on the
  bytes (reason ``invalid_model``).

Why a parameter: ``core/update.py`` is pure and imports no ONNX. ``decide`` always calls
:func:`sniff_model` itself and takes the ONNX check as its ``model_check`` argument, whose default is
:func:`check_onnx`; the ``onnx`` import happens here, when the check first runs, never when the core is
imported. ``model_check=None`` gives a decision without parsing the model (routing, pure-core tests).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

from edgefleet.errors import BundleError

MAX_MODEL_BYTES = 2**31 - 1  # protobuf's own limit for one message

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a zip archive (a torch .pt file keeps its pickle in data.pkl inside one)"),
    (b"PK\x05\x06", "a zip archive"),
    (b"\x1f\x8b", "a gzip stream (joblib compresses pickles this way)"),
    (b"BZh", "a bzip2 stream (joblib)"),
    (b"\xfd7zXZ\x00", "an xz stream (joblib)"),
    (b"\x93NUMPY", "a numpy .npy file"),
)


def sniff_model(data: bytes, max_bytes: int = MAX_MODEL_BYTES) -> None:
    """Refuse oversized, empty, pickled, archived or compressed model bytes (by content, not by name)."""
    if len(data) > max_bytes:
        raise BundleError(f"model is {len(data)} bytes, over the {max_bytes} limit", reason="oversized")
    if not data:
        raise BundleError("model member is empty", reason="invalid_model")
    if data[0] == 0x80 and len(data) > 1 and 2 <= data[1] <= 5:
        raise BundleError(f"model member is a pickle (protocol {data[1]}): it could run code; refused",
                          reason="unsafe_format")
    for magic, what in _MAGIC:
        if data.startswith(magic):
            raise BundleError(f"model member is {what}, not ONNX; refused", reason="unsafe_format")
    if data[0] == 0x78 and len(data) > 1 and (data[0] << 8 | data[1]) % 31 == 0:
        raise BundleError("model member is a zlib stream (joblib), not ONNX; refused", reason="unsafe_format")


def check_onnx(data: bytes, max_bytes: int = MAX_MODEL_BYTES) -> None:
    """Sniff, parse, refuse external data, then run ``onnx.checker`` on ``data``.

    Without the ``onnx`` package (a device's base install, which runs models but does not build them) the model
    is checked on the protobuf wire instead (:func:`check_onnx_wire`: well-formed, no external data); ONNX
    Runtime's own graph checks then run when the health check loads it, before the model is activated.
    """
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        check_onnx_wire(data, max_bytes)
        return

    sniff_model(data, max_bytes)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise BundleError(f"model member is not an ONNX protobuf: {_first_line(exc)}", reason="invalid_model") from exc
    for owner, tensor in _tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise BundleError(f"tensor {tensor.name[:80]!r} in {owner[:80]} {_describe(tensor)}; a bundle is one "
                              "file, so external data is refused", reason="external_data")
    try:
        onnx.checker.check_model(data)
    except (onnx.checker.ValidationError, DecodeError, ValueError, RuntimeError) as exc:
        raise BundleError(f"model fails onnx.checker: {_first_line(exc)}", reason="invalid_model") from exc


# ONNX field numbers (onnx.proto): where tensors and subgraphs lie in a ModelProto
_MODEL_GRAPH, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 20, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTRIBUTE, _FUNCTION_NODE = 5, 7
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def check_onnx_wire(data: bytes, max_bytes: int = MAX_MODEL_BYTES) -> None:
    """Sniff, then walk the ModelProto on the protobuf wire (no ``onnx`` import): malformed wire data is
    ``invalid_model``, a model without a graph too, and every tensor stored as external data (initializers,
    sparse ones, node attributes, subgraphs, training graphs, functions) is ``external_data``."""
    from edgefleet.bundle import protowire

    sniff_model(data, max_bytes)
    try:
        graphs = [(s, e) for n, w, s, e in protowire.fields(data, 0, len(data)) if n == _MODEL_GRAPH and w == 2]
        if not graphs:
            raise BundleError("model member holds no ONNX graph", reason="invalid_model")
        for number, wire, start, end in protowire.fields(data, 0, len(data)):
            if wire != 2:
                continue
            if number == _MODEL_GRAPH:
                _wire_graph(data, start, end, "graph", 0)
            elif number == _MODEL_TRAINING:
                for n, w, s, e in protowire.fields(data, start, end):
                    if n in (1, 2) and w == 2:
                        _wire_graph(data, s, e, "training graph", 0)
            elif number == _MODEL_FUNCTIONS:
                for n, w, s, e in protowire.fields(data, start, end):
                    if n == _FUNCTION_NODE and w == 2:
                        _wire_node(data, s, e, "function", 0)
    except BundleError as exc:
        if exc.reason == "malformed":
            raise BundleError(f"model member is not an ONNX protobuf: {exc}", reason="invalid_model") from exc
        raise


def _wire_graph(data: bytes, start: int, end: int, owner: str, depth: int) -> None:
    from edgefleet.bundle.protowire import fields

    if depth > 64:
        raise BundleError("model graphs nest too deeply", reason="invalid_model")
    for number, wire, s, e in fields(data, start, end):
        if wire != 2:
            continue
        if number == _GRAPH_INITIALIZER:
            _wire_tensor(data, s, e, owner)
        elif number == _GRAPH_SPARSE:
            _wire_sparse(data, s, e, owner)
        elif number == _GRAPH_NODE:
            _wire_node(data, s, e, owner, depth)


def _wire_node(data: bytes, start: int, end: int, owner: str, depth: int) -> None:
    from edgefleet.bundle.protowire import fields

    for number, wire, s, e in fields(data, start, end):
        if number != _NODE_ATTRIBUTE or wire != 2:
            continue
        for n, w, a, b in fields(data, s, e):
            if w != 2:
                continue
            if n in (_ATTR_TENSOR, _ATTR_TENSORS):
                _wire_tensor(data, a, b, owner)
            elif n in (_ATTR_SPARSE, _ATTR_SPARSES):
                _wire_sparse(data, a, b, owner)
            elif n in (_ATTR_GRAPH, _ATTR_GRAPHS):
                _wire_graph(data, a, b, owner, depth + 1)


def _wire_sparse(data: bytes, start: int, end: int, owner: str) -> None:
    from edgefleet.bundle.protowire import fields

    for number, wire, s, e in fields(data, start, end):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES) and wire == 2:
            _wire_tensor(data, s, e, owner)


def _wire_tensor(data: bytes, start: int, end: int, owner: str) -> None:
    from edgefleet.bundle.protowire import fields, read_varint

    name, external, location = b"", False, 0
    for number, wire, s, e in fields(data, start, end):
        if number == _TENSOR_NAME and wire == 2:
            name = data[s:e]
        elif number == _TENSOR_EXTERNAL:
            external = True
        elif number == _TENSOR_LOCATION and wire == 0:
            location = read_varint(data, s, e)[0]
    if external or location == _EXTERNAL:
        shown = name.decode("utf-8", "replace")[:80]
        raise BundleError(f"tensor {shown!r} in {owner} points to external data; a bundle is one file, so external "
                          "data is refused", reason="external_data")


def _describe(tensor: Any) -> str:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = str(entries.get("location", ""))
    if location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        kind = "an absolute path"
    elif ".." in posixpath.normpath(location.replace("\\", "/")).split("/"):
        kind = "a path that climbs out with '..'"
    else:
        kind = "a file beside the model (it could be a symlink)"
    return f"points to external data {location[:80]!r}, {kind}"


def _tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """Every TensorProto in a ModelProto: initializers, sparse ones, node attributes, subgraphs, functions."""
    graphs = [("graph", model.graph)]
    for info in model.training_info:
        graphs += [("training initialization", info.initialization), ("training algorithm", info.algorithm)]
    for label, graph in graphs:
        yield from _graph_tensors(label, graph, depth=0)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(f"function {function.name}", node, depth=0)


def _graph_tensors(label: str, graph: Any, depth: int) -> Iterator[tuple[str, Any]]:
    if depth > 64:
        raise BundleError("model graphs nest too deeply", reason="invalid_model")
    for tensor in graph.initializer:
        yield label, tensor
    for sparse in graph.sparse_initializer:
        yield label, sparse.values
        yield label, sparse.indices
    for node in graph.node:
        yield from _node_tensors(label, node, depth)


def _node_tensors(label: str, node: Any, depth: int) -> Iterator[tuple[str, Any]]:
    where = f"{label} node {node.name or node.op_type}"
    for attr in node.attribute:
        if attr.HasField("t"):
            yield where, attr.t
        yield from ((where, t) for t in attr.tensors)
        if attr.HasField("sparse_tensor"):
            yield where, attr.sparse_tensor.values
            yield where, attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield where, sparse.values
            yield where, sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(where, attr.g, depth + 1)
        for graph in attr.graphs:
            yield from _graph_tensors(where, graph, depth + 1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
