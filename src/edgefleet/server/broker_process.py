"""Run an amqtt broker in this process: ``python -m edgefleet.server.broker_process CONFIG.yaml``.

Started by :class:`edgefleet.server.broker.EmbeddedBroker`, which keeps the broker out of the process that
runs MQTT clients. Once its listeners are bound it writes its pid to ``CONFIG`` with the suffix ``.ready``
(:func:`ready_path`). Exits 0 on SIGTERM or SIGINT, 2 on a bad configuration, 6 if the broker cannot start
(e.g. the port is taken), and on its own if the parent process goes away (so a killed test run leaves no
broker behind). With a password file (:mod:`edgefleet.server.broker_auth`), each time the file changes the
connections of users no longer in it (revoked devices) are closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import dacite
import yaml
from amqtt.broker import Broker
from amqtt.errors import BrokerError
from amqtt.session import Session

from edgefleet.server.broker import ready_path
from edgefleet.server.broker_auth import PasswordFile, password_file

logger = logging.getLogger("edgefleet.broker")

_PARENT_POLL_S = 1.0
_REVOCATION_POLL_S = 0.25
AUTH_PLUGIN = "edgefleet.server.broker_auth.PasswordFileAuth"


def load_config(path: Path) -> dict[str, Any]:
    """Read the broker's YAML configuration (the layout of ``amqtt.contexts.BrokerConfig``)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


class ScopedRetainBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker, but retained messages only go to a client for its own subscriptions.

    amqtt 0.12.1 replays, on every CONNECT, the retained messages matching *every* topic filter any
    session holds (``Broker._handle_client_session`` loops over ``self._subscriptions``), so a device
    would receive other devices' retained desired state. We drop replays for filters the connecting
    session does not hold; a new SUBSCRIBE is unaffected (the subscription is added before the replay).
    """

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        holders = self._subscriptions.get(subscription[0], ())
        if any(held.client_id == session.client_id for held, _qos in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)


async def serve(config: dict[str, Any], ready_file: Path | None = None) -> None:
    """Start the broker, wait for SIGTERM/SIGINT or for the parent to exit, then shut it down."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watchdog = asyncio.create_task(_watch_parent(stop, os.getppid()))
    broker = ScopedRetainBroker(config)
    await broker.start()
    logger.info("broker started: %s", {k: v.get("bind") for k, v in config.get("listeners", {}).items()})
    path = _password_file_path(config)
    revocations = asyncio.create_task(_close_revoked(broker, password_file(path))) if path else None
    if ready_file is not None:
        _write_atomically(ready_file, f"{os.getpid()}\n")
    try:
        await stop.wait()
    finally:
        watchdog.cancel()
        if revocations is not None:
            revocations.cancel()
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
        logger.info("broker stopping")
        await broker.shutdown()
        logger.info("broker stopped")


async def _watch_parent(stop: asyncio.Event, parent_pid: int) -> None:
    """Set ``stop`` once this process has been re-parented (its parent died)."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(_PARENT_POLL_S)
    logger.warning("parent process %d is gone; shutting down", parent_pid)
    stop.set()


def _password_file_path(config: dict[str, Any]) -> Path | None:
    options = (config.get("plugins") or {}).get(AUTH_PLUGIN)
    path = options.get("password_file") if isinstance(options, dict) else None
    return Path(path) if path else None


async def _close_revoked(broker: Broker, users_file: PasswordFile) -> None:
    """Whenever the password file changes, close every connection whose user is no longer in it.

    The ACL plugin already refuses such a user every publish and delivery; this also cuts the connection, and
    the client's reconnect is refused by the authentication plugin.
    """
    seen = -1
    while True:
        users = users_file.users()
        if users_file.generation != seen:
            seen = users_file.generation
            for client_id, (session, handler) in list(broker.sessions.items()):
                if session.transitions.state == "connected" and (session.username or "") not in users:
                    logger.info("closing the connection of %r (client %s): no longer authorised",
                                session.username, client_id)
                    await handler.handle_connection_closed()
        await asyncio.sleep(_REVOCATION_POLL_S)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    if len(args) != 1:
        print("usage: python -m edgefleet.server.broker_process CONFIG.yaml", file=sys.stderr)
        return 2
    config_path = Path(args[0])
    try:
        config = load_config(config_path)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"error: cannot read broker config: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, ready_path(config_path)))
    except dacite.DaciteError as exc:
        print(f"error: invalid broker config {config_path}: {exc}", file=sys.stderr)
        return 2
    except (BrokerError, OSError) as exc:
        print(f"error: cannot start the broker: {exc}", file=sys.stderr)
        return 6
    return 0


if __name__ == "__main__":
    sys.exit(main())
