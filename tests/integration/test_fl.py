"""Federated learning on Flower with real processes on loopback: 5 clients with non-IID shards of sklearn's digits
(2 classes each) finish 3 rounds through `edgefleet fl serve`/`fl client`; a client killed mid-round does not stop
the round; the server receives only parameters (their bytes, two tensors, scalar metrics), never samples.

Flower runs in the Python of the ``fl`` extra: ``$EDGEFLEET_FL_PYTHON``, this interpreter if it has flwr, or a
``.venv-fl`` beside the repository, which ``make test`` creates (flwr pins protobuf, cryptography and the web stack
below the project's versions, so it never goes into .venv). Without one the tests skip with that message, and fail
in CI (CI=true), where the Makefile made it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet.bundle.pack import peek_manifest
from edgefleet.learn.fl import FL_PYTHON_ENV, ClientSettings, client_command, node_env, read_status
from edgefleet.transport.ports import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLASSES, FEATURES = 10, 64
PARAM_TENSORS = 2


def _fl_python() -> str | None:
    if os.environ.get(FL_PYTHON_ENV):
        return os.environ[FL_PYTHON_ENV]
    if importlib.util.find_spec("flwr") is not None:
        return sys.executable
    local = REPO / ".venv-fl" / "bin" / "python"
    return str(local) if local.exists() else None


@pytest.fixture
def fl_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    python = _fl_python()
    if python is None:
        missing(f"the fl extra (flwr) is not installed: set ${FL_PYTHON_ENV} or create .venv-fl "
                    "(make test does: python -m venv .venv-fl && .venv-fl/bin/pip install flwr==1.42.0 numpy)")
    monkeypatch.setenv(FL_PYTHON_ENV, python)
    return {**os.environ, FL_PYTHON_ENV: python}


def missing(reason: str) -> None:
    """Skip here, fail in CI, where ``make test`` installs the fl extra's venv."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _shards(root: Path, n: int = 5) -> tuple[list[Path], Path]:
    """Non-IID: shard i holds classes 2i and 2i+1 of digits; the evaluation file holds all of them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    paths = []
    for i in range(n):
        keep = np.isin(y, (2 * i, 2 * i + 1))
        path = root / f"shard{i}.npz"
        np.savez(path, train_x=x[keep], train_y=y[keep])
        paths.append(path)
    np.savez(root / "eval.npz", test_x=x, test_y=y)
    return paths, root / "eval.npz"


def _edgefleet(*args: str) -> list[str]:
    return [sys.executable, "-c", "from edgefleet.cli import main; main()", *args]


def _wait(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_five_non_iid_clients_finish_three_rounds_and_send_only_parameters(tmp_path: Path,
                                                                           fl_env: dict[str, str]) -> None:
    shards, eval_file = _shards(tmp_path)
    from edgefleet.bundle.signing import write_keypair

    write_keypair(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    state, bundle = tmp_path / "fl", tmp_path / "global.bundle"
    server = subprocess.Popen(_edgefleet(
        "fl", "serve", "--state-dir", str(state), "--features", str(FEATURES), "--classes", str(CLASSES),
        "--key", str(tmp_path / "signing.key"), "--out", str(bundle), "--address", address, "--rounds", "3",
        "--strategy", "fedprox", "--min-clients", "5", "--eval", str(eval_file), "--local-epochs", "2",
        "--server-momentum", "0.9"),
        env=fl_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    clients = []
    for i, shard in enumerate(shards):
        creds = tmp_path / f"dev{i}.json"
        creds.write_text(json.dumps({"device_id": f"dev-{i}"}))
        clients.append(subprocess.Popen(_edgefleet("fl", "client", "--server", address, "--data", str(shard),
                                                   "--credentials", str(creds), "--classes", str(CLASSES)),
                                        env=fl_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        out, err = server.communicate(timeout=180)
    finally:
        _wait(clients, 30)
    assert server.returncode == 0, err.decode()[-2000:]
    assert b"after 3 fedprox (server momentum 0.9) round(s)" in out
    status = read_status(state)
    assert status["server_momentum"] == 0.9 and status["strategy"] == "fedprox"
    assert status["state"] == "done" and [r["round"] for r in status["rounds"]] == [1, 2, 3]
    param_bytes = set()
    for entry in status["rounds"]:
        assert entry["clients"] == 5 and entry["failures"] == 0
        assert {r["device"] for r in entry["received"]} == {f"dev-{i}" for i in range(5)}  # the credentials' ids
        for got in entry["received"]:
            assert got["tensors"] == PARAM_TENSORS  # W and b, nothing else
            assert set(got["metrics"]) == {"device", "loss"} and set(got["metrics"].values()) <= {"str", "float"}
            param_bytes.add(got["parameter_bytes"])
    # every client sent exactly the parameters' size (W 64x10 + b 10 float32 plus npy headers), far below any shard
    assert len(param_bytes) == 1
    sent = param_bytes.pop()
    assert (FEATURES * CLASSES + CLASSES) * 4 <= sent < (FEATURES * CLASSES + CLASSES) * 4 + 512
    assert sent < min(p.stat().st_size for p in shards) / 10
    # the global model beats any single 2-class shard's ceiling (0.2) on all ten classes, and is signed
    assert status["rounds"][-1]["accuracy"] > 0.5
    manifest = peek_manifest(bundle.read_bytes())
    assert manifest.name == "fl-global" and manifest.metrics["accuracy"] > 0.5
    shown = subprocess.run(_edgefleet("fl", "status", str(state)), env=fl_env, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and "3/3 round(s)" in shown.stdout and "round 3: 5 client(s)" in shown.stdout


def test_a_client_killed_mid_round_does_not_stop_the_round(tmp_path: Path, fl_env: dict[str, str]) -> None:
    shards, _ = _shards(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    state = tmp_path / "fl"
    from edgefleet.learn.fl import ServeSettings, serve

    settings = ServeSettings(state_dir=state, features=FEATURES, classes=CLASSES, address=address, rounds=3,
                             min_clients=4)
    progress = tmp_path / "victim.json"
    clients = []
    for i, shard in enumerate(shards):
        victim = i == 0
        argv = client_command(ClientSettings(server=address, data=shard, device=f"dev-{i}", classes=CLASSES,
                                             progress=progress if victim else None,
                                             fit_delay_s=5.0 if victim else 0.0))
        clients.append(subprocess.Popen(argv, env=node_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    killed: list[int] = []

    def killer() -> None:  # SIGKILL the victim while it trains in round 1 or 2 (bounded wait)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            try:
                fitting = json.loads(progress.read_text()).get("fitting")
            except (OSError, ValueError):
                fitting = None
            if fitting is not None:
                os.kill(clients[0].pid, signal.SIGKILL)
                killed.append(int(fitting))
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        serve(settings, timeout_s=240)
    finally:
        thread.join(timeout=5)
        _wait(clients, 30)
    assert killed, "the victim never started training"
    status = read_status(state)
    assert status["state"] == "done" and len(status["rounds"]) == 3
    hit = status["rounds"][killed[0] - 1]
    assert hit["failures"] == 1  # the round went on and aggregated the others (accept_failures)
    assert "dev-0" not in {r["device"] for r in hit["received"]}
    assert all(r["clients"] >= 3 for r in status["rounds"]), [(r["clients"], r["failures"]) for r in status["rounds"]]
