"""A retraining factory for the synthetic classifier (``edgefleet retrain --factory
edgefleet.testing.retrain_models:channel_mean_net``): the torch twin of :func:`synthetic.channel_mean_model`
(mean over time, then one linear layer), starting from the deployed version's weights when it is given."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgefleet.learn.retrain import Deployed
from edgefleet.testing import synthetic


def channel_mean_net(deployed: Deployed | None = None) -> Any:
    """[N, CHANNELS, window] -> mean over time -> Linear(CHANNELS, CLASSES) logits; with ``deployed``, W and b
    read from its ONNX model (the float initializers :func:`synthetic.channel_mean_model` writes)."""
    import torch

    class ChannelMean(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(synthetic.CHANNELS, synthetic.CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.linear(x.mean(dim=2))
            return out

    net = ChannelMean()
    if deployed is not None and deployed.model is not None:
        weights = _initializers(deployed.model)
        with torch.no_grad():
            net.linear.weight.copy_(torch.from_numpy(weights["W"].T.copy()))
            net.linear.bias.copy_(torch.from_numpy(weights["b"].copy()))
    return net


def _initializers(model: bytes) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model_from_string(model)
    return {init.name: numpy_helper.to_array(init).astype(np.float32) for init in proto.graph.initializer}
