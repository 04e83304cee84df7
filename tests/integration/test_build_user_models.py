"""A user's own model through ``edgefleet build MODEL --data DATA`` for each input kind (a time series 1D-CNN, an
image CNN, a vector MLP, scikit-learn models exported with skl2onnx's defaults): the bundle's manifest carries
the pipeline, labels and golden samples; the agent's health check passes on it; the report's accuracy is the
accuracy of the shipped model run through the runtime's own pipeline on the raw test rows. Bad input is one line
and writes nothing, and ``bundle pack`` refuses a pipeline the agent could not run."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.healthcheck import check
from edgefleet.build.io_pipeline import model_input
from edgefleet.bundle.container import MODEL, read_container
from edgefleet.bundle.manifest import Manifest, golden_samples
from edgefleet.bundle.pack import peek_manifest
from edgefleet.bundle.signing import write_keypair
from edgefleet.runtime.runner import OnnxRuntimeRunner
from edgefleet.runtime.spec import ModelPipeline
from edgefleet.testing.cli import run_cli

# any candidate passes: these tests are about the pipeline, not the gate
FAST = ("max_accuracy_drop: 100\nrescue: {enabled: false}\n"
        "latency: {budget_s: 0.02, min_runs: 3, max_runs: 10, warmup: 1, batches: [1]}\n")
INT8_ONLY = FAST + "candidates: [{pass: static_int8}]\n"
LABELS = ["idle", "walk", "run", "fall"]


def one_line_error(out: str, needle: str) -> None:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out, out


def _model(nodes: list[onnx.NodeProto], shape: list[int], weights: dict[str, np.ndarray], classes: int) -> bytes:
    graph = helper.make_graph(
        nodes, "user", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, *shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, classes])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="a user")
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def series_cnn(channels: int = 3, window: int = 32, seed: int = 0) -> bytes:
    """Conv1d(3->8, k5) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(8->4): logits."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[2, 2], kernel_shape=[5]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1)]
    return _model(nodes, [channels, window], {"w1": rng.normal(0, 0.5, (8, channels, 5)), "b1": rng.normal(0, .1, 8),
                                              "w2": rng.normal(0, 1, (4, 8)), "b2": np.zeros(4)}, 4)


def image_cnn(seed: int = 0) -> bytes:
    """Conv2d(3->6, k3) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(6->4) -> Softmax: probabilities."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w2", "b2"], ["l"], transB=1),
             helper.make_node("Softmax", ["l"], ["y"], axis=1)]
    return _model(nodes, [3, 10, 10], {"w1": rng.normal(0, 0.5, (6, 3, 3, 3)), "b1": rng.normal(0, .1, 6),
                                       "w2": rng.normal(0, 2, (4, 6)), "b2": np.zeros(4)}, 4)


def vector_mlp(features: int = 6, seed: int = 0) -> bytes:
    """Gemm(6->16) -> Relu -> Gemm(16->4): logits."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
    return _model(nodes, [features], {"w1": rng.normal(0, 1, (16, features)), "b1": rng.normal(0, .1, 16),
                                      "w2": rng.normal(0, 1, (4, 16)), "b2": np.zeros(4)}, 4)


def labelled(model: bytes, raw: np.ndarray, model_x: np.ndarray, seed: int = 1) -> np.ndarray:
    """The float model's own classes on the model inputs, with one row in five relabelled at random, so the
    accuracy is well below 1 and depends on every row going through the right pipeline."""
    scores = OnnxRuntimeRunner(model).run(model_x)
    y = scores.argmax(axis=1).astype(np.int64)
    rng = np.random.default_rng(seed)
    flip = rng.random(len(y)) < 0.2
    y[flip] = rng.integers(0, scores.shape[1], size=int(flip.sum()))
    return y


def _split(raw: np.ndarray, y: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"calib_x": raw[:100], "test_x": raw[100:], "test_y": y[100:], **extra}


def series_case() -> tuple[bytes, dict[str, Any], str, list[str]]:
    """Raw sensor values around (100, -5, 20) with spreads (10, 2, 5); the pipeline file scales them."""
    mean, std = np.array([100.0, -5.0, 20.0]), np.array([10.0, 2.0, 5.0])
    z = np.random.default_rng(2).normal(size=(300, 3, 32))
    raw = (mean[:, None] + std[:, None] * z).astype(np.float32)
    model = series_cnn()
    y = labelled(model, raw, ((raw - mean[:, None]) / std[:, None]).astype(np.float32))
    pipeline = f"input:\n  mean: {mean.tolist()}\n  std: {std.tolist()}\nthresholds: {{min_confidence: 0.5}}\n"
    return model, _split(raw, y, sample_rate_hz=np.float32(50.0), labels=np.array(LABELS)), pipeline, ["--hop", "8"]


def image_case() -> tuple[bytes, dict[str, Any], str, list[str]]:
    """Raw 0..255 pixels in the model's layout [n, 3, 10, 10]; the pipeline scales by 1/255 and normalizes."""
    raw = np.random.default_rng(3).integers(0, 256, size=(300, 3, 10, 10)).astype(np.float32)
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
    model = image_cnn()
    x = (raw / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    y = labelled(model, raw, x.astype(np.float32))
    pipeline = f"input: {{scale: {1 / 255!r}, mean: {mean}, std: {std}}}\nlabels: {LABELS}\n"
    return model, _split(raw, y), pipeline, []


def vector_case() -> tuple[bytes, dict[str, Any], str, list[str]]:
    """Six features with their own offsets and scales; the pipeline file standardizes and names them."""
    mean, std = np.arange(6) * 10.0, np.arange(1, 7, dtype=np.float64)
    raw = (mean + std * np.random.default_rng(4).normal(size=(300, 6))).astype(np.float32)
    model = vector_mlp()
    y = labelled(model, raw, ((raw - mean) / std).astype(np.float32))
    names = [f"f{i}" for i in range(6)]
    pipeline = f"input:\n  kind: vector\n  names: {names}\n  mean: {mean.tolist()}\n  std: {std.tolist()}\n"
    return model, _split(raw, y), pipeline, ["--labels", ",".join(LABELS), "--threshold", "min_confidence=0.7"]


def _skl(estimator: Any, rows: int = 300, seed: int = 5) -> tuple[bytes, dict[str, Any]]:
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=rows, n_features=5, n_informative=4, n_redundant=0, n_classes=3,
                               random_state=seed)
    x = (x * 3.0 + 7.0).astype(np.float32)
    with warnings.catch_warnings():  # SVC(probability=True) is deprecated in recent scikit-learn
        warnings.simplefilter("ignore", FutureWarning)
        estimator.fit(x[:150], y[:150])
        model = bytes(skl2onnx.to_onnx(estimator, x[:1]).SerializeToString())  # default options: a ZipMap
    return model, {"calib_x": x[:150], "test_x": x[150:], "test_y": y[150:].astype(np.int64),
                   "labels": np.array(["a", "b", "c"])}


def forest_case() -> tuple[bytes, dict[str, Any], str, list[str]]:
    sklearn_ensemble = pytest.importorskip("sklearn.ensemble")
    model, data = _skl(sklearn_ensemble.RandomForestClassifier(n_estimators=8, max_depth=5, random_state=0))
    return model, data, "", []


CASES: dict[str, Callable[[], tuple[bytes, dict[str, Any], str, list[str]]]] = {
    "series": series_case, "image": image_case, "vector": vector_case, "forest": forest_case}


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    write_keypair(tmp_path)
    (tmp_path / "fast.yaml").write_text(FAST)
    (tmp_path / "int8.yaml").write_text(INT8_ONLY)
    return tmp_path


def build_args(workdir: Path, model: bytes, data: dict[str, Any], pipeline: str = "", recipe: str = "int8.yaml",
               stem: str = "My_Model") -> list[str | Path]:
    (workdir / f"{stem}.onnx").write_bytes(model)
    np.savez(workdir / "data.npz", **data)
    args: list[str | Path] = ["build", workdir / f"{stem}.onnx", "--data", workdir / "data.npz", "--key",
                              workdir / "signing.key", "--out", workdir / "m.efb", "--recipe", workdir / recipe,
                              "--report", workdir / "report.json", "--profile", "raspberry-pi"]
    if pipeline:
        (workdir / "pipeline.yaml").write_text(pipeline)
        args += ["--pipeline", workdir / "pipeline.yaml"]
    return args


def shipped(workdir: Path) -> tuple[bytes, Manifest]:
    data = (workdir / "m.efb").read_bytes()
    return read_container(data)[MODEL], peek_manifest(data)


def pipeline_accuracy(model: bytes, manifest: Manifest, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """What a device computes: raw rows through the manifest's input step, scores read through its output step."""
    pipeline = ModelPipeline.from_manifest(manifest.preprocess, manifest.postprocess)
    score = pipeline.outputs.scorer(OnnxRuntimeRunner(model))
    x = model_input(pipeline.inputs, test_x)
    predicted = np.concatenate([score(x[i : i + 64]) for i in range(0, len(x), 64)]).argmax(axis=1)
    return float(np.mean(predicted == test_y))


def health_check(model: bytes, manifest: Manifest, where: Path) -> float:
    (where / "candidate.onnx").write_bytes(model)
    (where / "candidate.json").write_text(manifest.model_dump_json())
    return check(where / "candidate.onnx", where / "candidate.json", runs=3)


@pytest.mark.parametrize("kind", list(CASES))
def test_build_writes_a_bundle_the_agent_runs(kind: str, workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Each input kind: the manifest has the pipeline (with the pipeline file's scaling and the data file's
    sample rate and labels), the output spec, 4 golden samples that are calibration rows after the input step; the
    health check passes; the report's accuracy is the runtime pipeline's accuracy on the raw test rows."""
    model, data, pipeline, flags = CASES[kind]()
    code, out = run_cli([*build_args(workdir, model, data, pipeline), *flags], monkeypatch, capsys)
    assert code == 0, out
    bundle_model, manifest = shipped(workdir)
    assert manifest.name == "my_model" and manifest.version == "1.0.0"
    pre, post = manifest.preprocess, manifest.postprocess
    assert post is not None
    if kind == "series":
        assert (pre["kind"], pre["channels"], pre["window"], pre["hop"]) == ("sliding_window", 3, 32, 8)
        assert pre["sample_rate_hz"] == 50.0 and pre["mean"] == [100.0, -5.0, 20.0]
        assert post == {"kind": "scores", "activation": "softmax"}  # the model gives logits
        assert manifest.labels == LABELS and manifest.thresholds == {"min_confidence": 0.5}
    elif kind == "image":
        assert (pre["kind"], pre["height"], pre["width"], pre["channels"], pre["layout"]) == ("image", 10, 10, 3,
                                                                                               "NCHW")
        assert pre["scale"] == pytest.approx(1 / 255) and pre["std"] == [0.25, 0.2, 0.3]
        assert post == {"kind": "scores", "activation": "none"}  # the model ends in a softmax
        assert manifest.labels == LABELS
    elif kind == "vector":
        assert (pre["kind"], pre["features"], pre["names"][0]) == ("vector", 6, "f0")
        assert post == {"kind": "scores", "activation": "softmax"}
        assert manifest.labels == LABELS and manifest.thresholds == {"min_confidence": 0.7}
    else:
        assert (pre["kind"], pre["features"]) == ("vector", 5)
        assert post["kind"] == "label_probabilities" and post["zipmap"] and post["classes"] == [0, 1, 2]
        assert manifest.labels == ["a", "b", "c"]
    report = json.loads((workdir / "report.json").read_text())
    assert report["float_shipped"] is (kind == "forest")
    golden = golden_samples(manifest)
    assert len(golden) == 4
    step = ModelPipeline.from_manifest(pre, post).inputs
    expected_inputs = model_input(step, np.asarray(data["calib_x"][:4], dtype=np.float32))
    np.testing.assert_allclose(np.concatenate([g[0] for g in golden]), expected_inputs, rtol=1e-6, atol=1e-6)
    assert health_check(bundle_model, manifest, workdir) > 0
    accuracy = pipeline_accuracy(bundle_model, manifest, data["test_x"], data["test_y"])
    chosen = next(c for c in report["candidates"] if c["label"] == report["chosen"])
    assert chosen["accuracy"] == manifest.metrics["accuracy"] == accuracy
    assert 0.5 < accuracy < 1.0 or kind == "forest"


@pytest.mark.parametrize("which", ["svc", "logistic"])
def test_sklearn_models_nothing_quantizes_ship_float(which: str, workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """An SVC(probability=True) after a StandardScaler, and a LogisticRegression, exported with skl2onnx's
    defaults (ZipMap): every pass of the default recipe is tried, none quantizes them, the float model ships and
    the report says so plainly; the bundle passes the health check."""
    pytest.importorskip("skl2onnx")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    estimator = (make_pipeline(StandardScaler(), SVC(probability=True, random_state=0)) if which == "svc"
                 else LogisticRegression(max_iter=500))
    model, data = _skl(estimator)
    code, out = run_cli(build_args(workdir, model, data, recipe="fast.yaml"), monkeypatch, capsys)
    assert code == 0, out
    assert "no pass quantizes this model: float model shipped" in out
    report = json.loads((workdir / "report.json").read_text())
    assert report["float_shipped"] and report["reason"].startswith("no pass quantizes this model")
    assert "counted as 0 MACs" in " ".join(report["candidates"][-1]["analysis_notes"])
    bundle_model, manifest = shipped(workdir)
    assert manifest.postprocess is not None and manifest.postprocess["zipmap"] is True
    health_check(bundle_model, manifest, workdir)
    assert manifest.metrics["accuracy"] == pipeline_accuracy(bundle_model, manifest, data["test_x"],
                                                              data["test_y"])


def test_data_that_does_not_fit_the_model_names_both_shapes(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    model, data, _, _ = series_case()
    data = {**data, "test_x": data["test_x"][:, :, :30]}
    code, out = run_cli(build_args(workdir, model, data), monkeypatch, capsys)
    assert code == 3
    one_line_error(out, "test_x has shape (200, 3, 30); the model's input is [?, 3, 32]")
    assert not (workdir / "m.efb").exists() and not (workdir / "report.json").exists()


@pytest.mark.parametrize(("pipeline", "needle"), [
    ("inputs: {mean: [0, 0, 0]}\n", "unknown key 'inputs'"),
    ("input: {mean: [0, 0, 0], scaling: 2}\n", "unknown key input.scaling"),
    ("output: {kind: scores, activation: softmax, temperature: 2}\n", "unknown key output.temperature"),
])
def test_a_pipeline_file_with_an_unknown_key_is_refused(pipeline: str, needle: str, workdir: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    model, data, _, _ = series_case()
    code, out = run_cli(build_args(workdir, model, data, pipeline), monkeypatch, capsys)
    assert code == 2
    one_line_error(out, needle)
    assert not (workdir / "m.efb").exists() and not (workdir / "report.json").exists()


def test_build_refuses_a_window_that_does_not_fit_before_any_work(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    model, data, _, _ = series_case()
    code, out = run_cli([*build_args(workdir, model, data), "--window", "20"], monkeypatch, capsys)
    assert code == 2
    one_line_error(out, "the agent could not run this bundle")
    assert not (workdir / "m.efb").exists() and not (workdir / "report.json").exists()


def pack_args(workdir: Path, model: bytes, *extra: str | Path) -> list[str | Path]:
    (workdir / "model.onnx").write_bytes(model)
    return ["bundle", "pack", workdir / "model.onnx", "--key", workdir / "signing.key", "--out", workdir / "p.efb",
            *extra]


@pytest.mark.parametrize(("flags", "needle"), [
    (["--window", "20"], "makes input [1, 3, 20] but the model's input 'x' is ['?', 3, 32]"),
    (["--labels", "a,b"], "scores 4 classes but the bundle names 2 labels"),
    (["--sample-rate", "10"], None),
])
def test_bundle_pack_refuses_a_pipeline_the_agent_could_not_run(flags: list[str], needle: str | None,
                                                                workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`bundle pack` checks the pipeline as the agent runs it: a window the model does not take, or labels that
    do not match its classes, is one line and no file; a sample rate alone is fine."""
    code, out = run_cli(pack_args(workdir, series_cnn(), *flags), monkeypatch, capsys)
    if needle is None:
        assert code == 0, out
        assert peek_manifest((workdir / "p.efb").read_bytes()).preprocess["sample_rate_hz"] == 10.0
        return
    assert code == 2
    one_line_error(out, "the agent could not run this bundle")
    assert needle in out and not (workdir / "p.efb").exists()


def test_bundle_pack_writes_the_pipeline_labels_thresholds_and_golden_rows(workdir: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`bundle pack --pipeline --golden data.npz --labels --threshold`: the same manifest parts a build writes,
    golden samples from the calibration rows through the input step, and a health check that passes."""
    model, data, pipeline, _ = series_case()
    np.savez(workdir / "data.npz", **data)
    (workdir / "pipeline.yaml").write_text(pipeline)
    code, out = run_cli(pack_args(workdir, model, "--pipeline", workdir / "pipeline.yaml", "--golden",
                                  workdir / "data.npz", "--threshold", "min_confidence=0.9", "--hop", "16",
                                  "--name", "pump", "--version", "2.1.0"), monkeypatch, capsys)
    assert code == 0, out
    bundle_model, manifest = read_container((workdir / "p.efb").read_bytes())[MODEL], peek_manifest(
        (workdir / "p.efb").read_bytes())
    assert manifest.ref == "pump@2.1.0" and manifest.labels == LABELS
    assert manifest.preprocess["mean"] == [100.0, -5.0, 20.0] and manifest.preprocess["hop"] == 16
    assert manifest.preprocess["sample_rate_hz"] == 50.0 and manifest.thresholds == {"min_confidence": 0.9}
    assert manifest.postprocess == {"kind": "scores", "activation": "softmax"}
    assert manifest.golden is not None and len(manifest.golden.samples) == 4
    health_check(bundle_model, manifest, workdir)
