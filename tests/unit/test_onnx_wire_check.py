"""The model check a device makes without the ``onnx`` package (its base install): the protobuf-wire walk of
``safe_onnx.check_onnx_wire`` refuses what ``onnx`` refuses for the same reason (external data anywhere, including
inside a subgraph, a sparse initializer or a function; bytes that are no ONNX protobuf) and accepts real models."""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.bundle import safe_onnx
from edgefleet.errors import BundleError
from edgefleet.testing import synthetic


def _external(tensor: TensorProto, location: str = "../../x") -> None:
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location


def initializer_outside() -> bytes:
    proto = onnx.load_model_from_string(synthetic.channel_mean_model())
    _external(proto.graph.initializer[0])
    return proto.SerializeToString()


def subgraph_outside(external: bool = True) -> bytes:
    """An If node whose then-branch holds a Constant whose tensor points outside (or holds its values)."""
    value = numpy_helper.from_array(np.ones(2, np.float32), "c")
    if external:
        _external(value, "/etc/passwd")
    branch = helper.make_graph([helper.make_node("Constant", [], ["y"], value=value)], "then", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(
        np.zeros(2, np.float32), "z"))], "else", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph).SerializeToString()


def sparse_outside() -> bytes:
    proto = onnx.load_model_from_string(synthetic.channel_mean_model())
    values = numpy_helper.from_array(np.ones(1, np.float32), "sv")
    _external(values)
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "si")
    proto.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    return proto.SerializeToString()


CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "initializer with external data": (initializer_outside, "external_data"),
    "subgraph constant with external data": (subgraph_outside, "external_data"),
    "sparse initializer with external data": (sparse_outside, "external_data"),
    "truncated protobuf": (lambda: synthetic.channel_mean_model()[:-7], "invalid_model"),
    "a pickle": (lambda: b"\x80\x04K\x01.", "unsafe_format"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_wire_check_refuses_what_onnx_refuses_for_the_same_reason(case: str) -> None:
    make, reason = CASES[case]
    data = make()
    for check in (safe_onnx.check_onnx, safe_onnx.check_onnx_wire):
        with pytest.raises(BundleError) as caught:
            check(data)
        assert caught.value.reason == reason, (check.__name__, str(caught.value))


def test_the_wire_check_accepts_real_models() -> None:
    for model in (synthetic.channel_mean_model(), subgraph_outside(external=False)):
        onnx.checker.check_model(model)
        safe_onnx.check_onnx_wire(model)


def test_without_the_onnx_package_check_onnx_walks_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a base install ``import onnx`` fails: ``check_onnx`` (decide's default) still refuses external data."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # ``import onnx`` raises ImportError
    safe_onnx.check_onnx(synthetic.channel_mean_model())
    with pytest.raises(BundleError) as caught:
        safe_onnx.check_onnx(subgraph_outside())
    assert caught.value.reason == "external_data"
