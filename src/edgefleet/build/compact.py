"""Shrink a serialized ONNX model without changing what it computes: short tensor names, no node names,
doc strings or value_info. Graph inputs and outputs keep their names (the bundle's schema uses them).

Names dominate small quantized models: a QDQ model of a few thousand parameters spends more bytes on names
like ``/0/0.3/Conv_output_0_QuantizeLinear_Output`` than on its int8 weights.
"""

from __future__ import annotations

import onnx


def _short(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if i == 0:
            return "t" + out


def compact(model: bytes) -> bytes:
    """The same model with every internal tensor renamed ``t<base36>``, node names, docs, metadata and unused
    opset imports dropped.

    Models with subgraphs (If, Loop, Scan) are returned unchanged: their bodies may use outer names.
    """
    proto = onnx.load_from_string(model)
    graph = proto.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return model
    keep = {v.name for v in [*graph.input, *graph.output]}
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            names[name] = _short(len(names))
        return names[name]

    for init in graph.initializer:
        init.name = rename(init.name)
        init.ClearField("doc_string")
    for node in graph.node:
        node.ClearField("name")
        node.ClearField("doc_string")
        node.input[:] = [rename(x) for x in node.input]
        node.output[:] = [rename(x) for x in node.output]
    del graph.value_info[:]
    graph.ClearField("doc_string")
    proto.ClearField("doc_string")
    del proto.metadata_props[:]
    used = {n.domain for n in graph.node} | {"", "ai.onnx"}
    kept = [o for o in proto.opset_import if o.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return bytes(proto.SerializeToString())
