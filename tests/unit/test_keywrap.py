"""Envelope encryption of model keys: a key wrapped for one device and bundle opens only there; keys at rest
open only with the server's master key; the device key pair is made once, its private key 0600; a stored
encrypted model is restored (in the verification child) with its wrapped key, the plaintext coming back
through the pipe; the server wraps only for devices that are not revoked and sends encrypted models whole."""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgefleet.agent.state import DEVICE_KEY_FILE, device_private_key, device_public_key
from edgefleet.agent.verify import StoredKey, TrustSpec, verify_stored
from edgefleet.bundle.encrypt import ModelKey
from edgefleet.bundle.keywrap import (
    generate_device_key,
    key_text,
    open_at_rest,
    parse_public_key,
    public_from_private,
    seal_at_rest,
    unwrap_for_device,
    wrap_for_device,
)
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.errors import BundleError
from edgefleet.server.model_keys import ModelKeys
from edgefleet.server.orchestrator import desired_message
from edgefleet.testing import synthetic

KEY = SigningKey.generate()
SHA = "ab" * 32


def refused(call: object, *args: object) -> str:
    with pytest.raises(BundleError) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.reason == "decrypt_failed"
    return str(caught.value)


def test_a_wrapped_key_opens_only_for_its_device_and_bundle() -> None:
    model_key = ModelKey.generate()
    private, public = generate_device_key()
    other_private, _ = generate_device_key()
    wrapped = wrap_for_device(model_key, public, "dev-a", SHA)
    assert unwrap_for_device(wrapped, private, "dev-a", SHA) == model_key
    assert model_key.to_text() not in wrapped
    assert "not wrapped for this device" in refused(unwrap_for_device, wrapped, other_private, "dev-a", SHA)
    refused(unwrap_for_device, wrapped, private, "dev-b", SHA)  # moved to another device id
    refused(unwrap_for_device, wrapped, private, "dev-a", "cd" * 32)  # moved under another bundle
    refused(unwrap_for_device, "not base64!", private, "dev-a", SHA)
    refused(unwrap_for_device, key_text(b"\x01" * 10), private, "dev-a", SHA)
    refused(wrap_for_device, model_key, bytes(32), "dev-a", SHA)  # a low-order public key: no shared secret


def test_a_sealed_key_opens_only_with_the_master_key_and_for_its_bundle() -> None:
    model_key, master = ModelKey.generate(), bytes(range(32))
    sealed = seal_at_rest(model_key, master, SHA)
    assert open_at_rest(sealed, master, SHA) == model_key
    refused(open_at_rest, sealed, bytes(32), SHA)
    refused(open_at_rest, sealed, master, "cd" * 32)


def test_the_device_key_pair_is_made_once_with_a_private_key_only_the_agent_reads(tmp_path: Path) -> None:
    public = device_public_key(tmp_path)
    assert device_public_key(tmp_path) == public  # the second start reads it
    private = device_private_key(tmp_path)
    assert key_text(public_from_private(private)) == public and len(parse_public_key(public)) == 32
    assert stat.S_IMODE((tmp_path / DEVICE_KEY_FILE).stat().st_mode) == 0o600
    (tmp_path / "device.pub").unlink()  # stopped between the two writes: the public key is derived again
    assert device_public_key(tmp_path) == public


def test_the_server_master_key_is_made_once_0600_or_taken_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_MODEL_MASTER_KEY", raising=False)
    sealed = ModelKeys.load(tmp_path).seal(ModelKey.generate(), SHA)
    path = tmp_path / "model-master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ModelKeys.load(tmp_path)  # the same file again
    model = SimpleNamespace(model_key_sealed=sealed, sha256=SHA, name="clf", version="1.0.0")
    _, public = generate_device_key()
    assert ModelKeys.load(tmp_path).wrap_for(model, "d", key_text(public)) is not None  # type: ignore[arg-type]
    monkeypatch.setenv("EDGEFLEET_MODEL_MASTER_KEY", key_text(bytes(32)))
    assert ModelKeys.load(tmp_path).wrap_for(model, "d", key_text(public)) is None  # type: ignore[arg-type]


def encrypted_bundle(model_key: ModelKey, version: str = "1.0.0") -> bytes:
    return pack_bundle(synthetic.channel_mean_model(), KEY, BundleSpec(
        name="clf", version=version, labels=list(synthetic.LABELS), preprocess=synthetic.preprocess_spec(),
        encrypt_key=model_key))


def test_a_stored_encrypted_bundle_is_restored_in_the_child_with_its_wrapped_key(tmp_path: Path) -> None:
    import hashlib

    model_key = ModelKey.generate()
    data = encrypted_bundle(model_key)
    digest = hashlib.sha256(data).hexdigest()
    public = parse_public_key(device_public_key(tmp_path))
    stored = StoredKey(wrap_for_device(model_key, public, "dev-a", digest), str(tmp_path / DEVICE_KEY_FILE))
    spec = TrustSpec(pinned=(KEY.public,), device_id="dev-a")
    child = verify_stored(data, spec, in_process=False, stored_key=stored)
    here = verify_stored(data, spec, in_process=True, stored_key=stored)
    assert child == here and child.model == synthetic.channel_mean_model()
    with pytest.raises(BundleError) as no_key:
        verify_stored(data, spec, in_process=False)
    assert no_key.value.reason == "decrypt_failed"
    _, other = generate_device_key()
    foreign = StoredKey(wrap_for_device(model_key, other, "dev-a", digest), stored.device_key_file)
    with pytest.raises(BundleError) as wrong:
        verify_stored(data, spec, in_process=False, stored_key=foreign)
    assert wrong.value.reason == "decrypt_failed"


def test_desired_states_carry_a_key_wrapped_per_device_never_for_a_revoked_one_and_no_delta(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_MODEL_MASTER_KEY", raising=False)
    keys = ModelKeys.load(tmp_path)
    model_key = ModelKey.generate()
    encrypted = SimpleNamespace(id=2, name="clf", version="1.1.0", release=2, sha256=SHA, size=10,
                                manifest={"encryption": {"key_id": model_key.key_id}},
                                model_key_sealed=keys.seal(model_key, SHA))
    clear = SimpleNamespace(id=1, name="clf", version="1.0.0", release=1, sha256="cd" * 32, size=10, manifest={},
                            model_key_sealed=None)
    models = {1: clear, 2: encrypted}
    private, public = generate_device_key()

    def device(revoked: bool = False, key: str | None = key_text(public), model: int = 2) -> SimpleNamespace:
        return SimpleNamespace(id="dev-a", desired_model_id=model, desired_shadow_id=None, revoked=revoked,
                               public_key=key, reported={"active_sha256": clear.sha256})

    target = desired_message(device(), models, keys).model  # type: ignore[arg-type]
    assert target is not None and target.wrapped_key is not None and target.delta_url is None  # sent whole
    assert unwrap_for_device(target.wrapped_key, private, "dev-a", SHA) == model_key
    assert desired_message(device(revoked=True), models, keys).model.wrapped_key is None  # type: ignore[arg-type,union-attr]
    assert desired_message(device(key=None), models, keys).model.wrapped_key is None  # type: ignore[arg-type,union-attr]
    assert desired_message(device(model=1), models, keys).model.wrapped_key is None  # type: ignore[arg-type,union-attr]
