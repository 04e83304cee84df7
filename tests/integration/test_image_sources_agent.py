"""Real agent processes on image input: an image classifier replayed from the very data file it was built with
reports, through the server, exactly the accuracy of the model on those rows; an agent reading a live camera
(the in-memory twin) infers on its frames and stops cleanly on SIGTERM, its capture thread with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.processes import ManagedProcess, wait_until
from edgefleet.testing.fleet import LocalFleet
from edgefleet.testing.linear import linear_model, predictions

pytestmark = pytest.mark.integration
LABELS = ["red", "green", "blue"]
SHAPE = [3, 8, 6]  # NCHW without the batch axis


def deploy(fleet: LocalFleet, device: str, model: bytes) -> None:
    assert fleet.api is not None and fleet.key is not None
    fleet.api.push_model(pack_bundle(model, fleet.key, BundleSpec(name="img", version="1.0.0", labels=LABELS)))
    fleet.provision(device)
    fleet.api.deploy("img@1.0.0", [device])


def start_agent(fleet: LocalFleet, device: str, source: str) -> ManagedProcess:
    return fleet.group.start(ManagedProcess.edgefleet(
        ["agent", "--credentials", str(fleet.root / "devices" / f"{device}.json"),
         "--data-dir", str(fleet.root / "agents" / device), "--source", source, "--telemetry-interval", "0.5"],
        fleet.root / "logs" / f"{device}.log"))


def model_totals(fleet: LocalFleet, device: str) -> dict[str, Any]:
    assert fleet.api is not None
    models = fleet.api.telemetry(device)["models"]
    return next((m for m in models if m["model"] == "img@1.0.0"), {"windows": 0})


def test_an_image_model_replayed_from_its_data_file_reports_the_bundles_accuracy(fleet: LocalFleet,
                                                                                tmp_path: Path) -> None:
    rows = np.random.default_rng(5).random((12, *SHAPE), dtype=np.float32)
    model = linear_model(SHAPE, len(LABELS))
    predicted = predictions(model, rows)
    y = predicted.copy()
    y[::3] = (y[::3] + 1) % len(LABELS)  # wrong on every third row: the expected accuracy is 2/3
    data = tmp_path / "data.npz"
    np.savez(data, calib_x=rows[:4], test_x=rows, test_y=y, labels=np.array(LABELS))
    deploy(fleet, "cam-1", model)

    agent = start_agent(fleet, "cam-1", f"npz:{data}?rate=50")
    assert agent.wait(90) == 0, agent.log_tail()  # it waits for the model, plays the rows once, and stops
    wait_until(lambda: model_totals(fleet, "cam-1")["windows"] >= len(rows), 30, "the agent's telemetry")
    totals = model_totals(fleet, "cam-1")
    assert totals["windows"] == totals["labelled"] == len(rows)
    assert totals["correct"] == int((predicted == y).sum()) == 8
    assert totals["accuracy"] == pytest.approx(8 / 12)


def test_an_agent_on_a_live_camera_infers_and_stops_on_sigterm(fleet: LocalFleet) -> None:
    deploy(fleet, "cam-2", linear_model(SHAPE, len(LABELS)))
    agent = start_agent(fleet, "cam-2", f"camera:synthetic?width={SHAPE[2]}&height={SHAPE[1]}&fps=500")
    wait_until(lambda: model_totals(fleet, "cam-2")["windows"] > 0, 90, "inference on camera frames")
    assert agent.stop(grace_s=15.0) == 0, agent.log_tail()
    assert "Traceback" not in agent.log_path.read_text(errors="replace")
