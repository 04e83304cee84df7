"""The agent process: ``python -m edgefleet.agent --credentials C --data-dir D --source S [options]``.

``edgefleet agent`` parses and checks its options, then replaces itself (``exec``, same process id) with this
entry, which imports only what the running agent needs: not typer, rich, pydantic, ``cryptography`` or
``onnx``, whose memory would otherwise stay resident for the device's whole uptime; nor OpenSSL, unless its
configuration speaks TLS or until it opens an HTTP client (:mod:`edgefleet.agent.lean`). The options are those of
``edgefleet agent``; an error is one line on stderr and the project's exit code, as the CLI prints them.

Before anything else the process locks its data directory for its whole life (:mod:`edgefleet.agent.lock`): a
second agent on the same directory exits at once (exit code 2) with one line naming the directory and the pid
of the agent that holds it.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from edgefleet.agent import lean
from edgefleet.agent.config import DEFAULT_TELEMETRY_INTERVAL_S
from edgefleet.agent.lock import DataDirLock
from edgefleet.errors import ConfigError, EdgefleetError

_OPTIONS: dict[str, tuple[str, type]] = {
    "--credentials": ("credentials", Path), "--data-dir": ("data_dir", Path), "--source": ("source", str),
    "--server": ("server", str), "--device-id": ("device_id", str), "--duration": ("duration", float),
    "--telemetry-interval": ("telemetry_interval", float), "--upstream": ("upstream", str),
    "--escalate-below": ("escalate_below", float), "--escalation-deadline": ("escalation_deadline", float),
    "--escalation-rate": ("escalation_rate", float)}
_REQUIRED = ("--credentials", "--data-dir", "--source")


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
    missing = [flag for flag in _REQUIRED if _OPTIONS[flag][0] not in values]
    if missing:
        raise ConfigError(f"edgefleet agent needs {', '.join(missing)}")
    return Options(**values)  # type: ignore[arg-type]


def command(credentials: Path, data_dir: Path, source: str, *, server: str | None = None,
            device_id: str | None = None, duration: float | None = None,
            telemetry_interval: float = DEFAULT_TELEMETRY_INTERVAL_S, upstream: str | None = None,
            escalate_below: float | None = None, escalation_deadline: float = 0.25,
            escalation_rate: float = 1.0) -> list[str]:
    """The command line that runs the agent with these options."""
    argv = [sys.executable, "-m", "edgefleet.agent", "--credentials", str(credentials), "--data-dir",
            str(data_dir), "--source", source, "--telemetry-interval", repr(float(telemetry_interval)),
            "--escalation-deadline", repr(float(escalation_deadline)),
            "--escalation-rate", repr(float(escalation_rate))]
    for flag, value in (("--server", server), ("--device-id", device_id), ("--duration", duration),
                        ("--upstream", upstream), ("--escalate-below", escalate_below)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def run(args: Options) -> None:
    """Run the agent with these options, its data directory locked from first to last (see agent.lock)."""
    lock = DataDirLock.acquire(args.data_dir)
    try:
        _run(args)
    finally:
        lock.release()


def _run(args: Options) -> None:
    from edgefleet.agent.config import load_config

    if args.upstream is not None and not str(args.upstream).startswith(("http://", "https://")):
        raise ConfigError(f"--upstream must be an http(s) URL, got {args.upstream!r}")
    config = load_config(args.credentials, args.data_dir, device_id=args.device_id, server_url=args.server,
                         telemetry_interval_s=args.telemetry_interval)
    config = dataclasses.replace(config, upstream_url=args.upstream, escalate_below=args.escalate_below,
                                 escalation_deadline_s=args.escalation_deadline,
                                 escalation_rate_per_s=args.escalation_rate)
    if lean.needs_openssl((config.server_url, config.upstream_url, config.mqtt.url, args.source)):
        lean.allow_openssl()  # TLS from the start: before paho-mqtt (imported below) looks for ssl
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.sources import open_source

    stream = open_source(args.source)
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
        device.run(stream, args.duration)
    finally:
        device.stop()


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
