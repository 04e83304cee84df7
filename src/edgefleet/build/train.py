"""Train a small 1D-CNN on windows of multichannel signals and export it to ONNX.

torch is imported inside the functions only: the device agent installs without it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from edgefleet.errors import DataError, ModelError

if TYPE_CHECKING:
    import torch

ONNX_OPSET = 17
INPUT_NAME = "x"
OUTPUT_NAME = "probs"


def _cnn1d(channels: int, n_classes: int) -> torch.nn.Module:
    """Conv(16,5)+BN+ReLU, Conv(32,5)+BN+ReLU, global average pool, Linear: about 3.5k parameters."""
    from torch import nn

    return nn.Sequential(
        nn.Conv1d(channels, 16, 5, padding=2),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Conv1d(16, 32, 5, padding=2),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(32, n_classes),
    )


def cnn2d(channels: int, n_classes: int) -> torch.nn.Module:
    """Conv(16,3)+BN+ReLU, MaxPool 2, Conv(32,3)+BN+ReLU, global average pool, Linear: for small images."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, n_classes),
    )


def _fit(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, seed: int
) -> None:
    """Adam with a cosine learning-rate schedule over ``epochs`` seeded shuffles of (x, y)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            if len(idx) < 2:  # BatchNorm needs two samples to estimate a variance
                continue
            optimizer.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
        scheduler.step()


def train_cnn1d(
    x: np.ndarray, y: np.ndarray, n_classes: int, *, epochs: int = 60, seed: int = 0, batch: int = 64
) -> torch.nn.Module:
    """Train the 1D-CNN on normalized windows x float32 [m, channels, window], labels y in [0, n_classes).

    Deterministic for a given seed (seeded init and shuffling, one CPU thread). Returns it in eval mode.
    """
    if x.ndim != 3:
        raise DataError(f"training windows must be [m, channels, window], got {x.shape}")
    return train_classifier(lambda: _cnn1d(x.shape[1], n_classes), x, y, n_classes, epochs=epochs, seed=seed,
                            batch=batch)


def train_classifier(
    make_model: Callable[[], torch.nn.Module], x: np.ndarray, y: np.ndarray, n_classes: int, *,
    epochs: int = 60, seed: int = 0, batch: int = 64,
) -> torch.nn.Module:
    """Build ``make_model()`` under a seed and train it on x float32 [m, ...], labels y in [0, n_classes).

    Deterministic for a given seed (seeded init and shuffling, one CPU thread). Returns it in eval mode.
    """
    import torch

    labels = np.asarray(y, dtype=np.int64)
    if labels.shape != (x.shape[0],) or x.shape[0] == 0:
        raise DataError(f"training inputs {x.shape} and labels {labels.shape} do not match")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(f"labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}")
    threads = torch.get_num_threads()
    # one thread: as fast as two on a net this small, and two spin-wait badly on a busy 2-core machine
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = make_model()
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        _fit(model, xt, torch.from_numpy(labels), epochs, batch, seed)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def export_onnx(model: torch.nn.Module, channels: int, window: int) -> bytes:
    """Export ``model`` with softmax appended: input "x" [batch, channels, window], output "probs"."""
    return export_classifier(model, (channels, window))


def export_classifier(model: torch.nn.Module, sample_shape: tuple[int, ...], *, softmax: bool = True) -> bytes:
    """Export ``model`` (softmax appended unless ``softmax`` is False): input "x" [batch, *sample_shape],
    output "probs" [batch, classes].

    Uses the TorchScript exporter (dynamo=False, opset 17) with a dynamic batch axis; returns the
    serialized ModelProto.
    """
    import torch

    wrapped = torch.nn.Sequential(model, torch.nn.Softmax(dim=-1)).eval() if softmax else model.eval()
    buffer = io.BytesIO()
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapped,
                (torch.zeros(1, *sample_shape),),
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter accepts a file object
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
        raise ModelError(f"ONNX export failed: {exc}") from exc
    return buffer.getvalue()
