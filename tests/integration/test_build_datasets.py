"""The datasets that packages ship, and ``edgefleet build --dataset`` training its default model on one."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgefleet.bundle.pack import peek_manifest
from edgefleet.bundle.signing import write_keypair
from edgefleet.cli import main
from edgefleet.data.datasets import DATASETS, load_dataset, standardize

pytest.importorskip("sktime")
pytest.importorskip("sklearn")

SHAPES = {"BasicMotions": ((6, 100), 4), "ItalyPowerDemand": ((1, 24), 2), "GunPoint": ((1, 150), 2),
          "ACSF1": ((1, 1460), 10), "digits": ((1, 8, 8), 10)}


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_loads_with_its_split(name: str) -> None:
    """Each dataset: the expected sample shape and class count, integer labels covering every class."""
    ds = load_dataset(name)
    shape, classes = SHAPES[name]
    assert ds.input_shape == shape and len(ds.labels) == classes
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int64
    assert set(np.unique(ds.train_y)) == set(range(classes))
    normalized, spec = standardize(ds)
    if ds.kind == "timeseries":
        assert np.allclose(normalized.train_x.mean(axis=(0, 2)), 0, atol=1e-4)
        assert len(spec["mean"]) == shape[0]


@pytest.mark.train
def test_build_from_a_dataset_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`edgefleet build --dataset digits` trains the small CNN, compresses it and signs a bundle."""
    pytest.importorskip("torch")
    write_keypair(tmp_path)
    (tmp_path / "fast.yaml").write_text("latency: {budget_s: 0.02, min_runs: 3, max_runs: 10, batches: [1]}\n")
    monkeypatch.setattr(sys, "argv", ["edgefleet", "build", "--dataset", "digits", "--epochs", "10",
                                      "--key", str(tmp_path / "signing.key"), "--out", str(tmp_path / "d.efb"),
                                      "--name", "digits", "--version", "0.1.0",
                                      "--recipe", str(tmp_path / "fast.yaml")])
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr()
    manifest = peek_manifest((tmp_path / "d.efb").read_bytes())
    assert manifest.labels == [str(i) for i in range(10)]
    assert manifest.metrics["float_accuracy"] > 0.85
    assert manifest.metrics["accuracy_drop_pp"] <= 1.0
    assert manifest.preprocess["kind"] == "image"
