"""The learning loop with real processes: `edgefleet server`, two agents whose sensors drifted (gain down, an
offset on one channel) escalating their unsure windows to `edgefleet serve-model --report-to`, which reports each
answer with its window (a label of lower trust); operators label each device's time range (ground truth);
`edgefleet data export` -> `edgefleet retrain --rollout` fine-tunes from the deployed weights and starts an A/B
rollout that reaches the treatment half. The deployed version's on-device accuracy on the drifted fleet before,
and the new version's after, are both asserted.

The agents' own hard-example uplink is capped per device and hour (2 by default, `--hard-examples-per-hour`; dev-1
runs with 0, dev-2 with 30), and the field data of a short run comes through the upstream tier (an answer for a
window the device also sent becomes that example's label, so the two are not told apart here). The README's
commands for this loop (the block after ``<!-- learn -->``) are checked against the ones run here: same
subcommands, no flag the test did not use.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.bundle.pack import BundleSpec, pack_bundle, write_bundle
from edgefleet.bundle.signing import PUBLIC_KEY_FILE
from edgefleet.data.basicmotions import Recordings, save_npz
from edgefleet.data.windows import sliding_windows
from edgefleet.processes import ManagedProcess, wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.fleet import LocalFleet

pytestmark = pytest.mark.integration
pytest.importorskip("torch")

CLASSES = {"dev-1": 1, "dev-2": 2}
"""Each device watches a machine in one state (its replay holds that class only); the drift breaks both."""
DEVICES = sorted(CLASSES)
OLD, NEW = "clf@1.0.0", "clf@1.0.1"
FIELD_EXAMPLES_PER_DEVICE = 8
README = Path(__file__).resolve().parents[2] / "README.md"
RAN: list[list[str]] = []
"""The edgefleet command lines this test ran (for the README check)."""


def drifted(x: np.ndarray) -> np.ndarray:
    """The fleet's sensors after drift: a third of the gain on every channel, +2 on channel 0."""
    out = 0.3 * x
    out[:, 0, :] += 2.0
    return out.astype(np.float32)


def device_recordings(root: Path, cls: int) -> Path:
    """Device ``cls`` watches a machine in state ``cls`` (its replay holds that class only), through drifted
    sensors."""
    rec = synthetic.recordings(per_class=2, length=60, seed=10 + cls)
    keep = rec.test_y == cls
    x, y = drifted(rec.test_x[keep]), rec.test_y[keep]
    path = root / f"drifted-{cls}.npz"
    save_npz(Recordings(x, y, x, y, rec.labels, rec.sample_rate_hz, "drifted"), path)
    return path


def base_data(root: Path) -> Path:
    """The clean data version 1 learnt from, as windows in the model's layout (build --data format)."""
    rec = synthetic.recordings(per_class=4, length=60, seed=3)
    train_x, train_y = sliding_windows(rec.train_x, rec.train_y, synthetic.WINDOW, synthetic.HOP)
    test_x, test_y = sliding_windows(rec.test_x, rec.test_y, synthetic.WINDOW, synthetic.HOP)
    path = root / "base.npz"
    np.savez(path, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, calib_x=train_x[:32],
             labels=np.array(synthetic.LABELS))
    return path


def telemetry_accuracy(fleet: LocalFleet, model: str, since: float = 0.0) -> tuple[float | None, int]:
    assert fleet.api is not None
    stats = fleet.api.model_telemetry(model, since)
    return stats.get("accuracy"), int(stats.get("labelled") or 0)


def active(fleet: LocalFleet, device: str) -> str | None:
    assert fleet.api is not None
    return (fleet.api.device(device)["reported"] or {}).get("active")  # type: ignore[no-any-return]


def cli(fleet: LocalFleet, *args: str, timeout_s: float = 60.0) -> Any:
    RAN.append(list(args))
    return fleet.cli(*args, timeout_s=timeout_s)


def cli_json(fleet: LocalFleet, *args: str) -> Any:
    done = cli(fleet, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_export_retrain_rollout_fixes_a_drifted_fleet(fleet: LocalFleet, tmp_path: Path) -> None:
    api, key = fleet.api, fleet.key
    assert api is not None and key is not None and fleet.server_url is not None
    api.push_model(pack_bundle(synthetic.channel_mean_model(), key, BundleSpec(
        name="clf", version="1.0.0", release=1, labels=list(synthetic.LABELS), preprocess=synthetic.preprocess_spec())))
    upstream_bundle = tmp_path / "upstream.bundle"  # the upstream tier: here the same model, on a server
    write_bundle(upstream_bundle, pack_bundle(synthetic.channel_mean_model(scale=6.0), key, BundleSpec(
        name="clf-big", version="1.0.0", release=1, labels=list(synthetic.LABELS),
        preprocess=synthetic.preprocess_spec())))
    info = tmp_path / "upstream.json"
    serve = ["serve-model", str(upstream_bundle), "--pub", str(fleet.root / "keys" / PUBLIC_KEY_FILE), "--port", "0",
             "--info-file", str(info), "--report-to", fleet.server_url]
    RAN.append(serve)
    fleet.group.start(ManagedProcess.edgefleet(serve, tmp_path / "upstream.log",
        env={"EDGEFLEET_TOKEN": fleet.operator_token or ""}))
    wait_until(info.exists, 60, "the upstream model to listen")
    upstream_url = json.loads(info.read_text())["url"]

    for device in DEVICES:
        fleet.provision(device, {"site": "drifted"})
    api.deploy(OLD, DEVICES)
    started = time.time()
    own_per_hour = {"dev-1": 0, "dev-2": 30}
    for device, cls in CLASSES.items():
        fleet.group.start(ManagedProcess.edgefleet(
            ["agent", "--credentials", str(fleet.root / "devices" / f"{device}.json"),
             "--data-dir", str(fleet.root / "agents" / device),
             "--source", f"npz:{device_recordings(tmp_path, cls)}?speed=20", "--telemetry-interval", "0.5",
             "--upstream", upstream_url, "--escalate-below", "0.999", "--escalation-rate", "10",
             "--hard-examples-per-hour", str(own_per_hour[device])],
            fleet.root / "logs" / f"{device}.log"))

    def collected() -> bool:
        rows = cli_json(fleet, "data", "examples", "--model", "clf")
        per_device = {d: sum(r["device"] == d and r["label_source"] == "upstream" for r in rows) for d in DEVICES}
        return min(per_device.values()) >= FIELD_EXAMPLES_PER_DEVICE

    wait_until(collected, 180, f"{FIELD_EXAMPLES_PER_DEVICE} field examples from every device")

    examples = cli_json(fleet, "data", "examples", "--model", "clf")
    # the upstream's answers, labels of lower trust (beside a few of the devices' own unlabelled hard examples)
    assert {(e["label_source"], e["label_trust"]) for e in examples if e["label"]} == {("upstream", "low")}
    before, labelled = telemetry_accuracy(fleet, OLD, started)
    assert labelled >= 20 and before is not None and before <= 0.2  # the drift broke version 1

    refused = cli(fleet, "data", "export", "--model", "clf", "--out", str(tmp_path / "none.npz"))
    assert refused.returncode != 0 and "upstream labels" in refused.stderr  # lower trust: not without asking
    now = time.time() + 60
    for device, cls in CLASSES.items():  # ground truth: each machine's state over the whole run
        answer = cli_json(fleet, "data", "label", synthetic.LABELS[cls], "--device", device, "--start",
                          str(started - 60), "--end", str(now), "--model", "clf")
        assert answer["labelled"] >= FIELD_EXAMPLES_PER_DEVICE
    field = tmp_path / "field.npz"
    exported = cli_json(fleet, "data", "export", "--model", "clf", "--out", str(field))
    assert exported["labelled"] >= len(DEVICES) * FIELD_EXAMPLES_PER_DEVICE and exported["upstream_labelled"] == 0

    retrained = cli(
        fleet, "retrain", "clf", "--factory", "edgefleet.testing.retrain_models:channel_mean_net",
        "--key", str(fleet.root / "keys" / "signing.key"), "--data", str(base_data(tmp_path)), "--field", str(field),
        "--epochs", "40", "--lr", "0.05", "--out", str(tmp_path / "clf-1.0.1.bundle"), "--rollout", "100%",
        "--gate", "accuracy_drop > 5%", "--window", "3", "--min-windows", "5", timeout_s=240)
    assert retrained.returncode == 0, retrained.stdout + retrained.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in retrained.stdout.splitlines() if " accuracy: " in line)
    field_before, field_after = (float(v) for v in lines["field accuracy"].split(" -> "))
    holdout_before, holdout_after = (float(v) for v in lines["holdout accuracy"].split(" -> "))
    assert field_before <= 0.2 and field_after >= 0.9  # on held-out labelled field examples
    assert holdout_before >= 0.9 and holdout_after >= 0.9  # and still right on clean data
    rollout_id = next(line.split()[1].rstrip(":") for line in retrained.stdout.splitlines()
                      if line.startswith("rollout "))

    def finished() -> bool:
        return str(api.rollout(rollout_id)["phase"]) in ("done", "aborted", "paused")

    wait_until(finished, 180, "the A/B rollout to finish")
    status = api.rollout(rollout_id)
    assert status["phase"] == "done" and status["mode"] == "ab", status.get("reason")
    treatment = sorted(d for a in status["decisions"] if a["kind"] == "assign" for d in a["devices"])
    assert len(treatment) == 1
    wait_until(lambda: all(active(fleet, d) == NEW for d in treatment), 120, "the treatment half on 1.0.1")
    switched = time.time()
    wait_until(lambda: telemetry_accuracy(fleet, NEW, switched)[1] >= 20, 120, "labelled windows from 1.0.1")
    after, _ = telemetry_accuracy(fleet, NEW, switched)
    assert after is not None and after >= 0.9 > 0.2 >= before  # on-device, on the drifted sensors
    for device in sorted(set(DEVICES) - set(treatment)):
        assert api.device(device)["desired"] == OLD  # the control half kept version 1
    check_readme_commands()


def check_readme_commands() -> None:
    """Every command of the README's learning block was run above: its subcommand, with a subset of its flags."""
    block = README.read_text().split("<!-- learn -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line.split("  #", 1)[0]) for line in block.replace("\\\n", " ").splitlines()
                if line.strip()]
    assert len(commands) >= 5
    for words in commands:
        words = [w for w in words if w != "&"]
        assert words[0] == "edgefleet", words
        head = words[1:3] if words[1] in ("data", "monitor", "alert", "fl") else words[1:2]
        flags = {w for w in words if w.startswith("--")}
        runs = [r for r in RAN if r[:len(head)] == head]
        assert any(flags <= {w for w in r if w.startswith("--")} for r in runs), (words, runs)
