"""Retraining: fine-tuning on base plus labelled field data from drifted devices improves accuracy on the field
examples and keeps the held-out base rows; the next version and release come from the registry; bad inputs (a
factory that returns no model, a --data file with other shapes) are one line each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from edgefleet.bundle.pack import peek_manifest
from edgefleet.bundle.signing import write_keypair
from edgefleet.errors import ConfigError, DataError
from edgefleet.learn.retrain import Deployed, load_data, load_model, next_version, retrain

FEATURES = 8


CLEAN: dict[str, np.ndarray] = {}
"""The clean training rows the deployed version learnt from (set by the test)."""


def linear_factory(deployed: Deployed | None = None) -> object:
    """The architecture; given the deployed version, its weights (here: retrained on the clean rows, as a real
    factory would load the deployed version's float weights)."""
    import torch

    from edgefleet.build.train import train_classifier

    def make() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))

    if deployed is None:
        return make()
    return train_classifier(make, CLEAN["x"], CLEAN["y"], 2, epochs=10).train()


def not_a_model() -> object:
    return {"weights": [1, 2, 3]}


def _rows(n: int, rng: np.random.Generator, drift: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The class shows on channels 0-3; a drifted sensor inverts their gain and offsets channels 4-7."""
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 0.5, (n, FEATURES)).astype(np.float32)
    x[:, :4] += (y[:, None] * 2 - 1) * (-1.5 if drift else 1.5)
    if drift:
        x[:, 4:] += 3.0
    return x.astype(np.float32), y.astype(np.int64)


def test_retrain_on_drifted_field_data_improves_field_accuracy(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train_x, train_y = _rows(400, rng)
    test_x, test_y = _rows(200, rng)
    np.savez(tmp_path / "base.npz", calib_x=train_x[:64], test_x=test_x, test_y=test_y, train_x=train_x,
             train_y=train_y)
    field_x, field_y = _rows(200, rng, drift=True)
    np.savez(tmp_path / "field.npz", calib_x=field_x[:32], test_x=field_x, test_y=field_y)
    key = write_keypair(tmp_path / "keys")
    CLEAN.update(x=train_x, y=train_y)
    previous, version, release = next_version([{"name": "m", "version": "1.2.3", "release": 4},
                                               {"name": "m", "version": "1.2.0", "release": 2},
                                               {"name": "other", "version": "9.0.0", "release": 9}], "m")
    assert previous == Deployed(name="m", version="1.2.3", release=4) and (version, release) == ("1.2.4", 5)
    data = load_data(tmp_path / "base.npz", tmp_path / "field.npz")
    assert data.field_train == 140 and len(data.field_y) == 60
    # the starting model: trained on clean data only, as the deployed version was
    result = retrain(f"{__name__}:linear_factory", data, name="m", previous=previous, version=version,
                     release=release, key=key, epochs=15, max_accuracy_drop=5.0, show=False)
    assert result.before["holdout"] >= 0.9 and result.before["field"] <= 0.2  # the drift broke it in the field
    assert result.after["field"] >= 0.9 and result.after["holdout"] >= 0.9  # fixed there, still right at home
    manifest = peek_manifest(result.built.bundle)
    assert (manifest.name, manifest.version, manifest.release) == ("m", "1.2.4", 5)


def test_a_factory_that_returns_no_model_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"must return a torch.nn.Module, got dict"):
        load_model(f"{__name__}:not_a_model", None)


def test_a_data_file_with_other_shapes_is_one_line(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = _rows(20, rng)
    np.savez(tmp_path / "base.npz", calib_x=x, test_x=x, test_y=y)
    np.savez(tmp_path / "field.npz", test_x=np.zeros((5, 3, 4), np.float32), test_y=np.zeros(5, np.int64))
    (tmp_path / "keys").mkdir()
    write_keypair(tmp_path / "keys")
    cmd = [sys.executable, "-c", "from edgefleet.cli import main; main()", "retrain", "m", "--factory",
           "x:y", "--key", str(tmp_path / "keys" / "signing.key"), "--data", str(tmp_path / "base.npz"),
           "--field", str(tmp_path / "field.npz"), "--server", "http://127.0.0.1:9", "--token", "t"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "field rows are [3, 4]; the base data's are [8]" in lines[0]


def test_field_rows_labelled_by_the_upstream_model_train_only_when_asked_and_are_never_scored(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x, y = _rows(40, rng)
    np.savez(tmp_path / "base.npz", calib_x=x, test_x=x, test_y=y)
    fx, fy = _rows(30, rng, drift=True)
    source = np.array(["range"] * 20 + ["upstream"] * 10)
    np.savez(tmp_path / "field.npz", calib_x=fx, test_x=fx, test_y=fy, test_source=source)
    plain = load_data(tmp_path / "base.npz", tmp_path / "field.npz")
    assert (plain.field_train, plain.field_upstream, plain.upstream_left_out) == (14, 0, 10)
    assert len(plain.field_y) == 6 and len(plain.train_y) == 20 + 14
    asked = load_data(tmp_path / "base.npz", tmp_path / "field.npz", include_upstream=True)
    assert (asked.field_train, asked.field_upstream, asked.upstream_left_out) == (24, 10, 0)
    assert len(asked.field_y) == 6 and len(asked.train_y) == 20 + 24  # the scored rows stay ground truth
    assert any(np.array_equal(asked.train_x[-1], row) for row in fx[20:])
    np.savez(tmp_path / "bad.npz", test_x=fx, test_y=fy, test_source=source[:5])
    with pytest.raises(DataError, match="one label source per test row"):
        load_data(tmp_path / "base.npz", tmp_path / "bad.npz")
