"""The Flower processes: ``python -m edgefleet.learn.fl_node server|client ...``.

Runs in a Python that has the ``fl`` extra (``flwr``), which may be another virtual environment than edgefleet's
(``EDGEFLEET_FL_PYTHON``): flwr pins protobuf, cryptography and the web stack to other versions than the control
plane's. So this module imports only numpy, flwr and the standard library.

The model is a softmax regression over flattened inputs (parameters ``[W (features, classes), b (classes)]``),
trained locally with mini-batch SGD (plus FedProx's proximal term when the server sends ``proximal_mu``). The
server runs Flower's FedAvg or FedProx (with ``--server-momentum``, Flower's FedAvgM aggregation under either,
FedProx's ``proximal_mu`` still sent to the clients), tolerates failed clients (``accept_failures``), writes a
status file after every round (clients, failures, the bytes each client sent and the metric names it sent:
parameters only, never samples) and the final global parameters to an ``.npz``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

STATUS_VERSION = 1


# -- the model --------------------------------------------------------------------------------------------------
def init_params(features: int, classes: int) -> list[np.ndarray]:
    """Zero weights and biases."""
    return [np.zeros((features, classes), np.float32), np.zeros(classes, np.float32)]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def local_fit(params: list[np.ndarray], x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, mu: float,
              batch: int = 32, seed: int = 0) -> tuple[list[np.ndarray], float]:
    """SGD on cross-entropy (+ mu/2 ||w - w_global||^2 with FedProx); returns new parameters and the last loss."""
    w, b = params[0].copy(), params[1].copy()
    w0, b0 = params[0], params[1]
    rng = np.random.default_rng(seed)
    onehot = np.eye(w.shape[1], dtype=np.float32)[y]
    loss = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            p = softmax(x[idx] @ w + b)
            grad = (p - onehot[idx]) / len(idx)
            gw, gb = x[idx].T @ grad, grad.sum(axis=0)
            if mu > 0:
                gw, gb = gw + mu * (w - w0), gb + mu * (b - b0)
            w -= lr * gw
            b -= lr * gb
        p = softmax(x @ w + b)
        loss = float(-np.log(p[np.arange(len(y)), y] + 1e-9).mean())
    return [w.astype(np.float32), b.astype(np.float32)], loss


def accuracy(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x @ params[0] + params[1]).argmax(axis=1) == y))


def load_xy(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x flattened float32, y int64) from an .npz: train_x/train_y, else test_x/test_y (as `data export` writes
    labelled field examples)."""
    with np.load(path, allow_pickle=False) as npz:
        keys = ("train_x", "train_y") if "train_x" in npz.files else ("test_x", "test_y")
        x, y = npz[keys[0]], npz[keys[1]]
    return x.reshape(len(x), -1).astype(np.float32), y.astype(np.int64)


def write_json(path: Path, value: Any) -> None:
    """Crash-safe: temporary file, fsync, replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(value, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# -- the server -------------------------------------------------------------------------------------------------
def run_server(args: argparse.Namespace) -> int:
    import flwr as fl
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg, FedAvgM, FedProx

    status_path, out_path = Path(args.status), Path(args.out)
    evaluation = load_xy(Path(args.eval)) if args.eval else None
    status: dict[str, Any] = {"version": STATUS_VERSION, "state": "waiting", "strategy": args.strategy,
                              "server_momentum": args.server_momentum, "rounds_total": args.rounds,
                              "min_clients": args.min_clients,
                              "address": args.address, "started": time.time(), "rounds": []}
    final: dict[str, list[np.ndarray]] = {"params": init_params(args.features, args.classes)}

    def fit_config(server_round: int) -> dict[str, Any]:
        config = {"round": server_round, "epochs": args.local_epochs, "lr": args.lr}
        if args.strategy == "fedprox":  # the proximal term is the clients'; FedAvgM does not send it by itself
            config["proximal_mu"] = args.mu
        return config

    def evaluate(server_round: int, params: list[np.ndarray], config: dict[str, Any]) -> Any:
        if evaluation is None:
            return None
        return 0.0, {"accuracy": accuracy(params, *evaluation)}

    # Server momentum (FedAvgM, Hsu et al. 2019) applies the averaged update with momentum: on non-IID shards the
    # averaged client updates are small and partly cancel, and momentum keeps the direction they agree on.
    base = FedAvgM if args.server_momentum > 0 else FedProx if args.strategy == "fedprox" else FedAvg

    class Recorded(base):  # type: ignore[misc, valid-type]
        """The chosen strategy, recording what every client sent in each round."""

        def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
            received = []
            for _, res in results:
                received.append({"device": str(res.metrics.get("device", "")),
                                 "examples": int(res.num_examples),
                                 "parameter_bytes": sum(len(t) for t in res.parameters.tensors),
                                 "tensors": len(res.parameters.tensors),
                                 "metrics": {k: type(v).__name__ for k, v in res.metrics.items()}})
            aggregated, metrics = super().aggregate_fit(server_round, results, failures)
            if aggregated is not None:
                final["params"] = parameters_to_ndarrays(aggregated)
            entry = {"round": server_round, "clients": len(results), "failures": len(failures),
                     "received": received, "finished": time.time()}
            if evaluation is not None:
                entry["accuracy"] = accuracy(final["params"], *evaluation)
            status["rounds"].append(entry)
            status["state"] = "running"
            write_json(status_path, status)
            return aggregated, metrics

    options: dict[str, Any] = {}
    if base is FedAvgM:
        options = {"server_learning_rate": 1.0, "server_momentum": args.server_momentum}
    elif base is FedProx:
        options = {"proximal_mu": args.mu}
    strategy = Recorded(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.min_clients,
                        min_evaluate_clients=0, min_available_clients=args.min_clients, accept_failures=True,
                        on_fit_config_fn=fit_config, evaluate_fn=evaluate if evaluation is not None else None,
                        initial_parameters=ndarrays_to_parameters(final["params"]), **options)
    write_json(status_path, status)
    fl.server.start_server(server_address=args.address, config=fl.server.ServerConfig(num_rounds=args.rounds,
                                                                                      round_timeout=args.round_timeout),
                           strategy=strategy)
    np.savez(out_path, W=final["params"][0], b=final["params"][1])
    status["state"] = "done"
    status["finished"] = time.time()
    write_json(status_path, status)
    return 0


# -- the client -------------------------------------------------------------------------------------------------
def run_client(args: argparse.Namespace) -> int:
    import flwr as fl

    x, y = load_xy(Path(args.data))  # stays here: only parameters and scalar metrics go to the server
    device = args.device
    progress = Path(args.progress) if args.progress else None

    class Client(fl.client.NumPyClient):  # type: ignore[misc]
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return init_params(x.shape[1], args.classes)

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            server_round = int(config.get("round", 0))
            if progress is not None:
                write_json(progress, {"device": device, "fitting": server_round})
            if args.fit_delay > 0:
                time.sleep(args.fit_delay)
            mu = float(config.get("proximal_mu", 0.0))
            params, loss = local_fit(parameters, x, y, epochs=int(config.get("epochs", 1)),
                                     lr=float(config.get("lr", 0.1)), mu=mu, seed=server_round)
            if progress is not None:
                write_json(progress, {"device": device, "fitted": server_round})
            return params, len(x), {"device": device, "loss": loss}

        def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            return 0.0, len(x), {"accuracy": accuracy(parameters, x, y)}

    fl.client.start_client(server_address=args.server, client=Client().to_client(),
                           max_retries=args.retries, max_wait_time=args.retry_wait)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="edgefleet.learn.fl_node")
    sub = top.add_subparsers(dest="role", required=True)
    srv = sub.add_parser("server")
    srv.add_argument("--address", required=True)
    srv.add_argument("--rounds", type=int, default=3)
    srv.add_argument("--strategy", choices=("fedavg", "fedprox"), default="fedavg")
    srv.add_argument("--mu", type=float, default=0.1)
    srv.add_argument("--server-momentum", type=float, default=0.0)
    srv.add_argument("--min-clients", type=int, default=2)
    srv.add_argument("--features", type=int, required=True)
    srv.add_argument("--classes", type=int, required=True)
    srv.add_argument("--local-epochs", type=int, default=1)
    srv.add_argument("--lr", type=float, default=0.1)
    srv.add_argument("--round-timeout", type=float, default=None)
    srv.add_argument("--eval", default=None)
    srv.add_argument("--status", required=True)
    srv.add_argument("--out", required=True)
    cli = sub.add_parser("client")
    cli.add_argument("--server", required=True)
    cli.add_argument("--data", required=True)
    cli.add_argument("--device", required=True)
    cli.add_argument("--classes", type=int, required=True)
    cli.add_argument("--progress", default=None)
    cli.add_argument("--fit-delay", type=float, default=0.0)
    cli.add_argument("--retries", type=int, default=30)
    cli.add_argument("--retry-wait", type=float, default=60.0)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_server(args) if args.role == "server" else run_client(args)


if __name__ == "__main__":
    sys.exit(main())
