"""Which optional extra a command needs, and the one line that says so when it is not installed.

``pip install edgefleet`` is the device's install: the agent, bundle verification, ONNX Runtime and the MQTT client,
whose ``edgefleet`` runs the device's commands (:mod:`edgefleet.entry`). This CLI, the control plane and the
tooling are extras (see ``pyproject.toml``):

    cli      typer, rich (the full CLI; without it ``edgefleet`` runs the device's commands: edgefleet.entry)
    server   fastapi, uvicorn, sqlalchemy, psycopg, amqtt, gmqtt, prometheus-client, pyyaml, onnx, typer, rich
    build    onnxconverter-common, pyyaml, onnx, typer, rich
    train    torch
    data     sktime, scikit-learn
    camera   pillow, opencv
    coap     aiocoap

A command states what it needs up front (:func:`require`, which looks modules up without importing them); any
other command that reaches a missing package is caught in ``edgefleet.cli.main`` by :func:`missing_extra`, which
names the extra that brings the module. Both give :class:`MissingExtraError`: one line, exit 2.
"""

from __future__ import annotations

import importlib.util

from edgefleet.errors import ConfigError

EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "cli": ("typer", "rich"),
    "server": ("fastapi", "uvicorn", "sqlalchemy", "psycopg", "amqtt", "gmqtt", "prometheus_client", "yaml"),
    "build": ("onnxconverter_common", "yaml", "onnx"),
    "train": ("torch",),
    "data": ("sktime", "sklearn"),
    "camera": ("PIL", "cv2"),
    "coap": ("aiocoap",),
    "kafka": ("aiokafka",),
}
"""The top-level modules each extra brings (the ones edgefleet imports)."""

COMMAND_EXTRAS: dict[str, tuple[str, ...]] = {
    "server": ("server",),
    "serve-model": ("server",),
    "build": ("build",),
    "demo": ("server", "build", "train", "data"),
    "coap-gateway": ("coap",),
}
"""The extras a top-level command always needs (others may need more for some inputs: ``build --dataset``)."""


class MissingExtraError(ConfigError):
    """A command needs an optional extra that is not installed."""

    def __init__(self, command: str, extras: list[str], module: str) -> None:
        names = ",".join(extras)
        super().__init__(f"`edgefleet {command}` needs the [{names}] extra (no module {module!r}): "
                         f"pip install 'edgefleet[{names}]'")
        self.extras = extras
        self.module = module


def installed(module: str) -> bool:
    """Whether a top-level module can be imported (looked up, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(command: str, *extras: str) -> None:
    """Raise :class:`MissingExtraError` naming every one of ``extras`` (default: the command's) that is missing."""
    wanted = extras or COMMAND_EXTRAS.get(command, ())
    missing: list[str] = []
    first_module = ""
    for extra in wanted:
        absent = [m for m in EXTRA_MODULES[extra] if not installed(m)]
        if absent:
            missing.append(extra)
            first_module = first_module or absent[0]
    if missing:
        raise MissingExtraError(command, missing, first_module)


def missing_extra(exc: ModuleNotFoundError, command: str) -> MissingExtraError | None:
    """The one-line error for a ``ModuleNotFoundError`` that an extra would fix; None for any other module."""
    top = (exc.name or "").partition(".")[0]
    candidates = [extra for extra, modules in EXTRA_MODULES.items() if top in modules]
    if not candidates:
        return None
    preferred = [extra for extra in COMMAND_EXTRAS.get(command, ()) if extra in candidates]
    return MissingExtraError(command, [(preferred or candidates)[0]], top)
