"""`edgefleet build --dataset NAME` writes pipelines the agent runs: time series as a ``sliding_window`` of the
series' length with the training statistics (and BasicMotions' 10 Hz), digits as a 1x8x8 gray ``image`` scaled by
1/16; the raw test rows through that pipeline are what the build measured (needs sktime, scikit-learn, torch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.healthcheck import check
from edgefleet.build.io_pipeline import model_input
from edgefleet.bundle.container import MODEL, read_container
from edgefleet.bundle.pack import peek_manifest
from edgefleet.bundle.signing import write_keypair
from edgefleet.cli import main
from edgefleet.data.datasets import load_dataset, standardize
from edgefleet.runtime.inputs import input_step
from edgefleet.runtime.runner import OnnxRuntimeRunner
from edgefleet.runtime.spec import ModelPipeline

pytest.importorskip("sktime")
pytest.importorskip("sklearn")


@pytest.mark.parametrize(("name", "rate"), [("BasicMotions", 10.0), ("ItalyPowerDemand", None), ("digits", None)])
def test_the_pipeline_makes_the_model_input_from_the_raw_rows(name: str, rate: float | None) -> None:
    """``standardize``'s spec, run by the runtime's input step on the raw test rows, gives its model-ready rows."""
    raw = load_dataset(name)
    ready, spec = standardize(raw)
    step = input_step(spec)
    np.testing.assert_allclose(model_input(step, raw.test_x), ready.test_x, rtol=1e-5, atol=1e-5)
    if raw.kind == "timeseries":
        length = raw.input_shape[1]
        assert (spec["kind"], spec["window"], spec["hop"]) == ("sliding_window", length, length)
        assert spec.get("sample_rate_hz") == rate
    else:
        assert spec == {"kind": "image", "height": 8, "width": 8, "channels": 1, "layout": "NCHW", "color": "gray",
                        "scale": 1 / 16}
        assert raw.test_x.max() == 16.0  # grey levels as the "sensor" gives them


@pytest.mark.train
def test_build_from_a_dataset_reproduces_its_accuracy_through_the_pipeline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`build --dataset ItalyPowerDemand`: the bundle's pipeline passes the agent's health check, and the raw
    test rows through it give the accuracy the report and the manifest state."""
    pytest.importorskip("torch")
    write_keypair(tmp_path)
    (tmp_path / "fast.yaml").write_text("latency: {budget_s: 0.02, min_runs: 3, max_runs: 10, batches: [1]}\n"
                                        "candidates: [{pass: static_int8}, {pass: fp16}]\n")
    monkeypatch.setattr(sys, "argv", ["edgefleet", "build", "--dataset", "ItalyPowerDemand", "--epochs", "15",
                                      "--key", str(tmp_path / "signing.key"), "--out", str(tmp_path / "d.efb"),
                                      "--recipe", str(tmp_path / "fast.yaml"), "--report", str(tmp_path / "r.json"),
                                      "--max-accuracy-drop", "100"])
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr()
    data = (tmp_path / "d.efb").read_bytes()
    manifest, model = peek_manifest(data), read_container(data)[MODEL]
    assert manifest.ref == "italypowerdemand@1.0.0" and manifest.labels == ["1", "2"]
    assert (manifest.preprocess["kind"], manifest.preprocess["window"]) == ("sliding_window", 24)
    assert manifest.golden is not None and len(manifest.golden.samples) == 4
    (tmp_path / "m.onnx").write_bytes(model)
    (tmp_path / "m.json").write_text(manifest.model_dump_json())
    check(tmp_path / "m.onnx", tmp_path / "m.json", runs=2)
    raw = load_dataset("ItalyPowerDemand")
    pipeline = ModelPipeline.from_manifest(manifest.preprocess, manifest.postprocess)
    score = pipeline.outputs.scorer(OnnxRuntimeRunner(model))
    x = model_input(pipeline.inputs, raw.test_x)
    predicted = np.concatenate([score(x[i : i + 64]) for i in range(0, len(x), 64)]).argmax(axis=1)
    report = json.loads((tmp_path / "r.json").read_text())
    chosen = next(c for c in report["candidates"] if c["label"] == report["chosen"])
    assert chosen["accuracy"] == manifest.metrics["accuracy"] == float(np.mean(predicted == raw.test_y))
