"""edgefleet.build.pipeline and recipe: the accuracy gate, the rescue search and the choice of candidate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.build.evaluate import predict
from edgefleet.build.passes import get_pass
from edgefleet.build.pipeline import BuildData, BuildSearch, Candidate, choose
from edgefleet.build.recipe import load_recipe
from edgefleet.core.profiles import BUILTIN_PROFILES
from edgefleet.errors import ConfigError

FEATURES, HIDDEN, NARROW, CLASSES = 256, 256, 32, 4


def outlier_model(seed: int = 0, scale: float = 1000.0) -> bytes:
    """x[256] -MatMul-> 256 -Relu-> -MatMul-> h[32] -MatMul-> 4 -Softmax.

    Channel 0 of h is ``scale`` times larger than the others and the last layer divides it back, so every
    channel matters: a per-tensor range for h wipes out channels 1..31 (or clips channel 0).
    """
    rng = np.random.default_rng(seed)
    wa = (rng.normal(size=(FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32)
    wb = (rng.normal(size=(HIDDEN, NARROW)) / np.sqrt(HIDDEN)).astype(np.float32)
    wc = rng.normal(size=(NARROW, CLASSES)).astype(np.float32)
    wb[:, 0] *= scale
    wc[0, :] /= scale
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wa"], ["a"], name="fc_a"), helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("MatMul", ["r", "wb"], ["h"], name="fc_b"),
         helper.make_node("MatMul", ["h", "wc"], ["logits"], name="fc_c"),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[numpy_helper.from_array(w, n) for n, w in (("wa", wa), ("wb", wb), ("wc", wc))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def outlier_data(model: bytes, n: int = 700, seed: int = 1) -> BuildData:
    """Calibration and test inputs, labelled by the float model itself (so float accuracy is 100%)."""
    x = np.random.default_rng(seed).normal(size=(n, FEATURES)).astype(np.float32)
    return BuildData(calib_x=x[:200], test_x=x[200:], test_y=predict(model, x[200:]).argmax(axis=1))


FAST = "latency: {budget_s: 0.05, min_runs: 3, max_runs: 20, warmup: 1, batches: [1]}\n"


def test_gate_rescues_an_outlier_model_by_keeping_sensitive_nodes_in_float() -> None:
    """Every default int8 candidate loses most of the accuracy; the rescue keeps the outlier tensor's nodes in
    float, meets the 1-point gate, and is chosen because it is smaller than fp16 (outlier-robust candidates off:
    they would pass first, see test_outlier_ptq)."""
    model = outlier_model()
    recipe = load_recipe(FAST + "outlier_candidates: []\n")
    outcome = BuildSearch(model, outlier_data(model), recipe, [BUILTIN_PROFILES["raspberry-pi"]]).run()
    int8 = [c for c in outcome.candidates if c.pass_name == "static_int8" and not c.config["nodes_to_exclude"]]
    assert len(int8) == 8
    measured = [c for c in int8 if c.error is None]  # the rest produced a model identical to an earlier one
    assert len(measured) >= 4 and all(c.error.startswith("identical") for c in int8 if c.error)
    assert all(c.drop_pp is not None and c.drop_pp > 20 for c in measured)
    chosen = outcome.chosen
    assert chosen is not None and chosen.config["nodes_to_exclude"]
    assert set(chosen.config["nodes_to_exclude"]) == {"fc_b", "fc_c"}
    assert chosen.drop_pp is not None and chosen.drop_pp <= 1.0
    assert chosen.size_bytes < next(c for c in outcome.candidates if c.pass_name == "fp16").size_bytes
    assert outcome.rescue_trials and outcome.rescue_trials[-1]["passed"]
    assert outcome.rescue_trials[0]["tensors_in_float"] == ["h"]
    assert any("rescued" in note for note in chosen.notes)
    assert chosen.analysis is not None and set(chosen.analysis.float_compute_nodes) == {"fc_b", "fc_c"}
    assert "passes the gate" in outcome.reason and chosen.verdicts[0].profile == "raspberry-pi"


def test_nothing_passes_without_rescue_or_fallback() -> None:
    """With only per-tensor int8 and no rescue the gate rejects everything: no choice, and the reason says so."""
    model = outlier_model()
    recipe = load_recipe(FAST + "rescue: {enabled: false}\noutlier_candidates: []\ncandidates:\n"
                         "  - pass: static_int8\n    options: {per_channel: false}\n")
    outcome = BuildSearch(model, outlier_data(model), recipe, []).run()
    assert outcome.chosen is None
    assert "no candidate met the gate" in outcome.reason


def test_statistics_are_collected_once_per_calibration_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-tensor and per-channel share one calibration (NNCF-style collect/apply split)."""
    model = outlier_model()
    static = type(get_pass("static_int8"))
    calls: list[str] = []
    original = static.collect

    def counting(self: object, *args: object) -> object:
        calls.append("collect")
        return original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(static, "collect", counting)
    recipe = load_recipe(FAST + "rescue: {enabled: false}\noutlier_candidates: []\ncandidates:\n"
                         "  - pass: static_int8\n    grid: {per_channel: [false, true]}\n")
    outcome = BuildSearch(model, outlier_data(model), recipe, []).run()
    assert len(outcome.candidates) == 2 and calls == ["collect"]


def _cand(label: str, size: int, latency: float, drop: float, passed: bool = True) -> Candidate:
    from edgefleet.build.latency import LatencyStats

    return Candidate(label=label, pass_name="x", config={}, model=b"m" * size, accuracy=0.9, drop_pp=drop,
                     passed=passed, latency={1: LatencyStats(1, latency, latency, latency, 10)})


def test_choose_smallest_then_fastest_within_tolerance() -> None:
    """b is 3% larger than a but faster: within the 5% tolerance, so b wins; c is smallest but fails."""
    a, b, c = _cand("a", 1000, 2.0, 0.1), _cand("b", 1030, 1.0, 0.2), _cand("c", 500, 0.5, 3.0, passed=False)
    chosen, reason = choose([a, b, c], 1.0, 0.05)
    assert chosen is b and "fastest" in reason and "c" in reason
    chosen, _ = choose([a, b, c], 1.0, 0.0)
    assert chosen is a


def test_choose_prefers_accuracy_when_times_are_within_noise() -> None:
    """Same size, 2% apart in time: timing noise, so the more accurate one (smaller drop) wins."""
    fast, accurate = _cand("fast", 1000, 1.0, 0.4), _cand("accurate", 1000, 1.02, 0.0)
    fast.accuracy, accurate.accuracy = 0.896, 0.9
    chosen, reason = choose([fast, accurate], 1.0, 0.05, 0.05)
    assert chosen is accurate and "most accurate" in reason
    chosen, _ = choose([fast, accurate], 1.0, 0.05, 0.0)
    assert chosen is fast


def test_recipe_yaml_grid_and_errors() -> None:
    recipe = load_recipe("max_accuracy_drop: 0.5\ncandidates:\n  - pass: static_int8\n"
                         "    grid: {calibration: [minmax, entropy]}\n    options: {per_channel: false}\n")
    assert recipe.max_accuracy_drop == 0.5
    assert [c.model_dump()["calibration"] for _, c in recipe.configs()] == ["minmax", "entropy"]
    assert len(load_recipe(None).configs()) == 9  # 3 calibrations x 2 granularities, 2 float-stem, fp16
    with pytest.raises(ConfigError, match="calibration"):
        load_recipe("candidates: [{pass: static_int8, options: {calibration: magic}}]")
    with pytest.raises(ConfigError, match="unknown pass"):
        load_recipe("candidates: [{pass: prune_everything}]")
    with pytest.raises(ConfigError, match="max_accuracy_drop"):
        load_recipe("max_accuracy_drop: -1")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe("- just a list")


def test_dynamic_int8_and_fp16_passes_shrink_the_model() -> None:
    """dynamic int8 stores int8 weights (< 0.3x); fp16 halves them; both still agree with the float model."""
    model = outlier_model(scale=1.0)
    x = outlier_data(model).test_x[:100]
    reference = predict(model, x).argmax(axis=1)
    for name, ratio in (("dynamic_int8", 0.3), ("fp16", 0.55)):
        step = get_pass(name)
        result = step.run(model, x, step.config_type())
        assert len(result.model) < ratio * len(model)
        assert (predict(result.model, x).argmax(axis=1) == reference).mean() >= 0.95
        onnx.checker.check_model(onnx.load_from_string(result.model))
