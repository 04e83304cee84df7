"""The agent process: ``python -m edgefleet.agent --credentials C --data-dir D --source S [options]``.

``edgefleet agent`` parses and checks its options, then replaces itself (``exec``, same process id) with this
entry, which imports only what the running agent needs: not typer, rich, pydantic, ``cryptography`` or
``onnx``, whose memory would otherwise stay resident for the device's whole uptime; nor OpenSSL, unless its
configuration speaks TLS or until it opens an HTTP client (:mod:`edgefleet.agent.lean`). The options are those of
``edgefleet agent``; an error is one line on stderr and the project's exit code, as the CLI prints them.

Before anything else the process locks its data directory for its whole life (:mod:`edgefleet.agent.lock`): a
second agent on the same directory exits at once (exit code 2) with one line naming the directory and the pid
of the agent that holds it.

Staying lean through updates: an update is downloaded (httpx), verified (``cryptography``, pydantic, ``onnx``)
and health-checked in this process, and what those imports take stays resident for the process's life (about
40 MiB, twice the agent's own footprint over a bare ONNX Runtime process). So once the updater is idle again (no
pending target, its step ``idle``: the new model active, or the update refused) and one of :data:`UPDATE_MODULES`
is loaded, the sensor loop ends at its next block (within :data:`edgefleet.agent.agent.RESTART_CHECK_S`), the
agent stops as it always does (the outbox drained, the last batch queued, the state closed, the lock released)
and the process executes itself again: same pid, same options, the rest of ``--duration`` if one was given. The
new image loads only what a fresh start loads (the kept models re-verified in a child process, see
:mod:`edgefleet.agent.verify`), reconnects with the same MQTT session and re-opens its source. Everything that
matters is durable in the SQLite state, so nothing is lost; a replay (``npz:``) starts again at its first row
(a live sensor simply goes on); the wire byte counts are carried over (``EDGEFLEET_WIRE_CARRY``). A stop
requested meanwhile (SIGTERM, SIGINT; blocked over the exec, taken once the new image handles them) ends
the process instead. ``EDGEFLEET_AGENT_REEXEC=0`` turns this off.
The first start, which makes the device's key pair (``cryptography``), is followed by one such restart too; an
image that finds those modules loaded right after a re-exec does not try again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from edgefleet.agent import lean
from edgefleet.agent.config import DEFAULT_HARD_EXAMPLES_PER_HOUR, DEFAULT_TELEMETRY_INTERVAL_S
from edgefleet.agent.lock import DataDirLock
from edgefleet.errors import ConfigError, EdgefleetError

if TYPE_CHECKING:
    from edgefleet.agent.state import AgentState

_OPTIONS: dict[str, tuple[str, type]] = {
    "--credentials": ("credentials", Path), "--data-dir": ("data_dir", Path), "--source": ("source", str),
    "--server": ("server", str), "--device-id": ("device_id", str), "--duration": ("duration", float),
    "--telemetry-interval": ("telemetry_interval", float), "--upstream": ("upstream", str),
    "--escalate-below": ("escalate_below", float), "--escalation-deadline": ("escalation_deadline", float),
    "--escalation-rate": ("escalation_rate", float), "--hard-examples-per-hour": ("hard_examples_per_hour", int)}
_REQUIRED = ("--credentials", "--data-dir", "--source")
UPDATE_MODULES = ("cryptography", "pydantic", "onnx")
"""Modules only the update path loads into the agent process (key statements too); their presence means a
re-exec gives memory back."""
REEXEC_ENV = "EDGEFLEET_AGENT_REEXEC"
WIRE_CARRY_ENV = "EDGEFLEET_WIRE_CARRY"
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
MIN_REEXEC_DURATION_S = 1.0
"""Less than this left of ``--duration``: the agent ends instead of starting again."""
log = logging.getLogger("edgefleet.agent.main")


@dataclasses.dataclass
class Options:
    """The agent's options (those of ``edgefleet agent``)."""

    credentials: Path
    data_dir: Path
    source: str
    server: str | None = None
    device_id: str | None = None
    duration: float | None = None
    telemetry_interval: float = DEFAULT_TELEMETRY_INTERVAL_S
    upstream: str | None = None
    escalate_below: float | None = None
    escalation_deadline: float = 0.25
    escalation_rate: float = 1.0
    hard_examples_per_hour: int = DEFAULT_HARD_EXAMPLES_PER_HOUR


def parse_args(argv: Sequence[str]) -> Options:
    """``--name value`` or ``--name=value`` pairs (argparse stays out of the agent's memory); ConfigError on
    anything else."""
    values: dict[str, object] = {}
    items = list(argv)
    while items:
        flag = items.pop(0)
        name, eq, inline = flag.partition("=")
        if name not in _OPTIONS:
            raise ConfigError(f"unknown option {flag!r}; options: {', '.join(_OPTIONS)}")
        if not eq:
            if not items:
                raise ConfigError(f"{name} needs a value")
            inline = items.pop(0)
        field_name, kind = _OPTIONS[name]
        try:
            values[field_name] = kind(inline)
        except ValueError as exc:
            raise ConfigError(f"{name} must be a number, got {inline!r}") from exc
    if values.get("hard_examples_per_hour", 0) < 0:  # type: ignore[operator]
        raise ConfigError("--hard-examples-per-hour must be 0 or more")
    missing = [flag for flag in _REQUIRED if _OPTIONS[flag][0] not in values]
    if missing:
        raise ConfigError(f"edgefleet agent needs {', '.join(missing)}")
    return Options(**values)  # type: ignore[arg-type]


def command(credentials: Path, data_dir: Path, source: str, *, server: str | None = None,
            device_id: str | None = None, duration: float | None = None,
            telemetry_interval: float = DEFAULT_TELEMETRY_INTERVAL_S, upstream: str | None = None,
            escalate_below: float | None = None, escalation_deadline: float = 0.25,
            escalation_rate: float = 1.0,
            hard_examples_per_hour: int = DEFAULT_HARD_EXAMPLES_PER_HOUR) -> list[str]:
    """The command line that runs the agent with these options."""
    argv = [sys.executable, "-m", "edgefleet.agent", "--credentials", str(credentials), "--data-dir",
            str(data_dir), "--source", source, "--telemetry-interval", repr(float(telemetry_interval)),
            "--escalation-deadline", repr(float(escalation_deadline)),
            "--escalation-rate", repr(float(escalation_rate)),
            "--hard-examples-per-hour", str(int(hard_examples_per_hour))]
    for flag, value in (("--server", server), ("--device-id", device_id), ("--duration", duration),
                        ("--upstream", upstream), ("--escalate-below", escalate_below)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def run(args: Options) -> None:
    """Run the agent with these options, its data directory locked from first to last (see agent.lock); after
    an update, execute the agent again (see the module docstring)."""
    lock = DataDirLock.acquire(args.data_dir)
    try:
        again = _run(args)
    finally:
        lock.release()
    if again is not None:
        _reexec(again)


def update_modules_loaded() -> bool:
    """Whether the update path has loaded its modules into this process."""
    return any(name in sys.modules for name in UPDATE_MODULES)


def updater_idle(state: AgentState) -> bool:
    """Whether no update is pending or under way (a database that cannot be read: not known to be idle)."""
    import sqlite3

    from edgefleet.agent.updater import PENDING_KEY, SHADOW_KEY, STEP_KEY

    try:
        return not state.get(PENDING_KEY) and not state.get(SHADOW_KEY) and state.get(STEP_KEY, "idle") == "idle"
    except (OSError, sqlite3.Error):
        return False


def _reexec(args: Options) -> None:
    """Replace this process with a fresh agent (same pid), carrying the wire byte counts over."""
    from edgefleet.transport.wire import WIRE

    argv = command(args.credentials, args.data_dir, args.source, server=args.server, device_id=args.device_id,
                   duration=args.duration, telemetry_interval=args.telemetry_interval, upstream=args.upstream,
                   escalate_below=args.escalate_below, escalation_deadline=args.escalation_deadline,
                   escalation_rate=args.escalation_rate, hard_examples_per_hour=args.hard_examples_per_hour)
    os.environ[WIRE_CARRY_ENV] = json.dumps(WIRE.snapshot())
    os.environ[REEXEC_ENV] = "again"
    log.info("restarting the agent process after an update (its memory back to a fresh start's)")
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # held over the exec until the new image handles them
    try:
        os.execv(argv[0], argv)
    except OSError as exc:  # the interpreter is gone (a package upgrade): a supervisor restarts the agent
        raise EdgefleetError(f"cannot restart the agent process after an update: {exc}") from exc


def _carry_wire() -> None:
    """Add the counts of the image this one replaced (a re-exec) to this process's wire counters."""
    carried = os.environ.pop(WIRE_CARRY_ENV, None)
    if carried:
        from edgefleet.transport.wire import WIRE

        try:
            WIRE.add(json.loads(carried))
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("ignored unreadable %s", WIRE_CARRY_ENV)


def _run(args: Options) -> Options | None:
    """Run the agent; the options to execute it again with, or None when it is to end."""
    from edgefleet.agent.config import load_config

    if args.upstream is not None and not str(args.upstream).startswith(("http://", "https://")):
        raise ConfigError(f"--upstream must be an http(s) URL, got {args.upstream!r}")
    config = load_config(args.credentials, args.data_dir, device_id=args.device_id, server_url=args.server,
                         telemetry_interval_s=args.telemetry_interval)
    config = dataclasses.replace(config, upstream_url=args.upstream, escalate_below=args.escalate_below,
                                 escalation_deadline_s=args.escalation_deadline,
                                 escalation_rate_per_s=args.escalation_rate,
                                 hard_examples_per_hour=args.hard_examples_per_hour)
    if lean.needs_openssl((config.server_url, config.upstream_url, config.mqtt.url, args.source)):
        lean.allow_openssl()  # TLS from the start: before paho-mqtt (imported below) looks for ssl
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.sources import open_source

    started = time.monotonic()
    _carry_wire()
    stream = open_source(args.source)
    device = Agent(config)
    stopping = False
    # an image executed again that starts with them loaded would only do it again: it keeps them
    helps = not (update_modules_loaded() and os.environ.get(REEXEC_ENV) == "again")

    def restart_when() -> bool:  # never while events wait in memory for a disk with room: they would be lost
        return helps and not device.holds_events() and update_modules_loaded() and updater_idle(device.state)

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        device.request_stop()
        close = getattr(stream, "close", None)  # an idle source (MQTT) would otherwise wait for its next reading
        if callable(close):
            close()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a stop sent during a re-exec arrives now
    device.start()
    reexec = os.environ.get(REEXEC_ENV, "1") != "0"
    try:
        device.run(stream, args.duration, restart_when=restart_when if reexec else None)
    finally:
        device.stop()
    if not device.restart_requested or stopping:
        return None
    close = getattr(stream, "close", None)
    if callable(close):
        close()
    if args.duration is None:
        return args
    left = args.duration - (time.monotonic() - started)
    return dataclasses.replace(args, duration=left) if left >= MIN_REEXEC_DURATION_S else None


def setup_logging() -> None:
    """Log lines as the other long-running processes write them."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx",):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except EdgefleetError as exc:
        print(f"edgefleet: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
