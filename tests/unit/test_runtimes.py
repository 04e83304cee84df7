"""Runtimes beyond ONNX Runtime: one runner contract on every runtime, the same predictions as ONNX Runtime on
the same inputs (stated tolerances), the TFLite export path, bundles that name their runtime, devices that
refuse a runtime they lack, and profiles that list only runtimes the code has.

The LiteRT models are the TFLite export (``edgefleet.build.tflite``) of the network below, kept in
``tests/data/runtimes`` because the export takes 15-35 s (a child process in the converter's venv): the ``slow``
test runs the export itself and checks it the same way; ``python tests/unit/test_runtimes.py`` rewrites them.

Tolerances: a float32 model on OpenVINO or LiteRT gives ONNX Runtime's scores within 1e-4 (float rounding);
OpenVINO runs ONNX Runtime's int8 QDQ model within 2% of the score range and the same top-1 on >= 95% of the
inputs; LiteRT's int8 model (its own quantizer) is within 10% of the score range of the float model and has
its top-1 on >= 85% of the inputs.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.build.latency import LatencyStats
from edgefleet.build.runtimes import bundle_runtime, runtime_per_profile, time_runners
from edgefleet.bundle.container import MODEL_TFLITE, read_container
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.runtimes import RUNTIMES
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.profiles import BUILTIN_PROFILES, parse_profiles, resolve
from edgefleet.core.rollout import DeviceView
from edgefleet.core.targeting import misfit
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import BundleError, ConfigError, ModelError
from edgefleet.runtime.runner import (
    BaseRunner,
    gpu_unavailable,
    installed_runtimes,
    make_runner,
    onnxruntime_providers,
    parse_runtimes,
)
from edgefleet.testing.cli import run_cli as _cli

torch = pytest.importorskip("torch")

SHAPE = (3, 16, 16)
CLASSES = 6
FLOAT_ATOL = 1e-4
EXPORTED = Path(__file__).resolve().parent.parent / "data" / "runtimes"


def _net() -> torch.nn.Module:
    """A MobileNet-like block stack: conv, batch norm, ReLU6, depthwise conv, residual add, pooling, linear."""
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
            self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                                       nn.Conv2d(8, 8, 1))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stem(x)
            return self.head(y + self.block(y))  # type: ignore[no-any-return]

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # spread batch norm statistics so the scores are not all alike
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net.eval()


class Models:
    """One network as ONNX float32, ONNX int8 (QDQ, ONNX Runtime's quantizer) and, where the LiteRT converter is
    installed, .tflite float32 and int8; plus inputs."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(48, *SHAPE)).astype(np.float32)
        self.calib = rng.normal(size=(32, *SHAPE)).astype(np.float32)
        self.net = _net()
        buffer = io.BytesIO()
        torch.onnx.export(self.net, (torch.from_numpy(self.x[:1]),), buffer, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
        self.onnx = buffer.getvalue()
        self.onnx_int8 = _ort_int8(self.onnx, self.calib)
        kept = {p.name: p.read_bytes() for p in EXPORTED.glob("net_*.tflite")}
        self.tflite, self.tflite_int8 = kept.get("net_float32.tflite", b""), kept.get("net_int8.tflite", b"")

    def export_tflite(self) -> tuple[bytes, bytes]:
        """The network through the TFLite export path: float32 and int8 (calibrated on ``calib``)."""
        from edgefleet.build.tflite import export_tflite

        try:
            models = export_tflite(self.net, self.x[:1], self.calib)
        except ConfigError as exc:  # no converter venv (`make litert-venv`): skip here, fail in CI
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(str(exc))
            pytest.skip(str(exc))
        assert models.int8 is not None
        return models.float32, models.int8


def _ort_int8(model: bytes, calib: np.ndarray) -> bytes:
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter({"x": calib[i : i + 1]} for i in range(len(calib)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.rows, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "f.onnx"), Path(tmp, "q.onnx")
        src.write_bytes(model)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return dst.read_bytes()


@pytest.fixture(scope="module")
def models() -> Models:
    return Models()


@pytest.fixture(params=RUNTIMES)
def runner(request: pytest.FixtureRequest, models: Models) -> Iterator[BaseRunner]:
    """The float32 model on each runtime (the contract suite runs on every backend)."""
    name = request.param
    yield make_runner(models.tflite if name == "litert" else models.onnx, name)


# -- one contract, every runtime --------------------------------------------------------------------------------
def test_every_runtime_gives_onnx_runtimes_float_scores_within_1e4(runner: BaseRunner, models: Models) -> None:
    expected = make_runner(models.onnx, "onnxruntime").run(models.x)
    actual = runner.run(models.x)
    assert actual.shape == expected.shape == (len(models.x), CLASSES)
    np.testing.assert_allclose(actual, expected, atol=FLOAT_ATOL, rtol=0)
    assert (actual.argmax(1) == expected.argmax(1)).all()


def test_every_runner_answers_batch_one_and_named_outputs_alike(runner: BaseRunner, models: Models) -> None:
    whole = runner.run(models.x[:4])
    rows = np.concatenate([runner.run(models.x[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(whole, rows, atol=FLOAT_ATOL)
    (named,) = runner.run_outputs(models.x[:4], [runner.output_names[0]])
    np.testing.assert_allclose(np.asarray(named), whole, atol=0)
    assert runner.runtime in RUNTIMES and runner.input_name


def test_every_runner_turns_its_failures_into_one_line_model_errors(runner: BaseRunner, models: Models) -> None:
    with pytest.raises(ModelError, match="has no output 'nope'"):
        runner.run_outputs(models.x[:1], ["nope"])
    with pytest.raises(ModelError) as caught:
        runner.run(np.zeros((1, 5, 7), np.float32))
    assert "\n" not in str(caught.value)


# -- int8 on every runtime ----------------------------------------------------------------------------------------
def _close(actual: np.ndarray, expected: np.ndarray, spread: float, agree: float) -> None:
    span = float(expected.max() - expected.min())
    assert float(np.abs(actual - expected).max()) <= spread * span
    assert float((actual.argmax(1) == expected.argmax(1)).mean()) >= agree


def test_openvino_runs_onnx_runtimes_int8_model_alike(models: Models) -> None:
    expected = make_runner(models.onnx_int8, "onnxruntime").run(models.x)
    _close(make_runner(models.onnx_int8, "openvino").run(models.x), expected, 0.02, 0.95)


def _check_tflite_pair(models: Models, float32: bytes, int8: bytes) -> None:
    expected = make_runner(models.onnx, "onnxruntime").run(models.x)
    np.testing.assert_allclose(make_runner(float32, "litert").run(models.x), expected, atol=FLOAT_ATOL, rtol=0)
    quantized = make_runner(int8, "litert")
    assert quantized.quantized_input  # type: ignore[attr-defined]  # fully int8: the runner quantizes the input
    _close(quantized.run(models.x), expected, 0.10, 0.85)


def test_the_tflite_int8_export_keeps_the_float_models_predictions(models: Models) -> None:
    _check_tflite_pair(models, models.tflite, models.tflite_int8)


@pytest.mark.slow
def test_the_tflite_export_path_converts_and_quantizes_the_torch_model(models: Models) -> None:
    """The export itself (a child process in the converter's venv), checked like the kept models."""
    _check_tflite_pair(models, *models.export_tflite())


# -- bundles name their runtime; devices refuse the ones they lack ------------------------------------------------
@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


def _bundle(models: Models, key: SigningKey, runtime: str | None, model: bytes | None = None) -> bytes:
    return pack_bundle(model or models.onnx, key, BundleSpec(name="net", version="1.0.0", golden=models.x[:2],
                                                             runtime=runtime))


def test_a_device_without_the_bundles_runtime_refuses_it_with_that_reason(models: Models, key: SigningKey) -> None:
    data = _bundle(models, key, "openvino")
    state = TrustState(keys={key.public.key_id: key.public}, runtimes=frozenset({"onnxruntime"}))
    with pytest.raises(BundleError, match="bundle needs runtime openvino, this device has onnxruntime") as caught:
        decide(data, state)
    assert caught.value.reason == "missing_runtime"
    accepted = decide(data, TrustState(keys=state.keys, runtimes=frozenset({"onnxruntime", "openvino"})))
    assert accepted.manifest.runtime == "openvino"
    assert decide(_bundle(models, key, None), state).manifest.needs_runtime == "onnxruntime"


def test_a_runtime_no_agent_knows_is_refused_as_missing() -> None:
    key = SigningKey.generate()
    from edgefleet.bundle.manifest import Manifest

    manifest = Manifest.model_validate({"name": "m", "version": "1.0.0", "release": 1, "members": {},
                                        "inputs": [], "outputs": [], "runtime": "npu-vendor-x"})
    assert manifest.needs_runtime == "npu-vendor-x"
    with pytest.raises(ConfigError, match="unknown runtime 'npu-vendor-x'"):
        pack_bundle(b"", key, BundleSpec(name="m", version="1.0.0", runtime="npu-vendor-x"))
    view = DeviceView("d", runtimes=frozenset({"onnxruntime", "litert"}))
    reason = misfit(view, [], [], "npu-vendor-x")
    assert reason == "runtime npu-vendor-x is not among the device's (litert, onnxruntime)"


def test_a_litert_bundle_carries_the_tflite_model_and_runs_on_the_agent(models: Models, key: SigningKey) -> None:
    from edgefleet.agent.model import ModelInfo, make_model
    from edgefleet.bundle.manifest import check_golden

    data = _bundle(models, key, "litert", models.tflite_int8)
    assert MODEL_TFLITE in read_container(data)
    state = TrustState(keys={key.public.key_id: key.public}, runtimes=frozenset(installed_runtimes()))
    accepted = decide(data, state)
    assert accepted.model == models.tflite_int8
    loaded = make_model(ModelInfo.from_bytes(accepted.manifest.canonical_bytes()), accepted.sha256, accepted.model)
    assert loaded.runner.runtime == "litert"  # type: ignore[attr-defined]
    check_golden(accepted.manifest, loaded.score)  # the golden outputs came from LiteRT at pack time
    with pytest.raises(BundleError, match="not a TFLite flatbuffer"):
        _bundle(models, key, "litert", models.onnx)
    with pytest.raises(BundleError) as caught:
        decide(data, TrustState(keys=state.keys, runtimes=frozenset({"onnxruntime", "openvino"})))
    assert caught.value.reason == "missing_runtime"


def test_the_agent_runtimes_setting_hides_installed_runtimes() -> None:
    from edgefleet.agent.config import agent_runtimes

    assert agent_runtimes({}) == installed_runtimes()
    assert agent_runtimes({"EDGEFLEET_AGENT_RUNTIMES": "onnxruntime"}) == ("onnxruntime",)
    assert "openvino" not in installed_runtimes(hidden=["openvino"])
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'"):
        agent_runtimes({"EDGEFLEET_AGENT_RUNTIMES": "onnxruntime,tensorrt"})
    with pytest.raises(ConfigError):
        parse_runtimes("tflite")


# -- profiles and the choice per profile --------------------------------------------------------------------------
def test_profiles_list_only_runtimes_the_code_has() -> None:
    for profile in BUILTIN_PROFILES.values():
        assert profile.runtimes and set(profile.runtimes) <= set(RUNTIMES), profile.name
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'"):
        parse_profiles("- {name: x, ram_bytes: 1, storage_bytes: 1, int8_macs_per_s: 1, float_macs_per_s: 1, "
                       "latency_budget_ms: 1, power_w: 1, runtimes: [onnxruntime, tensorrt]}")
    (jetson,) = resolve(["jetson-orin-nano"])
    assert onnxruntime_providers(jetson.providers)[-1] == "CPUExecutionProvider"  # GPUs where ORT has them


def test_onnx_runtime_takes_the_preferred_providers_it_has_and_falls_back_to_the_cpu(models: Models) -> None:
    from edgefleet.agent.model import ModelInfo, make_model

    assert onnxruntime_providers(["NoSuchExecutionProvider"]) == ["CPUExecutionProvider"]
    manifest = pack_bundle(models.onnx, SigningKey.generate(), BundleSpec(name="net", version="1.0.0"))
    info = ModelInfo.from_bytes(read_container(manifest)["manifest.json"])
    loaded = make_model(info, "0" * 64, models.onnx, ("NoSuchExecutionProvider", "CUDAExecutionProvider"))
    expected = ("CUDAExecutionProvider", "CPUExecutionProvider") if gpu_unavailable() is None else \
        ("CPUExecutionProvider",)
    assert loaded.runner.providers == expected  # type: ignore[attr-defined]


def _stats(ms: float) -> LatencyStats:
    return LatencyStats(batch=1, median_ms=ms, p10_ms=ms, p90_ms=ms, runs=1)


def test_the_runtime_is_chosen_per_profile_from_measured_latency() -> None:
    pi, watch, mcu = resolve(["raspberry-pi", "smartwatch", "microcontroller"])
    latency = {"onnxruntime": _stats(2.0), "openvino": _stats(1.0)}
    assert runtime_per_profile([pi, watch, mcu], latency) == {"raspberry-pi": "openvino",
                                                             "smartwatch": "onnxruntime", "microcontroller": None}
    assert bundle_runtime("auto", [pi], latency)[0] == "openvino"
    assert bundle_runtime("auto", [pi, watch], latency)[0] == "onnxruntime"
    assert bundle_runtime("auto", [pi], {**latency, "litert": _stats(0.5)})[0] == "onnxruntime"  # needs a .tflite
    assert bundle_runtime("openvino", [watch], latency) == ("openvino", "asked for")
    assert bundle_runtime("litert", [pi], latency) == ("litert", "asked for")  # the build exports it
    with pytest.raises(ConfigError, match="unknown runtime 'tflite'"):
        bundle_runtime("tflite", [pi], latency)


def test_candidates_are_timed_on_every_installed_runtime(models: Models) -> None:
    runners = {name: make_runner(models.onnx, name) for name in ("onnxruntime", "openvino")}
    timed = time_runners(runners, models.x, rounds=2, runs=3, warmup=1)
    assert set(timed) == set(runners) and all(s.runs == 6 and s.median_ms > 0 for s in timed.values())


def test_bundle_pack_runtime_litert_ships_the_tflite_export(models: Models, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from edgefleet.bundle.signing import write_keypair

    write_keypair(tmp_path)
    (tmp_path / "net.onnx").write_bytes(models.onnx)
    (tmp_path / "net.tflite").write_bytes(models.tflite_int8)
    np.save(tmp_path / "golden.npy", models.x[:3])
    common = ["bundle", "pack", str(tmp_path / "net.onnx"), "--key", str(tmp_path / "signing.key"), "--golden",
              str(tmp_path / "golden.npy"), "--out", str(tmp_path / "net.efb")]
    code, out = _cli([*common, "--runtime", "litert", "--tflite", str(tmp_path / "net.tflite")], monkeypatch, capsys)
    assert code == 0, out
    assert "runtime litert" in out
    data = (tmp_path / "net.efb").read_bytes()
    assert read_container(data)[MODEL_TFLITE] == models.tflite_int8
    code, out = _cli([*common, "--runtime", "litert"], monkeypatch, capsys)
    assert code == 2 and "--runtime litert needs --tflite" in out and "Traceback" not in out
    code, out = _cli([*common, "--runtime", "tensorrt"], monkeypatch, capsys)
    assert code == 2 and "known runtimes are onnxruntime, openvino, litert" in out


@pytest.mark.slow
def test_build_runtime_litert_ships_the_tflite_export_within_the_gate(models: Models, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`edgefleet build --runtime litert`: the float model exported to .tflite, int8 where it keeps the gate."""
    from edgefleet.bundle.pack import peek_manifest
    from edgefleet.bundle.signing import write_keypair

    write_keypair(tmp_path)
    (tmp_path / "fast.yaml").write_text("latency: {budget_s: 0.02, min_runs: 3, max_runs: 10, warmup: 1, "
                                        "batches: [1]}\nmax_accuracy_drop: 5.0\n")
    (tmp_path / "net.onnx").write_bytes(models.onnx)
    labels = make_runner(models.onnx).run(models.x).argmax(1)
    np.savez(tmp_path / "data.npz", calib_x=models.calib, test_x=models.x, test_y=labels)
    code, out = _cli(["build", str(tmp_path / "net.onnx"), "--data", str(tmp_path / "data.npz"), "--key",
                      str(tmp_path / "signing.key"), "--out", str(tmp_path / "net.efb"), "--recipe",
                      str(tmp_path / "fast.yaml"), "--profile", "raspberry-pi", "--runtime", "litert"],
                     monkeypatch, capsys)
    assert code == 0, out
    assert "runtime litert (asked for; ships the TFLite export" in out
    data = (tmp_path / "net.efb").read_bytes()
    members = read_container(data)
    assert MODEL_TFLITE in members and members[MODEL_TFLITE][4:8] == b"TFL3"
    manifest = peek_manifest(data)
    assert manifest.runtime == "litert" and manifest.metrics["litert_accuracy"] >= 0.95


# -- GPU: ONNX Runtime's CUDA and TensorRT providers ---------------------------------------------------------------
def test_the_gpu_providers_run_the_model_like_the_cpu(models: Models) -> None:
    reason = gpu_unavailable()
    if reason is not None:
        pytest.skip(f"needs an NVIDIA GPU with onnxruntime-gpu: {reason}")
    expected = make_runner(models.onnx).run(models.x)
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        runner = make_runner(models.onnx, providers=(provider,))
        assert runner.providers[0] == provider  # type: ignore[attr-defined]
        np.testing.assert_allclose(runner.run(models.x), expected, atol=1e-3)


def test_the_gpu_benchmark_says_why_it_measures_nothing_without_a_gpu() -> None:
    reason = gpu_unavailable()
    if reason is None:
        pytest.skip("an NVIDIA GPU is here: `make bench-gpu` measures it")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "bench.gpu_providers"], cwd=root, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"nothing measured: {reason}" in done.stdout


if __name__ == "__main__":  # rewrite the kept TFLite exports (after a change to the network or the converter)
    EXPORTED.mkdir(parents=True, exist_ok=True)
    fresh = Models()
    for suffix, model in zip(("float32", "int8"), fresh.export_tflite(), strict=True):
        (EXPORTED / f"net_{suffix}.tflite").write_bytes(model)
    print(f"wrote {EXPORTED}")
