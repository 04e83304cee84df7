"""Federated learning on Flower: start the Flower server or a client as a child process, follow its rounds, and
sign the final global model as a bundle.

flwr pins protobuf, cryptography and the web stack below the control plane's versions, so the Flower processes
(``edgefleet.learn.fl_node``) run in a Python that has the ``fl`` extra: ``$EDGEFLEET_FL_PYTHON`` if set, else
this interpreter when it can import flwr. Only numpy and flwr are imported there. The global model is a softmax
regression over flattened inputs; here it becomes an ONNX model (MatMul, Add, Softmax), signed like any bundle,
and goes out through a normal gated rollout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import edgefleet
from edgefleet.errors import ConfigError, DataError, ModelError

FL_PYTHON_ENV = "EDGEFLEET_FL_PYTHON"
STATUS_FILE = "status.json"
GLOBAL_FILE = "global.npz"
STRATEGIES = ("fedavg", "fedprox")


def fl_python() -> str:
    """The interpreter that runs the Flower processes; ConfigError when none has flwr."""
    chosen = os.environ.get(FL_PYTHON_ENV)
    if chosen:
        if not Path(chosen).exists():
            raise ConfigError(f"${FL_PYTHON_ENV} names {chosen}, which does not exist")
        return chosen
    if importlib.util.find_spec("flwr") is not None:
        return sys.executable
    raise ConfigError(f"federated learning needs the [fl] extra: pip install 'edgefleet[fl]' (or set "
                      f"${FL_PYTHON_ENV} to a Python that has it)")


def node_command(role: str, options: dict[str, Any]) -> list[str]:
    """``python -m edgefleet.learn.fl_node ROLE --opt value ...`` (None values left out)."""
    argv = [fl_python(), "-m", "edgefleet.learn.fl_node", role]
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def node_env() -> dict[str, str]:
    """This process's environment with edgefleet's package root first on PYTHONPATH (the FL Python may have
    only flwr and numpy)."""
    root = str(Path(edgefleet.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


@dataclass(frozen=True)
class ServeSettings:
    """What ``edgefleet fl serve`` runs."""

    state_dir: Path
    features: int
    classes: int
    address: str = "127.0.0.1:8088"
    rounds: int = 3
    strategy: str = "fedavg"
    mu: float = 0.1
    server_momentum: float = 0.0
    """FedAvgM's server momentum (0: plain averaging); 0.9 suits non-IID shards, see fl_node."""
    min_clients: int = 2
    local_epochs: int = 1
    lr: float = 0.1
    eval_data: Path | None = None
    round_timeout_s: float | None = None

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if self.rounds < 1 or self.min_clients < 1 or self.features < 1 or self.classes < 2:
            raise ConfigError("rounds and min clients must be >= 1, features >= 1, classes >= 2")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(f"--server-momentum must be in [0, 1), not {self.server_momentum}")
        host, sep, port = self.address.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ConfigError(f"--address must be HOST:PORT, not {self.address!r}")


def serve(settings: ServeSettings, on_round: Callable[[dict[str, Any]], None] | None = None,
          timeout_s: float = 3600.0) -> Path:
    """Run the Flower server for the settings' rounds; call ``on_round`` with each finished round's entry; return
    the final global parameters' file. TransportError-free: a failed server is a ModelError with its last line."""
    settings.check()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    status, out = settings.state_dir / STATUS_FILE, settings.state_dir / GLOBAL_FILE
    out.unlink(missing_ok=True)
    argv = node_command("server", {
        "address": settings.address, "rounds": settings.rounds, "strategy": settings.strategy, "mu": settings.mu,
        "server_momentum": settings.server_momentum,
        "min_clients": settings.min_clients, "features": settings.features, "classes": settings.classes,
        "local_epochs": settings.local_epochs, "lr": settings.lr, "round_timeout": settings.round_timeout_s,
        "eval": settings.eval_data, "status": status, "out": out})
    log = settings.state_dir / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, env=node_env(), stdout=sink, stderr=subprocess.STDOUT)
        seen, deadline = 0, time.monotonic() + timeout_s
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                seen = _report(status, seen, on_round)
                time.sleep(0.2)
            if proc.poll() is None:
                raise ModelError(f"the Flower server did not finish {settings.rounds} rounds in {timeout_s:.0f} s")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    _report(status, seen, on_round)
    if proc.returncode != 0 or not out.exists():
        raise ModelError(f"the Flower server failed (exit {proc.returncode}): {_last_line(log)}")
    return out


def _report(status: Path, seen: int, on_round: Callable[[dict[str, Any]], None] | None) -> int:
    try:
        rounds = read_status(status).get("rounds", [])
    except ConfigError:
        return seen
    for entry in rounds[seen:]:
        if on_round is not None:
            on_round(entry)
    return len(rounds)


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no output"


def read_status(path: Path) -> dict[str, Any]:
    """The server's status file (a state directory or the file); ConfigError when there is none."""
    file = path / STATUS_FILE if path.is_dir() else path
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no federated run status at {file}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{file} is not a federated run status")
    return value


def device_identity(credentials: Path) -> str:
    """The device id in an agent's credentials file (what `device add` wrote): the client's identity."""
    try:
        raw = json.loads(credentials.read_text())
        return str(raw["device_id"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{credentials} is not a device credentials file (no device_id)") from exc


@dataclass(frozen=True)
class ClientSettings:
    """What ``edgefleet fl client`` runs: the local data file never leaves the device."""

    server: str
    data: Path
    device: str
    classes: int
    progress: Path | None = None
    fit_delay_s: float = 0.0


def client_command(settings: ClientSettings) -> list[str]:
    """The child process's command line for a client (checks the data file first)."""
    if not settings.data.is_file():
        raise DataError(f"no local data at {settings.data}")
    return node_command("client", {"server": settings.server, "data": settings.data, "device": settings.device,
                                   "classes": settings.classes, "progress": settings.progress,
                                   "fit_delay": settings.fit_delay_s or None})


def run_client(settings: ClientSettings) -> int:
    """Run a client until the server ends the run; its exit code."""
    return subprocess.call(client_command(settings), env=node_env())


def global_model_onnx(params: Path) -> bytes:
    """The global softmax regression as ONNX: input "x" [batch, features], output "probs" [batch, classes]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    try:
        with np.load(params, allow_pickle=False) as npz:
            w, b = npz["W"].astype(np.float32), npz["b"].astype(np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"cannot read the global model {params}: {exc}") from exc
    features, classes = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["z0"]), helper.make_node("Add", ["z0", "b"], ["z"]),
         helper.make_node("Softmax", ["z"], ["probs"], axis=-1)],
        "fl_global",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgefleet-fl")
    model.ir_version = 8
    onnx.checker.check_model(model)
    serialized: bytes = model.SerializeToString()
    return serialized


def global_accuracy(model: bytes, eval_data: Path) -> float:
    """The global model's accuracy on an .npz's test_x/test_y (flattened)."""
    from edgefleet.build.evaluate import accuracy

    with np.load(eval_data, allow_pickle=False) as npz:
        x, y = npz["test_x"], npz["test_y"]
    return accuracy(model, x.reshape(len(x), -1).astype(np.float32), y)
