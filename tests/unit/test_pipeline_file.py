"""The pipeline file and how a build or a pack resolves the bundle's pipeline: unknown keys refused with one line
naming them, each source laid over the previous one (inferred, data file, pipeline file, flags), the softmax
decided from the model's scores, data rows checked against the pipeline and turned into model input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.build.inputs import default_name
from edgefleet.build.io_pipeline import (
    PipelineOptions,
    ResolvedPipeline,
    check_rows,
    model_input,
    options_from_flags,
    resolve_pipeline,
    with_activation,
)
from edgefleet.build.pipeline_file import parse_pipeline, parse_thresholds
from edgefleet.errors import ConfigError, DataError
from edgefleet.runtime.inputs import INPUT_STEPS, input_step
from edgefleet.runtime.outputs import OUTPUT_STEPS


def linear_model(shape: list[int], classes: int = 3) -> bytes:
    """Flatten -> MatMul: a model whose input is [N, *shape]."""
    size = int(np.prod(shape))
    weights = np.random.default_rng(0).normal(size=(size, classes)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], ["y"])], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, *shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, classes])],
        [numpy_helper.from_array(weights, "w")])
    return bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


def test_every_step_declares_the_keys_it_reads() -> None:
    assert {"window", "hop", "mean", "std", "sample_rate_hz"} <= INPUT_STEPS["sliding_window"].KEYS
    assert {"scale", "layout", "color", "resize"} <= INPUT_STEPS["image"].KEYS
    assert {"kind", "version", "output", "activation"} == OUTPUT_STEPS["scores"].KEYS
    assert "zipmap" in OUTPUT_STEPS["label_probabilities"].KEYS and "output" in OUTPUT_STEPS["regression"].KEYS


def test_a_full_pipeline_file_parses() -> None:
    parsed = parse_pipeline("input: {kind: sliding_window, sample_rate_hz: 100, mean: [0, 1], std: [1, 2]}\n"
                            "output: {kind: scores, activation: softmax}\nlabels: [a, b]\n"
                            "thresholds: {min_confidence: 0.6}\n")
    assert parsed.input["sample_rate_hz"] == 100 and parsed.output == {"kind": "scores", "activation": "softmax"}
    assert parsed.labels == ("a", "b") and parsed.thresholds == {"min_confidence": 0.6}
    assert parse_pipeline("").input == {}


@pytest.mark.parametrize(("text", "needle"), [
    ("inputs: {}\n", "unknown key 'inputs'"),
    ("input: {kind: image, height: 8, width: 8, sacle: 2}\n", "unknown key input.sacle for input (image)"),
    ("input: {kind: pixels}\n", "unknown input kind 'pixels'"),
    ("input: {windw: 3}\n", "unknown key input.windw"),
    ("output: {activation: softmax}\n", "output needs a kind"),
    ("output: {kind: scores, output: y, threshold: 2}\n", "unknown key output.threshold"),
    ("output: {kind: label_probabilities, probabilities: p, zipmap: true, classes: [0], label: l, x: 1}\n",
     "unknown key output.x"),
    ("labels: [a, a]\n", "names a class twice"),
    ("thresholds: {min_confidence: high}\n", "thresholds.min_confidence must be a number"),
    ("- input\n", "must be a mapping"),
    ("input: [1, 2]\n", "input must be a mapping"),
    ("input: {kind: [\n", "not valid YAML"),
])
def test_bad_pipeline_files_are_one_line(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_pipeline(text, where="p.yaml")
    message = str(caught.value)
    assert needle in message and message.startswith("p.yaml") and "\n" not in message


def test_flags_parse_or_say_which_is_wrong(tmp_path: Path) -> None:
    assert parse_thresholds(["a=1", "b = 2.5"]) == {"a": 1.0, "b": 2.5}
    for bad in (["a"], ["=1"], ["a=x"], ["a=nan"]):
        with pytest.raises(ConfigError, match="--threshold"):
            parse_thresholds(bad)
    with pytest.raises(ConfigError, match="--window"):
        options_from_flags(window=0)
    with pytest.raises(ConfigError, match="--sample-rate"):
        options_from_flags(sample_rate_hz=-1.0)
    with pytest.raises(ConfigError, match="cannot read"):
        options_from_flags(pipeline=tmp_path / "missing.yaml")
    assert options_from_flags(labels="a, b,c").labels == ("a", "b", "c")


def test_sources_are_laid_over_each_other_in_order() -> None:
    """Inferred (window 32, hop 32) < data file (sample rate, labels) < pipeline file (mean/std, labels) < flags
    (hop, labels, thresholds)."""
    model = linear_model([2, 32])
    bare = resolve_pipeline(model, PipelineOptions())
    assert bare.preprocess == {"kind": "sliding_window", "channels": 2, "window": 32, "hop": 32,
                               "mean": [0.0, 0.0], "std": [1.0, 1.0]}
    assert bare.labels == [] and bare.postprocess is None
    data = resolve_pipeline(model, PipelineOptions(), data_sample_rate=25.0, data_labels=["x", "y", "z"])
    assert data.preprocess["sample_rate_hz"] == 25.0 and data.labels == ["x", "y", "z"]
    file = parse_pipeline("input: {mean: [1, 2], std: [3, 4], sample_rate_hz: 50}\nlabels: [p, q, r]\n"
                          "thresholds: {a: 1}\n")
    layered = resolve_pipeline(model, PipelineOptions(file=file), data_sample_rate=25.0, data_labels=["x", "y", "z"])
    assert layered.preprocess["mean"] == [1, 2] and layered.preprocess["sample_rate_hz"] == 50
    assert layered.labels == ["p", "q", "r"] and layered.thresholds == {"a": 1.0}
    flagged = resolve_pipeline(model, PipelineOptions(file=file, hop=8, labels=("u", "v", "w"),
                                                      thresholds={"a": 2.0, "b": 3.0}, sample_rate_hz=10.0))
    assert (flagged.preprocess["hop"], flagged.preprocess["window"], flagged.preprocess["sample_rate_hz"]) == (8, 32,
                                                                                                               10.0)
    assert flagged.labels == ["u", "v", "w"] and flagged.thresholds == {"a": 2.0, "b": 3.0}


def test_a_file_key_of_another_kind_is_refused_against_the_inferred_kind() -> None:
    """A file ``input`` without a kind merges over the inferred one, and its keys are checked against it."""
    with pytest.raises(ConfigError, match=r"unknown key input.scale for input \(sliding_window\)"):
        resolve_pipeline(linear_model([2, 32]), PipelineOptions(file=parse_pipeline("input: {scale: 2}\n")))


def test_a_file_kind_replaces_the_inferred_one() -> None:
    """[N, 2, 32] is inferred as a series; the file may say it is a raw tensor instead."""
    file = parse_pipeline("input: {kind: tensor, shape: [2, 32]}\n")
    assert resolve_pipeline(linear_model([2, 32]), PipelineOptions(file=file)).preprocess == {"kind": "tensor",
                                                                                              "shape": [2, 32]}


def test_series_flags_on_another_kind_are_refused() -> None:
    with pytest.raises(ConfigError, match="--window apply to a time series"):
        resolve_pipeline(linear_model([6]), PipelineOptions(window=4))


@pytest.mark.parametrize(("options", "needle"), [
    (PipelineOptions(window=16), "makes input [1, 2, 16]"),
    (PipelineOptions(labels=("a", "b")), "scores 3 classes but the bundle names 2 labels"),
    (PipelineOptions(file=parse_pipeline("output: {kind: scores, output: nope}\n")), "reads 'nope'"),
    (PipelineOptions(file=parse_pipeline("input: {mean: [0], std: [1]}\n")), "inconsistent sizes"),
])
def test_a_pipeline_the_agent_could_not_run_is_refused(options: PipelineOptions, needle: str) -> None:
    with pytest.raises(ConfigError, match="the agent could not run this bundle") as caught:
        resolve_pipeline(linear_model([2, 32]), options)
    assert needle in str(caught.value)


def test_softmax_is_decided_from_the_scores() -> None:
    plain = ResolvedPipeline(preprocess={}, postprocess=None, labels=[], thresholds={})
    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    probabilities = np.array([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    assert with_activation(plain, logits).postprocess == {"kind": "scores", "activation": "softmax"}
    assert with_activation(plain, probabilities).postprocess == {"kind": "scores", "activation": "none"}
    named = ResolvedPipeline(preprocess={}, postprocess={"kind": "scores", "output": "y"}, labels=[], thresholds={})
    assert with_activation(named, logits).postprocess == {"kind": "scores", "output": "y", "activation": "softmax"}
    said = ResolvedPipeline(preprocess={}, postprocess={"kind": "scores", "activation": "none"}, labels=[],
                            thresholds={}, output_given=True)
    assert with_activation(said, logits) is said
    zipmap = ResolvedPipeline(preprocess={}, postprocess={"kind": "label_probabilities", "probabilities": "p"},
                              labels=[], thresholds={})
    assert with_activation(zipmap, logits) is zipmap


def test_rows_are_checked_against_the_pipeline_and_become_model_input() -> None:
    series = input_step({"kind": "sliding_window", "channels": 2, "window": 4, "hop": 4, "mean": [10, 0],
                         "std": [2, 1]})
    rows = np.stack([np.full((2, 4), [[12.0], [3.0]])] * 3).astype(np.float32)
    np.testing.assert_allclose(model_input(series, check_rows(rows, series, [None, 2, 4], "calib_x")),
                               np.stack([np.full((2, 4), [[1.0], [3.0]])] * 3))
    with pytest.raises(DataError, match=r"calib_x has shape \(3, 2, 5\); the model's input is \[\?, 2, 4\]"):
        check_rows(np.zeros((3, 2, 5)), series, [None, 2, 4], "calib_x")
    with pytest.raises(DataError, match="rank-3"):
        check_rows(np.zeros((3, 8)), series, [None, 2, 4], "calib_x")
    image = input_step({"kind": "image", "height": 2, "width": 3, "channels": 3, "layout": "NCHW", "scale": 0.5})
    pixels = np.arange(36, dtype=np.float32).reshape(2, 3, 2, 3)
    np.testing.assert_allclose(model_input(image, pixels), pixels * 0.5)  # NCHW rows stay NCHW


@pytest.mark.parametrize(("text", "name"), [("My Model (v2)", "my-model-v2"), ("__", "model"),
                                            ("ok.name_1", "ok.name_1"), ("x" * 80, "x" * 64)])
def test_default_names_fit_the_manifest(text: str, name: str) -> None:
    assert default_name(text) == name
