"""The manifest's input pipeline and output interpretation: each step parses, refuses what a device could not
run, and maps readings to model input (and outputs to scores) exactly; ModelPipeline.check catches at pack time
what would fail on the device."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.bundle.describe import default_postprocess, default_preprocess
from edgefleet.bundle.manifest import TensorSpec
from edgefleet.bundle.pack import BundleSpec, model_schema, pack_bundle, peek_manifest
from edgefleet.bundle.signing import SigningKey
from edgefleet.errors import BundleError, ConfigError
from edgefleet.runtime.inputs import ImageInput, SeriesInput, TensorInput, VectorInput, input_step, resize_frames
from edgefleet.runtime.outputs import ClassScores, LabelProbabilities, output_step, softmax
from edgefleet.runtime.runner import OnnxRuntimeRunner
from edgefleet.runtime.spec import ModelPipeline


def linear_model(shape: list[int | None], classes: int, *, elem: int = TensorProto.FLOAT) -> bytes:
    """Flatten the input and multiply by a fixed matrix: [N, ...] -> [N, classes]."""
    features = int(np.prod([d for d in shape[1:] if d]))
    weights = np.linspace(-1, 1, features * classes, dtype=np.float32).reshape(features, classes)
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1)]
    if elem != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["flat"], ["flat_f"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("MatMul", ["flat_f" if elem != TensorProto.FLOAT else "flat", "w"], ["y"]))
    graph = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", elem, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, classes])],
                              [onnx.numpy_helper.from_array(weights, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_defaults_follow_the_input_rank() -> None:
    series = default_preprocess([TensorSpec(name="x", dtype="float", shape=[None, 6, 40])])
    assert series["kind"] == "sliding_window" and series["window"] == series["hop"] == 40
    image = default_preprocess([TensorSpec(name="x", dtype="float", shape=[None, 3, 32, 24])])
    assert (image["kind"], image["layout"], image["height"], image["width"]) == ("image", "NCHW", 32, 24)
    nhwc = default_preprocess([TensorSpec(name="x", dtype="uint8", shape=[1, 96, 96, 3])])
    assert (nhwc["layout"], nhwc["dtype"]) == ("NHWC", "uint8")
    assert default_preprocess([TensorSpec(name="x", dtype="float", shape=[None, 10])])["kind"] == "vector"
    assert default_preprocess([TensorSpec(name="x", dtype="float", shape=[None, 2, 3, 4, 5])])["kind"] == "tensor"
    with pytest.raises(BundleError, match="free axes"):
        default_preprocess([TensorSpec(name="x", dtype="float", shape=[None, None, 3])])


def test_image_step_resizes_orders_colour_scales_and_lays_out() -> None:
    step = input_step({"kind": "image", "height": 2, "width": 2, "channels": 3, "layout": "NCHW", "color": "bgr",
                       "resize": "nearest", "scale": 0.5, "mean": [0, 0, 0], "std": [1, 1, 2]})
    assert isinstance(step, ImageInput)
    frame = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    assert step.accepts((4, 4, 3)) and not step.accepts((4, 4, 1))
    x = step.apply(frame[None])
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    small = resize_frames(frame[None], 2, 2, "nearest")[0]
    expected = small[..., ::-1].astype(np.float32) * 0.5 / np.array([1, 1, 2], dtype=np.float32)
    np.testing.assert_allclose(x[0], expected.transpose(2, 0, 1))
    exact = input_step({"kind": "image", "height": 4, "width": 4, "channels": 3})
    assert not exact.accepts((5, 4, 3)), "without resize, frames of another size are refused"
    rows = np.random.default_rng(0).random((3, 3, 4, 4)).astype(np.float32)
    assert isinstance(exact, ImageInput)
    np.testing.assert_array_equal(exact.apply(exact.to_frames(rows)), rows)


def test_bilinear_resize_keeps_a_constant_image_constant() -> None:
    frames = np.full((2, 7, 5, 3), 9.0, dtype=np.float32)
    out = resize_frames(frames, 3, 4, "bilinear")
    assert out.shape == (2, 3, 4, 3)
    np.testing.assert_allclose(out, 9.0)


def test_vector_series_and_tensor_steps() -> None:
    vector = input_step({"kind": "vector", "features": 3, "names": ["a", "b", "c"], "mean": [1, 2, 3],
                         "std": [2, 2, 2]})
    assert isinstance(vector, VectorInput)
    np.testing.assert_allclose(vector.apply(np.array([[3.0, 2.0, 1.0]])), [[1.0, 0.0, -1.0]])
    series = input_step({"kind": "sliding_window", "channels": 2, "window": 4, "hop": 4, "mean": [1, 0],
                         "std": [1, 2]})
    assert isinstance(series, SeriesInput) and series.accepts((2,)) and series.model_shape == (1, 2, 4)
    np.testing.assert_allclose(series.apply(np.ones((1, 2, 4))), [[[0] * 4, [0.5] * 4]])
    tensor = input_step({"kind": "tensor", "shape": [2, 2], "dtype": "int64"})
    assert isinstance(tensor, TensorInput) and tensor.apply(np.ones((1, 2, 2))).dtype == np.int64


@pytest.mark.parametrize(("spec", "match"), [
    ({}, "no input pipeline"),
    ({"kind": "audio"}, "unknown preprocessing kind"),
    ({"kind": "vector", "features": 3, "version": 2}, "newer agent"),
    ({"kind": "image", "height": 8}, "needs height, width"),
    ({"kind": "image", "height": 8, "width": 8, "channels": 2}, "out of range"),
    ({"kind": "image", "height": 8, "width": 8, "channels": 1, "color": "rgb"}, "does not fit"),
    ({"kind": "image", "height": 8, "width": 8, "layout": "CHW"}, "layout"),
    ({"kind": "vector", "features": 2, "mean": [0, 0], "std": [1, 0]}, "std > 0"),
    ({"kind": "vector", "features": 2, "names": ["a"]}, "1 names for 2"),
    ({"kind": "tensor", "shape": [0]}, "out of range"),
    ({"kind": "vector", "features": 2, "dtype": "complex"}, "dtype"),
])
def test_input_specs_the_agent_cannot_run_are_refused(spec: dict[str, object], match: str) -> None:
    with pytest.raises(BundleError, match=match):
        input_step(spec)


def test_output_steps() -> None:
    assert isinstance(output_step(None), ClassScores)
    logits = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    probs = output_step({"kind": "scores", "activation": "softmax"}).interpret([logits])
    np.testing.assert_allclose(probs, softmax(logits))
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
    zipmap = output_step({"kind": "label_probabilities", "probabilities": "p", "zipmap": True, "classes": [2, 0]})
    assert isinstance(zipmap, LabelProbabilities)
    np.testing.assert_allclose(zipmap.interpret([[{0: 0.25, 2: 0.75}]]), [[0.75, 0.25]])
    assert output_step({"kind": "anomaly_score"}).interpret([np.array([3.0, 4.0])]).shape == (2, 1)
    for bad, match in (({"kind": "softmax"}, "unknown output kind"),
                       ({"kind": "label_probabilities", "probabilities": "p", "zipmap": True}, "classes"),
                       ({"kind": "scores", "activation": "relu"}, "activation")):
        with pytest.raises(BundleError, match=match):
            output_step(bad)


def test_check_names_what_does_not_fit() -> None:
    model = linear_model([None, 6, 40], 4)
    inputs, outputs = model_schema(model)
    good = ModelPipeline.from_manifest(default_preprocess(inputs), None)
    good.check(inputs, outputs, ["a", "b", "c", "d"])
    with pytest.raises(BundleError, match="scores 4 classes but the bundle names 3"):
        good.check(inputs, outputs, ["a", "b", "c"])
    wrong_window = ModelPipeline.from_manifest({**default_preprocess(inputs), "window": 30}, None)
    with pytest.raises(BundleError, match=r"makes input \[1, 6, 30\] but the model's input 'x' is \['\?', 6, 40\]"):
        wrong_window.check(inputs, outputs, [])
    missing = ModelPipeline.from_manifest(default_preprocess(inputs), {"kind": "scores", "output": "nope"})
    with pytest.raises(BundleError, match="reads 'nope'"):
        missing.check(inputs, outputs, [])


def test_pack_refuses_a_bundle_the_agent_could_not_run_and_infers_the_rest() -> None:
    key = SigningKey.generate()
    model = linear_model([None, 3, 8, 8], 2)
    with pytest.raises(ConfigError, match="the agent could not run this bundle"):
        pack_bundle(model, key, BundleSpec(name="m", version="1.0.0", preprocess={"kind": "vector", "features": 192}))
    bundle = pack_bundle(model, key, BundleSpec(name="m", version="1.0.0", labels=["no", "yes"],
                                                golden=np.zeros((2, 3, 8, 8), dtype=np.float32)))
    manifest = peek_manifest(bundle)
    assert manifest.preprocess["kind"] == "image" and manifest.postprocess is None
    assert manifest.golden is not None and len(manifest.golden.samples) == 2


def test_a_scikit_learn_forest_with_zipmap_is_described_and_scored() -> None:
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y)
    model = skl2onnx.to_onnx(forest, x[:1]).SerializeToString()
    inputs, outputs = model_schema(model)
    post = default_postprocess(model, outputs)
    assert post is not None and post["zipmap"] and post["classes"] == [0, 1, 2]
    pipeline = ModelPipeline.from_manifest(default_preprocess(inputs), post)
    pipeline.check(inputs, outputs, ["setosa", "versicolor", "virginica"])
    scores = pipeline.outputs.scorer(OnnxRuntimeRunner(model))(pipeline.inputs.apply(x[:10]))
    np.testing.assert_allclose(scores, forest.predict_proba(x[:10]), atol=1e-5)
