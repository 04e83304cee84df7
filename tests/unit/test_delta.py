"""Weight-level deltas: byte-exact rebuilds, the whole-bundle fallback, and refusals of bad deltas."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.bundle import copydiff
from edgefleet.bundle.container import MANIFEST, read_container, write_container
from edgefleet.bundle.delta import MAGIC, Base, DeltaFile, apply, diff
from edgefleet.bundle.encrypt import ModelKey
from edgefleet.bundle.manifest import canonical_json
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.protowire import graph_elements, write_varint, zigzag
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.update import TrustState, accept_delta
from edgefleet.errors import BundleError

KEY = SigningKey.generate()
TRUST = TrustState(keys={KEY.public.key_id: KEY.public})
WIDTH, LAYERS = 32, 4


def mlp(seed: int, *, head_seed: int | None = None) -> bytes:
    """x [N, WIDTH] through LAYERS MatMul+Relu layers and a head; ``head_seed`` retrains only the head."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=(WIDTH, WIDTH)).astype(np.float32) for _ in range(LAYERS)]
    head = np.random.default_rng(seed if head_seed is None else head_seed).normal(size=(WIDTH, 4)).astype(np.float32)
    nodes, previous = [], "x"
    for i in range(LAYERS):
        nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"h{i}"])]
        previous = f"h{i}"
    nodes.append(helper.make_node("MatMul", [previous, "head"], ["y"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
                              + [numpy_helper.from_array(head, "head")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def bundle(model: bytes, release: int, **spec: object) -> bytes:
    return pack_bundle(model, KEY, BundleSpec(name="mlp", version=f"1.{release}.0", release=release,
                                              **spec))  # type: ignore[arg-type]


A = bundle(mlp(0), 1)
B_HEAD = bundle(mlp(0, head_seed=7), 2)
BASE = Base.of(read_container(A))
BASE_ID = hashlib.sha256(BASE.model).digest()[:16]


def reason_of(action: object) -> str:
    with pytest.raises(BundleError) as caught:
        action()  # type: ignore[operator]
    return caught.value.reason


def test_a_head_only_update_sends_only_the_head_and_rebuilds_b_byte_for_byte() -> None:
    result = diff(A, B_HEAD)
    assert result.is_delta
    assert len(result.data) < len(B_HEAD) * 0.3  # the head is 512 of ~17k weight bytes
    kinds = [kind for _, _, kind in DeltaFile.decode(result.data, BASE).holes]
    assert kinds.count(1) == 1 and kinds.count(0) >= LAYERS  # the head rides as a byte difference
    assert apply(A, result.data) == B_HEAD
    assert accept_delta(A, result.data, TRUST).manifest.release == 2


def test_a_full_retrain_is_sent_whole() -> None:
    b = bundle(mlp(1), 2)
    result = diff(A, b)
    assert not result.is_delta and result.data == b
    assert result.delta_bytes is not None and result.delta_bytes > len(b) // 2
    assert "whole" in result.note
    assert apply(A, result.data) == b  # a whole bundle passes through apply unchanged


def test_the_fraction_is_configurable() -> None:
    b = bundle(mlp(1), 2)
    result = diff(A, b, max_fraction=2.0)
    assert result.is_delta and apply(A, result.data) == b


def test_encrypted_bundles_are_sent_whole() -> None:
    b = bundle(mlp(0, head_seed=7), 2, encrypt_key=ModelKey.generate())
    result = diff(A, b)
    assert not result.is_delta and result.data == b


def test_a_delta_whose_rebuilt_model_hashes_wrong_is_refused() -> None:
    parsed = DeltaFile.decode(diff(A, B_HEAD).data, BASE)
    skeleton = bytearray(parsed.skeleton)
    skeleton[-5] ^= 0x01
    tampered = dataclasses.replace(parsed, skeleton=bytes(skeleton)).encode(BASE)
    assert reason_of(lambda: apply(A, tampered)) == "hash_mismatch"
    assert reason_of(lambda: accept_delta(A, tampered, TRUST)) == "hash_mismatch"


def test_a_delta_whose_holes_are_swapped_hashes_wrong() -> None:
    parsed = DeltaFile.decode(diff(A, B_HEAD).data, BASE)
    size = {index: BASE.elements[index][2] - BASE.elements[index][1] for _, index, _ in parsed.holes}
    holes = list(parsed.holes)
    i, j = next((i, j) for i in range(len(holes)) for j in range(i + 1, len(holes))
                if size[holes[i][1]] == size[holes[j][1]] and holes[i][1] != holes[j][1] and holes[i][2] == 0)
    holes[i], holes[j] = (*holes[i][:1], holes[j][1], holes[i][2]), (*holes[j][:1], holes[i][1], holes[j][2])
    tampered = dataclasses.replace(parsed, holes=tuple(holes)).encode(BASE)
    assert reason_of(lambda: apply(A, tampered)) == "hash_mismatch"


def test_a_self_consistent_forgery_still_needs_the_signature() -> None:
    """A delta whose every digest an attacker recomputed rebuilds, and is then refused by decide."""
    parsed = DeltaFile.decode(diff(A, B_HEAD).data, BASE)
    target = read_container(B_HEAD)
    manifest = json.loads(target[MANIFEST])
    manifest["hardware"] = ["attacker-chosen"]
    forged_manifest = canonical_json(manifest)
    forged_b = write_container({**target, MANIFEST: forged_manifest})
    forged = dataclasses.replace(parsed, manifest=forged_manifest, target_bundle_size=len(forged_b),
                                 target_bundle_id=hashlib.sha256(forged_b).digest()[:16])
    data = forged.encode(BASE)
    assert apply(A, data) == forged_b
    assert reason_of(lambda: accept_delta(A, data, TRUST)) == "bad_signature"
    stranger = SigningKey.generate()
    evil = pack_bundle(mlp(0, head_seed=9), stranger, BundleSpec(name="mlp", version="1.2.0", release=2))
    evil_delta = diff(A, evil).data
    assert apply(A, evil_delta) == evil
    assert reason_of(lambda: accept_delta(A, evil_delta, TRUST)) == "unknown_key"


def test_a_delta_made_against_another_base_is_refused() -> None:
    other_base = bundle(mlp(3), 1)
    assert reason_of(lambda: apply(other_base, diff(A, B_HEAD).data)) == "delta_base_mismatch"


@pytest.mark.parametrize("cut", [0, 7, 50, -1])
def test_truncated_deltas_are_refused(cut: int) -> None:
    data = diff(A, B_HEAD).data
    assert reason_of(lambda: apply(A, data[:cut] if cut >= 0 else data[:-1])) in ("truncated", "malformed")


def test_padded_and_foreign_deltas_are_refused() -> None:
    data = diff(A, B_HEAD).data
    assert reason_of(lambda: apply(A, data + b"\x00")) == "malformed"
    assert reason_of(lambda: apply(A, b"PK\x03\x04" + data[4:])) == "malformed"


def header(*sizes: int) -> bytes:
    return MAGIC + b"\x01" + BASE_ID + b"\x00" * 16 + b"".join(write_varint(size) for size in sizes)


def test_a_zip_bomb_stream_stops_at_the_declared_size() -> None:
    compressor = zlib.compressobj(9, zdict=BASE.skeleton[-32768:])
    bomb = compressor.compress(b"\x00" * (64 << 20)) + compressor.flush()
    assert reason_of(lambda: apply(A, header(100, 10, 10, 10, 0, len(bomb), 0) + bomb)) == "oversized"


def test_declared_sizes_are_capped_before_anything_is_read() -> None:
    assert reason_of(lambda: apply(A, header(1 << 60, 10, 10, 1 << 60, 0, 0, 0))) == "oversized"
    assert reason_of(lambda: apply(A, header(100, 1 << 40, 10, 10, 0, 0, 0))) == "oversized"
    assert reason_of(lambda: apply(A, header(100, 10, 10, 10, 1 << 30, 0, 0))) == "oversized"


def test_copy_ops_cannot_reach_outside_their_source() -> None:
    source = b"0123456789abcdef" * 4
    target = b"xx" + source[5:40] + b"yy"
    assert copydiff.patch(source, copydiff.diff(source, target), len(target)) == target
    outside = write_varint(20 << 1 | 1) + write_varint(zigzag(60))
    assert reason_of(lambda: copydiff.patch(source, outside, 100)) == "malformed"
    assert reason_of(lambda: copydiff.patch(source, write_varint(50 << 1) + b"short", 100)) == "malformed"
    assert reason_of(lambda: copydiff.patch(source, write_varint(20 << 1 | 1) + b"\x00", 10)) == "malformed"


def test_models_that_are_not_protobuf_cannot_be_diffed_but_still_ship() -> None:
    assert reason_of(lambda: graph_elements(b"\x0f\xff")) == "malformed"
    assert reason_of(lambda: graph_elements(b"\x3a\x10\x0a")) == "malformed"  # graph longer than the file
    assert onnx.load_from_string(mlp(0)).graph.name == "mlp"
