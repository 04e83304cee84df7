"""Property-based fuzzing of everything that parses untrusted bundle bytes.

For random and mutated bundles, deltas and statements, the only exception that may escape is
BundleError (the project's bundle error, an EdgefleetError), and ``edgefleet bundle apply`` writes
nothing but its ``--out`` file inside the target directory.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from edgefleet.bundle import copydiff
from edgefleet.bundle.container import MANIFEST, MODEL, SIGNATURES, read_container, write_container
from edgefleet.bundle.delta import Base, DeltaFile, apply, diff
from edgefleet.bundle.manifest import Manifest, MemberDigest
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.cli import app
from edgefleet.core.keys import Keyring, rotation_statement, verify_rollback_order
from edgefleet.core.update import TrustState, accept_delta, decide
from edgefleet.errors import BundleError
from edgefleet.testing.synthetic import channel_mean_model

KEY = SigningKey.generate()
TRUST = TrustState(keys={KEY.public.key_id: KEY.public})
A = pack_bundle(channel_mean_model(), KEY, BundleSpec(name="clf", version="1.0.0", release=1))
B = pack_bundle(channel_mean_model(bias=[0.5, 0.1, 0.2, 0.3]), KEY, BundleSpec(name="clf", version="1.1.0", release=2))
DELTA = diff(A, B, max_fraction=1.0).data
BASE = Base.of(read_container(A))
STATEMENT = rotation_statement(KEY, SigningKey.generate())
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few random flips, cuts, insertions or overwrites."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "overwrite"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
    return bytes(data)


def signed_around(model: bytes) -> bytes:
    """A correctly signed bundle whose model member is ``model``, so the model checks themselves run."""
    manifest = Manifest.model_validate({
        **json.loads(read_container(A)[MANIFEST]),
        "members": {MODEL: MemberDigest(size=len(model), sha256=hashlib.sha256(model).hexdigest())},
    }).canonical_bytes()
    sig = base64.b64encode(KEY.sign(manifest)).decode()
    return write_container({MANIFEST: manifest, SIGNATURES: json.dumps({"signatures": [
        {"keyid": KEY.public.key_id, "sig": sig}]}).encode(), MODEL: model})


def only_bundle_errors(*calls: object) -> None:
    for call in calls:
        with contextlib.suppress(BundleError):
            call()  # type: ignore[operator]


@FUZZ
@given(st.one_of(st.binary(max_size=512), mutated(A), mutated(B)))
def test_read_and_decide_raise_only_bundle_errors(data: bytes) -> None:
    only_bundle_errors(lambda: read_container(data), lambda: decide(data, TRUST),
                       lambda: decide(data, TRUST, allow_rollback=True, rollback_order=data))


@FUZZ
@given(mutated(read_container(A)[MODEL]))
def test_signed_garbage_models_raise_only_bundle_errors(model: bytes) -> None:
    only_bundle_errors(lambda: decide(signed_around(model), TRUST))


@FUZZ
@given(st.one_of(st.binary(max_size=512), mutated(DELTA), mutated(DELTA[:120])))
def test_delta_apply_raises_only_bundle_errors(delta: bytes) -> None:
    only_bundle_errors(lambda: apply(A, delta), lambda: accept_delta(A, delta, TRUST),
                       lambda: DeltaFile.decode(delta, BASE), lambda: diff(A, delta))


@FUZZ
@given(st.one_of(st.binary(max_size=256), mutated(STATEMENT)))
def test_statements_raise_only_bundle_errors(data: bytes) -> None:
    ring = Keyring.pinned([KEY.public])
    only_bundle_errors(lambda: ring.apply_statement(data), lambda: verify_rollback_order(data, TRUST.keys))


_RUNNER = CliRunner()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(DELTA), st.just(DELTA), st.binary(max_size=128)), st.sampled_from(["B", "../B", "o/B"]))
def test_cli_apply_writes_only_its_out_file(delta: bytes, out_name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        target = root / "target"
        work = target / "work"
        work.mkdir(parents=True)
        (work / "A").write_bytes(A)
        (work / "DELTA").write_bytes(delta)
        out = work / out_name
        before = os.getcwd()
        os.chdir(work)
        try:
            result = _RUNNER.invoke(app, ["bundle", "apply", "A", "DELTA", "--out", out_name])
        finally:
            os.chdir(before)
        assert result.exception is None or isinstance(result.exception, (BundleError, SystemExit)), result.exception
        written = {p.relative_to(root) for p in root.rglob("*") if p.is_file()}
        expected = {Path("target/work/A"), Path("target/work/DELTA")}
        if result.exit_code == 0:
            expected.add(out.resolve().relative_to(root.resolve()))
        assert written == expected


@FUZZ
@given(st.binary(max_size=300), st.binary(max_size=300), st.binary(max_size=64))
def test_copy_insert_ops_round_trip_and_garbage_ops_raise_only_bundle_errors(source: bytes, target: bytes,
                                                                               garbage: bytes) -> None:
    mixed = source[: len(source) // 2] + target + source[len(source) // 3 :]
    for wanted in (target, mixed):
        assert copydiff.patch(source, copydiff.diff(source, wanted), len(wanted)) == wanted
    only_bundle_errors(lambda: copydiff.patch(source, garbage, 1000))
