"""Training-time compression from a user's ONNX model: the ONNX -> PyTorch converter computes what the ONNX model
computes; ``edgefleet build`` with train_x/train_y prunes channels (MACs and parameters drop by what the report
says), distills and trains with quantization, each candidate in REPORT.json with its training time; bad inputs
give one line (a train_x that does not fit the model: exit 2; a model the converter cannot handle: the PTQ search
still ships a bundle)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from edgefleet.build.evaluate import predict
from edgefleet.bundle.signing import write_keypair
from edgefleet.cli import main
from edgefleet.testing.cli import run_cli as _run

torch = pytest.importorskip("torch")
nn = torch.nn
pytestmark = pytest.mark.train

FAST = """latency: {budget_s: 0.02, min_runs: 3, max_runs: 10, warmup: 1, batches: [1]}
candidates: [{pass: static_int8, options: {per_channel: true}}]
rescue: {enabled: false}
training: {epochs: 2, qat_epochs: 1, prune_ratios: [0.5], unstructured_sparsity: 0, qat_unpruned: false, batch: 32}
"""
SHAPE = (3, 12, 12)


class _Mixed(nn.Module):
    """Depthwise and grouped convs, HardSwish, a squeeze-excite style Mul, Concat, pools, Sigmoid/Tanh, Linear."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6())
        self.pw = nn.Conv2d(16, 16, 1)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 16, 1), nn.Sigmoid())
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 9, 24), nn.Tanh(), nn.Linear(24, classes))

    def forward(self, x: Any) -> Any:
        y = self.stem(x)
        z = self.pw(self.dw(y)) * self.gate(y) + y
        return self.head(torch.cat([self.pool(z), self.avg(z)], dim=1))


def _small_cnn(classes: int = 4) -> Any:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, classes))


def _export(net: Any, shape: tuple[int, ...] = SHAPE) -> bytes:
    from edgefleet.build.train import export_classifier

    torch.manual_seed(0)
    for module in net.modules():  # BatchNorm statistics that are not the identity
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    return export_classifier(net.eval(), shape)


def _arrays(model: bytes, rows: int = 600, seed: int = 0, **extra: np.ndarray) -> dict[str, np.ndarray]:
    """Random inputs labelled by the model itself (accuracy 100% for the float model)."""
    x = np.random.default_rng(seed).normal(size=(rows, *SHAPE)).astype(np.float32)
    y = predict(model, x).argmax(axis=1)
    return {"calib_x": x[:64], "test_x": x[400:], "test_y": y[400:], "train_x": x[:400], "train_y": y[:400],
            **extra}


def _build_args(workdir: Path, model: bytes, arrays: dict[str, np.ndarray]) -> list[str]:
    write_keypair(workdir)
    (workdir / "recipe.yaml").write_text(FAST)
    (workdir / "model.onnx").write_bytes(model)
    np.savez(workdir / "data.npz", **arrays)
    return ["build", str(workdir / "model.onnx"), "--data", str(workdir / "data.npz"), "--key",
            str(workdir / "signing.key"), "--out", str(workdir / "m.efb"), "--name", "m", "--recipe",
            str(workdir / "recipe.yaml"), "--report", str(workdir / "report.json")]


@pytest.mark.parametrize("net", [_Mixed, _small_cnn], ids=["mixed-ops", "cnn-bn"])
def test_converted_torch_model_matches_onnx_outputs(net: Any) -> None:
    """The converter builds real layers (Conv2d, BatchNorm2d, Linear) computing the ONNX model's outputs."""
    from edgefleet.build.torch_bridge import to_torch

    model = _export(net())
    x = np.random.default_rng(3).normal(size=(8, *SHAPE)).astype(np.float32)
    converted = to_torch(model)
    with torch.no_grad():
        got = converted.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, predict(model, x), atol=1e-5)
    assert any(isinstance(m, nn.Conv2d) for m in converted.module.modules())
    assert any(isinstance(m, nn.Linear) for m in converted.module.modules())
    logits = to_torch(model, logits=True)  # the final Softmax left out for training, recorded for export
    assert logits.softmax_axis is not None and logits.input_shape == SHAPE
    with torch.no_grad():
        scores = torch.softmax(logits.module(torch.from_numpy(x)), dim=-1).numpy()
    np.testing.assert_allclose(scores, got, atol=1e-5)


@pytest.fixture(scope="module")
def trained_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``edgefleet build`` with training rows: pruning + distillation, then int8 by PTQ and by QAT."""
    workdir = tmp_path_factory.mktemp("train")
    model = _export(_small_cnn())
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["edgefleet", *_build_args(workdir, model, _arrays(model))])
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, exc.code
    finally:
        mp.undo()
    report: dict[str, Any] = json.loads((workdir / "report.json").read_text())
    report["_bundle"] = (workdir / "m.efb").exists()
    return report


def test_pruned_model_macs_and_params_drop_as_reported(trained_report: dict[str, Any]) -> None:
    """The pruned candidate's ONNX has fewer channels; its MACs and parameters (counted on the ONNX graph) drop in
    the proportion torch-pruning's counts in the report's config and notes state."""
    base = trained_report["baseline"]
    pruned = next(c for c in trained_report["candidates"] if c["label"] == "pruned 50% + KD float32")
    assert pruned["error"] is None and pruned["accuracy"] is not None
    config = pruned["config"]
    stated_macs = config["macs_after"] / config["macs_before"]
    stated_params = config["params_after"] / config["params_before"]
    assert stated_macs < 0.5 and stated_params < 0.5  # half the channels of each conv: MACs fall ~4x inside
    assert pruned["macs"] / base["macs"] == pytest.approx(stated_macs, rel=0.1)
    assert pruned["params"] / base["params"] == pytest.approx(stated_params, rel=0.1)
    assert f"MACs {config['macs_before']:,} -> {config['macs_after']:,}" in pruned["notes"][0]
    assert pruned["size_bytes"] < 0.5 * base["size_bytes"]
    assert pruned["train_s"] > 0


def test_distillation_and_qat_candidates_in_report_with_training_time(trained_report: dict[str, Any]) -> None:
    """Pruned + KD int8 (PTQ and QAT) and QAT alone are measured candidates of the same gated search."""
    by_label = {c["label"]: c for c in trained_report["candidates"]}
    for label in ("pruned 50% + KD, int8 PTQ", "pruned 50% + KD + QAT int8"):
        cand = by_label[label]
        assert cand["error"] is None, cand["error"]
        assert cand["pass"] == "train" and cand["train_s"] > 0 and cand["build_s"] >= cand["train_s"]
        assert cand["accuracy"] is not None and cand["latency_ms"]["b1"]["median_ms"] > 0
        assert cand["int8_mac_fraction"] > 0.5, label  # int8 kernels, not a float model
        assert cand["compressed_bytes"] <= cand["size_bytes"]
    qat = by_label["pruned 50% + KD + QAT int8"]
    assert qat["size_bytes"] < 0.3 * trained_report["baseline"]["size_bytes"]
    assert "quantization-aware training" in " ".join(qat["notes"])
    assert trained_report["passed"] and trained_report["_bundle"]


def test_unconvertible_model_gives_one_line_and_ptq_still_ships(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An operator outside the converter's set (Sin) is one report line; the PTQ candidates still run and ship."""

    class _Sine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)

        def forward(self, x: Any) -> Any:
            return self.fc(torch.sin(self.conv(x)).mean(dim=(2, 3)))

    model = _export(_Sine())
    assert any(n.op_type == "Sin" for n in onnx.load_from_string(model).graph.node)
    code, out = _run(_build_args(tmp_path, model, _arrays(model)), monkeypatch, capsys)
    assert code == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    failed = [c for c in report["candidates"] if c["pass"] == "train"]
    assert len(failed) == 1
    error = failed[0]["error"]
    assert error.startswith("cannot convert the ONNX model to PyTorch: Sin node") and "\n" not in error
    assert report["chosen"] == "int8 minmax per-channel" and (tmp_path / "m.efb").exists()
    assert "training-time compression skipped: cannot convert" in out


def test_train_x_shape_not_matching_model_exits_2_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """train_x rows of another shape than the model's input: one line naming both shapes, exit 2, no bundle."""
    model = _export(_small_cnn())
    arrays = _arrays(model)
    arrays["train_x"] = np.zeros((400, 3, 10, 10), dtype=np.float32)
    code, out = _run(_build_args(tmp_path, model, arrays), monkeypatch, capsys)
    assert code == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and "train_x has shape (400, 3, 10, 10)" in lines[0] and "Traceback" not in out
    assert not (tmp_path / "m.efb").exists()


def test_factory_that_does_not_compute_the_onnx_model_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--factory must return the ONNX model in PyTorch: another model is one line and exit 2, before training."""
    model = _export(_small_cnn())
    (tmp_path / "my_factory.py").write_text(
        "import torch\n\ndef other():\n    torch.manual_seed(5)\n    return torch.nn.Sequential(torch.nn.Flatten(), "
        f"torch.nn.Linear({int(np.prod(SHAPE))}, 4))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = [*_build_args(tmp_path, model, _arrays(model)), "--factory", "my_factory:other"]
    code, out = _run(args, monkeypatch, capsys)
    assert code == 2, out
    assert "--factory my_factory:other does not compute the ONNX model" in out and "Traceback" not in out
