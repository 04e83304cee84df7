"""`edgefleet keys` and `edgefleet bundle` as a user runs them: pack, inspect, verify, diff, apply, rotate, revoke."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefleet.bundle.signing import load_public_key
from edgefleet.core.keys import Keyring
from edgefleet.core.update import TrustState, decide
from edgefleet.testing.synthetic import CHANNELS, WINDOW, channel_mean_model


def edgefleet(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def ok(*args: str | Path) -> str:
    result = edgefleet(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(needle: str, *args: str | Path) -> None:
    result = edgefleet(*args)
    assert result.returncode == 5, result.stderr
    assert "Traceback" not in result.stderr and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "a.onnx").write_bytes(channel_mean_model())
    (tmp_path / "b.onnx").write_bytes(channel_mean_model(bias=[0.3, 0.1, 0.0, 0.2]))
    np.save(tmp_path / "golden.npy", np.ones((2, CHANNELS, WINDOW), dtype=np.float32))
    ok("keys", "init", "--dir", tmp_path / "keys")
    return tmp_path


def test_pack_diff_apply_verify(workdir: Path) -> None:
    key, pub = workdir / "keys" / "signing.key", workdir / "keys" / "signing.pub"
    ok("bundle", "pack", workdir / "a.onnx", "--name", "clf", "--version", "1.0.0", "--key", key,
       "--out", workdir / "a.bundle", "--golden", workdir / "golden.npy")
    ok("bundle", "pack", workdir / "b.onnx", "--name", "clf", "--version", "1.1.0", "--release", "2", "--key", key,
       "--out", workdir / "b.bundle", "--hardware", "rpi4", "--expires", "2999-01-01T00:00:00Z")
    manifest = json.loads(ok("bundle", "inspect", workdir / "a.bundle"))
    assert manifest["golden"]["samples"] == "2 samples" and manifest["release"] == 1

    out = ok("bundle", "diff", workdir / "a.bundle", workdir / "b.bundle", "--out", workdir / "d.delta",
             "--max-fraction", "0.9")
    assert "delta is" in out
    ok("bundle", "apply", workdir / "a.bundle", workdir / "d.delta", "--out", workdir / "b2.bundle")
    assert (workdir / "b2.bundle").read_bytes() == (workdir / "b.bundle").read_bytes()
    assert "ok: clf@1.1.0" in ok("bundle", "verify", workdir / "b2.bundle", "--pub", pub, "--hardware", "rpi4")
    refused("wrong_hardware", "bundle", "verify", workdir / "b2.bundle", "--pub", pub)

    whole = ok("bundle", "diff", workdir / "a.bundle", workdir / "b.bundle", "--out", workdir / "w.delta",
               "--max-fraction", "0.1")
    assert "sending B whole" in whole
    assert (workdir / "w.delta").read_bytes() == (workdir / "b.bundle").read_bytes()

    delta = bytearray((workdir / "d.delta").read_bytes())
    delta[-3] ^= 0xFF
    (workdir / "bad.delta").write_bytes(bytes(delta))
    refused("refused", "bundle", "apply", workdir / "a.bundle", workdir / "bad.delta", "--out", workdir / "x")
    assert not (workdir / "x").exists()


def test_rotate_and_revoke(workdir: Path) -> None:
    keys = workdir / "keys"
    old = load_public_key(keys / "signing.pub")
    out = ok("keys", "rotate", "--dir", keys)
    new = load_public_key(keys / "signing.pub")
    assert new != old and f"replaces {old.key_id}" in out
    assert (keys / f"retired-{old.key_id}.key").stat().st_mode & 0o777 == 0o600
    assert (keys / "signing.key").stat().st_mode & 0o777 == 0o600
    assert not list(keys.glob("pending-*"))
    statement = (keys / f"rotation-{old.key_id}-{new.key_id}.json").read_bytes()

    ok("bundle", "pack", workdir / "a.onnx", "--name", "clf", "--version", "2.0.0", "--key", keys / "signing.key",
       "--out", workdir / "new.bundle")
    refused("unknown_key", "bundle", "verify", workdir / "new.bundle", "--pub", keys / f"retired-{old.key_id}.pub")
    ring = Keyring.pinned([old]).apply_statement(statement)
    assert decide((workdir / "new.bundle").read_bytes(), TrustState.from_keyring(ring)).key_id == new.key_id

    ok("keys", "revoke", new.key_id, "--key", keys / "signing.key", "--out", workdir / "revoke.json")
    revoked = ring.apply_statement((workdir / "revoke.json").read_bytes())
    assert new.key_id in revoked.revoked and not revoked.trusted()


def test_encrypted_bundles(workdir: Path) -> None:
    key = workdir / "keys" / "signing.key"
    ok("keys", "model-key", "--out", workdir / "model.key")
    ok("bundle", "pack", workdir / "a.onnx", "--name", "clf", "--version", "1.0.0", "--key", key,
       "--out", workdir / "e.bundle", "--encrypt-key", workdir / "model.key")
    pub = workdir / "keys" / "signing.pub"
    refused("decrypt_failed", "bundle", "verify", workdir / "e.bundle", "--pub", pub)
    assert "ok:" in ok("bundle", "verify", workdir / "e.bundle", "--pub", pub, "--decrypt-key", workdir / "model.key")
