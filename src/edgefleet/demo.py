"""``edgefleet demo``: the whole path on one machine, with embedded defaults.

train (BasicMotions) -> int8 -> sign -> server -> provision -> assign -> agents stream and infer -> telemetry
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgefleet.bundle.pack import BundleSpec, pack_bundle, write_bundle
from edgefleet.bundle.signing import PUBLIC_KEY_FILE, write_keypair
from edgefleet.client import ControlPlane
from edgefleet.errors import EdgefleetError
from edgefleet.processes import ManagedProcess, ProcessGroup, wait_until

MODEL_NAME = "basicmotions-cnn"
MODEL_VERSION = "1.0.0"


@dataclass(frozen=True)
class DemoSettings:
    workdir: Path | None = None
    devices: int = 5
    duration_s: float = 20.0
    epochs: int = 60
    seed: int = 0


@dataclass(frozen=True)
class DeviceRow:
    device: str
    model: str | None
    windows: int
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
    float_accuracy: float
    int8_accuracy: float
    float_bytes: int
    int8_bytes: int
    rows: list[DeviceRow]
    seconds: float


def run_demo(settings: DemoSettings, console: Console | None = None) -> DemoResult:
    """Run the demo end to end; every process it starts is stopped before it returns."""
    console = console or Console(width=None if sys.stdout.isatty() else 120)
    started = time.monotonic()
    with _workdir(settings.workdir) as work, ProcessGroup() as group, _progress(console) as progress:
        step = progress.add_task("loading BasicMotions (sktime)", total=None)
        build, data_file = _build(work, settings, progress, step)
        progress.update(step, description="signing the bundle")
        key = write_keypair(work / "keys", overwrite=True)
        bundle = pack_bundle(build.int8_model, key, BundleSpec(
            name=MODEL_NAME, version=MODEL_VERSION, labels=list(build.labels), preprocess=build.preprocess,
            metrics={"accuracy": build.int8_metrics.accuracy, "float_accuracy": build.float_metrics.accuracy,
                     "size_bytes": float(build.int8_metrics.size_bytes)}))
        write_bundle(work / f"{MODEL_NAME}-{MODEL_VERSION}.bundle", bundle)

        progress.update(step, description="starting the control plane (embedded broker, SQLite)")
        api = _start_server(work, group)
        progress.update(step, description=f"registering {MODEL_NAME}@{MODEL_VERSION}, provisioning devices")
        api.push_model(bundle)
        devices = [f"watch-{i + 1:02d}" for i in range(settings.devices)]
        for device in devices:
            (work / "devices" / f"{device}.json").parent.mkdir(parents=True, exist_ok=True)
            (work / "devices" / f"{device}.json").write_text(json.dumps(api.add_device(device, {"demo": "1"})))
        api.deploy(f"{MODEL_NAME}@{MODEL_VERSION}", devices)

        progress.update(step, description=f"{len(devices)} agents stream BasicMotions at 10 Hz")
        agents = [group.start(ManagedProcess.edgefleet([
            "agent", "--credentials", str(work / "devices" / f"{device}.json"),
            "--data-dir", str(work / "agents" / device),
            "--source", f"npz:{data_file}?shard={i}/{len(devices)}",
            "--duration", str(settings.duration_s), "--telemetry-interval", "2",
        ], work / "logs" / f"{device}.log")) for i, device in enumerate(devices)]
        stream = progress.add_task("streaming", total=settings.duration_s)
        t0 = time.monotonic()
        while any(a.running for a in agents) and time.monotonic() - t0 < settings.duration_s + 60:
            progress.update(stream, completed=min(settings.duration_s, time.monotonic() - t0))
            time.sleep(0.2)
        progress.update(stream, completed=settings.duration_s)
        for device, agent in zip(devices, agents, strict=True):
            code = agent.wait(0)
            if code != 0:
                raise EdgefleetError(f"agent {device} exited with {code}: {agent.log_tail(3)}")
        progress.update(step, description="collecting telemetry")
        rows = _collect(api, devices)
        progress.update(step, description="stopping every process")
    result = DemoResult(build.float_metrics.accuracy, build.int8_metrics.accuracy, build.float_metrics.size_bytes,
                        build.int8_metrics.size_bytes, rows, time.monotonic() - started)
    console.print(summary_table(result))
    return result


def _build(work: Path, settings: DemoSettings, progress: Progress, step: Any) -> tuple[Any, Path]:
    from edgefleet.build.skeleton import build_basicmotions_model
    from edgefleet.data.basicmotions import load_basicmotions, save_npz

    recordings = load_basicmotions()
    data_file = work / "basicmotions.npz"
    save_npz(recordings, data_file)
    progress.update(step, description=f"training a 1D-CNN ({settings.epochs} epochs), int8 quantization")
    build = build_basicmotions_model(recordings, epochs=settings.epochs, seed=settings.seed)
    (work / "model-float32.onnx").write_bytes(build.float_model)
    (work / "model-int8.onnx").write_bytes(build.int8_model)
    return build, data_file


def _start_server(work: Path, group: ProcessGroup) -> ControlPlane:
    data_dir = work / "server"
    server = group.start(ManagedProcess.edgefleet([
        "server", "--data-dir", str(data_dir), "--port", "0",
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


def _collect(api: ControlPlane, devices: list[str]) -> list[DeviceRow]:
    """Wait until the server has ingested everything the agents delivered, then summarize per device."""
    previous: list[int] = []
    for _ in range(50):
        counts = [api.telemetry(d)["batches"] for d in devices]
        if counts == previous:
            break
        previous = counts
        time.sleep(0.3)
    rows = []
    for device in devices:
        reported = api.device(device).get("reported") or {}
        telemetry = api.telemetry(device)
        model = reported.get("active")
        summary = next((m for m in telemetry["models"] if m["model"] == model), None) or {}
        latency = summary.get("latency_ms", {})
        rows.append(DeviceRow(device, model, int(summary.get("windows", 0)), int(summary.get("labelled", 0)),
                              int(summary.get("correct", 0)), latency.get("p50"), latency.get("p99"),
                              int(telemetry["gaps"])))
    return rows


def summary_table(result: DemoResult) -> Table:
    table = Table(title=f"edgefleet demo: {MODEL_NAME} on {len(result.rows)} devices "
                        f"(build: float32 {result.float_accuracy:.1%} / int8 {result.int8_accuracy:.1%}, "
                        f"{result.float_bytes / 1024:.1f} KB -> {result.int8_bytes / 1024:.1f} KB)")
    for column in ("device", "model", "windows", "accuracy", "p50 ms", "p99 ms", "seq gaps"):
        table.add_column(column, justify="left" if column in ("device", "model") else "right")
    for row in result.rows:
        table.add_row(row.device, row.model or "-", str(row.windows), _pct(row.accuracy), _ms(row.p50_ms),
                      _ms(row.p99_ms), str(row.gaps))
    labelled = sum(r.labelled for r in result.rows)
    correct = sum(r.correct for r in result.rows)
    table.add_section()
    table.add_row("fleet", "", str(sum(r.windows for r in result.rows)), _pct(correct / labelled if labelled else None),
                  "", "",
                  str(sum(r.gaps for r in result.rows)))
    table.caption = f"build-time int8 accuracy {result.int8_accuracy:.1%}; demo took {result.seconds:.0f} s"
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
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        yield progress
