"""``edgefleet keys ...`` and ``edgefleet bundle ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet.errors import ConfigError

keys_app = typer.Typer(no_args_is_help=True, help="Signing keys.")
bundle_app = typer.Typer(no_args_is_help=True, help="Signed model bundles.")


@keys_app.command("init")
def keys_init(directory: Annotated[Path, typer.Option("--dir", help="where to write signing.key/.pub")],
              force: Annotated[bool, typer.Option(help="overwrite an existing key")] = False) -> None:
    """Create an Ed25519 signing key pair: DIR/signing.key and DIR/signing.pub."""
    from edgefleet.bundle.signing import write_keypair

    key = write_keypair(directory, overwrite=force)
    typer.echo(f"key id {key.public.key_id}: {directory / 'signing.key'} and {directory / 'signing.pub'}")


@bundle_app.command("pack")
def bundle_pack(model: Annotated[Path, typer.Argument(help="an ONNX model file")],
                name: Annotated[str, typer.Option(help="model name")],
                version: Annotated[str, typer.Option(help="semantic version, e.g. 1.0.0")],
                key: Annotated[Path, typer.Option(help="signing.key")],
                out: Annotated[Path, typer.Option(help="bundle file to write")],
                release: Annotated[int, typer.Option(help="monotonic release counter")] = 1) -> None:
    """Sign an already built ONNX model as a bundle (no compression)."""
    from edgefleet.bundle.pack import BundleSpec, pack_bundle, write_bundle
    from edgefleet.bundle.signing import load_signing_key

    data = read_file(model)
    bundle = pack_bundle(data, load_signing_key(key), BundleSpec(name=name, version=version, release=release))
    write_bundle(out, bundle)
    typer.echo(f"{name}@{version} -> {out} ({len(bundle)} bytes)")


@bundle_app.command("inspect")
def bundle_inspect(bundle: Annotated[Path, typer.Argument(help="bundle file")]) -> None:
    """Print a bundle's manifest (not verified: use `bundle verify` for that)."""
    from edgefleet.bundle.pack import peek_manifest

    typer.echo(peek_manifest(read_file(bundle)).model_dump_json(indent=2))


@bundle_app.command("verify")
def bundle_verify(bundle: Annotated[Path, typer.Argument(help="bundle file")],
                  pub: Annotated[list[Path], typer.Option(help="trusted signing.pub (repeatable)")]) -> None:
    """Check a bundle's signature and hashes as a device would."""
    from edgefleet.bundle.signing import load_public_key
    from edgefleet.core.update import TrustState, decide

    keys = {k.key_id: k for k in (load_public_key(p) for p in pub)}
    accepted = decide(read_file(bundle), TrustState(keys=keys))
    typer.echo(f"ok: {accepted.manifest.ref} release {accepted.manifest.release}, signed by {accepted.key_id}")


def read_file(path: Path) -> bytes:
    """A user-named file's bytes, or one clear ConfigError line."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
