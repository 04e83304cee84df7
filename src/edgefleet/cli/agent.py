"""``edgefleet agent``: run the edge agent; ``edgefleet agent status``: what a stopped or running agent holds.

The status names what runs, not only what the slots hold: ``running`` is the model the agent process holding the
directory runs (null when it runs none, when no agent process holds the directory, or while the one that does
has not yet said what it runs), ``agent_pid`` that process, ``active_expired`` whether its model runs past its
signed expiry, and ``slot_error:<slot>`` why a slot's model did not run at the last start (see
:mod:`edgefleet.agent.restore`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet.errors import ConfigError

if TYPE_CHECKING:
    from edgefleet.agent.lock import LockState
    from edgefleet.agent.state import AgentState

agent_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                        help="Run the edge agent, or inspect its state.")


@agent_app.callback()
def agent(ctx: typer.Context,
          credentials: Annotated[Path | None, typer.Option(help="credentials JSON from provisioning")] = None,
          data_dir: Annotated[Path | None, typer.Option(help="the agent's state directory")] = None,
          source: Annotated[str | None, typer.Option(
              help="npz:PATH?shard=I/N, jsonl:-|PATH, csv:PATH, vibration:?rate=2000&fault=outer_race, "
                   "mqtt://HOST:PORT/TOPIC")] = None,
          server: Annotated[str | None, typer.Option(help="control plane URL (default: from credentials)")] = None,
          device_id: Annotated[str | None, typer.Option(help="must match the credentials")] = None,
          duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
          telemetry_interval: Annotated[float, typer.Option(
              help="seconds between telemetry batches (a short one for demos and tests)")] = 300.0,
          upstream: Annotated[str | None, typer.Option(
              help="edgefleet serve-model URL: uncertain windows are escalated to it")] = None,
          escalate_below: Annotated[float | None, typer.Option(
              min=0.0, max=1.0, help="escalate windows under this confidence (default: the manifest's)")] = None,
          escalation_deadline: Annotated[float, typer.Option(
              min=0.001, help="seconds to wait for the upstream answer before using the local one")] = 0.25,
          escalation_rate: Annotated[float, typer.Option(
              min=0.0, help="escalations per second at most (token bucket, burst 5)")] = 1.0,
          hard_examples_per_hour: Annotated[int, typer.Option(
              min=0, help="low-confidence inputs uplinked per hour at most (field data for retraining)")] = 2,
          local_socket: Annotated[Path | None, typer.Option(
              help="Unix socket on the device: every prediction and alert as JSON (see --local-socket-kind)")] = None,
          local_socket_kind: Annotated[str, typer.Option(
              help="dgram: one JSON object per datagram; stream: JSON lines on a connection")] = "dgram",
          local_mqtt: Annotated[str | None, typer.Option(
              help="a broker on the device, mqtt://HOST:PORT: predictions and alerts on --local-mqtt-topic")] = None,
          local_mqtt_topic: Annotated[str | None, typer.Option(
              help="topic prefix on the local broker: PREFIX/prediction, PREFIX/alert "
                   "(default edgefleet/local/DEVICE)")] = None,
          local_hook: Annotated[Path | None, typer.Option(
              help="executable run per alert with the alert's JSON on stdin")] = None,
          local_hook_rate: Annotated[float, typer.Option(
              min=0.001, help="hook runs per second at most (burst 5)")] = 1.0,
          local_predictions: Annotated[bool, typer.Option(
              help="deliver every prediction locally, not only alerts")] = True,
          ) -> None:
    """Run the edge agent: infer on a sensor stream, report telemetry, apply model updates."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [name for name, value in (("--credentials", credentials), ("--data-dir", data_dir),
                                         ("--source", source)) if value is None]
    if missing:
        raise ConfigError(f"edgefleet agent needs {', '.join(missing)}")
    assert credentials is not None and data_dir is not None and source is not None
    if upstream is not None and not upstream.startswith(("http://", "https://")):
        raise ConfigError(f"--upstream must be an http(s) URL, got {upstream!r}")
    from edgefleet.agent.local_action import LocalActionConfig
    from edgefleet.agent.main import command, main

    local = LocalActionConfig(socket=local_socket, socket_kind=local_socket_kind, mqtt_url=local_mqtt,
                              mqtt_topic=local_mqtt_topic, hook=local_hook, hook_rate_per_s=local_hook_rate,
                              predictions=local_predictions)
    local.check()
    os.environ.update(local.to_environ())  # the agent process (and its re-executions) reads them: agent.config
    argv = command(credentials, data_dir, source, server=server, device_id=device_id, duration=duration,
                   telemetry_interval=telemetry_interval, upstream=upstream, escalate_below=escalate_below,
                   escalation_deadline=escalation_deadline, escalation_rate=escalation_rate,
                   hard_examples_per_hour=hard_examples_per_hour)
    # The agent runs for the device's uptime: it replaces this process (same pid, signals and all) with one
    # that does not hold the CLI's modules (typer, rich) in memory. Without exec, it runs here.
    if os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(argv[0], argv)
    raise typer.Exit(main(argv[3:]))


@agent_app.command("status")
def status(data_dir: Annotated[Path, typer.Option(help="the agent's state directory")],
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Show what the agent runs, its model slots, update state, trusted releases and queued telemetry."""
    from edgefleet.agent.lock import probe
    from edgefleet.agent.state import AgentState, describe

    if not (data_dir / "agent.db").exists():
        raise ConfigError(f"{data_dir} holds no agent state")
    state = AgentState(data_dir)
    try:
        info = {**_running(state, probe(data_dir)), **describe(state)}
    finally:
        state.close()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        typer.echo(f"{key:>16}: {value}")


def _running(state: AgentState, lock: LockState) -> dict[str, Any]:
    """What runs (as the agent recorded it, unless no agent process holds the directory), and the slots' errors."""
    from edgefleet.agent.state import SLOTS

    # None: never run as a process here (an in-process agent): trust the record; else it must be the holder's own
    alive = lock.held is None or (lock.held and state.get("running_pid") == lock.pid)
    errors = {f"slot_error:{name}": error for name in SLOTS if (error := state.get(f"slot_error:{name}"))}
    return {"agent_pid": lock.pid if lock.held else None, "running": state.get("running") if alive else None,
            "active_expired": bool(state.get("active_expired")) if alive else False,
            "time_floor": state.get("time_floor"), **errors}
