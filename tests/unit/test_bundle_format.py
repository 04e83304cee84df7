"""The bundle format beyond trust: golden samples, the encrypted model member, compatibility, purity."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from edgefleet.bundle.container import MANIFEST, MODEL, MODEL_ENC, SIGNATURES, read_container, write_container
from edgefleet.bundle.encrypt import ModelKey
from edgefleet.bundle.manifest import MAX_GOLDEN_SAMPLES, check_golden, golden_samples
from edgefleet.bundle.pack import BundleSpec, pack_bundle, peek_manifest
from edgefleet.bundle.safe_onnx import check_onnx, sniff_model
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import BundleError, ConfigError, ModelError
from edgefleet.runtime.runner import OnnxRuntimeRunner
from edgefleet.testing.synthetic import CHANNELS, WINDOW, channel_mean_model

KEY = SigningKey.generate()
TRUST = TrustState(keys={KEY.public.key_id: KEY.public})
MODEL_BYTES = channel_mean_model()
GOLDEN = np.random.default_rng(0).normal(size=(3, CHANNELS, WINDOW)).astype(np.float32)


def pack(model: bytes = MODEL_BYTES, **spec: object) -> bytes:
    return pack_bundle(model, KEY, BundleSpec(name="clf", version="1.0.0", **spec))  # type: ignore[arg-type]


def test_golden_outputs_are_computed_at_pack_time_and_signed() -> None:
    accepted = decide(pack(golden=GOLDEN, golden_atol=1e-5), TRUST)
    samples = golden_samples(accepted.manifest)
    assert len(samples) == 3
    runner = OnnxRuntimeRunner(MODEL_BYTES)
    for (x, expected), row in zip(samples, GOLDEN, strict=True):
        assert x.dtype == np.float32 and x.shape == (1, CHANNELS, WINDOW)
        np.testing.assert_array_equal(x[0], row)
        np.testing.assert_array_equal(expected, runner.run(x))
    check_golden(accepted.manifest, runner.run)
    assert accepted.manifest.golden is not None and accepted.manifest.golden.atol == 1e-5


def test_a_different_model_fails_the_golden_check() -> None:
    manifest = decide(pack(golden=list(GOLDEN)), TRUST).manifest  # a list of single samples works too
    other = OnnxRuntimeRunner(channel_mean_model(scale=1.0))
    with pytest.raises(ModelError, match="golden sample 0"):
        check_golden(manifest, other.run)
    with pytest.raises(ModelError, match="shape"):
        check_golden(manifest, lambda x: np.zeros((1, 2), dtype=np.float32))
    with pytest.raises(ModelError):
        check_golden(manifest, lambda x: np.full((1, 4), np.nan, dtype=np.float32))


def test_golden_inputs_must_fit_the_model_and_the_cap() -> None:
    with pytest.raises(ConfigError, match="golden"):
        pack(golden=np.zeros((2, CHANNELS, WINDOW + 1), dtype=np.float32))
    with pytest.raises(ConfigError, match="golden"):
        pack(golden=np.zeros((MAX_GOLDEN_SAMPLES + 1, CHANNELS, WINDOW), dtype=np.float32))
    with pytest.raises(ConfigError, match="finite"):
        pack(golden=np.full((1, CHANNELS, WINDOW), np.inf, dtype=np.float32))


def test_unset_new_fields_stay_out_of_the_signed_bytes() -> None:
    """Bundles signed before golden samples and encryption existed keep verifying."""
    manifest = json.loads(read_container(pack())[MANIFEST])
    assert "golden" not in manifest and "encryption" not in manifest
    assert {"created", "expires", "min_agent_version", "hardware", "profiles", "metrics"} <= set(manifest)


def test_an_encrypted_model_opens_only_with_its_key() -> None:
    key = ModelKey.generate()
    data = pack(encrypt_key=key)
    members = read_container(data)
    assert MODEL not in members and MODEL_BYTES not in members[MODEL_ENC]
    manifest = peek_manifest(data)
    assert manifest.encryption is not None and manifest.encryption.key_id == key.key_id
    assert decide(data, TRUST, decryption_key=key).model == MODEL_BYTES
    assert _reason(lambda: decide(data, TRUST)) == "decrypt_failed"
    assert _reason(lambda: decide(data, TRUST, decryption_key=ModelKey.generate())) == "decrypt_failed"


def test_a_relay_can_verify_an_encrypted_bundle_it_cannot_open() -> None:
    data = pack(encrypt_key=ModelKey.generate())
    routed = decide(data, TRUST, open_model=False)
    assert routed.encrypted and routed.model == read_container(data)[MODEL_ENC]
    members = read_container(data)
    tampered = bytearray(members[MODEL_ENC])
    tampered[-1] ^= 1
    assert _reason(lambda: decide(write_container({**members, MODEL_ENC: bytes(tampered)}), TRUST,
                                  open_model=False)) == "hash_mismatch"
    assert decide(pack(), TRUST, open_model=False).model == MODEL_BYTES  # a clear model is still checked


def test_an_encrypted_member_must_match_what_the_manifest_says() -> None:
    clear, encrypted = read_container(pack()), read_container(pack(encrypt_key=ModelKey.generate()))
    both = write_container({**encrypted, MODEL: clear[MODEL]})
    assert _reason(lambda: decide(both, TRUST)) == "unexpected_member"
    undeclared = write_container({MANIFEST: clear[MANIFEST], SIGNATURES: clear[SIGNATURES],
                                  MODEL_ENC: encrypted[MODEL_ENC]})
    assert _reason(lambda: decide(undeclared, TRUST)) == "unexpected_member"


def test_the_onnx_check_is_a_parameter_and_the_byte_sniff_is_not() -> None:
    assert decide(pack(), TRUST, model_check=None).model == MODEL_BYTES
    seen: list[bytes] = []
    decide(pack(), TRUST, model_check=seen.append)
    assert seen == [MODEL_BYTES]
    with pytest.raises(BundleError) as caught:
        sniff_model(pickle.dumps({"a": 1}))
    assert caught.value.reason == "unsafe_format"
    with pytest.raises(BundleError) as caught:
        sniff_model(MODEL_BYTES, max_bytes=10)
    assert caught.value.reason == "oversized"
    check_onnx(MODEL_BYTES)


def test_the_pure_core_imports_no_onnx_runtime_or_torch() -> None:
    code = ("import sys, edgefleet.core.update, edgefleet.core.keys; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _reason(action: object) -> str:
    with pytest.raises(BundleError) as caught:
        action()  # type: ignore[operator]
    return caught.value.reason
