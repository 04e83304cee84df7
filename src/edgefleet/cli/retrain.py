"""``edgefleet retrain NAME``: fine-tune on base plus labelled field data, build under the gate, sign the next
version, and optionally push it and start an A/B rollout against the current one (edgefleet.learn.retrain)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet.errors import ConfigError


def retrain(name: Annotated[str, typer.Argument(help="the model to retrain (its registry name)")],
            factory: Annotated[str, typer.Option(help="module:function returning the torch model (it may take "
                                                      "deployed=... to load the deployed version's weights)")],
            key: Annotated[Path, typer.Option(help="signing.key")],
            data: Annotated[Path, typer.Option(help="base .npz: calib_x, test_x, test_y [, train_x, train_y]")],
            field: Annotated[Path | None, typer.Option(help="labelled field data (`edgefleet data export`)")] = None,
            upstream_labels: Annotated[bool, typer.Option(
                help="also train on field rows labelled only by the upstream model (lower trust; never scored)")]
            = False,
            epochs: Annotated[int, typer.Option(min=1, help="fine-tuning epochs")] = 20,
            lr: Annotated[float, typer.Option(min=1e-6, max=10.0, help="fine-tuning learning rate (Adam)")] = 1e-3,
            out: Annotated[Path | None, typer.Option(help="bundle file (default: NAME-VERSION.bundle)")] = None,
            rollout: Annotated[str | None, typer.Option(help="push and start an A/B rollout in these waves: "
                                                          "10%,100%")] = None,
            gate: Annotated[list[str] | None, typer.Option("--gate", help="rollout gate (repeatable)")] = None,
            select: Annotated[list[str] | None, typer.Option(help="rollout: only devices with tag KEY=VALUE")]
            = None,
            window: Annotated[float | None, typer.Option(help="rollout: seconds each wave is judged")] = None,
            min_windows: Annotated[int | None, typer.Option(help="rollout: windows each cohort needs")] = None,
            max_accuracy_drop: Annotated[float | None, typer.Option(help="percentage points")] = None,
            server: Annotated[str, typer.Option("--server", envvar="EDGEFLEET_SERVER", help="control plane URL")]
            = "",
            token: Annotated[str, typer.Option("--token", envvar="EDGEFLEET_TOKEN", help="operator token")]
            = "") -> None:
    """Fine-tune NAME's architecture, build it through the accuracy gate, sign it as the next version (from the
    server's registry) and report accuracy before and after on held-out rows and field examples."""
    from rich.console import Console

    from edgefleet.bundle.pack import write_bundle
    from edgefleet.bundle.signing import load_signing_key
    from edgefleet.cli.fleet import _pairs
    from edgefleet.client import ControlPlane
    from edgefleet.learn.retrain import load_data, next_version, with_bundle
    from edgefleet.learn.retrain import retrain as run

    console = Console(stderr=True)
    if not server or not token:
        raise ConfigError("give the server and operator token: --server/--token or EDGEFLEET_SERVER/EDGEFLEET_TOKEN")
    signing_key = load_signing_key(key)
    rows = load_data(data, field, include_upstream=upstream_labels)
    api = ControlPlane(server, token)
    try:
        previous, version, release = next_version(api.models(), name)
        if previous is not None and previous.sha256:
            previous = with_bundle(previous, api.bundle(previous.sha256))
        console.print(f"{name}: {previous.version if previous else 'none'} -> {version} (release {release}); "
                      f"{len(rows.train_y)} training rows ({rows.field_train} from the field"
                      f"{_upstream_note(rows.field_upstream, rows.upstream_left_out)})", highlight=False)
        result = run(factory, rows, name=name, previous=previous, version=version, release=release,
                     key=signing_key, epochs=epochs, lr=lr, max_accuracy_drop=max_accuracy_drop,
                     progress=lambda msg: console.print(f"[dim]{msg}[/dim]", highlight=False))
        path = out or Path(f"{name}-{version}.bundle")
        write_bundle(path, result.built.bundle)
        for part in result.after:
            typer.echo(f"{part} accuracy: {result.before[part]:.3f} -> {result.after[part]:.3f}")
        if rows.field_upstream:
            typer.echo(f"trained on {rows.field_upstream} field row(s) labelled by the upstream model (lower trust, "
                       "not scored)")
        typer.echo(f"{result.built.ref} release {release} -> {path}")
        if rollout is not None:
            api.push_model(result.built.bundle)
            started = api.create_rollout(result.built.ref, waves=[w.strip() for w in rollout.split(",")],
                                         gates=[{"expr": g, "action": "abort"} for g in gate or []], mode="ab",
                                         select=_pairs(select, "--select"), window_s=window, min_windows=min_windows)
            typer.echo(f"rollout {started['id']}: {result.built.ref} against "
                       f"{previous.version if previous else 'nothing'}, {started['phase']}")
    finally:
        api.close()


def _upstream_note(used: int, left_out: int) -> str:
    if used:
        return f", {used} of them labelled by the upstream model: lower trust"
    if left_out:
        return f"; {left_out} labelled only by the upstream model left out: --upstream-labels to use them"
    return ""


def register(app: typer.Typer) -> None:
    """Add ``retrain`` to the edgefleet command."""
    app.command("retrain")(retrain)
