"""Trigger-gated inference: the bundle's ``trigger`` keeps the model from running on quiet windows, lets it run on
events, counts what it skipped in telemetry, and a bad trigger is refused when the bundle is packed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.inference import InferencePipeline
from edgefleet.agent.model import LoadedModel, load_model
from edgefleet.agent.sensors.vibration import VibrationSignal, VibrationSource
from edgefleet.build.pipeline_file import parse_pipeline
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import BundleError
from edgefleet.runtime.trigger import TriggerGate, TriggerSpec
from edgefleet.testing.vibration_models import RATE_HZ, WINDOW, peak_model, vibration_bundle
from edgefleet.transport.messages import TelemetryBatch, parse

KEY = SigningKey.generate()
QUIET_S, FAULT_S = 6.0, 4.0


def _model(trigger: dict[str, Any] | None) -> LoadedModel:
    data = vibration_bundle(KEY, trigger=trigger)
    return load_model(decide(data, TrustState(keys={KEY.public.key_id: KEY.public})))


def _machine() -> VibrationSource:
    """A healthy bearing for QUIET_S seconds, then an outer-race fault for FAULT_S."""
    signal = VibrationSignal(RATE_HZ, fault="outer_race", fault_after_s=QUIET_S, seed=3)
    return VibrationSource(signal, speed=float("inf"), duration_s=QUIET_S + FAULT_S, with_labels=True)


def _run(trigger: dict[str, Any] | None) -> tuple[InferencePipeline, list[str | None], dict[str, Any]]:
    source = _machine()
    pipeline = InferencePipeline(_model(trigger), source=source)
    predicted = [outcome.predicted for block in source.blocks() for outcome in pipeline.push_block(block)]
    wire = json.loads(pipeline.take_batch("vib-01", 0, 1.8e9, 0).to_bytes())
    return pipeline, predicted, wire


@pytest.mark.parametrize("trigger", [{"kind": "peak", "threshold": 1.0}, {"kind": "rms", "threshold": 0.44},
                                     {"kind": "energy", "threshold": 0.44**2, "channel": 0}])
def test_quiet_windows_are_skipped_and_the_fault_is_inferred_on(trigger: dict[str, Any]) -> None:
    windows = int((QUIET_S + FAULT_S) * RATE_HZ) // WINDOW
    fault_windows = int(FAULT_S * RATE_HZ) // WINDOW
    _, ungated, ungated_wire = _run(None)
    assert len(ungated) == windows and "trigger_skipped" not in ungated_wire  # no trigger: the model runs always
    _, gated, wire = _run(trigger)
    # the model ran on the fault's windows only (one window straddles the onset), and found the fault on each
    assert fault_windows <= len(gated) <= fault_windows + 1
    assert gated.count("fault") >= fault_windows
    assert wire["windows"] == len(gated) and wire["trigger_skipped"] == windows - len(gated)
    batch = parse(TelemetryBatch, json.dumps(wire).encode())  # the server's schema takes the new field
    assert batch.trigger_skipped == windows - len(gated)
    assert wire["correct"] == wire["labelled"] >= fault_windows - 1  # the straddling window has no one label


def test_hold_keeps_the_model_running_after_an_event() -> None:
    gate = TriggerGate(TriggerSpec("peak", 1.0, hold=2), np.ones(1, dtype=np.float32))
    loud, quiet = np.full((1, 8), 2.0, dtype=np.float32), np.zeros((1, 8), dtype=np.float32)
    assert [gate.fires(w) for w in (quiet, loud, quiet, quiet, quiet, loud)] == [False, True, True, True, False,
                                                                                  True]
    assert gate.skipped == 2


def test_the_level_is_in_sensor_units_about_the_training_mean() -> None:
    std = np.array([2.0, 0.5], dtype=np.float32)
    raw = np.array([[3.0, -1.0, 3.0, -1.0], [0.5, 0.5, 0.5, 0.5]], dtype=np.float32)  # channel 0 about mean 1
    scaled = (raw - np.array([[1.0], [0.5]], dtype=np.float32)) / std[:, None]
    assert TriggerGate(TriggerSpec("rms", 0.0, channel=0), std).level(scaled) == pytest.approx(2.0)
    assert TriggerGate(TriggerSpec("peak", 0.0), std).level(scaled) == pytest.approx(2.0)
    assert TriggerGate(TriggerSpec("energy", 0.0), std).level(scaled) == pytest.approx(2.0)  # (4 + 0) / 2


@pytest.mark.parametrize(("trigger", "needle"), [
    ({"kind": "loudness", "threshold": 1}, "kind 'loudness'"),
    ({"kind": "rms"}, "threshold must be a number"),
    ({"kind": "rms", "threshold": -1}, "threshold must be a number"),
    ({"kind": "rms", "threshold": 1, "channel": 3}, "channel must be an integer from 0 to 0"),
    ({"kind": "rms", "threshold": 1, "hold": -1}, "hold must be"),
    ({"kind": "rms", "threshold": 1, "treshold": 2}, "unknown key 'treshold'"),
    ("rms", "must be a mapping"),
])
def test_a_bad_trigger_is_refused_with_its_reason(trigger: Any, needle: str) -> None:
    with pytest.raises(BundleError, match=needle):
        TriggerSpec.from_manifest(trigger, channels=1)


def test_a_pipeline_file_may_give_a_trigger() -> None:
    parsed = parse_pipeline("input:\n  kind: sliding_window\n  trigger: {kind: rms, threshold: 0.5, hold: 1}\n")
    assert parsed.input["trigger"] == {"kind": "rms", "threshold": 0.5, "hold": 1}


def _edgefleet(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_bundle_pack_refuses_a_bad_trigger_with_one_line_and_packs_a_good_one(tmp_path: Path) -> None:
    (tmp_path / "vib.onnx").write_bytes(peak_model())
    assert _edgefleet("keys", "init", "--dir", tmp_path / "keys").returncode == 0
    common = ["bundle", "pack", tmp_path / "vib.onnx", "--key", tmp_path / "keys" / "signing.key",
              "--labels", "normal,fault", "--sample-rate", str(RATE_HZ)]
    bad = tmp_path / "bad.yaml"
    bad.write_text("input:\n  kind: sliding_window\n  trigger: {kind: rms, threshold: 0.5, channel: 4}\n")
    refused = _edgefleet(*common, "--pipeline", bad, "--out", tmp_path / "bad.bundle")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "trigger" in refused.stderr
    assert "channel must be an integer from 0 to 0" in refused.stderr
    assert not (tmp_path / "bad.bundle").exists()
    good = tmp_path / "good.yaml"
    good.write_text("input:\n  kind: sliding_window\n  trigger: {kind: peak, threshold: 1.0}\n")
    packed = _edgefleet(*common, "--pipeline", good, "--out", tmp_path / "good.bundle")
    assert packed.returncode == 0, packed.stderr
    manifest = json.loads(_edgefleet("bundle", "inspect", tmp_path / "good.bundle").stdout)
    assert manifest["preprocess"]["trigger"] == {"kind": "peak", "threshold": 1.0}
