"""Training-time compression on the MobileNetV2-class model of bench_compress: structured pruning + distillation,
then int8 by post-training quantization and by quantization-aware training, against float32 and edgefleet's
best post-training int8 model, timed side by side at batch 1 with one thread.

``bench_compress`` calls :func:`training_rows`; alone: ``python -m bench.training_compress`` prints the rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.models import BenchModel, digits_96, mobilenet_v2_digits
from edgefleet.build.evaluate import accuracy
from edgefleet.build.latency import compare_latency
from edgefleet.build.pipeline import BuildData, BuildSearch
from edgefleet.build.recipe import load_recipe
from edgefleet.build.training.data import TrainingSet

GATE_PP, SPEED_TARGET, SIZE_TARGET = 0.5, 2.0, 0.25
RECIPE = """
max_accuracy_drop: {gate}
candidates:
  - pass: static_int8
    options: {{float_stem: true}}
    grid: {{per_channel: [false, true]}}
rescue: {{enabled: false}}
latency: {{batches: [1], budget_s: 0.3, max_runs: 100}}
training:
  prune_ratios: {ratios}
  epochs: {epochs}
  qat_epochs: {qat_epochs}
  qat_unpruned: false
  unstructured_sparsity: {sparsity}
  threads: {threads}
  batch: 32
"""


def training_rows(bm: BenchModel, *, ratios: tuple[float, ...] = (0.3, 0.5), epochs: int = 6, qat_epochs: int = 1,
                  sparsity: float = 0.5, threads: int = 1, save: Path | None = None) -> dict[str, Any]:
    """Rows (float32, the best PTQ int8, every training-time candidate), target notes and the search's choice;
    ``save``: a folder to write every timed model to (``NN.onnx`` in row order)."""
    data = digits_96()
    recipe = load_recipe(RECIPE.format(gate=GATE_PP, epochs=epochs, qat_epochs=qat_epochs, threads=threads,
                                       ratios=list(ratios), sparsity=sparsity))
    build = BuildData(bm.calib_x, bm.test_x, bm.test_y, train=TrainingSet(data["train_x"], data["train_y"]))
    start = time.perf_counter()
    outcome = BuildSearch(bm.model, build, recipe, [], progress=lambda m: print(f"  {m}", flush=True)).run()
    search_s = time.perf_counter() - start
    ptq = [c for c in outcome.candidates if c.pass_name != "train" and c.passed and c.model]
    best_ptq = min(ptq, key=lambda c: c.latency_ms(1)) if ptq else None
    trained = [c for c in outcome.candidates if c.pass_name == "train"]
    timed = [("float32", bm.model, None), *([(f"PTQ {best_ptq.label}", best_ptq.model, best_ptq)] if best_ptq else []),
             *[(c.label, c.model, c) for c in trained if c.model]]
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        for i, (_, model, _) in enumerate(timed):
            (save / f"{i:02d}.onnx").write_bytes(model or b"")
    stats = compare_latency([m for _, m, _ in timed if m], bm.test_x, 1, rounds=15, runs=25, threads=1)
    base_acc = accuracy(bm.model, bm.test_x, bm.test_y)
    rows = []
    for (label, model, cand), s in zip(timed, stats, strict=True):
        assert model is not None
        acc = base_acc if cand is None else (cand.accuracy or 0.0)
        rows.append({"method": label, "accuracy": acc, "drop_pp": 100 * (base_acc - acc), "size_bytes": len(model),
                     "size_ratio": len(model) / len(bm.model), "latency_b1_ms": s.median_ms,
                     "latency_b1_p10_ms": s.p10_ms, "latency_b1_p90_ms": s.p90_ms,
                     "speedup_b1": stats[0].median_ms / s.median_ms, "train_s": cand.train_s if cand else 0.0,
                     "macs": cand.analysis.macs if cand and cand.analysis else None,
                     "notes": cand.notes if cand else []})
    errors = {c.label: c.error for c in trained if c.error}
    notes = targets(rows)
    return {"model": bm.name, "rows": rows, "errors": errors, "targets": notes, "search_s": search_s,
            "chosen": outcome.chosen.label if outcome.chosen else None, "epochs": epochs, "qat_epochs": qat_epochs}


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The best training-time row within the gate against the MobileNetV2 targets, and the PTQ anchor's figures."""
    trained = [r for r in rows[1:] if not r["method"].startswith("PTQ") and r["drop_pp"] <= GATE_PP + 1e-9]
    out = [f"PTQ anchor {r['method']}: {r['speedup_b1']:.2f}x, size {r['size_ratio']:.3f}x, drop {r['drop_pp']:.2f} pp"
           for r in rows if r["method"].startswith("PTQ")]
    if not trained:
        return [*out, f"MISSED: no training-time candidate within the {GATE_PP} pp gate"]
    best = max(trained, key=lambda r: r["speedup_b1"])
    speed = "met" if best["speedup_b1"] >= SPEED_TARGET else "MISSED"
    size = "met" if best["size_ratio"] <= SIZE_TARGET else "MISSED"
    return [*out, f"{best['method']}: batch-1 speedup {best['speedup_b1']:.2f}x (target >= {SPEED_TARGET}): {speed}; "
                  f"size {best['size_ratio']:.3f}x (target <= {SIZE_TARGET}): {size}; drop {best['drop_pp']:.2f} pp; "
                  f"trained {best['train_s']:.0f} s"]


def markdown(result: dict[str, Any]) -> str:
    """The rows as a markdown table with the target notes under it."""
    from bench.common import markdown_table

    table = markdown_table(
        ["method", "acc %", "drop pp", "size KB", "x f32", "b1 ms (p10-p90)", "b1 speedup", "train s"],
        [[r["method"], 100 * r["accuracy"], r["drop_pp"], r["size_bytes"] / 1024, r["size_ratio"],
          f"{r['latency_b1_ms']:.3g} ({r['latency_b1_p10_ms']:.3g}-{r['latency_b1_p90_ms']:.3g})",
          f"{r['speedup_b1']:.2f}x", r["train_s"]] for r in result["rows"]])
    errors = "".join(f"\n- {label}: {error}" for label, error in result["errors"].items())
    return (f"Training-time compression on {result['model']} ({result['epochs']} distillation epochs after pruning, "
            f"{result['qat_epochs']} QAT epochs; batch 1, one thread, timed side by side):\n\n{table}\n\n"
            + "\n".join(f"- {n}" for n in result["targets"]) + errors)


def main() -> None:
    np.random.seed(0)
    bm = mobilenet_v2_digits()
    print(f"{bm.name}: trained in {bm.train_s:.0f} s, {len(bm.model):,} bytes", flush=True)
    result = training_rows(bm)
    print(json.dumps(result, indent=2, default=str))
    print(markdown(result))


if __name__ == "__main__":
    main()
