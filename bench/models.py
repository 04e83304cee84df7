"""Models for the benchmarks, trained briefly on real data that packages ship (plain torch, no torchvision).

* ``mobilenet_v2``: MobileNetV2 (inverted residuals, ReLU6, width multiplier) written out in plain torch;
* ``digits_96``: scikit-learn's 8x8 digits upscaled to 96x96x3, the input size of small MobileNets;
* trained models with their calibration and test data (``BenchModel``) for ``bench_compress``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np


def _make_divisible(value: float, divisor: int = 8) -> int:
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def mobilenet_v2(n_classes: int, width: float = 0.5, in_channels: int = 3) -> Any:
    """MobileNetV2 (Sandler et al. 2018) with width multiplier ``width``; last channel kept at 1280."""
    from torch import nn

    def conv_bn(inp: int, out: int, stride: int, groups: int = 1, kernel: int = 3, act: bool = True) -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(out)]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        return nn.Sequential(*layers)

    class InvertedResidual(nn.Module):
        def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = inp * expand
            layers = [conv_bn(inp, hidden, 1, kernel=1)] if expand != 1 else []
            layers += [conv_bn(hidden, hidden, stride, groups=hidden), conv_bn(hidden, out, 1, kernel=1, act=False)]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and inp == out

        def forward(self, x: Any) -> Any:
            return x + self.block(x) if self.residual else self.block(x)

    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    channels = _make_divisible(32 * width)
    layers: list[nn.Module] = [conv_bn(in_channels, channels, 2)]
    for expand, c, n, s in settings:
        out = _make_divisible(c * width)
        for i in range(n):
            layers.append(InvertedResidual(channels, out, s if i == 0 else 1, expand))
            channels = out
    layers += [conv_bn(channels, 1280, 1, kernel=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
               nn.Linear(1280, n_classes)]
    return nn.Sequential(*layers)


def digits_96(seed: int = 0) -> dict[str, Any]:
    """Digits upscaled (bilinear) to [n, 3, 96, 96], standardized; the same split as edgefleet's ``digits``."""
    import torch
    import torch.nn.functional as F

    from edgefleet.data.datasets import load_dataset, standardize

    ds, _ = standardize(load_dataset("digits"))  # grey levels scaled to [0, 1]

    def up(x: np.ndarray) -> np.ndarray:
        t = F.interpolate(torch.from_numpy(x), size=(96, 96), mode="bilinear", align_corners=False)
        return ((t.repeat(1, 3, 1, 1) - 0.3) / 0.4).numpy().astype(np.float32)

    return {"train_x": up(ds.train_x), "train_y": ds.train_y, "test_x": up(ds.test_x), "test_y": ds.test_y,
            "labels": list(ds.labels)}


@dataclass(frozen=True)
class BenchModel:
    """A trained float model and its data: calibration inputs, test inputs and labels."""

    name: str
    model: bytes
    calib_x: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_s: float


def _calib(x: np.ndarray, n: int = 256, seed: int = 0) -> np.ndarray:
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False))
    return np.ascontiguousarray(x[idx])


def basicmotions_cnn1d(epochs: int = 60) -> BenchModel:
    """The demo's model: 40-sample windows of BasicMotions (hop 5 for test windows), 1D-CNN."""
    from bench.windowed_cnn import TRAIN_HOP, normalize
    from edgefleet.build.train import export_onnx, train_cnn1d
    from edgefleet.data.basicmotions import load_basicmotions
    from edgefleet.data.windows import channel_stats, sliding_windows

    start = time.perf_counter()
    rec = load_basicmotions()
    mean, std = channel_stats(rec.train_x)
    train_x, train_y = sliding_windows(normalize(rec.train_x, mean, std), rec.train_y, 40, TRAIN_HOP)
    test_x, test_y = sliding_windows(normalize(rec.test_x, mean, std), rec.test_y, 40, 5)
    net = train_cnn1d(train_x, train_y, len(rec.labels), epochs=epochs, seed=0)
    return BenchModel("BasicMotions 1D-CNN", export_onnx(net, 6, 40), _calib(train_x), test_x, test_y,
                      time.perf_counter() - start)


def dataset_model(name: str, label: str, epochs: int) -> BenchModel:
    """edgefleet's default small model for a bundled dataset (what `edgefleet build --dataset` trains)."""
    from edgefleet.build.inputs import from_dataset

    start = time.perf_counter()
    inputs = from_dataset(name, epochs=epochs)
    d = inputs.data
    return BenchModel(label, inputs.model, d.calib_x, d.test_x, d.test_y, time.perf_counter() - start)


def mobilenet_v2_digits(epochs: int = 3) -> BenchModel:
    """MobileNetV2 (width 0.5) at 96x96x3 trained briefly on upscaled digits."""
    from edgefleet.build.train import export_classifier, train_classifier

    start = time.perf_counter()
    data = digits_96()
    net = train_classifier(lambda: mobilenet_v2(10), data["train_x"], data["train_y"], 10, epochs=epochs, seed=0,
                           batch=32)
    return BenchModel("MobileNetV2-0.5 96x96", export_classifier(net, (3, 96, 96)), _calib(data["train_x"]),
                      data["test_x"], data["test_y"], time.perf_counter() - start)
