"""``edgefleet build`` end to end in-process: bundle, report and plot; every bad input gives one line and an exit
code, and leaves no bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.build.evaluate import predict
from edgefleet.bundle.pack import peek_manifest
from edgefleet.bundle.signing import write_keypair
from edgefleet.testing.cli import run_cli

FAST = "latency: {budget_s: 0.02, min_runs: 3, max_runs: 10, warmup: 1, batches: [1, 32]}\n"
FEATURES = 256


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    write_keypair(tmp_path)
    (tmp_path / "fast.yaml").write_text(FAST)
    return tmp_path


def _write(workdir: Path, model: bytes, **arrays: np.ndarray) -> list[str]:
    (workdir / "model.onnx").write_bytes(model)
    np.savez(workdir / "data.npz", **arrays)
    return ["build", str(workdir / "model.onnx"), "--data", str(workdir / "data.npz"),
            "--key", str(workdir / "signing.key"), "--out", str(workdir / "m.efb"), "--name", "m",
            "--version", "1.0.0", "--recipe", str(workdir / "fast.yaml")]


def _good(seed: int = 1) -> tuple[bytes, dict[str, np.ndarray]]:
    from test_pipeline import outlier_model

    model = outlier_model(scale=1.0)
    x = np.random.default_rng(seed).normal(size=(500, FEATURES)).astype(np.float32)
    return model, {"calib_x": x[:100], "test_x": x[100:], "test_y": predict(model, x[100:]).argmax(axis=1)}


def test_build_writes_bundle_report_and_plot(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    model, arrays = _good()
    args = [*_write(workdir, model, **arrays), "--report", str(workdir / "report.json"),
            "--profile", "raspberry-pi", "--profile", "microcontroller"]
    code, out = run_cli(args, monkeypatch, capsys)
    assert code == 0, out
    assert "chosen" in out and "raspberry-pi" in out
    manifest = peek_manifest((workdir / "m.efb").read_bytes())
    assert manifest.metrics["accuracy_drop_pp"] <= 1.0
    assert manifest.metrics["size_bytes"] < 0.35 * len(model)
    assert {"macs", "arena_bytes", "energy_uj_estimate", "latency_b1_ms", "latency_b32_ms"} <= set(manifest.metrics)
    assert manifest.profiles == ["raspberry-pi"]  # a microcontroller has no ONNX Runtime
    report = json.loads((workdir / "report.json").read_text())
    assert report["passed"] and report["chosen"] in {c["label"] for c in report["candidates"]}
    assert report["baseline"]["macs"] == 256 * 256 + 256 * 32 + 32 * 4
    assert {v["profile"] for v in report["baseline"]["profiles"]} == {"raspberry-pi", "microcontroller"}
    assert any("estimate" in line for line in report["energy_method"])
    assert (workdir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_passes_exits_non_zero_without_a_bundle(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from test_pipeline import outlier_model

    model = outlier_model()
    x = np.random.default_rng(1).normal(size=(400, FEATURES)).astype(np.float32)
    (workdir / "fast.yaml").write_text(FAST + "rescue: {enabled: false}\noutlier_candidates: []\n"
                                        "candidates: [{pass: static_int8}]\n")
    args = _write(workdir, model, calib_x=x[:100], test_x=x[100:], test_y=predict(model, x[100:]).argmax(axis=1))
    code, out = run_cli([*args, "--report", str(workdir / "r.json")], monkeypatch, capsys)
    assert code == 4 and "no bundle written" in out and "Traceback" not in out
    assert not (workdir / "m.efb").exists()
    assert json.loads((workdir / "r.json").read_text())["passed"] is False


def _bad_inputs() -> dict[str, tuple[dict[str, np.ndarray], int, str]]:
    _, good = _good()
    nan = good["test_x"].copy()
    nan[3, 7] = np.nan
    return {
        "calib-wrong-shape": ({**good, "calib_x": good["calib_x"][:, :100]}, 3, "calib_x has shape"),
        "calib-wrong-rank": ({**good, "calib_x": good["calib_x"][0]}, 3, "rank-2"),
        "calib-strings": ({**good, "calib_x": np.array([["a"] * FEATURES] * 4)}, 3, "real numbers"),
        "nan-in-test": ({**good, "test_x": nan}, 3, "NaN"),
        "labels-out-of-range": ({**good, "test_y": good["test_y"] + 4}, 3, "4 classes"),
        "labels-float": ({**good, "test_y": good["test_y"].astype(np.float32)}, 3, "integer class labels"),
        "labels-count": ({**good, "test_y": good["test_y"][:-1]}, 3, "one label per"),
        "missing-array": ({"calib_x": good["calib_x"], "test_x": good["test_x"]}, 3, "lacks test_y"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_data_is_one_line_and_an_exit_code(case: str, workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    arrays, expected_code, message = _bad_inputs()[case]
    model, _ = _good()
    code, out = run_cli(_write(workdir, model, **arrays), monkeypatch, capsys)
    assert code == expected_code and message in out, out
    assert "Traceback" not in out and not (workdir / "m.efb").exists()


def test_a_file_that_is_not_onnx(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    _, arrays = _good()
    code, out = run_cli(_write(workdir, b"PK\x03\x04 this is a zip, not a model", **arrays), monkeypatch, capsys)
    assert code == 4 and "is not an ONNX model" in out and "Traceback" not in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--profile", "toaster"], "unknown profile"), (["--max-accuracy-drop", "-1"], "max-accuracy-drop"),
     (["--dataset", "digits"], "not both")],
)
def test_bad_options_are_config_errors(extra: list[str], message: str, workdir: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    model, arrays = _good()
    code, out = run_cli([*_write(workdir, model, **arrays), *extra], monkeypatch, capsys)
    assert code == 2 and message in out


def test_unknown_dataset_is_a_config_error(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(["build", "--dataset", "imagenet", "--key", str(workdir / "signing.key"), "--out",
                         str(workdir / "x.efb"), "--name", "x", "--version", "1.0.0"], monkeypatch, capsys)
    assert code == 2 and "GunPoint" in out
