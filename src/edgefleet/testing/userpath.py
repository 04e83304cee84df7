"""A user's own model through the command line, as the README tour runs it, timed step by step.

``keys init`` -> ``server`` -> ``build MODEL --data DATA`` -> ``model push`` -> ``device add`` -> ``agent
--source npz:DATA`` -> ``rollout create`` -> the agent downloads, verifies, health-checks, activates and replays
the data file's test rows -> ``device telemetry --json``. Every step is a real ``edgefleet`` process; the update
steps are timed from the agent's own events (their device timestamps), the first inference from the first
telemetry batch that counted a window.

The models (:func:`series_model`, :func:`image_model`, :func:`forest_model`) are made here without training
frameworks: nearest-centroid linear classifiers over synthetic classes (one per input kind), and a scikit-learn
forest exported by skl2onnx with its default options (a ZipMap output).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.errors import EdgefleetError
from edgefleet.processes import ManagedProcess, ProcessGroup, wait_until

LABELS = ("idle", "walk", "run")


@dataclass(frozen=True)
class UserModel:
    """A model file's bytes and the data file a user would give ``build --data``."""

    kind: str
    model: bytes
    data: dict[str, np.ndarray]


def _classes(rows: int, shape: tuple[int, ...], seed: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(len(LABELS), *shape)).astype(np.float32)
    y = np.arange(rows) % len(LABELS)
    x = centres[y] + rng.normal(0.0, spread, size=(rows, *shape)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def _centroid_model(x: np.ndarray, y: np.ndarray) -> bytes:
    """Flatten -> MatMul with the class centres -> minus half their squared norms -> Softmax: nearest centroid,
    its logits scaled to a spread of about 3 on ``x`` so the probabilities are not all 0 or 1."""
    shape = tuple(int(d) for d in x.shape[1:])
    centres = np.stack([x[y == k].mean(axis=0) for k in range(len(LABELS))])
    flat = centres.reshape(len(centres), -1).astype(np.float64)
    weights, bias = flat.T, -0.5 * (flat ** 2).sum(axis=1)
    logits = x.reshape(len(x), -1) @ weights + bias
    scale = 3.0 / max(float(logits.std(axis=1).mean()), 1e-6)
    weights, bias = (weights * scale).astype(np.float32), (bias * scale).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["dot"]),
             helper.make_node("Add", ["dot", "b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    graph = helper.make_graph(
        nodes, "user-model", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, *shape])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, len(centres)])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="a user")
    onnx.checker.check_model(model)
    serialized: bytes = model.SerializeToString()
    return serialized


def _data(x: np.ndarray, y: np.ndarray, **extra: Any) -> dict[str, np.ndarray]:
    half = len(x) // 2
    data = {"calib_x": x[:half], "test_x": x[half:], "test_y": y[half:], "labels": np.array(LABELS)}
    data.update({k: np.asarray(v) for k, v in extra.items()})
    return data


def series_model(rows: int = 60, channels: int = 3, window: int = 16, seed: int = 0) -> UserModel:
    """[N, C, T] recordings of three activities at 20 Hz, and a classifier of one recording."""
    x, y = _classes(rows, (channels, window), seed, spread=2.5)
    return UserModel("series", _centroid_model(x, y), _data(x, y, sample_rate_hz=np.float64(20.0)))


def image_model(rows: int = 60, size: int = 12, seed: int = 1) -> UserModel:
    """[N, 3, H, W] images (pixel values 0..255) of three classes, and a classifier of one image."""
    x, y = _classes(rows, (3, size, size), seed, spread=9.0)
    x = np.clip(x * 20.0 + 128.0, 0, 255).round().astype(np.float32)
    return UserModel("image", _centroid_model(x, y), _data(x, y))


def forest_model(rows: int = 120, features: int = 5, seed: int = 2) -> UserModel:
    """A scikit-learn random forest over table rows, exported by skl2onnx with its defaults (label + ZipMap)."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import RandomForestClassifier

    x, y = _classes(rows, (features,), seed, spread=1.2)
    half = rows // 2
    forest = RandomForestClassifier(n_estimators=10, max_depth=4, random_state=seed).fit(x[:half], y[:half])
    model: bytes = to_onnx(forest, x[:1]).SerializeToString()
    return UserModel("vector", model, _data(x, y))


USER_MODELS = {"series": series_model, "image": image_model, "vector": forest_model}


@dataclass
class UserPath:
    """Runs the README's commands in ``root`` with a user's model; ``timings`` collects seconds per step."""

    root: Path
    group: ProcessGroup = field(default_factory=ProcessGroup)
    timings: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def edgefleet(self, *args: str, timeout_s: float = 300.0, step: str | None = None) -> str:
        """Run one command to completion; its stdout, or EdgefleetError with its one-line stderr."""
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "edgefleet", *args], capture_output=True, text=True,
                                timeout=timeout_s, cwd=self.root, env={**os.environ, **self.env}, check=False)
        if step is not None:
            self.timings[step] = time.monotonic() - started
        if result.returncode != 0:
            raise EdgefleetError(f"edgefleet {' '.join(args[:2])} exited {result.returncode}: "
                                 f"{result.stderr.strip()[-400:]}")
        return result.stdout

    def start(self, *args: str, log: str) -> ManagedProcess:
        """Start a long-running command (server, agent) in the background."""
        env = {**os.environ, **self.env}
        process = ManagedProcess([sys.executable, "-m", "edgefleet", *args], self.root / "logs" / f"{log}.log",
                                 env=env, cwd=self.root)
        return self.group.start(process)

    def start_server(self) -> None:
        self.edgefleet("keys", "init", "--dir", "keys")
        server = self.start("server", "--data-dir", "srv", "--port", "0", "--trusted-key", "keys/signing.pub",
                            log="server")
        info = self.root / "srv" / "server.json"

        def ready() -> bool:
            if not server.running:
                raise EdgefleetError(f"server exited: {server.log_tail(5)}")
            return info.exists()

        wait_until(ready, 60, "the server to start")
        self.env["EDGEFLEET_SERVER"] = json.loads(info.read_text())["api_url"]
        self.env["EDGEFLEET_TOKEN"] = (self.root / "srv" / "operator.token").read_text().strip()

    def ship(self, user: UserModel, *, speed: float = 1.0) -> dict[str, Any]:
        """``KIND.onnx`` + ``KIND.npz`` -> build -> push -> device add ``KIND-01`` -> its agent -> rollout; returns
        the built bundle's manifest (``bundle inspect``). The model's name is the file's stem, as build defaults."""
        kind = user.kind
        (self.root / f"{kind}.onnx").write_bytes(user.model)
        np.savez(self.root / f"{kind}.npz", **user.data)  # type: ignore[arg-type]
        self.edgefleet("build", f"{kind}.onnx", "--data", f"{kind}.npz", "--key", "keys/signing.key",
                       "--out", f"{kind}.bundle", "--report", f"{kind}-report.json", step="build")
        manifest: dict[str, Any] = json.loads(self.edgefleet("bundle", "inspect", f"{kind}.bundle"))
        self.edgefleet("model", "push", f"{kind}.bundle", step="push")
        device = f"{kind}-01"
        self.edgefleet("device", "add", device, "--tag", f"kind={kind}", "--out", f"{device}.json")
        self.start("agent", "--credentials", f"{device}.json", "--data-dir", f"agent-{device}",
                   "--source", f"npz:{kind}.npz?speed={speed:g}&loop=0", "--telemetry-interval", "1", log=device)
        self.rollout_started = time.time()
        self.edgefleet("rollout", "create", f"{manifest['name']}@{manifest['version']}", "--select", f"kind={kind}",
                       "--waves", "100%", step="rollout_create")
        return manifest

    def telemetry(self, device: str) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(self.edgefleet("device", "telemetry", device, "--json"))
        return answer

    def wait_windows(self, device: str, ref: str, windows: int, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until the device's telemetry for ``ref`` counts ``windows`` windows; the last answer."""
        answer: dict[str, Any] = {}

        def counted() -> bool:
            nonlocal answer
            answer = self.telemetry(device)
            return int(answer["models"].get(ref, {}).get("windows", 0)) >= windows

        wait_until(counted, timeout_s, f"{windows} windows of {ref} in {device}'s telemetry", interval_s=0.5)
        return answer

    def update_breakdown(self, device: str) -> dict[str, float]:
        """Seconds from ``rollout create`` to each update step and to the first telemetry batch with a window,
        from the agent's own event and batch timestamps."""
        events = _events(self.env, device)
        at: dict[str, float] = {}
        for event in events:
            name, ts = event.get("name"), event.get("ts")
            if name in ("downloading", "verifying", "health_checking", "activating", "activated") and ts:
                at.setdefault(str(name), float(ts))
        start = self.rollout_started
        out = {f"to_{k}_s": v - start for k, v in at.items()}
        if "downloading" in at and "verifying" in at:
            out["download_s"] = at["verifying"] - at["downloading"]
        if "health_checking" in at and "activating" in at:
            out["health_check_s"] = at["activating"] - at["health_checking"]
        return out

    def close(self) -> None:
        self.group.stop_all()


def _events(env: dict[str, str], device: str) -> list[dict[str, Any]]:
    from edgefleet.client import ControlPlane

    api = ControlPlane(env["EDGEFLEET_SERVER"], env["EDGEFLEET_TOKEN"])
    try:
        return list(api.events(device))
    finally:
        api.close()


def bundle_accuracy(bundle: Path, data: dict[str, np.ndarray]) -> float:
    """The accuracy of the bundle's own model on the data file's test rows, run through the bundle's pipeline
    the way the agent runs it (series rows as whole windows)."""
    from edgefleet.bundle.container import MANIFEST, MODEL, read_container
    from edgefleet.bundle.manifest import Manifest
    from edgefleet.runtime.inputs import ImageInput, SeriesInput
    from edgefleet.runtime.runner import OnnxRuntimeRunner
    from edgefleet.runtime.spec import ModelPipeline

    members = read_container(bundle.read_bytes())
    manifest = Manifest.from_bytes(members[MANIFEST])
    pipeline = ModelPipeline.from_manifest(manifest.preprocess, manifest.postprocess)
    rows = np.asarray(data["test_x"])
    step = pipeline.inputs
    if isinstance(step, ImageInput):
        rows = step.to_frames(rows)
    elif not isinstance(step, SeriesInput):
        rows = rows.astype(np.float32)
    scores = pipeline.outputs.scorer(OnnxRuntimeRunner(members[MODEL]))(step.apply(rows))
    return float(np.mean(scores.argmax(axis=1) == np.asarray(data["test_y"])))
