"""The ``edgefleet`` command: the full CLI where the ``cli`` extra (typer, rich) is installed, else the device's.

``pip install edgefleet`` is a device's install: the agent, bundle verification, ONNX Runtime and the MQTT client,
without the CLI toolkit (typer brings rich and pygments: about 13 MB, a tenth of what the device installs). There
``edgefleet`` still runs everything a device runs:

    edgefleet agent --credentials C --data-dir D --source S [options]   the agent (``edgefleet.agent.main``), with
                                                                        the local-action flags (--local-*)
    edgefleet agent status --data-dir D [--json]                        what the agent runs, its slots and outbox

and any other command answers in one line which extra it needs (exit 2). ``pip install 'edgefleet[cli]'`` (or any
of ``[server]``, ``[build]``) gives the full CLI, which this module hands over to unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = """usage: edgefleet agent --credentials FILE --data-dir DIR --source SOURCE [options]
       edgefleet agent status --data-dir DIR [--json]

This is a device's install (pip install edgefleet). Every other command, and --help for each, comes with the
full CLI: pip install 'edgefleet[cli]'."""


def main() -> None:
    """Console entry point."""
    if all(importlib.util.find_spec(name) is not None for name in ("typer", "rich")):
        from edgefleet.cli import main as full_cli

        full_cli()
        return
    sys.exit(device_main(sys.argv[1:]))


def device_main(argv: Sequence[str]) -> int:
    """The device's commands without the CLI toolkit; one line on stderr and exit 2 for anything else."""
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args[0] != "agent":
        extras = ",".join(_command_extras().get(args[0], ("cli",)))  # server and build bring the CLI too
        print(f"edgefleet: error: `edgefleet {args[0]}` needs the [{extras}] extra (this is a device's install): "
              f"pip install 'edgefleet[{extras}]'", file=sys.stderr)
        return 2
    if args[1:2] == ["status"]:
        return _status(args[2:])
    if any(a in ("-h", "--help") for a in args[1:]):
        print(USAGE)
        return 0
    try:
        rest = _local_action_flags(args[1:])
    except ValueError as exc:
        print(f"edgefleet: error: {exc}", file=sys.stderr)
        return 2
    from edgefleet.agent.main import command

    # the same process image `edgefleet agent` gives: the lean agent entry, by exec (see edgefleet.cli.agent)
    lean = command(Path("."), Path("."), "")[:3]
    if os.name == "posix":
        sys.stdout.flush()
        os.execv(lean[0], [*lean, *rest])
    from edgefleet.agent.main import main as agent_main

    return agent_main(rest)


def _command_extras() -> dict[str, tuple[str, ...]]:
    """``edgefleet.cli.extras.COMMAND_EXTRAS``, read from its file: importing it through the ``edgefleet.cli``
    package would run that package's ``__init__``, which needs typer."""
    spec = importlib.util.spec_from_file_location("edgefleet_cli_extras", Path(__file__).parent / "cli" / "extras.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table: dict[str, tuple[str, ...]] = module.COMMAND_EXTRAS
    return table


def _local_action_flags(args: list[str]) -> list[str]:
    """Take the --local-* flags out of ``args`` into the environment the agent reads (``LOCAL_ENV``)."""
    from edgefleet.agent.local_action import LOCAL_ENV

    by_flag = {flag: name for name, (_field, flag) in LOCAL_ENV.items()}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, _, inline = arg.partition("=")
        if flag == "--local-predictions" or flag == "--no-local-predictions":
            name = next(n for n, (f, _) in LOCAL_ENV.items() if f == "predictions")
            os.environ[name] = "1" if flag == "--local-predictions" else "0"
        elif flag in by_flag:
            if not inline:
                if i + 1 >= len(args):
                    raise ValueError(f"{flag} needs a value")
                i += 1
                inline = args[i]
            os.environ[by_flag[flag]] = inline
        else:
            rest.append(arg)
        i += 1
    return rest


def _status(args: list[str]) -> int:
    as_json = "--json" in args
    rest = [a for a in args if a != "--json"]
    if len(rest) != 2 or rest[0] != "--data-dir":
        print("edgefleet: error: edgefleet agent status needs --data-dir DIR [--json]", file=sys.stderr)
        return 2
    data_dir = Path(rest[1])
    if not (data_dir / "agent.db").exists():
        print(f"edgefleet: error: {data_dir} holds no agent state", file=sys.stderr)
        return 2
    from edgefleet.agent.state import AgentState, describe

    state = AgentState(data_dir)
    try:
        info = describe(state)
    finally:
        state.close()
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>16}: {value}")
    return 0
