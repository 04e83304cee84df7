"""Weight-level delta vs whole bundle vs bsdiff4, for three real updates of a BasicMotions classifier.

Updates of an int8 bundle (the form devices get): (a) only the classifier head fine-tuned, then
re-quantized with the same calibration; (b) a full retrain with another seed; (c) the same float model
re-quantized with another calibration set. Run on the skeleton's 1D-CNN (about 3.5k parameters) and on
a wider 1D-CNN built here (about 420k parameters), where the sizes mean something. For each: the full
bundle, edgefleet's delta (and what it sends after the 50% fallback), a bsdiff4 patch between the two
bundle files, and the time to build and to apply the delta, against downloading the whole bundle at
1 Mbit/s. Run: ``python -m bench.bench_delta`` (or ``make bench-delta``).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import bsdiff4
import numpy as np
import torch
from torch import nn

from bench.common import markdown_table, publish
from bench.windowed_cnn import normalize
from edgefleet.build.quantize import quantize_int8
from edgefleet.build.train import export_onnx, train_cnn1d
from edgefleet.bundle.delta import apply, diff
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.update import TrustState, accept_delta
from edgefleet.data.basicmotions import load_basicmotions
from edgefleet.data.windows import channel_stats, sliding_windows
from edgefleet.runtime.runner import OnnxRuntimeRunner

WINDOW, HOP, TRAIN_HOP = 40, 5, 2
CALIBRATION = 128
LINK_BIT_S = 1_000_000
REPEAT = 5


def windows() -> dict[str, Any]:
    rec = load_basicmotions()
    mean, std = channel_stats(rec.train_x)
    train_x, train_y = sliding_windows(normalize(rec.train_x, mean, std), rec.train_y, WINDOW, TRAIN_HOP)
    test_x, test_y = sliding_windows(normalize(rec.test_x, mean, std), rec.test_y, WINDOW, HOP)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "classes": len(rec.labels),
            "preprocess": {"kind": "sliding_window", "channels": int(train_x.shape[1]), "window": WINDOW,
                           "hop": HOP, "sample_rate_hz": float(rec.sample_rate_hz),
                           "mean": [float(v) for v in mean], "std": [float(v) for v in std]}}


def wide_cnn(channels: int, classes: int) -> nn.Module:
    """A wider 1D-CNN: 64-128-256-256 filters and a two-layer head, about 420k parameters."""
    layers: list[nn.Module] = []
    for c_in, c_out, k in ((channels, 64, 5), (64, 128, 5), (128, 256, 5), (256, 256, 3)):
        layers += [nn.Conv1d(c_in, c_out, k, padding=k // 2), nn.BatchNorm1d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(256, 64), nn.ReLU(),
                         nn.Linear(64, classes))


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int, lr: float = 3e-3,
        params: list[nn.Parameter] | None = None, freeze_bn: bool = False) -> nn.Module:
    """Adam with cosine decay; ``params`` limits training to those, ``freeze_bn`` keeps BatchNorm statistics."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(params if params is not None else list(model.parameters()), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))
    model.eval() if freeze_bn else model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 64):
            idx = order[start : start + 64]
            if len(idx) < 2:
                continue
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
        schedule.step()
    return model.eval()


def fine_tune_head(model: nn.Module, data: dict[str, Any], epochs: int = 8) -> nn.Module:
    """A copy of ``model`` with only its final Linear layer trained further (BatchNorm statistics frozen)."""
    tuned = copy.deepcopy(model)
    for parameter in tuned.parameters():
        parameter.requires_grad_(False)
    head = [m for m in tuned.modules() if isinstance(m, nn.Linear)][-1]
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    return fit(tuned, data["train_x"], data["train_y"], epochs=epochs, seed=11, lr=1e-2,
               params=list(head.parameters()), freeze_bn=True)


def calibration(data: dict[str, Any], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x: np.ndarray = data["train_x"]
    return x[rng.choice(len(x), size=min(CALIBRATION, len(x)), replace=False)]


def accuracy(model: bytes, data: dict[str, Any]) -> float:
    predicted = OnnxRuntimeRunner(model).run(data["test_x"]).argmax(axis=1)
    return float(np.mean(predicted == data["test_y"]))


def median_s(fn: Callable[[], object]) -> float:
    samples = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def updates(name: str, base: nn.Module, retrained: nn.Module, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Bundle the base and its three updates; measure each update's delta, bsdiff patch and timings."""
    key = SigningKey.generate()
    trust = TrustState(keys={key.public.key_id: key.public})
    channels, golden = data["preprocess"]["channels"], data["test_x"][:4]

    def int8(model: nn.Module, calib_seed: int = 0) -> bytes:
        return quantize_int8(export_onnx(model, channels, WINDOW), calibration(data, calib_seed))

    def bundle(model: bytes, release: int) -> bytes:
        return pack_bundle(model, key, BundleSpec(name=name, version=f"1.{release}.0", release=release,
                                                  preprocess=data["preprocess"], golden=golden))

    base_model = int8(base)
    a = bundle(base_model, 1)
    targets = {"a_head_finetune": int8(fine_tune_head(base, data)), "b_full_retrain": int8(retrained),
               "c_requantize": int8(base, calib_seed=1)}
    before = accuracy(base_model, data)
    return [{"model": name, "update": update, **measure(a, bundle(model, release), trust),
             "accuracy_before": before, "accuracy_after": accuracy(model, data)}
            for release, (update, model) in enumerate(targets.items(), start=2)]


def measure(a: bytes, b: bytes, trust: TrustState) -> dict[str, Any]:
    """Sizes and times of edgefleet's delta and of a bsdiff4 patch from bundle ``a`` to bundle ``b``."""
    raw, sent, patch = diff(a, b, max_fraction=float("inf")), diff(a, b), bsdiff4.diff(a, b)
    assert apply(a, raw.data) == b and bsdiff4.patch(a, patch) == b
    return {
        "full_bytes": len(b), "delta_bytes": len(raw.data), "sent_bytes": len(sent.data),
        "sent_whole": not sent.is_delta, "bsdiff_bytes": len(patch),
        "build_s": median_s(lambda: diff(a, b)), "apply_s": median_s(lambda: apply(a, raw.data)),
        "apply_verify_s": median_s(lambda: accept_delta(a, raw.data, trust)),
        "bsdiff_build_s": median_s(lambda: bsdiff4.diff(a, b)),
        "bsdiff_apply_s": median_s(lambda: bsdiff4.patch(a, patch)),
        "download_full_s": len(b) * 8 / LINK_BIT_S,
    }


def main() -> None:
    torch.set_num_threads(4)
    data = windows()
    x, y, classes = data["train_x"], data["train_y"], data["classes"]
    small = train_cnn1d(x, y, classes, epochs=60, seed=0)
    small_retrained = train_cnn1d(x, y, classes, epochs=60, seed=1)
    torch.manual_seed(0)
    wide = fit(wide_cnn(x.shape[1], classes), x, y, epochs=25, seed=0, lr=1e-3)
    torch.manual_seed(1)
    wide_retrained = fit(wide_cnn(x.shape[1], classes), x, y, epochs=25, seed=1, lr=1e-3)
    rows = updates("cnn1d-3k", small, small_retrained, data) + updates("cnn1d-wide-420k", wide, wide_retrained, data)

    head = [r for r in rows if r["update"] == "a_head_finetune"]
    checks = {f"{r['model']}: head delta <= 5% of bundle": r["delta_bytes"] <= 0.05 * r["full_bytes"] for r in head}
    checks |= {f"{r['model']}: head delta <= bsdiff patch": r["delta_bytes"] <= r["bsdiff_bytes"] for r in head}
    checks |= {f"{r['model']} {r['update']}: apply < download at 1 Mbit/s": r["apply_s"] < r["download_full_s"]
               for r in rows}
    table = markdown_table(
        ["model", "update", "full bundle B", "edgefleet delta", "delta/B", "sent", "bsdiff4 patch", "build s",
         "apply s", "apply+verify s", "B at 1 Mbit/s s", "accuracy before -> after"],
        [[r["model"], r["update"], r["full_bytes"], r["delta_bytes"], f"{r['delta_bytes'] / r['full_bytes']:.1%}",
          "B whole" if r["sent_whole"] else "delta", r["bsdiff_bytes"], r["build_s"], r["apply_s"],
          r["apply_verify_s"], r["download_full_s"], f"{r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f}"]
         for r in rows])
    verdicts = "\n".join(f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in checks.items())
    notes = ("Bundles are int8 (QDQ) with 4 golden samples in the manifest. `edgefleet delta` is the delta "
             "file itself; `sent` is what `bundle diff` ships with the default 50% fallback. Times are medians "
             f"of {REPEAT} runs; apply+verify is `accept_delta` (rebuild, then `decide` with the ONNX check).")
    publish("delta", {"rows": rows, "targets": checks}, f"{table}\n\n{notes}\n\nTargets:\n{verdicts}\n")


if __name__ == "__main__":
    main()
