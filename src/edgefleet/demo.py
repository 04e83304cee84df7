"""``edgefleet demo``: the product path on one machine, every piece a real process, with embedded defaults.

dataset -> the default small model (``build.inputs.from_dataset``, as ``edgefleet build --dataset``) -> the build
search under the accuracy gate and a signed bundle (``build.product.build_bundle``, as ``edgefleet build``) ->
``edgefleet server`` -> push -> provision -> a rollout in waves (the API call ``edgefleet rollout create``
makes) -> ``edgefleet agent`` processes replay their shard of the test rows (``npz:``, the data file the build
measured) -> per device, what ``edgefleet device telemetry`` reads, beside the build-time accuracy.

Scenarios: ``watch`` (BasicMotions: smartwatch accelerometer and gyroscope, 6 channels at 10 Hz, one 100-sample
recording per window) and ``camera`` (scikit-learn's 8x8 grey digits, one frame per inference at 10 frames/s).
The replay plays each shard once, so the on-device accuracy is the shipped model's accuracy on those rows.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgefleet.bundle.signing import PUBLIC_KEY_FILE, write_keypair
from edgefleet.client import ControlPlane
from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.processes import ManagedProcess, ProcessGroup, wait_until

if TYPE_CHECKING:
    from edgefleet.build.product import BuiltBundle


@dataclass(frozen=True)
class Scenario:
    """What the demo builds and how its devices stream it."""

    name: str
    dataset: str
    device_prefix: str
    profile: str
    """The device profile the devices are provisioned with (core.profiles)."""
    stream: str
    frame_rate_hz: float = 0.0
    """Image rows replayed per second at speed 1; 0 for a series (replayed at the bundle's sample rate)."""


SCENARIOS = {
    "watch": Scenario("watch", "BasicMotions", "watch", "smartwatch",
                      "BasicMotions (6 channels at 10 Hz, 100 samples a window)"),
    "camera": Scenario("camera", "digits", "cam", "smart-camera", "8x8 grey digit frames at 10 frames/s",
                       frame_rate_hz=10.0),
}
ROLLOUT_WINDOW_S = 3.0
"""Observation window per wave: short, the demo has no gates to judge."""
INSTALL_TIMEOUT_S = 60.0
AGENT_SLACK_S = 60.0
"""Seconds an agent may wait for its model (its wave) on top of the replay, before ``--duration`` stops it."""


def scenario(name: str) -> Scenario:
    """The scenario called ``name``; ConfigError naming the known ones otherwise."""
    if name not in SCENARIOS:
        raise ConfigError(f"--scenario must be one of {', '.join(SCENARIOS)}, not {name!r}")
    return SCENARIOS[name]


@dataclass(frozen=True)
class DemoSettings:
    workdir: Path | None = None
    scenario: str = "watch"
    devices: int = 5
    duration_s: float = 20.0
    """Seconds a device's replay of its shard takes (the replay speed is chosen for it)."""
    epochs: int = 60
    seed: int = 0


@dataclass(frozen=True)
class DeviceRow:
    device: str
    model: str | None
    windows: int
    expected: int
    labelled: int
    correct: int
    p50_ms: float | None
    p99_ms: float | None
    gaps: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


@dataclass(frozen=True)
class DemoResult:
    scenario: str
    model: str
    chosen: str
    """The shipped candidate (e.g. ``int8 percentile per-tensor``)."""
    build_accuracy: float
    float_accuracy: float
    float_bytes: int
    shipped_bytes: int
    rollout: str
    phase: str
    speed: float
    rows: list[DeviceRow]
    seconds: float


@dataclass(frozen=True)
class Replay:
    """How each device replays its shard: ``speed`` times faster than ``row_s`` seconds a row."""

    data_file: Path
    rows: int
    row_s: float
    speed: float
    frame_rate_hz: float
    windows_per_row: int

    def source(self, index: int, count: int) -> str:
        rate = f"&rate={self.frame_rate_hz:g}" if self.frame_rate_hz else ""
        return f"npz:{self.data_file}?shard={index}/{count}&speed={self.speed:g}&loop=0{rate}"

    def expected_windows(self, index: int, count: int) -> int:
        return len(range(index, self.rows, count)) * self.windows_per_row


def run_demo(settings: DemoSettings, console: Console | None = None) -> DemoResult:
    """Run the demo end to end; every process it starts is stopped before it returns."""
    chosen_scenario = scenario(settings.scenario)
    console = console or Console(width=None if sys.stdout.isatty() else 120)
    started = time.monotonic()
    with _workdir(settings.workdir) as work, ProcessGroup() as group, _progress(console) as progress:
        step = progress.add_task(f"loading {chosen_scenario.dataset}, training its default model", total=None)
        built, replay = _build(work, settings, chosen_scenario, lambda msg: progress.update(step, description=msg))
        progress.update(step, description="starting the control plane (embedded broker, SQLite)")
        api = _start_server(work, group)
        progress.update(step, description=f"pushing {built.ref}, provisioning {settings.devices} devices")
        api.push_model(built.bundle)
        devices = [f"{chosen_scenario.device_prefix}-{i + 1:02d}" for i in range(settings.devices)]
        for device in devices:
            credentials = work / "devices" / f"{device}.json"
            credentials.parent.mkdir(parents=True, exist_ok=True)
            credentials.write_text(json.dumps(api.add_device(device, {"demo": chosen_scenario.name},
                                                             profile=chosen_scenario.profile)))
        agents = [group.start(ManagedProcess.edgefleet([
            "agent", "--credentials", str(work / "devices" / f"{device}.json"),
            "--data-dir", str(work / "agents" / device), "--source", replay.source(i, len(devices)),
            "--duration", f"{settings.duration_s + AGENT_SLACK_S:g}", "--telemetry-interval", "2",
        ], work / "logs" / f"{device}.log")) for i, device in enumerate(devices)]
        waves = ["20%", "100%"] if len(devices) > 1 else ["100%"]
        rollout = api.create_rollout(built.ref, waves=waves, select={"demo": chosen_scenario.name},
                                     profile=chosen_scenario.profile, window_s=ROLLOUT_WINDOW_S,
                                     install_timeout_s=INSTALL_TIMEOUT_S)
        phase = _follow(api, rollout["id"], agents, settings, progress, step, chosen_scenario)
        for device, agent in zip(devices, agents, strict=True):
            code = agent.wait(0)
            if code != 0:
                raise EdgefleetError(f"agent {device} exited with {code}: {agent.log_tail(3)}")
        progress.update(step, description="collecting telemetry")
        rows = _collect(api, devices, built.ref, replay)
        progress.update(step, description="stopping every process")
    baseline = built.outcome.baseline
    result = DemoResult(chosen_scenario.name, built.ref, built.chosen.label, built.accuracy,
                        float(baseline.accuracy or 0.0), baseline.size_bytes, built.chosen.size_bytes,
                        rollout["id"], phase, replay.speed, rows, time.monotonic() - started)
    console.print(summary_table(result))
    return result


def _build(work: Path, settings: DemoSettings, chosen: Scenario,
           say: Callable[[str], None]) -> tuple[BuiltBundle, Replay]:
    """Build and sign the scenario's model as ``edgefleet build --dataset`` does, and write the data file the
    agents replay (the dataset's raw rows, in the format ``edgefleet build --data`` reads)."""
    from edgefleet.build.inputs import from_dataset
    from edgefleet.build.product import build_bundle
    from edgefleet.build.recipe import load_recipe
    from edgefleet.core.profiles import BUILTIN_PROFILES, resolve
    from edgefleet.data.datasets import load_dataset

    recipe = load_recipe(None).model_copy(update={"seed": settings.seed})
    say(f"training the default {chosen.dataset} model ({settings.epochs} epochs)")
    inputs = from_dataset(chosen.dataset, epochs=settings.epochs, seed=settings.seed)
    key = write_keypair(work / "keys", overwrite=True)
    built = build_bundle(inputs, recipe, resolve(list(BUILTIN_PROFILES), {}), key, progress=say)
    (work / f"{built.name}-{built.version}.bundle").write_bytes(built.bundle)

    raw = load_dataset(chosen.dataset)
    data_file = work / f"{built.name}.npz"
    arrays: dict[str, Any] = {"calib_x": raw.train_x, "test_x": raw.test_x, "test_y": raw.test_y,
                              "labels": np.array(built.labels, dtype=np.str_)}
    pre = built.preprocess
    if pre.get("kind") == "sliding_window":
        rate = float(pre.get("sample_rate_hz") or 10.0)
        arrays["sample_rate_hz"] = np.float64(rate)
        samples = int(raw.test_x.shape[-1])
        windows_per_row = (samples - int(pre["window"])) // int(pre["hop"]) + 1
        row_s = samples / rate
    else:
        windows_per_row, row_s = 1, 1.0 / chosen.frame_rate_hz
    with data_file.open("wb") as fh:
        np.savez(fh, **arrays)
    rows = len(raw.test_x)
    per_device = math.ceil(rows / settings.devices)
    speed = max(1.0, math.ceil(10 * per_device * row_s / settings.duration_s) / 10)
    return built, Replay(data_file, rows, row_s, speed, chosen.frame_rate_hz, windows_per_row)


def _follow(api: ControlPlane, rollout_id: str, agents: list[ManagedProcess], settings: DemoSettings,
            progress: Progress, step: Any, chosen: Scenario) -> str:
    """Show the rollout and the replay until the rollout has ended and every agent has played its shard; the
    rollout's final phase, or EdgefleetError when it did not finish."""
    deadline = time.monotonic() + settings.duration_s + AGENT_SLACK_S + 30
    phase, rollout = "installing", api.rollout(rollout_id)
    while time.monotonic() < deadline:
        rollout = api.rollout(rollout_id)
        phase = str(rollout["phase"])
        running = sum(a.running for a in agents)
        progress.update(step, description=f"rollout {rollout_id}: wave {rollout['wave']}/{rollout['waves']} "
                                          f"{phase}; {running} {chosen.name} agent(s) replaying {chosen.stream}")
        if phase in ("aborted", "paused"):
            raise EdgefleetError(f"rollout {rollout_id} {phase}: {rollout['reason']}")
        if phase == "done" and not running:
            return phase
        time.sleep(0.3)
    raise EdgefleetError(f"the demo did not finish in time: rollout {rollout_id} {phase} ({rollout['reason']}), "
                         f"{sum(a.running for a in agents)} agent(s) still running")


def _start_server(work: Path, group: ProcessGroup) -> ControlPlane:
    data_dir = work / "server"
    server = group.start(ManagedProcess.edgefleet([
        "server", "--data-dir", str(data_dir), "--port", "0", "--tick", "0.5",
        "--trusted-key", str(work / "keys" / PUBLIC_KEY_FILE)], work / "logs" / "server.log"))
    info_file = data_dir / "server.json"

    def ready() -> bool:
        if not server.running:
            raise EdgefleetError(f"server exited: {server.log_tail(5)}")
        return info_file.exists()

    wait_until(ready, 60, "the control plane to start")
    info = json.loads(info_file.read_text())
    api = ControlPlane(info["api_url"], (data_dir / "operator.token").read_text().strip())
    wait_until(lambda: _healthy(api), 30, "the control plane's API")
    return api


def _healthy(api: ControlPlane) -> bool:
    try:
        return bool(api.health().get("status") == "ok")
    except EdgefleetError:
        return False


def _collect(api: ControlPlane, devices: list[str], ref: str, replay: Replay) -> list[DeviceRow]:
    """Per device, what ``edgefleet device telemetry`` reads for the shipped model, once the server has ingested
    every window the device inferred (bounded: what is there after 15 s)."""
    from edgefleet.cli.fleet import telemetry_summary

    def windows(answer: dict[str, Any]) -> int:
        return int(telemetry_summary(answer)["models"].get(ref, {}).get("windows", 0))

    expected = {d: replay.expected_windows(i, len(devices)) for i, d in enumerate(devices)}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if all(windows(api.telemetry(d)) >= expected[d] for d in devices):
            break
        time.sleep(0.3)
    rows = []
    for device in devices:
        reported = api.device(device).get("reported") or {}
        answer = api.telemetry(device)
        summary = telemetry_summary(answer)["models"].get(ref, {})
        latency = summary.get("latency_ms", {})
        rows.append(DeviceRow(device, reported.get("active"), int(summary.get("windows", 0)), expected[device],
                              int(summary.get("labelled", 0)), int(summary.get("correct", 0)), latency.get("p50"),
                              latency.get("p99"), int(answer["gaps"])))
    return rows


def summary_table(result: DemoResult) -> Table:
    """Per device: the model it runs, windows inferred, on-device accuracy and latency, beside the build's."""
    table = Table(title=f"edgefleet demo ({result.scenario}): {result.model} ({result.chosen}) on "
                        f"{len(result.rows)} devices, rollout {result.rollout} {result.phase}")
    for column in ("device", "model", "windows", "accuracy", "build accuracy", "p50 ms", "p99 ms", "seq gaps"):
        table.add_column(column, justify="left" if column in ("device", "model") else "right")
    build = _pct(result.build_accuracy)
    for row in result.rows:
        table.add_row(row.device, row.model or "-", f"{row.windows}/{row.expected}", _pct(row.accuracy), build,
                      _ms(row.p50_ms), _ms(row.p99_ms), str(row.gaps))
    labelled = sum(r.labelled for r in result.rows)
    correct = sum(r.correct for r in result.rows)
    table.add_section()
    table.add_row("fleet", "", f"{sum(r.windows for r in result.rows)}/{sum(r.expected for r in result.rows)}",
                  _pct(correct / labelled if labelled else None), build, "", "", str(sum(r.gaps for r in result.rows)))
    table.caption = (f"build: float32 {_pct(result.float_accuracy)} {result.float_bytes / 1024:.1f} KB -> shipped "
                     f"{build} {result.shipped_bytes / 1024:.1f} KB; replayed at {result.speed:g}x; "
                     f"demo took {result.seconds:.0f} s")
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
        yield Path(tmp)


@contextmanager
def _progress(console: Console) -> Iterator[Progress]:
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        yield progress
