"""``edgefleet keys ...`` and ``edgefleet bundle ...``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet.cli.fleet import Json, Server, Token
from edgefleet.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from edgefleet.build.io_pipeline import ResolvedPipeline

keys_app = typer.Typer(no_args_is_help=True, help="Signing keys, key rotation and revocation.")
bundle_app = typer.Typer(no_args_is_help=True, help="Signed model bundles and deltas between them.")


@keys_app.command("init")
def keys_init(directory: Annotated[Path, typer.Option("--dir", help="where to write signing.key/.pub")],
              force: Annotated[bool, typer.Option(help="overwrite an existing key")] = False) -> None:
    """Create an Ed25519 signing key pair: DIR/signing.key and DIR/signing.pub."""
    from edgefleet.bundle.signing import write_keypair

    key = write_keypair(directory, overwrite=force)
    typer.echo(f"key id {key.public.key_id}: {directory / 'signing.key'} and {directory / 'signing.pub'}")


@keys_app.command("rotate")
def keys_rotate(directory: Annotated[Path, typer.Option("--dir", help="holds the current signing.key/.pub")]) -> None:
    """Replace DIR/signing.key with a new key and write the rotation statement that devices apply.

    The old pair is kept as DIR/retired-OLDID.key/.pub; the statement DIR/rotation-OLDID-NEWID.json is
    signed by the old key and by the new one.
    """
    from edgefleet.bundle.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, SigningKey, load_signing_key
    from edgefleet.core.keys import rotation_statement
    from edgefleet.storage import atomic_write

    old = load_signing_key(directory / PRIVATE_KEY_FILE)
    new = SigningKey.generate()
    old_id, new_id = old.public.key_id, new.public.key_id
    statement = directory / f"rotation-{old_id}-{new_id}.json"
    pending = directory / f"pending-{new_id}.key"  # a crash at any step leaves both private keys on disk
    atomic_write(pending, _key_text(new.raw), mode=0o600)
    atomic_write(directory / f"retired-{old_id}.key", _key_text(old.raw), mode=0o600)
    atomic_write(directory / f"retired-{old_id}.pub", (old.public.to_text() + "\n").encode())
    atomic_write(statement, rotation_statement(old, new))
    atomic_write(directory / PRIVATE_KEY_FILE, _key_text(new.raw), mode=0o600)
    atomic_write(directory / PUBLIC_KEY_FILE, (new.public.to_text() + "\n").encode())
    pending.unlink()
    typer.echo(f"key {new_id} replaces {old_id}; publish {statement} to the server and the devices with "
               f"`edgefleet keys publish {statement}` before pushing bundles signed by {new_id}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="id of the key to revoke")],
                key: Annotated[Path, typer.Option(help="a trusted signing.key that signs the statement")],
                out: Annotated[Path, typer.Option(help="statement file to write")],
                reason: Annotated[str, typer.Option(help="why, for the record")] = "") -> None:
    """Write a statement, signed by KEY, that revokes KEY_ID on every device that applies it."""
    from edgefleet.bundle.signing import load_signing_key
    from edgefleet.core.keys import revocation_statement
    from edgefleet.storage import atomic_write

    if not key_id or len(key_id) > 64 or not key_id.isalnum():
        raise ConfigError(f"{key_id!r} is not a key id")
    signer = load_signing_key(key)
    atomic_write(out, revocation_statement(key_id, signer, reason=reason))
    typer.echo(f"{out}: key {key_id} revoked, signed by {signer.public.key_id}; publish it with "
               f"`edgefleet keys publish {out}`")


@keys_app.command("publish")
def keys_publish(statement: Annotated[Path, typer.Argument(help="a statement from `keys rotate` or `keys revoke`")],
                 server: Server = "", token: Token = "", as_json: Json = False) -> None:
    """Register a signed key rotation or revocation with the server.

    The server checks it against the keys it trusts, follows it from then on (`model push` accepts bundles signed
    by a new key, refuses a revoked one) and sends it to every device in its desired state; a device that is
    offline gets it when it comes back.
    """
    from edgefleet.cli.fleet import _api, _emit

    with _api(server, token) as api:
        answer = api.publish_statement(read_file(statement))
    what = f"{'rotation to' if answer['type'] == 'rotate' else 'revocation of'} key {answer['key_id']}"
    text = (f"{statement}: {what} published to every device; trusted keys: {', '.join(answer['trusted']) or 'none'}"
            if answer["stored"] else f"{statement}: {what} is already in effect; nothing changed")
    _emit(answer, as_json, text)


@keys_app.command("list")
def keys_list(server: Server = "", token: Token = "", as_json: Json = False) -> None:
    """The server's trusted, retired and revoked keys, and the statements it sends to every device."""
    from edgefleet.cli.fleet import _api, _emit

    with _api(server, token) as api:
        ring = api.keyring()
    lines = [*(f"{k}  trusted" for k in ring["trusted"]),
             *(f"{k}  retired (replaced by {new})" for k, new in ring["retired"].items()),
             *(f"{k}  revoked" for k in ring["revoked"])]
    _emit(ring, as_json, "\n".join(lines) or "no keys")


@keys_app.command("model-key")
def keys_model_key(out: Annotated[Path, typer.Option(help="file to write (mode 0600)")]) -> None:
    """Create an AES-256 key for `bundle pack --encrypt-key`; push the bundle with `model push --model-key`."""
    from edgefleet.bundle.encrypt import write_model_key

    key = write_model_key(out)
    typer.echo(f"model key {key.key_id}: {out}")


@bundle_app.command("pack")
def bundle_pack(model: Annotated[Path, typer.Argument(help="an ONNX model file")],
                key: Annotated[Path, typer.Option(help="signing.key")],
                out: Annotated[Path, typer.Option(help="bundle file to write")],
                name: Annotated[str | None, typer.Option(help="model name (default: the model file's stem)")] = None,
                version: Annotated[str, typer.Option(help="semantic version")] = "1.0.0",
                release: Annotated[int, typer.Option(help="monotonic release counter")] = 1,
                expires: Annotated[str | None, typer.Option(help="ISO 8601 time after which devices refuse it")] = None,
                hardware: Annotated[list[str] | None, typer.Option(help="compatible hardware id (repeatable)")] = None,
                encrypt_key: Annotated[Path | None, typer.Option(help="model key file: encrypt the model")] = None,
                golden: Annotated[Path | None, typer.Option(
                    help="golden inputs: a data .npz (its first calib_x rows, through the input pipeline) or an "
                         ".npy of model inputs [n, ...]")] = None,
                pipeline: Annotated[Path | None, typer.Option(help="pipeline YAML: input, output, labels, thresholds")]
                = None,
                labels: Annotated[str | None, typer.Option(help="class names in class order: a,b,c")] = None,
                threshold: Annotated[list[str] | None, typer.Option(help="KEY=VALUE for the manifest (repeatable)")]
                = None,
                sample_rate: Annotated[float | None, typer.Option(help="time series: samples per second")] = None,
                window: Annotated[int | None, typer.Option(help="time series: samples per window")] = None,
                hop: Annotated[int | None, typer.Option(help="time series: samples between windows")] = None,
                runtime: Annotated[str, typer.Option(help="runtime the device must run it on: onnxruntime, openvino "
                                                     "or litert (with --tflite)")] = "onnxruntime",
                tflite: Annotated[Path | None, typer.Option(help="the .tflite export of MODEL, shipped for --runtime "
                                                            "litert")] = None) -> None:
    """Sign an already built ONNX model as a bundle (no compression).

    The input pipeline and output interpretation are inferred from the model (and the --golden data file), then
    set by --pipeline and the flags; a bundle the agent could not run is refused here, and nothing is written.
    With --runtime litert the bundle ships the --tflite export of MODEL instead (golden outputs from LiteRT).
    """
    from edgefleet.build.inputs import default_name, read_npz
    from edgefleet.build.io_pipeline import GOLDEN_ROWS, options_from_flags, resolve_pipeline
    from edgefleet.bundle.encrypt import load_model_key
    from edgefleet.bundle.pack import BundleSpec, pack_bundle, write_bundle
    from edgefleet.bundle.runtimes import MODEL_FORMATS
    from edgefleet.bundle.safe_onnx import check_onnx
    from edgefleet.bundle.signing import load_signing_key
    from edgefleet.cli.build import check_name_version
    from edgefleet.core.keys import parse_time

    check_name_version(name, version)
    if runtime not in MODEL_FORMATS:
        raise ConfigError(f"--runtime {runtime!r}: known runtimes are {', '.join(MODEL_FORMATS)}")
    if (MODEL_FORMATS[runtime] == "tflite") != (tflite is not None):
        raise ConfigError("--tflite goes with --runtime litert, and --runtime litert needs --tflite")
    if expires is not None:
        try:
            parse_time(expires)
        except BundleError as exc:
            raise ConfigError(f"--expires: {exc}") from exc
    options = options_from_flags(pipeline, labels, threshold, sample_rate, window, hop)
    model_bytes = read_file(model)
    check_onnx(model_bytes)
    data = read_npz(golden, ("calib_x",)) if golden is not None and golden.suffix == ".npz" else {}
    resolved = resolve_pipeline(model_bytes, options, data_sample_rate=data.get("sample_rate_hz"),
                                data_labels=data.get("labels"))
    golden_inputs: Any = None
    if data:
        golden_inputs, resolved = _golden_rows(model_bytes, data["calib_x"], resolved, GOLDEN_ROWS)
    elif golden is not None:
        golden_inputs = _load_npy(golden)
    spec = BundleSpec(name=name or default_name(model.stem), version=version, release=release, expires=expires,
                      hardware=hardware or [], labels=resolved.labels, preprocess=resolved.preprocess,
                      postprocess=resolved.postprocess, thresholds=resolved.thresholds,
                      encrypt_key=None if encrypt_key is None else load_model_key(encrypt_key), golden=golden_inputs,
                      runtime=None if runtime == "onnxruntime" else runtime)
    shipped = read_file(tflite) if tflite is not None else model_bytes
    bundle = pack_bundle(shipped, load_signing_key(key), spec)
    write_bundle(out, bundle)
    typer.echo(f"{spec.name}@{version} -> {out} ({len(bundle)} bytes, runtime {runtime})")


def _golden_rows(model: bytes, calib_x: Any, resolved: ResolvedPipeline,
                 rows: int) -> tuple[Any, ResolvedPipeline]:
    """The first ``rows`` calibration rows through the input step, and the pipeline with the softmax decided
    from the model's scores on the calibration rows (where the output spec leaves it open)."""
    from edgefleet.build.evaluate import predict
    from edgefleet.build.inputs import ACTIVATION_SAMPLES
    from edgefleet.build.io_pipeline import check_rows, model_input, needs_activation, with_activation
    from edgefleet.bundle.pack import model_schema

    step = resolved.step
    x = model_input(step, check_rows(calib_x[:ACTIVATION_SAMPLES], step, model_schema(model)[0][0].shape,
                                     "calib_x"))
    if needs_activation(resolved):
        resolved = with_activation(resolved, predict(model, x, postprocess=resolved.postprocess))
    return x[:rows], resolved


@bundle_app.command("inspect")
def bundle_inspect(bundle: Annotated[Path, typer.Argument(help="bundle file")]) -> None:
    """Print a bundle's manifest (not verified: use `bundle verify` for that)."""
    from edgefleet.bundle.pack import peek_manifest

    manifest: dict[str, Any] = peek_manifest(read_file(bundle)).model_dump(mode="json")
    if manifest.get("golden"):
        manifest["golden"]["samples"] = f"{len(manifest['golden']['samples'])} samples"
    typer.echo(json.dumps(manifest, indent=2))


@bundle_app.command("verify")
def bundle_verify(bundle: Annotated[Path, typer.Argument(help="bundle file")],
                  pub: Annotated[list[Path], typer.Option(help="trusted signing.pub (repeatable)")],
                  decrypt_key: Annotated[Path | None, typer.Option(help="model key of an encrypted bundle")] = None,
                  hardware: Annotated[str, typer.Option(help="check as this device hardware")] = "generic") -> None:
    """Check a bundle's signature, hashes, policy and model safety as a device would."""
    from edgefleet.bundle.encrypt import load_model_key
    from edgefleet.bundle.signing import load_public_key
    from edgefleet.core.update import TrustState, decide

    keys = {k.key_id: k for k in (load_public_key(p) for p in pub)}
    model_key = None if decrypt_key is None else load_model_key(decrypt_key)
    try:
        accepted = decide(read_file(bundle), TrustState(keys=keys, hardware=hardware), decryption_key=model_key)
    except BundleError as exc:
        raise BundleError(f"{bundle} refused ({exc.reason}): {exc}", reason=exc.reason) from exc
    typer.echo(f"ok: {accepted.manifest.ref} release {accepted.manifest.release}, signed by {accepted.key_id}")


@bundle_app.command("diff")
def bundle_diff(base: Annotated[Path, typer.Argument(help="bundle the devices have (A)")],
                target: Annotated[Path, typer.Argument(help="bundle they should get (B)")],
                out: Annotated[Path, typer.Option(help="delta file to write (B whole if a delta does not pay)")],
                max_fraction: Annotated[float, typer.Option(min=0.0, help="send B whole above this share")] = 0.5,
                ) -> None:
    """Write a weight-level delta from A to B, or B itself when the delta would be too large."""
    from edgefleet.bundle.delta import diff
    from edgefleet.storage import atomic_write

    result = diff(read_file(base), read_file(target), max_fraction=max_fraction)
    atomic_write(out, result.data)
    typer.echo(f"{out}: {len(result.data)} bytes ({result.fraction:.1%} of B); {result.note}")


@bundle_app.command("apply")
def bundle_apply(base: Annotated[Path, typer.Argument(help="bundle A the delta was made against")],
                 delta: Annotated[Path, typer.Argument(help="delta file from `bundle diff`")],
                 out: Annotated[Path, typer.Option(help="rebuilt bundle B to write")]) -> None:
    """Rebuild bundle B from A and a delta; refuses unless B matches its signed digests."""
    from edgefleet.bundle.delta import apply
    from edgefleet.storage import atomic_write

    try:
        rebuilt = apply(read_file(base), read_file(delta))
    except BundleError as exc:
        raise BundleError(f"{delta} refused ({exc.reason}): {exc}", reason=exc.reason) from exc
    atomic_write(out, rebuilt)
    typer.echo(f"{out}: {len(rebuilt)} bytes rebuilt; verify it with `edgefleet bundle verify`")


@bundle_app.command("rollback-order")
def bundle_rollback_order(name: Annotated[str, typer.Option(help="model name")],
                          release: Annotated[int, typer.Option(min=1, help="the older release to allow")],
                          key: Annotated[Path, typer.Option(help="a trusted signing.key")],
                          out: Annotated[Path, typer.Option(help="statement file to write")],
                          hours: Annotated[float, typer.Option(min=0.0, help="valid for this long")] = 24.0,
                          device: Annotated[list[str] | None, typer.Option(help="device id (repeatable)")] = None,
                          ) -> None:
    """Write a signed order that lets devices go back to an older release of a model."""
    from datetime import timedelta

    from edgefleet.bundle.signing import load_signing_key
    from edgefleet.core.keys import rollback_order
    from edgefleet.storage import atomic_write

    expires = datetime.now(UTC) + timedelta(hours=hours)
    atomic_write(out, rollback_order(name, release, load_signing_key(key), expires=expires, devices=device or []))
    typer.echo(f"{out}: {name} release {release} allowed until {expires.isoformat(timespec='seconds')}")


def read_file(path: Path) -> bytes:
    """A user-named file's bytes, or one clear ConfigError line."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


def _load_npy(path: Path) -> Any:
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read golden inputs {path}: {exc}") from exc


def _key_text(raw: bytes) -> bytes:
    import base64

    return base64.b64encode(raw) + b"\n"
