"""Outlier-robust int8 (edgefleet.build.passes: cle, smooth_quant, bias correction, robust_int8) and the build
search's use of it: channel scaling keeps the float model's function, and a model whose channels differ in scale
by 1000x ships at int8's size within the gate instead of keeping nodes in float or falling back to fp16."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgefleet.build.evaluate import accuracy, predict
from edgefleet.build.passes import get_pass, make_config
from edgefleet.build.passes.bias_correction import correct_biases
from edgefleet.build.passes.channel_scaling import Weights, channel_range, channel_statistics, find_pairs, prepare
from edgefleet.build.passes.static_int8 import StaticInt8, StaticInt8Config
from edgefleet.build.pipeline import BuildData, BuildSearch
from edgefleet.build.recipe import load_recipe
from edgefleet.build.report import plot, report_json
from edgefleet.testing.outliers import conv_model, with_outlier_channels

FAST = "latency: {budget_s: 0.05, min_runs: 3, max_runs: 20, warmup: 1, batches: [1]}\n"
RTOL = 1e-4
"""Channel scaling changes only float rounding: outputs agree within 1e-4 of the largest output magnitude."""


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(700, 4, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def outlier(inputs: np.ndarray) -> bytes:
    """The random conv model with one channel 1000x larger after each of its two pairs, same function."""
    return with_outlier_channels(conv_model(), 1000.0, pairs=2, calib_x=inputs[:64])


def _data(model: bytes, x: np.ndarray) -> BuildData:
    """Labelled by the float model, keeping the 70% of test rows where its top two scores are furthest apart."""
    scores = predict(model, x[200:])
    top = np.sort(scores, axis=1)
    keep = (top[:, -1] - top[:, -2]) > np.quantile(top[:, -1] - top[:, -2], 0.3)
    return BuildData(calib_x=x[:200], test_x=x[200:][keep], test_y=scores.argmax(axis=1)[keep])


def _close(a: bytes, b: bytes, x: np.ndarray) -> float:
    ya, yb = predict(a, x), predict(b, x)
    return float(np.abs(ya - yb).max() / np.abs(ya).max())


def test_outlier_model_keeps_the_function_and_has_a_1000x_channel(inputs: np.ndarray, outlier: bytes) -> None:
    """The test model itself: same outputs as the original, and one activation channel far above the rest."""
    assert _close(conv_model(), outlier, inputs[:100]) < RTOL
    pairs = find_pairs(onnx.load_from_string(outlier))
    assert [(p.first.node.name, p.second.node.name) for p in pairs] == [("conv1", "conv2"), ("conv2", "conv3")]
    ranges = channel_statistics(outlier, {"c2": 1}, inputs[:64])["c2"]
    assert ranges.max() > 100 * np.median(ranges)


def test_cle_preserves_function_and_equalizes_weight_ranges(inputs: np.ndarray, outlier: bytes) -> None:
    step = get_pass("cle")
    result = step.run(outlier, inputs[:16], make_config("cle", {}))
    assert _close(outlier, result.model, inputs[:200]) < RTOL
    proto = onnx.load_from_string(result.model)
    weights = Weights(proto)
    for pair in find_pairs(proto):  # after CLE each channel's range is the same on both sides of a pair
        r1 = channel_range(weights.get(pair.first.weight), pair.first.out_axis)
        r2 = channel_range(weights.get(pair.second.weight), pair.second.in_axis)
        np.testing.assert_allclose(r1, r2, rtol=0.05)
    assert "equalized 2 layer pair(s)" in result.notes[0]
    ranges = channel_statistics(result.model, {"c2": 1}, inputs[:64])["c2"]
    assert ranges.max() < 20 * np.median(ranges)  # the 1000x channel is gone


def test_smooth_quant_preserves_function_and_flattens_activation_ranges(inputs: np.ndarray, outlier: bytes) -> None:
    result = get_pass("smooth_quant").run(outlier, inputs[:64], make_config("smooth_quant", {"alpha": 0.5}))
    assert _close(outlier, result.model, inputs[:200]) < RTOL
    before = channel_statistics(outlier, {"c2": 1}, inputs[:64])["c2"]
    after = channel_statistics(result.model, {"c2": 1}, inputs[:64])["c2"]
    assert after.max() / np.median(after) < 0.1 * before.max() / np.median(before)


def test_bias_correction_removes_the_int8_mean_shift_and_nothing_else(inputs: np.ndarray, outlier: bytes) -> None:
    """Against itself (no quantization) it changes nothing; against per-tensor int8 it shrinks every output
    channel's mean error (the outlier channel pushes the others' int8 rounding off centre)."""
    prepared = prepare(outlier)
    x = inputs[:64]
    same, _ = correct_biases(prepared, prepared, x)
    assert _close(prepared, same, inputs[:100]) < 1e-6
    step, config = StaticInt8(), StaticInt8Config(per_channel=False)
    stats = step.collect(prepared, inputs[:200], config)
    plain = step.apply(prepared, stats, config).model
    corrected, notes = correct_biases(plain, stats.model, x)
    reference = predict(prepared, inputs[200:])

    def mean_error(model: bytes) -> np.ndarray:
        return np.abs((predict(model, inputs[200:]) - reference).mean(axis=0))

    assert mean_error(corrected).max() < 0.5 * mean_error(plain).max()
    assert notes[0].startswith("bias correction: 4 layer(s)")


def test_search_ships_the_outlier_model_in_int8_at_int8_size(inputs: np.ndarray, outlier: bytes,
                                                             tmp_path: Path) -> None:
    """Plain int8 fails the gate per tensor and per channel; the default outlier-robust candidates are tried
    before the rescue, one passes at the plain int8 model's size, and the report and plot list them."""
    data = _data(outlier, inputs)
    recipe = load_recipe(FAST + "candidates: [{pass: static_int8, grid: {per_channel: [false, true]}}, {pass: fp16}]\n")
    outcome = BuildSearch(outlier, data, recipe, []).run()  # the default outlier candidates, gate 1 pp
    plain = [c for c in outcome.candidates if c.pass_name == "static_int8" and c.error is None]
    assert plain and all(not c.passed for c in plain)
    robust = [c for c in outcome.candidates if c.pass_name == "robust_int8"]
    assert {c.config["equalize"] for c in robust} == {"cle", "smooth_quant"} and len(robust) == 5
    chosen = outcome.chosen
    assert chosen is not None and chosen.pass_name == "robust_int8" and chosen.drop_pp is not None
    assert chosen.drop_pp <= 1.0 and not outcome.rescue_trials
    same_granularity = next(c for c in plain if c.config["per_channel"] == chosen.config["per_channel"])
    assert chosen.size_bytes <= 1.05 * same_granularity.size_bytes
    fp16 = next(c for c in outcome.candidates if c.pass_name == "fp16")
    assert chosen.size_bytes < 0.75 * fp16.size_bytes
    assert accuracy(chosen.model or b"", data.test_x, data.test_y) == chosen.accuracy
    report = json.loads(json.dumps(report_json(outcome), default=str))
    labels = {c["label"] for c in report["candidates"] if c["pass"] == "robust_int8"}
    assert {"int8 minmax per-tensor +cle +bias-corr", "int8 minmax per-channel +smoothquant(0.5) +bias-corr"} <= labels
    assert report["chosen"] in labels and any("cle: equalized" in n for c in report["candidates"] for n in c["notes"])
    plot(outcome, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_dense_layers_are_equalized_too() -> None:
    """MatMul -> Relu -> MatMul -> MatMul with a 1000x channel (tests/unit/test_pipeline's model): CLE keeps its
    function, and robust int8 per tensor recovers the accuracy plain per-tensor int8 loses."""
    from test_pipeline import outlier_data, outlier_model

    model = outlier_model()
    data = outlier_data(model)
    result = get_pass("cle").run(model, data.calib_x, make_config("cle", {}))
    assert _close(model, result.model, data.test_x) < RTOL
    assert "equalized 2 layer pair(s)" in result.notes[0]
    plain = StaticInt8().run(model, data.calib_x, StaticInt8Config(per_channel=False)).model
    robust = get_pass("robust_int8").run(model, data.calib_x, make_config("robust_int8", {"per_channel": False}))
    assert accuracy(plain, data.test_x, data.test_y) < 0.5
    assert accuracy(robust.model, data.test_x, data.test_y) >= 0.98
