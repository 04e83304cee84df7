"""``edgefleet twin``: run N digital twins (the real agent code on virtual sensors, networks and disks, from a
scenario file) against a server and its broker, as devices; they are revoked when the command ends."""

from __future__ import annotations

import json
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from edgefleet.cli.fleet import Json, Server, Token, _api


def twin(scenario: Annotated[Path, typer.Option(help="scenario YAML: data, variation, faults (see edgefleet.twin."
                                                     "scenario)")],
         devices: Annotated[int, typer.Option(min=1, max=100_000, help="how many twins")] = 10,
         duration: Annotated[float | None, typer.Option(min=1, help="seconds to run (default: until Ctrl-C)")] = None,
         workdir: Annotated[Path | None, typer.Option(help="credentials, data directories, logs (default: a temp "
                                                           "dir)")] = None,
         keep: Annotated[bool, typer.Option("--keep", help="do not revoke the twins at the end")] = False,
         server: Server = "", token: Token = "", as_json: Json = False) -> None:
    """Run twins of devices (tagged twin=RUN: no real rollout or device list includes them)."""
    from edgefleet.twin.fleet import TwinFleet
    from edgefleet.twin.scenario import load_scenario

    plan = load_scenario(scenario)
    root = workdir or Path(tempfile.mkdtemp(prefix="edgefleet-twin-"))
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with _api(server, token) as api:
        fleet = TwinFleet(api, root, plan)
        try:
            fleet.provision(devices)
            start_s = fleet.start()
            typer.echo(f"{devices} twin(s) started in {start_s:.1f} s (tag twin={fleet.run_id}, files in {root})",
                       err=True)
            started = time.monotonic()
            while not stop.wait(1.0):
                if duration is not None and time.monotonic() - started >= duration:
                    break
                if not any(h.running for h in fleet.hosts):
                    break
            running = fleet.running()
        finally:
            fleet.close(keep=keep)
    summary = {"twins": devices, "run": fleet.run_id, "running": running, "revoked": not keep, "workdir": str(root)}
    ending = "kept" if keep else "revoked"
    typer.echo(json.dumps(summary, indent=2, sort_keys=True) if as_json
               else f"{running} of {devices} twin(s) ran a model; {ending} (twin={fleet.run_id})")


def register(app: typer.Typer) -> None:
    app.command("twin")(twin)
