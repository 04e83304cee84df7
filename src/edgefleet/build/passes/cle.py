"""Cross-layer equalization (Nagel et al. 2019, AIMET): make the weight ranges of paired channels equal.

For every pair of consecutive linear layers (see :mod:`channel_scaling`), channel ``i`` of the first layer's
output is divided by ``s_i = sqrt(r1_i / r2_i)`` and the second layer's input channel ``i`` multiplied by it,
where ``r1_i`` and ``r2_i`` are the two channels' weight ranges: both become ``sqrt(r1_i * r2_i)``. A channel
that an earlier rescaling (or training) blew up by a factor ``k`` is brought back, so per-tensor and per-channel
int8 ranges fit every channel. Chains of layers are equalized in sweeps until the scales settle.
The float model's function is unchanged (up to float rounding).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from pydantic import Field

from edgefleet.build.passes import Pass, PassConfig, PassResult, register
from edgefleet.build.passes.channel_scaling import Weights, channel_range, find_pairs, prepare, rescale
from edgefleet.build.quantize import load_checked


class CleConfig(PassConfig):
    """Sweeps over all pairs (stopping early once no scale moves by more than ``tolerance``)."""

    sweeps: int = Field(default=20, ge=1, le=1000)
    tolerance: float = Field(default=1e-3, gt=0)
    preprocess: bool = True


def equalize(model: onnx.ModelProto, sweeps: int = 20, tolerance: float = 1e-3) -> tuple[int, float]:
    """Equalize ``model``'s pairs in place; returns the number of pairs and the largest total scale applied."""
    pairs = find_pairs(model)
    weights = Weights(model)
    total = {id(p): np.ones(weights.get(p.first.weight).shape[p.first.out_axis]) for p in pairs}
    for _ in range(sweeps):
        moved = 0.0
        for pair in pairs:
            r1 = channel_range(weights.get(pair.first.weight), pair.first.out_axis)
            r2 = channel_range(weights.get(pair.second.weight), pair.second.in_axis)
            scale = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
            rescale(weights, pair, scale)
            total[id(pair)] *= scale
            moved = max(moved, float(np.max(np.abs(np.log(scale)))) if scale.size else 0.0)
        if moved < tolerance:
            break
    weights.store()
    largest = max((float(np.max(np.maximum(t, 1 / t))) for t in total.values() if t.size), default=1.0)
    return len(pairs), largest


@register
class CrossLayerEqualization(Pass):
    """Float model in, equalized float model out (quantize it afterwards: see ``robust_int8``)."""

    name = "cle"
    config_type = CleConfig

    def apply(self, model: bytes, stats: Any, config: PassConfig) -> PassResult:
        assert isinstance(config, CleConfig)
        proto = load_checked(prepare(model) if config.preprocess else model)
        count, largest = equalize(proto, config.sweeps, config.tolerance)
        note = f"cle: equalized {count} layer pair(s), largest channel scale {largest:.3g}" if count else \
            "cle: no pair of consecutive linear layers to equalize"
        return PassResult(model=bytes(proto.SerializeToString()), notes=[note])
