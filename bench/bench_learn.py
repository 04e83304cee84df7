"""The learning loop's benchmark (E8): retraining on drifted devices, and federated learning on Flower.

1. Retraining on drift. A 1D-CNN (the benchmarks' BasicMotions model: 40-sample windows, ~3.5k parameters) is
   trained on clean BasicMotions; the devices' sensors then drift (per channel: gain x0.5-1.5, an offset of up to
   1.5 training standard deviations, noise of 0.2 of one). The drifted test recordings are split by recording:
   half are the field (the windows devices uplink, of which a share is labelled), half are the evaluation devices.
   One `retrain` (edgefleet.learn.retrain: fine-tune from the deployed weights, build through the accuracy gate,
   sign) with 2% of the field windows labelled, and the upper bound with all of them labelled. Accuracy is the
   shipped model's (the bundle's chosen model, or version 1's float model) through ONNX Runtime, the agent's
   runtime, on the evaluation devices' windows (hop 5, the agent's) after the manifest's input step: the
   on-device computation, run in this process rather than through agents.
2. Federated learning. sklearn's digits (8x8, 10 classes), 70/30 split; 10 clients with non-IID shards (client i
   holds half of class i and half of class i+1). `edgefleet fl` (Flower 1.42 in .venv-fl: one server, ten client
   processes on loopback) runs 20 rounds of FedAvg and of FedProx (mu 0.1), tuned (2 local epochs, lr 0.5,
   server momentum 0.9: FedAvgM) and at `fl serve`'s defaults (1 epoch, lr 0.1, no momentum); centralised
   training on the union is the anchor (the same softmax regression and SGD, 50 epochs). The clients reach the
   server through a TCP proxy that counts and keeps what they send: bytes per client per round are the wire
   bytes both ways; raw bytes uplinked are the bytes of training samples (float32, as the clients hold them)
   found anywhere in what the clients sent.

Run: ``make bench-learn`` (``python -m bench.bench_learn``); ``EDGEFLEET_FL_PYTHON`` or ``.venv-fl`` gives Flower.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, markdown_table, publish
from edgefleet.testing.counting_proxy import CountingProxy

WINDOW, HOP, TRAIN_HOP = 40, 5, 2
LABELLED_SHARE = 0.02
LABEL_SEEDS = (0, 1, 2)
RETRAIN_EPOCHS = 20
FL_CLIENTS, FL_ROUNDS, FL_TARGET_POINTS = 10, 20, 0.02
FL_DEFAULTS: dict[str, float] = {"local_epochs": 1, "lr": 0.1, "server_momentum": 0.0}
"""`edgefleet fl serve`'s defaults: the figure a user meets without tuning."""
FL_TUNED: dict[str, float] = {"local_epochs": 2, "lr": 0.5, "server_momentum": 0.9}
"""`--local-epochs 2 --lr 0.5 --server-momentum 0.9`: FedAvgM's server momentum for non-IID shards."""
CENTRAL_EPOCHS = 50
DEPLOYED: dict[str, Any] = {}
"""Version 1's trained weights, which the factory loads when retrain gives it the deployed version."""


# -- 1. retraining on drift ----------------------------------------------------------------------------------
def cnn(deployed: Any = None) -> Any:
    """The retrain factory: the benchmarks' 1D-CNN, with version 1's weights when given the deployed version."""
    from edgefleet.build.train import _cnn1d

    net = _cnn1d(6, 4)
    if deployed is not None and "state" in DEPLOYED:
        net.load_state_dict(DEPLOYED["state"])
    return net


def drift(x: np.ndarray, std: np.ndarray, seed: int = 7) -> np.ndarray:
    """Sensors after drift: per channel a gain of 0.5-1.5, an offset of up to 1.5 std, noise of 0.2 std."""
    rng = np.random.default_rng(seed)
    channels = x.shape[1]
    gain = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    offset = (rng.uniform(-1.5, 1.5, channels) * std).astype(np.float32)
    noise = rng.normal(0.0, 1.0, x.shape).astype(np.float32) * (0.2 * std)[None, :, None]
    out: np.ndarray = (x * gain[None, :, None] + offset[None, :, None] + noise).astype(np.float32)
    return out


def retrain_bench(work: Path) -> dict[str, Any]:
    import torch

    from edgefleet.build.evaluate import accuracy
    from edgefleet.build.io_pipeline import model_input
    from edgefleet.build.train import export_onnx, train_cnn1d
    from edgefleet.bundle.signing import SigningKey
    from edgefleet.data.basicmotions import load_basicmotions
    from edgefleet.data.windows import channel_stats, sliding_windows
    from edgefleet.learn.retrain import Deployed, load_data, retrain
    from edgefleet.runtime.inputs import input_step

    rec = load_basicmotions()
    mean, std = channel_stats(rec.train_x)
    preprocess = {"kind": "sliding_window", "channels": 6, "window": WINDOW, "hop": HOP,
                  "sample_rate_hz": float(rec.sample_rate_hz), "mean": [float(v) for v in mean],
                  "std": [float(v) for v in std]}
    step = input_step(preprocess)
    train_x, train_y = sliding_windows(rec.train_x, rec.train_y, WINDOW, TRAIN_HOP)  # raw readings
    test_x, test_y = sliding_windows(rec.test_x, rec.test_y, WINDOW, HOP)
    started = time.perf_counter()
    net = train_cnn1d(model_input(step, train_x), train_y, len(rec.labels), epochs=60, seed=0)
    DEPLOYED["state"] = {k: v.clone() for k, v in net.state_dict().items()}
    v1 = export_onnx(net, 6, WINDOW)
    train_s = time.perf_counter() - started

    drifted = drift(rec.test_x, std)
    field_recs = np.concatenate([np.flatnonzero(rec.test_y == c)[::2] for c in range(len(rec.labels))])
    eval_recs = np.setdiff1d(np.arange(len(rec.test_y)), field_recs)
    field_x, field_y = sliding_windows(drifted[field_recs], rec.test_y[field_recs], WINDOW, HOP)
    eval_x, eval_y = sliding_windows(drifted[eval_recs], rec.test_y[eval_recs], WINDOW, HOP)
    clean_eval_x, clean_eval_y = sliding_windows(rec.test_x[eval_recs], rec.test_y[eval_recs], WINDOW, HOP)

    def device_accuracy(model: bytes) -> float:
        return accuracy(model, model_input(step, eval_x), eval_y)

    def clean_accuracy(model: bytes) -> float:
        return accuracy(model, model_input(step, clean_eval_x), clean_eval_y)

    base = work / "base.npz"
    np.savez(base, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, calib_x=train_x[::10],
             labels=np.array(rec.labels))
    deployed = Deployed(name="motion", version="1.0.0", release=1, model=v1,
                        manifest={"preprocess": preprocess, "labels": list(rec.labels)})
    key = SigningKey.generate()
    runs: list[dict[str, Any]] = []
    for seed, share in [(s, LABELLED_SHARE) for s in LABEL_SEEDS] + [(0, 1.0)]:
        rng = np.random.default_rng(seed)
        n = max(1, round(len(field_y) * share))
        pick = np.sort(rng.choice(len(field_y), size=n, replace=False))
        field = work / f"field-{seed}-{n}.npz"
        np.savez(field, calib_x=field_x[pick], test_x=field_x[pick], test_y=field_y[pick],
                 test_source=np.array(["range"] * n), labels=np.array(rec.labels))
        data = load_data(base, field, seed=seed)
        torch.manual_seed(seed)
        started = time.perf_counter()
        result = retrain(f"{__name__}:cnn", data, name="motion", previous=deployed, version="1.0.1", release=2,
                         key=key, epochs=RETRAIN_EPOCHS, show=False)
        shipped = result.built.chosen.model
        assert shipped is not None
        runs.append({"labelled": n, "share": share, "seed": seed, "field_train": data.field_train,
                     "after": device_accuracy(shipped), "after_clean": clean_accuracy(shipped),
                     "pass": result.built.chosen.label, "retrain_s": time.perf_counter() - started})
        print(f"retrain with {n} labelled field windows (seed {seed}): {runs[-1]}", flush=True)
    few = [r for r in runs if r["share"] == LABELLED_SHARE]
    return {"retrain_acc_before": device_accuracy(v1), "retrain_acc_before_clean": clean_accuracy(v1),
            "retrain_acc_after": float(np.median([r["after"] for r in few])),
            "retrain_acc_after_runs": [r["after"] for r in few],
            "retrain_acc_all_labels": runs[-1]["after"], "retrain_runs": runs,
            "retrain_field_windows": len(field_y), "retrain_eval_windows": len(eval_y),
            "retrain_labelled_windows": few[0]["labelled"], "retrain_v1_train_s": train_s}


# -- 2. federated learning -----------------------------------------------------------------------------------
class CapturingProxy(CountingProxy):
    """A CountingProxy that also keeps every byte the clients sent."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(upstream)
        self.sent = bytearray()

    def _pipe(self, source: Any, sink: Any, up: bool) -> None:
        if not up:
            super()._pipe(source, sink, up)
            return
        import contextlib

        source.settimeout(None)
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                with self._lock:
                    self.upstream_bytes += len(data)
                    self.sent += data
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(2)
                sock.close()


def fl_python() -> str | None:
    chosen = os.environ.get("EDGEFLEET_FL_PYTHON")
    if chosen:
        return chosen
    local = ROOT / ".venv-fl" / "bin" / "python"
    return str(local) if local.exists() else None


def digits_shards(work: Path) -> tuple[list[Path], Path, np.ndarray, np.ndarray, list[np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    cut = int(len(y) * 0.7)
    train, test = order[:cut], order[cut:]
    np.savez(work / "eval.npz", test_x=x[test], test_y=y[test])
    halves: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for c in range(10):
        idx = train[y[train] == c]
        halves[c] = (idx[: len(idx) // 2], idx[len(idx) // 2:])
    paths, shards = [], []
    for i in range(FL_CLIENTS):
        idx = np.concatenate([halves[i % 10][0], halves[(i + 1) % 10][1]])
        path = work / f"shard{i}.npz"
        np.savez(path, train_x=x[idx], train_y=y[idx])
        paths.append(path)
        shards.append(x[idx])
    return paths, work / "eval.npz", x[train], y[train], shards


def fl_run(strategy: str, work: Path, shards: list[Path], eval_file: Path, samples: list[np.ndarray],
           python: str, options: dict[str, float]) -> dict[str, Any]:
    from edgefleet.learn.fl import ClientSettings, ServeSettings, client_command, node_env, read_status, serve
    from edgefleet.transport.ports import free_port

    port = free_port()
    state = work / f"fl-{strategy}-{options['server_momentum']}"
    settings = ServeSettings(state_dir=state, features=64, classes=10, address=f"127.0.0.1:{port}",
                             rounds=FL_ROUNDS, strategy=strategy, mu=0.1, min_clients=FL_CLIENTS,
                             local_epochs=int(options["local_epochs"]), lr=options["lr"],
                             server_momentum=options["server_momentum"], eval_data=eval_file)
    env = {**node_env(), "EDGEFLEET_FL_PYTHON": python}
    os.environ["EDGEFLEET_FL_PYTHON"] = python
    proxy = CapturingProxy(("127.0.0.1", port)).start()
    clients: list[subprocess.Popen[bytes]] = []
    failure: list[BaseException] = []
    started = time.perf_counter()

    def server() -> None:
        try:
            serve(settings, timeout_s=900)
        except BaseException as exc:  # reported below
            failure.append(exc)

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    try:
        for i, shard in enumerate(shards):
            argv = client_command(ClientSettings(server=f"127.0.0.1:{proxy.port}", data=shard, device=f"dev-{i}",
                                                 classes=10))
            clients.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        thread.join(timeout=960)
    finally:
        for proc in clients:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proxy.close()
    if failure or thread.is_alive():
        raise RuntimeError(f"the {strategy} run failed: {failure[0] if failure else 'timed out'}")
    elapsed = time.perf_counter() - started
    status = read_status(state)
    rounds = status["rounds"]
    up, down = proxy.counts()
    sent = bytes(proxy.sent)
    leaked = sum(len(row.tobytes()) for shard in samples for row in shard if row.tobytes() in sent)
    payload = [r["parameter_bytes"] for entry in rounds for r in entry["received"]]
    return {"accuracy_by_round": [entry["accuracy"] for entry in rounds], "final_accuracy": rounds[-1]["accuracy"],
            "clients_per_round": [entry["clients"] for entry in rounds], "wire_up_bytes": up,
            "wire_down_bytes": down, "bytes_per_client_round": (up + down) / (FL_CLIENTS * len(rounds)),
            "up_bytes_per_client_round": up / (FL_CLIENTS * len(rounds)),
            "parameter_bytes_per_client_round": float(np.mean(payload)), "raw_bytes_uplinked": leaked,
            "samples_checked": sum(len(s) for s in samples), "seconds": elapsed}


def fl_bench(work: Path) -> dict[str, Any]:
    from edgefleet.learn.fl_node import accuracy, init_params, load_xy, local_fit

    python = fl_python()
    if python is None:
        raise SystemExit("the FL part needs Flower: make .venv-fl/.installed (or set EDGEFLEET_FL_PYTHON)")
    shards, eval_file, union_x, union_y, samples = digits_shards(work)
    params, _ = local_fit(init_params(64, 10), union_x, union_y, epochs=CENTRAL_EPOCHS, lr=0.1, mu=0.0)
    test_x, test_y = load_xy(eval_file)
    central = accuracy(params, test_x, test_y)
    print(f"centralised: {central:.4f}", flush=True)
    out: dict[str, Any] = {"fl_centralised_acc": central, "fl_clients": FL_CLIENTS, "fl_rounds_run": FL_ROUNDS,
                           "fl_settings_tuned": FL_TUNED, "fl_settings_defaults": FL_DEFAULTS}
    for suffix, options in (("", FL_TUNED), ("_defaults", FL_DEFAULTS)):
        for strategy in ("fedavg", "fedprox"):
            run = fl_run(strategy, work, shards, eval_file, samples, python, options)
            reached = [i + 1 for i, acc in enumerate(run["accuracy_by_round"]) if acc >= central - FL_TARGET_POINTS]
            run["rounds_to_target"] = reached[0] if reached else None
            out[f"fl_{strategy}{suffix}"] = run
            out[f"fl_{strategy}{suffix}_acc"] = run["final_accuracy"]
            print(f"{strategy}{suffix} {options}: {run['final_accuracy']:.4f} after {FL_ROUNDS} rounds, within 2 "
                  f"points at round {run['rounds_to_target']}, {run['bytes_per_client_round']:.0f} B per client "
                  "per round", flush=True)
    runs = [out[f"fl_{s}{x}"] for s in ("fedavg", "fedprox") for x in ("", "_defaults")]
    to_target = [out[f"fl_{s}"]["rounds_to_target"] for s in ("fedavg", "fedprox")]
    out["fl_rounds"] = min((r for r in to_target if r is not None), default=None)
    to_target_defaults = [out[f"fl_{s}_defaults"]["rounds_to_target"] for s in ("fedavg", "fedprox")]
    out["fl_rounds_defaults"] = min((r for r in to_target_defaults if r is not None), default=None)
    out["fl_bytes_per_client_round"] = out["fl_fedavg"]["bytes_per_client_round"]
    out["fl_raw_bytes_uplinked"] = sum(run["raw_bytes_uplinked"] for run in runs)
    # the detector's positive control: the same search finds every sample in the shard files that hold them
    files = b"".join(path.read_bytes() for path in shards)
    out["fl_raw_detector_control"] = sum(row.tobytes() in files for shard in samples for row in shard) / sum(
        len(s) for s in samples)
    return out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-learn-") as tmp:
        work = Path(tmp)
        load = os.getloadavg()[0]
        result = {**retrain_bench(work), **fl_bench(work)}
    result["load_avg_at_start"] = load
    fa = result["fl_fedavg"]
    retrain_rows = [
        ["version 1 (clean training), drifted devices", f"{result['retrain_acc_before']:.3f}",
         f"{result['retrain_acc_before_clean']:.3f}", "-"],
        *[[f"retrain, {r['labelled']} field windows labelled ({r['share']:.0%}, seed {r['seed']})",
           f"{r['after']:.3f}", f"{r['after_clean']:.3f}", r["pass"]] for r in result["retrain_runs"]],
    ]
    fl_rows = [["centralised (union, 50 epochs)", f"{result['fl_centralised_acc']:.3f}", "-", "-", "-", "-"]]
    for key, name in (("fl_fedavg", "FedAvg + server momentum 0.9 (FedAvgM)"),
                      ("fl_fedprox", "FedProx (mu 0.1) + server momentum 0.9"),
                      ("fl_fedavg_defaults", "FedAvg, `fl serve` defaults"),
                      ("fl_fedprox_defaults", "FedProx (mu 0.1), `fl serve` defaults")):
        run = result[key]
        fl_rows.append([name, f"{run['final_accuracy']:.3f}", str(run["rounds_to_target"] or f"> {FL_ROUNDS}"),
                        f"{run['bytes_per_client_round']:.0f}", f"{run['parameter_bytes_per_client_round']:.0f}",
                        str(run["raw_bytes_uplinked"])])
    met = result["fl_rounds"] is not None
    section = f"""
Retraining on drift: BasicMotions, the benchmarks' 1D-CNN; the devices' sensors drift (gain, offset, noise).
{result['retrain_field_windows']} field windows (half the drifted test recordings), of which 2% labelled
({result['retrain_labelled_windows']} windows, three draws) or all; accuracy on the other
{result['retrain_eval_windows']} windows (the evaluation devices), shipped model through ONNX Runtime after the
manifest's input step (the agent's computation, run in-process, not through agents).

{markdown_table(["model", "accuracy, drifted devices", "accuracy, clean", "shipped pass"], retrain_rows)}

retrain_acc_before {result['retrain_acc_before']:.3f}, retrain_acc_after {result['retrain_acc_after']:.3f}
(median of the three 2% draws), retrain_acc_all_labels {result['retrain_acc_all_labels']:.3f}.

Federated: digits, {FL_CLIENTS} Flower clients (real processes, loopback, through a counting proxy) with non-IID
shards (2 classes each), {FL_ROUNDS} rounds. Tuned: `--local-epochs 2 --lr 0.5 --server-momentum 0.9` (Flower's
FedAvgM aggregation; FedProx keeps its proximal term on the clients). Defaults (the field figure, what `fl serve`
does untuned): 1 local epoch, lr 0.1, no server momentum. Target: within 2 points of centralised in <= 20 rounds:
{'met' if met else 'NOT met'} tuned (fl_rounds = {result['fl_rounds']}), {'met' if result['fl_rounds_defaults']
else 'not met'} at the defaults (fl_rounds_defaults = {result['fl_rounds_defaults']}). Bytes per client per round: wire
bytes both ways through the proxy (gRPC framing included) / parameter payload the server received. Raw bytes
uplinked: training samples' float32 bytes found in everything the clients sent ({fa['samples_checked']} samples
checked per run; the same search finds {result['fl_raw_detector_control']:.0%} of them in the shard files).

{markdown_table(["training", "accuracy", "rounds to within 2 points", "B/client/round (wire)",
                 "B/client/round (parameters)", "raw bytes uplinked"], fl_rows)}

The machine was shared (load average {load:.1f} on 2 cores at the start): times are not comparable; the
accuracies and byte counts are.
"""
    publish("learn", result, section)


if __name__ == "__main__":
    sys.exit(main())
