"""``edgefleet serve-model BUNDLE --port N --pub KEY.pub``: the upstream model of tiered inference.

``--pki DATA_DIR/pki`` (the server's fleet CA) or ``--cert``/``--key``/``--client-ca``: HTTPS that requires each
device's fleet certificate; ``--device-tokens FILE``: a listed device token on every request
(:mod:`edgefleet.upstream.auth`). A non-loopback ``--host`` without TLS is refused unless ``--insecure``.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.upstream.auth import UpstreamTls

UPSTREAM_CERT = "upstream.pem"
UPSTREAM_KEY = "upstream.key"


def tls_from_pki(pki_dir: Path, host: str) -> UpstreamTls:
    """A certificate for ``host`` (and localhost, 127.0.0.1, this machine's name) issued by the fleet CA in
    ``pki_dir`` and kept there (renewed when due); devices verified against that CA."""
    from edgefleet.errors import ConfigError
    from edgefleet.server.pki import CA_KEY, FleetCA

    if not (pki_dir / CA_KEY).exists():
        raise ConfigError(f"--pki {pki_dir} holds no fleet CA (no {CA_KEY}): give the server's DATA_DIR/pki")
    ca = FleetCA(pki_dir)
    hosts = {"127.0.0.1", "localhost", socket.gethostname()}
    if host not in ("0.0.0.0", "::", ""):
        hosts.add(host.strip("[]"))
    cert, key = pki_dir / UPSTREAM_CERT, pki_dir / UPSTREAM_KEY
    ca.write_identity(host, cert, key, hosts=sorted(hosts))
    return UpstreamTls(cert, key, ca.ca_path)


def serve_model(bundle: Annotated[Path, typer.Argument(help="signed bundle to serve")],
                pub: Annotated[Path, typer.Option("--pub", help="public key (signing.pub) to verify the bundle")],
                port: Annotated[int, typer.Option(min=0, max=65535, help="HTTP port (0 = any free port)")] = 8090,
                host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
                info_file: Annotated[Path | None, typer.Option(help="write {\"url\": ...} here once listening")]
                = None,
                pki: Annotated[Path | None, typer.Option(
                    help="the fleet CA directory (the server's DATA_DIR/pki): HTTPS with a certificate it issues, "
                         "and only devices with a fleet certificate are served")] = None,
                cert: Annotated[Path | None, typer.Option(help="HTTPS certificate (with --key, --client-ca)")] = None,
                key: Annotated[Path | None, typer.Option(help="its private key")] = None,
                client_ca: Annotated[Path | None, typer.Option(
                    help="CA whose certificates devices must present (the fleet CA, ca.pem)")] = None,
                device_tokens: Annotated[Path | None, typer.Option(
                    help="file of allowed device tokens (one a line, or sha256:HEX); re-read when it changes")]
                = None,
                insecure: Annotated[bool, typer.Option(
                    help="allow plain HTTP on a non-loopback address")] = False,
                report_to: Annotated[str | None, typer.Option(
                    help="control plane URL: report each answer with its window there (kept as a label of lower "
                         "trust, `edgefleet data examples`)")] = None,
                report_token: Annotated[str, typer.Option(envvar="EDGEFLEET_TOKEN",
                                                          help="operator token for --report-to")] = "") -> None:
    """Serve a verified bundle (POST /v1/infer) for agents started with --upstream URL."""
    from edgefleet.cli import setup_logging
    from edgefleet.errors import ConfigError
    from edgefleet.upstream.auth import DeviceTokens, check_exposure, tls_from_files
    from edgefleet.upstream.report import control_plane_reporter
    from edgefleet.upstream.service import load_upstream, serve

    setup_logging()
    if pki is not None and any(p is not None for p in (cert, key, client_ca)):
        raise ConfigError("give either --pki or --cert/--key/--client-ca, not both")
    tls = tls_from_pki(pki, host) if pki is not None else tls_from_files(cert, key, client_ca)
    check_exposure(host, tls, insecure)
    tokens = DeviceTokens(device_tokens) if device_tokens is not None else None
    if report_to and not report_token:
        raise ConfigError("--report-to needs the operator token: --report-token or EDGEFLEET_TOKEN")
    model = load_upstream(bundle, pub)
    reporter = control_plane_reporter(report_to, report_token) if report_to else None
    serve(model, host=host, port=port, info_file=info_file, tls=tls, tokens=tokens, reporter=reporter)


def register(app: typer.Typer) -> None:
    """Add ``serve-model`` to the top-level command."""
    app.command("serve-model")(serve_model)
