"""``edgefleet agent``: run the edge agent; ``edgefleet agent status``: what a stopped or running agent holds."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from edgefleet.errors import ConfigError

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
          telemetry_interval: Annotated[float, typer.Option(help="seconds between telemetry batches")] = 2.0,
          upstream: Annotated[str | None, typer.Option(
              help="edgefleet serve-model URL: uncertain windows are escalated to it")] = None,
          escalate_below: Annotated[float | None, typer.Option(
              min=0.0, max=1.0, help="escalate windows under this confidence (default: the manifest's)")] = None,
          escalation_deadline: Annotated[float, typer.Option(
              min=0.001, help="seconds to wait for the upstream answer before using the local one")] = 0.25,
          escalation_rate: Annotated[float, typer.Option(
              min=0.0, help="escalations per second at most (token bucket, burst 5)")] = 1.0,
          ) -> None:
    """Run the edge agent: infer on a sensor stream, report telemetry, apply model updates."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [name for name, value in (("--credentials", credentials), ("--data-dir", data_dir),
                                         ("--source", source)) if value is None]
    if missing:
        raise ConfigError(f"edgefleet agent needs {', '.join(missing)}")
    assert credentials is not None and data_dir is not None and source is not None
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.config import load_config
    from edgefleet.agent.sources import open_source
    from edgefleet.cli import setup_logging

    setup_logging()
    config = load_config(credentials, data_dir, device_id=device_id, server_url=server,
                         telemetry_interval_s=telemetry_interval)
    if upstream is not None and not upstream.startswith(("http://", "https://")):
        raise ConfigError(f"--upstream must be an http(s) URL, got {upstream!r}")
    config = dataclasses.replace(config, upstream_url=upstream, escalate_below=escalate_below,
                                 escalation_deadline_s=escalation_deadline, escalation_rate_per_s=escalation_rate)
    stream = open_source(source)
    device = Agent(config)

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        device.request_stop()
        close = getattr(stream, "close", None)  # an idle source (MQTT) would otherwise wait for its next reading
        if callable(close):
            close()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    device.start()
    try:
        device.run(stream, duration)
    finally:
        device.stop()


@agent_app.command("status")
def status(data_dir: Annotated[Path, typer.Option(help="the agent's state directory")],
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Show the agent's model slots, update state, trusted releases and queued telemetry."""
    from edgefleet.agent.state import AgentState, describe

    if not (data_dir / "agent.db").exists():
        raise ConfigError(f"{data_dir} holds no agent state")
    state = AgentState(data_dir)
    try:
        info = describe(state)
    finally:
        state.close()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        typer.echo(f"{key:>16}: {value}")
