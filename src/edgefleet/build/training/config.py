"""The recipe's ``training`` section: which training-time candidates a build tries when it has training rows.

::

    training:
      enabled: true
      epochs: 10                # distillation fine-tune after pruning
      prune_ratios: [0.5]       # fraction of channels removed per prunable layer (structured, torch-pruning)
      round_to: 8               # kept channels a multiple of this (int8 kernels want multiples of 8)
      qat: true                 # quantization-aware training (torchao PT2E), exported as int8 ONNX
      qat_epochs: 3
      unstructured_sparsity: 0.5  # weights zeroed by magnitude; reported where it buys compressed size
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainingSpec(BaseModel):
    """Training-time candidates: pruning ratios, distillation and QAT settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    epochs: int = Field(default=10, ge=0, description="distillation epochs after pruning")
    batch: int = Field(default=64, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    prune_ratios: tuple[float, ...] = Field(default=(0.5,), description="fraction of channels removed")
    round_to: int = Field(default=8, ge=1)
    temperature: float = Field(default=4.0, gt=0, description="distillation softmax temperature")
    alpha: float = Field(default=0.5, ge=0, le=1, description="weight of the label loss; the rest is distillation")
    qat: bool = True
    qat_epochs: int = Field(default=3, ge=1)
    qat_lr: float = Field(default=1e-4, gt=0)
    qat_unpruned: bool = Field(default=True, description="also QAT the unpruned model (with qat)")
    unstructured_sparsity: float = Field(default=0.5, ge=0, lt=1, description="0: no unstructured candidate")
    max_rows: int = Field(default=20_000, ge=2, description="training rows used (a seeded sample beyond this)")
    threads: int = Field(default=1, ge=1, description="torch threads while training")
