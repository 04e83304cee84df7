"""Float32 and int8 latency of each model on each runtime (ONNX Runtime, OpenVINO, LiteRT), side by side.

``bench.bench_compress`` calls :func:`compare_runtimes` on every model it benchmarks and publishes the rows under
``runtimes`` in ``bench/results/compress.json``. For each model, in one run:

- ONNX Runtime and OpenVINO run the float32 ONNX model and the same int8 QDQ model (the build's shipped int8 where
  the caller passes it, else the static int8 pass with its defaults);
- LiteRT runs the TFLite export of the same model: the ONNX model converted to PyTorch (``build.torch_bridge``),
  then ``build.tflite`` (litert-torch for float32, ai-edge-quantizer's static int8 calibrated on the same rows).

All six runners of a model are timed at batch 1, one thread, in interleaved rounds (load from other processes
hits them alike); accuracy is each runner's top-1 on the test rows. A runtime that is missing or cannot run a
model gets its reason instead of figures.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bench.models import BenchModel
from edgefleet.build.runtimes import time_runners
from edgefleet.errors import EdgefleetError
from edgefleet.runtime.runner import BaseRunner, installed_runtimes, make_runner

PRECISIONS = ("float32", "int8")


def static_int8(model: bytes, calib_x: np.ndarray) -> bytes:
    """The static int8 pass with its defaults (unsigned activations, per-channel weights, QDQ)."""
    from edgefleet.build.passes.static_int8 import StaticInt8, StaticInt8Config

    return StaticInt8().run(model, calib_x, StaticInt8Config()).model


def tflite_pair(bm: BenchModel) -> tuple[bytes, bytes]:
    """The model's TFLite export, float32 and int8 (calibrated on the model's calibration rows)."""
    from edgefleet.build.tflite import export_tflite
    from edgefleet.build.torch_bridge import to_torch

    converted = to_torch(bm.model)
    models = export_tflite(converted.module, bm.test_x[:1], bm.calib_x)
    assert models.int8 is not None
    return models.float32, models.int8


def _top1(runner: BaseRunner, x: np.ndarray, y: np.ndarray, batch: int = 64) -> float:
    scores = np.concatenate([runner.run(np.ascontiguousarray(x[i : i + batch], dtype=np.float32))
                             for i in range(0, len(x), batch)])
    return float((scores.reshape(len(x), -1).argmax(1) == y).mean())


def compare_model(bm: BenchModel, int8: bytes | None = None, *, rounds: int = 7, runs: int = 15
                  ) -> list[dict[str, Any]]:
    """One row per runtime: float32 and int8 median latency (p10-p90), int8 speedup, top-1 accuracy of both, and
    each against ONNX Runtime's float32 in the same run."""
    onnx_int8 = int8 if int8 is not None else static_int8(bm.model, bm.calib_x)
    models: dict[str, dict[str, bytes]] = {"onnxruntime": {"float32": bm.model, "int8": onnx_int8},
                                           "openvino": {"float32": bm.model, "int8": onnx_int8}}
    errors: dict[str, str] = {name: "not installed" for name in ("onnxruntime", "openvino", "litert")
                              if name not in installed_runtimes()}
    export_s = 0.0
    if "litert" not in errors:
        start = time.perf_counter()
        try:
            f32, i8 = tflite_pair(bm)
            models["litert"] = {"float32": f32, "int8": i8}
        except (EdgefleetError, ImportError) as exc:
            errors["litert"] = f"no TFLite export: {exc}"
        export_s = time.perf_counter() - start
    runners: dict[str, BaseRunner] = {}
    for runtime, pair in models.items():
        if runtime in errors:
            continue
        try:
            for precision in PRECISIONS:
                runners[f"{runtime}/{precision}"] = make_runner(pair[precision], runtime)
        except EdgefleetError as exc:
            errors[runtime] = str(exc)
    runners = {k: r for k, r in runners.items() if k.split("/")[0] not in errors}
    timed = time_runners(runners, bm.test_x, 1, rounds=rounds, runs=runs)
    anchor = timed.get("onnxruntime/float32")
    rows = []
    for runtime in ("onnxruntime", "openvino", "litert"):
        row: dict[str, Any] = {"model": bm.name, "runtime": runtime}
        if runtime in errors:
            rows.append({**row, "error": errors[runtime]})
            continue
        for precision in PRECISIONS:
            key = f"{runtime}/{precision}"
            stats = timed.get(key)
            if stats is None:
                row[f"{precision}_error"] = "failed on the benchmark's input"
                continue
            row.update({f"{precision}_ms": stats.median_ms, f"{precision}_p10_ms": stats.p10_ms,
                        f"{precision}_p90_ms": stats.p90_ms,
                        f"{precision}_accuracy": _top1(runners[key], bm.test_x, bm.test_y),
                        f"{precision}_size_bytes": len(models[runtime][precision])})
            if anchor is not None:
                row[f"{precision}_vs_ort_float32"] = anchor.median_ms / stats.median_ms
        if "float32_ms" in row and "int8_ms" in row:
            row["int8_speedup"] = row["float32_ms"] / row["int8_ms"]
        if runtime == "litert":
            row["export_s"] = export_s
        rows.append(row)
    return rows


def compare_runtimes(models: Sequence[BenchModel], int8: Mapping[str, bytes] | None = None, *, rounds: int = 7,
                     runs: int = 15) -> list[dict[str, Any]]:
    """:func:`compare_model` for every model (``int8`` maps a model's name to its shipped int8 ONNX model)."""
    rows: list[dict[str, Any]] = []
    for bm in models:
        rows += compare_model(bm, (int8 or {}).get(bm.name), rounds=rounds, runs=runs)
        ran = [r["runtime"] for r in rows if r["model"] == bm.name and "error" not in r]
        print(f"{bm.name}: timed on {', '.join(ran)}", flush=True)
    return rows


def runtimes_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    from bench.common import markdown_table

    def cell(row: dict[str, Any], precision: str) -> str:
        if f"{precision}_ms" not in row:
            return "-"
        return (f"{row[f'{precision}_ms']:.3g} ({row[f'{precision}_p10_ms']:.3g}-{row[f'{precision}_p90_ms']:.3g}), "
                f"{100 * row[f'{precision}_accuracy']:.1f}%")

    return markdown_table(
        ["model", "runtime", "float32 ms (p10-p90), acc", "int8 ms (p10-p90), acc", "int8 speedup",
         "float32 vs ORT f32", "int8 vs ORT f32"],
        [[r["model"], r["runtime"], cell(r, "float32"), cell(r, "int8"),
          f"{r['int8_speedup']:.2f}x" if "int8_speedup" in r else r.get("error", "-")[:80],
          f"{r['float32_vs_ort_float32']:.2f}x" if "float32_vs_ort_float32" in r else "-",
          f"{r['int8_vs_ort_float32']:.2f}x" if "int8_vs_ort_float32" in r else "-"] for r in rows])


if __name__ == "__main__":  # a quick look without the whole compress benchmark: the small models only
    from bench.models import basicmotions_cnn1d, dataset_model

    quick = [basicmotions_cnn1d(epochs=20), dataset_model("digits", "digits CNN 8x8", epochs=10)]
    print(runtimes_table(compare_runtimes(quick, rounds=3, runs=10)))
