"""Build inputs beyond ONNX files: ONNX-ML models from skl2onnx, a torch ``module:function``, bundled datasets."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgefleet.build.inputs import from_factory, validate
from edgefleet.build.pipeline import BuildSearch
from edgefleet.build.recipe import load_recipe
from edgefleet.errors import ConfigError

FAST = load_recipe("latency: {budget_s: 0.02, min_runs: 3, max_runs: 10, warmup: 1, batches: [1]}\n")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    sklearn = pytest.importorskip("sklearn.datasets")
    x, y = sklearn.load_digits(return_X_y=True)
    return x.astype(np.float32), y


def _to_onnx(estimator: Any, x: np.ndarray, final: Any) -> bytes:
    skl2onnx = pytest.importorskip("skl2onnx")
    proto = skl2onnx.to_onnx(estimator, x[:1], options={id(final): {"zipmap": False}},
                             target_opset={"": 17, "ai.onnx.ml": 3})
    return bytes(proto.SerializeToString())


def test_tree_from_skl2onnx_ships_the_float_model() -> None:
    """A decision tree is one ai.onnx.ml TreeEnsembleClassifier: nothing quantizes or converts it, so the float
    model is the candidate and is chosen, and the reason says so and names the operator."""
    from sklearn.tree import DecisionTreeClassifier

    x, y = _digits()
    tree = DecisionTreeClassifier(max_depth=6, random_state=0).fit(x[:1200], y[:1200])
    model = _to_onnx(tree, x, tree)
    outcome = BuildSearch(model, validate(model, x[:100], x[1200:], y[1200:]), FAST, []).run()
    assert outcome.float_shipped and outcome.chosen is not None and outcome.chosen.pass_name == "none"
    assert outcome.chosen.accuracy == outcome.baseline.accuracy
    assert outcome.reason.startswith("no pass quantizes this model: float model shipped")
    assert "TreeEnsembleClassifier" in outcome.reason and "nothing to quantize" in outcome.reason


def test_scaler_and_mlp_pipeline_quantizes_what_it_can() -> None:
    """StandardScaler (ai.onnx.ml Scaler) + MLP: the MatMuls become int8, the ML operators stay float and the
    candidate's notes say so."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _digits()
    mlp = MLPClassifier((64,), max_iter=60, random_state=0)
    pipe = make_pipeline(StandardScaler(), mlp)
    with pytest.warns(Warning):  # sklearn: not converged in 60 iterations, which is fine here
        pipe.fit(x[:1200], y[:1200])
    model = _to_onnx(pipe, x, mlp)
    outcome = BuildSearch(model, validate(model, x[:100], x[1200:], y[1200:]), FAST, []).run()
    chosen = outcome.chosen
    assert chosen is not None and chosen.pass_name == "static_int8"
    assert chosen.drop_pp is not None and chosen.drop_pp <= 1.0
    assert any("left in float" in n and "Scaler" in n for n in chosen.notes)
    assert chosen.analysis is not None and chosen.analysis.int8_fraction == 1.0


def tiny_factory() -> tuple[Any, dict[str, Any]]:
    """A ``module:function`` for the build: an untrained 2-layer torch net and random data it labels itself."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).eval()
    x = np.random.default_rng(0).normal(size=(300, 12)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(dim=1).numpy()
    return net, {"calib_x": x[:100], "test_x": x[100:], "test_y": y[100:], "labels": ["a", "b", "c"]}


def test_torch_factory_is_exported_and_validated() -> None:
    pytest.importorskip("torch")
    inputs = from_factory(f"{__name__}:tiny_factory")
    assert inputs.labels == ["a", "b", "c"]
    assert inputs.data.test_x.shape == (200, 12)
    outcome = BuildSearch(inputs.model, inputs.data, FAST, []).run()
    assert outcome.baseline.accuracy == 1.0 and outcome.chosen is not None


@pytest.mark.parametrize(("spec", "message"), [("nocolon", "module:function"), ("no_such_module_xyz:f", "import"),
                                               (f"{__name__}:_digits", "must return")])
def test_bad_factory_is_a_config_error(spec: str, message: str) -> None:
    pytest.importorskip("torch")
    with pytest.raises(ConfigError, match=message):
        from_factory(spec)
