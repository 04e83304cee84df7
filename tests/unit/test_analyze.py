"""edgefleet.build.analyze / memory / energy: MACs, parameters, arena and energy on hand-computed graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.build.analyze import analyze
from edgefleet.build.energy import ENERGY_PJ_45NM
from edgefleet.build.memory import plan_arena
from edgefleet.build.quantize import quantize_int8
from edgefleet.errors import ModelError


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           weights: dict[str, np.ndarray]) -> bytes:
    initializer = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _conv_net() -> bytes:
    """x[1,3,8,8] -Conv(4x3x3x3,pad 1)-> y[1,4,8,8] -Relu-> r -GAP-> p[1,4,1,1] -Flatten-> f[1,4] -Gemm-> o[1,10]."""
    rng = np.random.default_rng(0)
    return _model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["y"], ["r"], name="relu"),
         helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
         helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "w2", "b2"], ["o"], transB=1, name="fc")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["batch", 10])],
        {"w": rng.normal(size=(4, 3, 3, 3)), "b": rng.normal(size=4), "w2": rng.normal(size=(10, 4)),
         "b2": rng.normal(size=10)},
    )


def test_conv_net_macs_params_and_weight_bytes() -> None:
    """Conv: 4*8*8 outputs x 3*3*3 = 6912 MACs; Gemm: 10 x 4 = 40; 162 float parameters = 648 bytes."""
    a = analyze(_conv_net())
    macs = {n.name: n.macs for n in a.nodes}
    assert macs == {"conv": 6912, "relu": 0, "gap": 0, "flatten": 0, "fc": 40}
    assert a.macs == 6952
    adds = {n.name: n.adds for n in a.nodes}
    assert adds == {"conv": 256, "relu": 256, "gap": 256, "flatten": 0, "fc": 10}
    assert (a.params, a.weight_bytes) == (162, 648)
    assert all(n.precision == "fp32" for n in a.nodes)


def test_conv_net_arena_and_peak_memory() -> None:
    """Live bytes per step: x+y 1792, y+r 2048, r+p 1040, p+f 32, f+o 56: the peak and the arena are 2048."""
    a = analyze(_conv_net())
    assert a.arena.peak_live_bytes == 2048
    assert a.arena.peak_step == 1
    assert a.arena.arena_bytes == 2048
    offsets = {p.name: p.offset for p in a.arena.placements}
    assert offsets["y"] == 0 and offsets["r"] == 1024 and offsets["x"] == 1024


def test_batch_scales_macs_and_arena() -> None:
    """At batch 4 every count and every activation is four times as large; weights are not."""
    one, four = analyze(_conv_net()), analyze(_conv_net(), batch=4)
    assert four.macs == 4 * one.macs
    assert four.arena.peak_live_bytes == 4 * one.arena.peak_live_bytes
    assert four.weight_bytes == one.weight_bytes


def test_energy_estimate_by_hand() -> None:
    """fp32 MACs cost mult+add (4.6 pJ), adds 0.9, mults 3.7; weights 162 words from DRAM; 4968 activation
    bytes (each tensor read by each consumer and written once) from SRAM."""
    t = ENERGY_PJ_45NM
    compute = 6952 * (t["mult_fp32"] + t["add_fp32"]) + 778 * t["add_fp32"] + 4 * t["mult_fp32"]
    dram, sram = 162 * t["dram_read_32b"], (4968 // 4) * t["sram_read_32b"]
    energy = analyze(_conv_net()).energy
    assert energy.compute_uj == pytest.approx(compute * 1e-6)
    assert energy.dram_uj == pytest.approx(dram * 1e-6)
    assert energy.sram_uj == pytest.approx(sram * 1e-6)
    assert energy.total_uj == pytest.approx((compute + dram + sram) * 1e-6)
    assert any("estimate" in a for a in energy.assumptions)


def test_conv_transpose_depthwise_and_matmul_macs() -> None:
    """ConvTranspose: 32 inputs x 3 x 3x3 = 864; depthwise 3x3 on 4x6x6: 144 x 9 = 1296; MatMul 1x5x7: 35."""
    rng = np.random.default_rng(1)
    model = _model(
        [helper.make_node("ConvTranspose", ["a", "wt"], ["ta"], pads=[1, 1, 1, 1], name="deconv"),
         helper.make_node("Conv", ["d", "wd"], ["td"], pads=[1, 1, 1, 1], group=4, name="dw"),
         helper.make_node("MatMul", ["m", "wm"], ["tm"], name="mm"),
         helper.make_node("Mul", ["tm", "tm"], ["sq"], name="mul")],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2, 4, 4]),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, [1, 4, 6, 6]),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 5])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
         for n, shape in (("ta", [1, 3, 4, 4]), ("td", [1, 4, 6, 6]), ("sq", [1, 7]))],
        {"wt": rng.normal(size=(2, 3, 3, 3)), "wd": rng.normal(size=(4, 1, 3, 3)), "wm": rng.normal(size=(5, 7))},
    )
    costs = {n.name: n for n in analyze(model).nodes}
    assert (costs["deconv"].macs, costs["dw"].macs, costs["mm"].macs) == (864, 1296, 35)
    assert (costs["mul"].mults, costs["mul"].macs) == (7, 0)


def test_greedy_arena_on_a_branch() -> None:
    """a is read by B and by the Add, so it lives across three steps: the peak is a+b+c = 300 bytes."""
    steps = [(["x"], ["a"]), (["a"], ["b"]), (["a", "b"], ["c"])]
    plan = plan_arena(steps, {n: 100 for n in "xabc"}, ["x"], ["c"], alignment=4)
    spans = {p.name: (p.first, p.last) for p in plan.placements}
    assert spans == {"x": (0, 0), "a": (0, 2), "b": (1, 2), "c": (2, 2)}
    assert plan.peak_live_bytes == 300 and plan.arena_bytes == 300
    offsets = {p.name: p.offset for p in plan.placements}
    assert offsets == {"a": 0, "x": 100, "b": 100, "c": 200}  # b reuses x's slot: their lifetimes don't meet


def test_greedy_arena_aligns_offsets() -> None:
    """Two 10-byte tensors alive together: the second starts at the next 16-byte boundary."""
    plan = plan_arena([(["x"], ["y"])], {"x": 10, "y": 10}, ["x"], ["y"], alignment=16)
    assert sorted(p.offset for p in plan.placements) == [0, 16]
    assert plan.arena_bytes == 26 and plan.peak_live_bytes == 20


def test_quantized_model_is_analysed_as_int8() -> None:
    """After static int8 every MAC is int8, weights shrink (int8 weights, int32 biases, scales) and so does
    the arena (uint8 tensors)."""
    float_model = _conv_net()
    calib = np.random.default_rng(2).normal(size=(16, 3, 8, 8)).astype(np.float32)
    f, q = analyze(float_model), analyze(quantize_int8(float_model, calib))
    assert q.macs == f.macs
    assert q.int8_fraction == 1.0 and not q.float_compute_nodes
    assert q.params == f.params
    assert q.weight_bytes < 0.7 * f.weight_bytes
    assert q.arena.arena_bytes < f.arena.arena_bytes
    assert q.energy.total_uj < f.energy.total_uj


def test_not_onnx_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        analyze(b"definitely not protobuf \x00\xff" * 4)
