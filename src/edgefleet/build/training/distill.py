"""Knowledge distillation: fine-tune a student on labels and on the original model's softened scores."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

Hook = Callable[[], None]


def teacher_logits(teacher: torch.nn.Module, x: np.ndarray, batch: int = 256) -> torch.Tensor:
    """The teacher's outputs on every row, computed once (in eval mode, no gradients)."""
    import torch

    teacher.eval()
    with torch.no_grad():
        parts = [teacher(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))) for i in range(0, len(x), batch)]
    return torch.cat(parts)


def distill(student: torch.nn.Module, x: np.ndarray, y: np.ndarray, soft: torch.Tensor | None, *, epochs: int,
            batch: int, lr: float, temperature: float, alpha: float, seed: int,
            after_step: Hook | None = None, switch_mode: bool = True) -> None:
    """Adam with a cosine schedule for ``epochs`` over seeded shuffles: ``alpha`` * cross-entropy on labels +
    (1 - ``alpha``) * T^2 * KL(teacher || student) at temperature T (labels only when ``soft`` is None).
    ``after_step`` runs after every optimizer step (unstructured pruning re-applies its masks there);
    ``switch_mode=False`` leaves the module's train/eval mode alone (an exported PT2E model has its own)."""
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if switch_mode:
        student.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), batch):
            idx = order[start:start + batch]
            if len(idx) < 2:  # BatchNorm needs two samples to estimate a variance
                continue
            out = student(xt[idx])
            loss = F.cross_entropy(out, yt[idx])
            if soft is not None and alpha < 1:
                kd = F.kl_div(F.log_softmax(out / temperature, dim=1), F.log_softmax(soft[idx] / temperature, dim=1),
                              reduction="batchmean", log_target=True)
                loss = alpha * loss + (1 - alpha) * temperature**2 * kd
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            if after_step is not None:
                after_step()
        scheduler.step()
