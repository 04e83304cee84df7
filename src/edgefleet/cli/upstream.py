"""``edgefleet serve-model BUNDLE --port N --pub KEY.pub``: the upstream model of tiered inference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def serve_model(bundle: Annotated[Path, typer.Argument(help="signed bundle to serve")],
                pub: Annotated[Path, typer.Option("--pub", help="public key (signing.pub) to verify the bundle")],
                port: Annotated[int, typer.Option(min=0, max=65535, help="HTTP port (0 = any free port)")] = 8090,
                host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
                info_file: Annotated[Path | None, typer.Option(help="write {\"url\": ...} here once listening")]
                = None) -> None:
    """Serve a verified bundle over HTTP (POST /v1/infer) for agents started with --upstream URL."""
    from edgefleet.cli import setup_logging
    from edgefleet.upstream.service import load_upstream, serve

    setup_logging()
    serve(load_upstream(bundle, pub), host=host, port=port, info_file=info_file)


def register(app: typer.Typer) -> None:
    """Add ``serve-model`` to the top-level command."""
    app.command("serve-model")(serve_model)
