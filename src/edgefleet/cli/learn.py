"""``edgefleet monitor ...``, ``edgefleet alert ...`` and ``edgefleet data ...``: monitors after rollout, the fleet
alerts they raise, and field data (hard examples, their labels, datasets made of them) over the REST API."""

from __future__ import annotations

import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.cli.fleet import Json, Server, Token, _api, _emit, _pairs
from edgefleet.errors import ConfigError

monitor_app = typer.Typer(no_args_is_help=True, help="Watch deployed models: drift, accuracy, silence, errors.")
alert_app = typer.Typer(no_args_is_help=True, help="Fleet alerts raised by monitors.")
data_app = typer.Typer(no_args_is_help=True, help="Field data: hard examples from devices, labels, datasets.")


def register(app: typer.Typer) -> None:
    app.add_typer(monitor_app, name="monitor")
    app.add_typer(alert_app, name="alert")
    app.add_typer(data_app, name="data")


# -- monitors ------------------------------------------------------------------------------------------------
@monitor_app.command("create")
def monitor_create(expr: Annotated[str, typer.Argument(help="e.g. 'drift_psi > 0.2 OR silent_for > 15m'")],
                   model: Annotated[str, typer.Option(help="model NAME (every version is watched)")],
                   server: Server = "", token: Token = "",
                   select: Annotated[list[str] | None, typer.Option(help="only devices with tag KEY=VALUE")] = None,
                   webhook: Annotated[str | None, typer.Option(help="POST each alert as JSON to this URL")] = None,
                   pause_rollouts: Annotated[bool, typer.Option(help="firing pauses the model's rollouts")] = False,
                   window: Annotated[float, typer.Option(help="seconds of telemetry judged")] = 300.0,
                   as_json: Json = False) -> None:
    """Watch a model's fleet with a gate expression; it raises an alert while the expression holds."""
    tags = _pairs(select, "--select")
    with _api(server, token) as api:
        row = api.create_monitor(expr, model, select=tags, webhook=webhook, pause_rollouts=pause_rollouts,
                                 window_s=window)
    _emit(row, as_json, f"monitor {row['id']} watches {row['model']}: {row['expr']}")


@monitor_app.command("list")
def monitor_list(server: Server = "", token: Token = "", as_json: Json = False) -> None:
    """Every monitor with its state (ok, firing, unknown) and why."""
    with _api(server, token) as api:
        rows = api.monitors()
    lines = [f"{r['id']}  {r['state']:8}  {r['model']}  {r['expr']}  ({r['explanation']})" for r in rows]
    _emit(rows, as_json, "\n".join(lines) or "no monitors")


@monitor_app.command("delete")
def monitor_delete(monitor_id: Annotated[str, typer.Argument(help="monitor id")], server: Server = "",
                   token: Token = "") -> None:
    """Stop watching; the monitor's open alerts are cleared."""
    with _api(server, token) as api:
        api.delete_monitor(monitor_id)
    typer.echo(f"monitor {monitor_id} deleted")


@alert_app.command("list")
def alert_list(server: Server = "", token: Token = "",
               active: Annotated[bool, typer.Option(help="only alerts not cleared yet")] = False,
               as_json: Json = False) -> None:
    """Fleet alerts, newest first."""
    with _api(server, token) as api:
        rows = api.alerts(active=active)
    lines = [f"{r['id']}  {'FIRING ' if r['active'] else 'cleared'}  {r['model']}  monitor {r['monitor']}: "
             f"{r['explanation']}" for r in rows]
    _emit(rows, as_json, "\n".join(lines) or "no alerts")


# -- field data ----------------------------------------------------------------------------------------------
@data_app.command("examples")
def data_examples(model: Annotated[str, typer.Option(help="model NAME")], server: Server = "", token: Token = "",
                  device: Annotated[str | None, typer.Option(help="only this device's")] = None,
                  labelled: Annotated[bool | None, typer.Option("--labelled/--unlabelled", show_default=False,
                                                                help="only labelled (unlabelled) examples")] = None,
                  as_json: Json = False) -> None:
    """The hard examples devices sent for a model (without their data)."""
    with _api(server, token) as api:
        rows = api.hard_examples(model, device=device, labelled=labelled)
    lines = [f"{r['id']}  {r['model']}  {r['device']}  {r['ts']:.0f}  predicted {r['predicted']} "
             f"({r['confidence']:.2f})  label {_label(r)}" for r in rows]
    _emit(rows, as_json, "\n".join(lines) or "no hard examples")


def _when(text: str | None, option: str) -> float | None:
    """Unix seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"{option} must be unix seconds or an ISO 8601 time, not {text!r}") from exc
    if moment.tzinfo is None:
        from datetime import UTC

        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@data_app.command("label")
def data_label(label: Annotated[str, typer.Argument(help="the ground-truth class")], server: Server = "",
               token: Token = "",
               example: Annotated[int | None, typer.Option(help="one hard example's id")] = None,
               device: Annotated[str | None, typer.Option(help="every hard example this device sent ...")] = None,
               start: Annotated[str | None, typer.Option(help="... from (unix seconds or ISO 8601)")] = None,
               end: Annotated[str | None, typer.Option(help="... until (unix seconds or ISO 8601)")] = None,
               model: Annotated[str | None, typer.Option(help="with --device: only this model's examples")] = None,
               as_json: Json = False) -> None:
    """Post a ground-truth label for one hard example, or for a device's time range."""
    if (example is None) == (device is None):
        raise ConfigError("give --example ID, or --device DEVICE with --start and --end")
    since, until = _when(start, "--start"), _when(end, "--end")
    if device is not None and (since is None or until is None):
        raise ConfigError("--device needs --start and --end")
    with _api(server, token) as api:
        answer = api.label_examples(label, example=example, device=device, start=since, end=until, model=model)
    _emit(answer, as_json, f"labelled {answer['labelled']} hard example(s) {label!r}")


@data_app.command("export")
def data_export(model: Annotated[str, typer.Option(help="model NAME")],
                out: Annotated[Path, typer.Option(help=".npz to write (the format `edgefleet build --data` reads)")],
                server: Server = "", token: Token = "",
                include_upstream: Annotated[bool, typer.Option(
                    help="also the examples labelled only by the upstream model (lower trust; marked in "
                         "test_source)")] = False,
                as_json: Json = False) -> None:
    """Write the model's field data as a dataset: calib_x (every example), test_x/test_y (the labelled ones)."""
    with _api(server, token) as api:
        data, answer = api.export_field_data(model, include_upstream=include_upstream)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    upstream = (f" ({answer['upstream_labelled']} by the upstream model, lower trust)"
                if answer.get("upstream_labelled") else "")
    left = (f"; {answer['upstream_left_out']} with upstream labels only left out (--include-upstream)"
            if answer.get("upstream_left_out") else "")
    _emit({**answer, "out": str(out)}, as_json,
          f"wrote {out}: {answer['examples']} example(s), {answer['labelled']} labelled{upstream}{left}")


def _label(row: dict[str, Any]) -> str:
    """An example's label as listed: the upstream model's marked as such (lower trust)."""
    if row.get("label") is None:
        return "-"
    return f"{row['label']} (upstream)" if row.get("label_trust") == "low" else str(row["label"])
