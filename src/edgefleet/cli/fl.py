"""``edgefleet fl serve|client|status``: federated learning on Flower (the ``fl`` extra, see edgefleet.learn.fl)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

fl_app = typer.Typer(no_args_is_help=True, help="Federated learning on Flower: the data stays on the devices.")


@fl_app.command("serve")
def fl_serve(state_dir: Annotated[Path, typer.Option(help="status, log and final global parameters")],
             features: Annotated[int, typer.Option(min=1, help="inputs per sample (flattened)")],
             classes: Annotated[int, typer.Option(min=2, help="number of classes")],
             key: Annotated[Path, typer.Option(help="signing.key for the final global model")],
             out: Annotated[Path, typer.Option(help="bundle file to write")],
             name: Annotated[str, typer.Option(help="model name in the bundle")] = "fl-global",
             version: Annotated[str, typer.Option(help="semantic version")] = "1.0.0",
             release: Annotated[int, typer.Option(help="monotonic release counter")] = 1,
             address: Annotated[str, typer.Option(help="HOST:PORT the Flower server listens on")] = "127.0.0.1:8088",
             rounds: Annotated[int, typer.Option(min=1, help="federated rounds")] = 3,
             strategy: Annotated[str, typer.Option(help="fedavg, or fedprox for non-IID data")] = "fedavg",
             mu: Annotated[float, typer.Option(min=0, help="FedProx proximal term")] = 0.1,
             server_momentum: Annotated[float, typer.Option(help="server momentum (FedAvgM) in [0, 1); 0.9 "
                                                            "helps on non-IID shards")] = 0.0,
             min_clients: Annotated[int, typer.Option(min=1, help="clients a round needs (the others may fail)")]
             = 2,
             local_epochs: Annotated[int, typer.Option(min=1, help="client epochs per round")] = 1,
             lr: Annotated[float, typer.Option(help="client learning rate")] = 0.1,
             eval_data: Annotated[Path | None, typer.Option("--eval", help=".npz with test_x/test_y the server "
                                                             "scores each round on")] = None) -> None:
    """Run the Flower server (FedAvg or FedProx) for ROUNDS and sign the final global model as a bundle."""
    from rich.console import Console

    from edgefleet.bundle.pack import BundleSpec, pack_bundle, write_bundle
    from edgefleet.bundle.signing import load_signing_key
    from edgefleet.cli.build import check_name_version
    from edgefleet.learn.fl import ServeSettings, global_accuracy, global_model_onnx, serve

    console = Console(stderr=True)
    check_name_version(name, version)
    signing_key = load_signing_key(key)
    settings = ServeSettings(state_dir=state_dir, features=features, classes=classes, address=address,
                             rounds=rounds, strategy=strategy, mu=mu, server_momentum=server_momentum,
                             min_clients=min_clients,
                             local_epochs=local_epochs, lr=lr, eval_data=eval_data)

    def shown(entry: dict[str, Any]) -> None:
        acc = f", accuracy {entry['accuracy']:.3f}" if "accuracy" in entry else ""
        console.print(f"round {entry['round']}/{rounds}: {entry['clients']} client(s), "
                      f"{entry['failures']} failure(s){acc}", highlight=False)

    params = serve(settings, on_round=shown)
    model = global_model_onnx(params)
    metrics = {"accuracy": global_accuracy(model, eval_data)} if eval_data is not None else {}
    bundle = pack_bundle(model, signing_key, BundleSpec(name=name, version=version, release=release,
                                                        metrics=metrics))
    write_bundle(out, bundle)
    momentum = f" (server momentum {server_momentum:g})" if server_momentum else ""
    typer.echo(f"{name}@{version} after {rounds} {strategy}{momentum} round(s) -> {out} ({len(bundle)} bytes)")


@fl_app.command("client")
def fl_client(server: Annotated[str, typer.Option(help="the Flower server's HOST:PORT")],
              data: Annotated[Path, typer.Option(help="local .npz (train_x/train_y or test_x/test_y): it stays here")],
              credentials: Annotated[Path, typer.Option(help="the device's credentials file (its identity)")],
              classes: Annotated[int, typer.Option(min=2, help="number of classes")]) -> None:
    """Train locally beside the agent in each round; only parameters and scalar metrics leave the device."""
    from edgefleet.errors import TransportError
    from edgefleet.learn.fl import ClientSettings, device_identity, run_client

    code = run_client(ClientSettings(server=server, data=data, device=device_identity(credentials), classes=classes))
    if code != 0:
        raise TransportError(f"the Flower client ended with exit code {code}")


@fl_app.command("status")
def fl_status(state_dir: Annotated[Path, typer.Argument(help="the server's --state-dir")],
              as_json: Annotated[bool, typer.Option("--json", help="print the status file")] = False) -> None:
    """The federated run's rounds: clients, failures, bytes received, accuracy."""
    from edgefleet.learn.fl import read_status

    status = read_status(state_dir)
    if as_json:
        typer.echo(json.dumps(status, indent=2, sort_keys=True))
        return
    typer.echo(f"{status.get('strategy')} {status.get('state')}: {len(status.get('rounds', []))}/"
               f"{status.get('rounds_total')} round(s)")
    for entry in status.get("rounds", []):
        sent = sum(r.get("parameter_bytes", 0) for r in entry.get("received", []))
        acc = f" accuracy {entry['accuracy']:.3f}" if "accuracy" in entry else ""
        typer.echo(f"  round {entry['round']}: {entry['clients']} client(s), {entry['failures']} failure(s), "
                   f"{sent} B of parameters{acc}")


def register(app: typer.Typer) -> None:
    """Add ``fl`` to the edgefleet command."""
    app.add_typer(fl_app, name="fl")
