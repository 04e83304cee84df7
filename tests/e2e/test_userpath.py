"""A user's own model, for each input kind, goes from `edgefleet build MODEL --data DATA` to a device by the
README's commands (real server, embedded broker and agent processes), and the on-device accuracy that
`edgefleet device telemetry --json` reports equals the accuracy of the bundle's model on the same rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.testing.userpath import USER_MODELS, UserPath, bundle_accuracy


@pytest.fixture(scope="module")
def userpath(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserPath]:
    path = UserPath(tmp_path_factory.mktemp("userpath"))
    path.start_server()
    try:
        yield path
    finally:
        path.close()


@pytest.mark.parametrize("kind", sorted(USER_MODELS))
def test_a_users_model_runs_on_a_device_with_the_bundles_accuracy(userpath: UserPath, kind: str) -> None:
    user = USER_MODELS[kind]()
    manifest = userpath.ship(user, speed=10.0)
    assert manifest["name"] == kind and manifest["version"] == "1.0.0"  # defaults: the file's stem, 1.0.0
    assert manifest["golden"] is not None, "build attaches golden samples from the calibration data"
    rows = len(user.data["test_x"])
    ref = f"{kind}@1.0.0"
    answer = userpath.wait_windows(f"{kind}-01", ref, rows)
    counted = answer["models"][ref]
    assert counted["windows"] == rows and counted["labelled"] == rows, counted
    expected = bundle_accuracy(userpath.root / f"{kind}.bundle", user.data)
    assert counted["accuracy"] == pytest.approx(expected, abs=1e-9), (counted, expected)
    assert counted["correct"] == round(expected * rows)
    assert 0.5 <= expected < 1.0 or kind != "vector", "the forest is neither perfect nor useless"
    assert np.isfinite(counted["latency_ms"]["p99"])
    steps = userpath.update_breakdown(f"{kind}-01")
    assert steps.get("download_s", -1) >= 0 and steps.get("health_check_s", -1) >= 0, steps


def test_the_build_refuses_a_data_file_that_does_not_fit_the_model(userpath: UserPath, tmp_path: Path) -> None:
    user = USER_MODELS["series"]()
    (tmp_path / "m.onnx").write_bytes(user.model)
    np.savez(tmp_path / "d.npz", **{**user.data, "test_x": user.data["test_x"][:, :, :10]})
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "edgefleet", "build", "m.onnx", "--data", "d.npz", "--key",
                             str(userpath.root / "keys" / "signing.key"), "--out", "m.bundle"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "(3, 10)" in result.stderr.replace("[", "(").replace("]", ")") or "10" in result.stderr
    assert not (tmp_path / "m.bundle").exists()
