"""Structured pruning with torch-pruning (whole channels removed across dependent layers), and unstructured
magnitude pruning (weights zeroed, shapes kept)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgefleet.errors import ModelError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Counts:
    """Multiply-accumulates per sample and parameters of a torch model, as torch-pruning counts them."""

    macs: int
    params: int


def count(model: torch.nn.Module, sample_shape: tuple[int, ...]) -> Counts:
    """MACs at batch 1 and parameters of ``model``."""
    import torch
    import torch_pruning as tp

    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model.eval(), torch.zeros(1, *sample_shape))
    return Counts(int(macs), int(params))


def prune_channels(model: torch.nn.Module, sample_shape: tuple[int, ...], ratio: float, round_to: int) -> None:
    """Remove ``ratio`` of the channels of every prunable layer group (L2 magnitude of the group), keeping
    counts a multiple of ``round_to``; the last layer's outputs (the classes) are kept. ModelError when
    torch-pruning cannot trace the model."""
    import torch
    import torch_pruning as tp

    example = torch.zeros(1, *sample_shape)
    weighted = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))]
    if not weighted:
        raise ModelError("structured pruning: the model has no convolution or linear layer")
    model.eval()
    try:
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=[weighted[-1]], round_to=round_to)
        pruner.step()
        with torch.no_grad():
            model(example)
    except (RuntimeError, ValueError, KeyError, IndexError) as exc:
        raise ModelError(f"structured pruning failed: {exc}".splitlines()[0]) from exc


def magnitude_masks(model: torch.nn.Module, sparsity: float) -> Callable[[], None]:
    """Zero the smallest ``sparsity`` fraction of each conv/linear weight; returns a function that re-applies
    the masks (call it after every optimizer step so the zeros stay zeros)."""
    import torch

    masks: list[tuple[torch.Tensor, torch.Tensor]] = []
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
            w = module.weight
            k = int(sparsity * w.numel())
            if k < 1:
                continue
            threshold = w.detach().abs().flatten().kthvalue(k).values
            masks.append((w, (w.detach().abs() > threshold).to(w.dtype)))

    def apply() -> None:
        with torch.no_grad():
            for w, mask in masks:
                w.mul_(mask)

    apply()
    return apply
