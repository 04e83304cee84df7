"""ONNX Runtime's GPU execution providers on an NVIDIA GPU: TensorRT and CUDA, fp16 and int8 against fp32.

    make bench-gpu            (= python -m bench.gpu_providers [--width 1.0 --size 224 --rounds 7])

One short prepared run on a machine with an NVIDIA GPU and ``onnxruntime-gpu``: a MobileNetV2 (plain torch,
``bench.models.mobilenet_v2``, random weights: latency does not depend on them) is exported to ONNX float32, to
float16 (``onnxconverter_common``, inputs and outputs kept float32) and to int8 QDQ (the build's static int8 pass,
calibrated on random rows). In the same run, interleaved, at batch 1 and 32:

    CPU fp32                    the anchor on the host
    CUDA fp32 / fp16 / int8     CUDAExecutionProvider on the float32, float16 and QDQ models
    TensorRT fp32 / fp16 / int8 TensorrtExecutionProvider on the float32 model (fp16: trt_fp16_enable) and on the
                                QDQ model (trt_int8_enable, explicit quantization), engines cached in a temp dir

Each timing is ``session.run`` from host arrays to host arrays (copies included), median and p10-p90 of
interleaved rounds after warm-up (TensorRT builds its engines during warm-up; the build time is reported).
Outputs are compared with the CPU fp32 model's (top-1 agreement and largest difference). Results go to
``bench/results/gpu.json`` and the ``gpu`` section of BENCHMARKS.md. Without an NVIDIA GPU, or without the CUDA
provider in this ONNX Runtime, it says so and exits 0, writing nothing. ``--dry-run`` runs the whole script on
any machine (the variants whose provider is missing are listed as not measured) and writes nothing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

CUDA, TRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name from ``nvidia-smi``; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def why_not() -> str | None:
    """Why this machine cannot run the measurement (None: it can)."""
    try:
        from edgefleet.runtime.runner import gpu_unavailable
    except ImportError as exc:
        return f"cannot import edgefleet's runner: {exc}"
    return gpu_unavailable()


def models(width: float, size: int, calib_rows: int = 64) -> dict[str, bytes]:
    """MobileNetV2 (``width``, ``size`` x ``size`` x 3, 1000 classes) as float32, float16 and int8 QDQ ONNX."""
    import onnx
    import torch
    from onnxconverter_common import float16

    from bench.models import mobilenet_v2
    from edgefleet.build.passes.static_int8 import StaticInt8, StaticInt8Config

    torch.manual_seed(0)
    net = mobilenet_v2(1000, width=width).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fp32.onnx"
        torch.onnx.export(net, (torch.zeros(1, 3, size, size),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
        fp32 = path.read_bytes()
    fp16 = float16.convert_float_to_float16(onnx.load_from_string(fp32), keep_io_types=True).SerializeToString()
    calib = np.random.default_rng(1).normal(size=(calib_rows, 3, size, size)).astype(np.float32)
    int8 = StaticInt8().run(fp32, calib, StaticInt8Config()).model
    return {"fp32": fp32, "fp16": fp16, "int8": int8}


def sessions(onnx_models: dict[str, bytes], cache: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """One session per variant (name -> session) and why each variant that could not open did not."""
    import onnxruntime as ort

    def trt(**flags: bool) -> tuple[str, dict[str, Any]]:
        return TRT, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                     "trt_max_workspace_size": 2 << 30, **flags}

    plan: dict[str, tuple[str, list[Any]]] = {
        "CPU fp32": ("fp32", [CPU]),
        "CUDA fp32": ("fp32", [CUDA, CPU]),
        "CUDA fp16": ("fp16", [CUDA, CPU]),
        "CUDA int8": ("int8", [CUDA, CPU]),
        "TensorRT fp32": ("fp32", [trt(trt_fp16_enable=False), CUDA, CPU]),
        "TensorRT fp16": ("fp32", [trt(trt_fp16_enable=True), CUDA, CPU]),
        "TensorRT int8": ("int8", [trt(trt_int8_enable=True, trt_fp16_enable=True), CUDA, CPU]),
    }
    opened: dict[str, Any] = {}
    failed: dict[str, str] = {}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for name, (variant, providers) in plan.items():
        wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        try:
            with warnings.catch_warnings():  # ORT warns when a provider is missing; the check below reports it
                warnings.simplefilter("ignore")
                session = ort.InferenceSession(onnx_models[variant], options, providers=providers)
        except Exception as exc:  # a provider that cannot build this model: report it, measure the others
            failed[name] = str(exc).splitlines()[0][:200]
            continue
        if session.get_providers()[0] != wanted:
            failed[name] = f"{wanted} did not load (fell back to {session.get_providers()[0]})"
            continue
        opened[name] = session
    return opened, failed


def measure(opened: dict[str, Any], batch: int, size: int, rounds: int, runs: int) -> dict[str, dict[str, float]]:
    """Median, p10 and p90 ms per session at ``batch``, interleaved; warm-up time (engine builds) per session."""
    x = np.random.default_rng(2).normal(size=(batch, 3, size, size)).astype(np.float32)
    warm: dict[str, float] = {}
    for name, session in opened.items():
        start = time.perf_counter()
        for _ in range(3):
            session.run(None, {"x": x})
        warm[name] = time.perf_counter() - start
    samples: dict[str, list[float]] = {name: [] for name in opened}
    for _ in range(rounds):
        for name, session in opened.items():
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, {"x": x})
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
                   "p90_ms": float(np.percentile(t, 90)), "warmup_s": warm[name], "runs": len(t)}
            for name, t in samples.items()}


def agreement(opened: dict[str, Any], size: int, rows: int = 64) -> dict[str, dict[str, float]]:
    """Each session's top-1 agreement with CPU fp32 and the largest output difference, on the same rows."""
    x = np.random.default_rng(3).normal(size=(rows, 3, size, size)).astype(np.float32)
    reference = opened["CPU fp32"].run(None, {"x": x})[0]
    out = {}
    for name, session in opened.items():
        y = session.run(None, {"x": x})[0]
        out[name] = {"top1_agreement": float((y.argmax(1) == reference.argmax(1)).mean()),
                     "max_abs_diff": float(np.abs(y.astype(np.float32) - reference).max())}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width multiplier")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="run on any machine and print, writing nothing")
    args = parser.parse_args(argv)
    reason = why_not()
    if reason is not None and not args.dry_run:
        print(f"gpu_providers: nothing measured: {reason}; the GPU providers need an NVIDIA GPU and onnxruntime-gpu")
        return 0
    import onnxruntime as ort

    start = time.perf_counter()
    built = models(args.width, args.size)
    with tempfile.TemporaryDirectory(prefix="edgefleet-trt-") as cache:
        opened, failed = sessions(built, Path(cache))
        latency = {f"b{b}": measure(opened, b, args.size, args.rounds, args.runs) for b in (1, 32)}
        agree = agreement(opened, args.size)
    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    for batch, stats in latency.items():
        for name, s in stats.items():
            provider = name.split()[0]
            base = stats.get(f"{provider} fp32") or stats.get("CUDA fp32")
            ratios.setdefault(batch, {})[name] = {
                "speedup_vs_same_provider_fp32": base["median_ms"] / s["median_ms"] if base else None,
                "speedup_vs_cpu_fp32": stats["CPU fp32"]["median_ms"] / s["median_ms"]}
    result = {"gpu": gpu_name(), "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
              "model": f"MobileNetV2-{args.width:g} {args.size}x{args.size}x3, 1000 classes, random weights",
              "sizes_bytes": {k: len(v) for k, v in built.items()}, "latency": latency, "ratios": ratios,
              "agreement_with_cpu_fp32": agree, "failed": failed, "total_s": time.perf_counter() - start}
    from bench.common import markdown_table, publish

    def ratio(batch: str, name: str) -> str:
        value = ratios[batch][name]["speedup_vs_same_provider_fp32"]
        return "-" if value is None else f"{value:.2f}x"

    table = markdown_table(
        ["variant", "b1 ms (p10-p90)", "b1 vs same EP fp32", "b32 ms (p10-p90)", "b32 vs same EP fp32",
         "top-1 vs CPU fp32", "warm-up s"],
        [[name, f"{s['median_ms']:.3g} ({s['p10_ms']:.3g}-{s['p90_ms']:.3g})", ratio("b1", name),
          f"{latency['b32'][name]['median_ms']:.3g} ({latency['b32'][name]['p10_ms']:.3g}-"
          f"{latency['b32'][name]['p90_ms']:.3g})", ratio("b32", name),
          f"{100 * agree[name]['top1_agreement']:.0f}%", f"{s['warmup_s']:.1f}"]
         for name, s in latency["b1"].items()])
    failures = "".join(f"\n- {name}: {why}" for name, why in failed.items())
    section = (f"{result['gpu']}, ONNX Runtime {ort.__version__}, {result['model']}; session.run from host arrays "
               f"(copies included), interleaved rounds.\n\n{table}\n")
    section += f"\nNot measured:{failures}\n" if failures else ""
    if args.dry_run:
        print(f"dry run ({reason or 'a GPU is here'}); nothing written\n\n{section}")
        return 0
    publish("gpu", result, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
