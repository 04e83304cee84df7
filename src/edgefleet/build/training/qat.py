"""Quantization-aware training with torchao's PT2E flow: BatchNorm folded into its convolution, the model
exported with a dynamic batch, fake-quantized by the x86 quantizer (uint8 activations, per-channel symmetric
int8 weights: the combination ONNX Runtime fuses into integer kernels), fine-tuned, converted."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from edgefleet.errors import ModelError

if TYPE_CHECKING:
    import torch

Train = Callable[["torch.nn.Module"], None]


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of an fx GraphModule with each BatchNorm that follows a convolution (its only user) folded in."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    gm = copy.deepcopy(model).eval()
    if not isinstance(gm, torch.fx.GraphModule):
        gm = torch.fx.symbolic_trace(gm)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], torch.nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules[src.target], (torch.nn.Conv1d, torch.nn.Conv2d))):
            continue
        fused = fuse_conv_bn_eval(modules[src.target], modules[node.target])  # type: ignore[arg-type]
        gm.add_submodule(str(src.target), fused)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def quiet_torchao() -> None:
    """torchao logs its optional CUDA kernels that fail to load on a CPU build: not the user's concern."""
    for name in ("torchao", "torch._dynamo", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quantization_aware(model: torch.nn.Module, sample_shape: tuple[int, ...], calib_x: np.ndarray,
                       train: Train) -> torch.nn.Module:
    """Fold BatchNorm, prepare for QAT, let the observers see ``calib_x``, run ``train`` on the prepared model
    (its fake quantizers learn alongside the weights), then convert to quantize/dequantize ops."""
    import warnings

    import torch

    quiet_torchao()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        example = torch.from_numpy(np.ascontiguousarray(calib_x[:2], dtype=np.float32))
        try:
            folded = fold_batchnorm(model)
            batch = torch.export.Dim("batch", min=1, max=65536)
            exported = torch.export.export(folded, (example,), dynamic_shapes=({0: batch},)).module()
            quantizer = X86InductorQuantizer()
            quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=True))
            prepared = prepare_qat_pt2e(exported, quantizer)  # type: ignore[arg-type]
        except (RuntimeError, ValueError, AssertionError) as exc:
            raise ModelError(f"quantization-aware training: cannot prepare the model: {exc}".splitlines()[0]) \
                from exc
        with torch.no_grad():
            for start in range(0, len(calib_x), 64):
                prepared(torch.from_numpy(np.ascontiguousarray(calib_x[start:start + 64], dtype=np.float32)))
        move_exported_model_to_train(prepared)
        train(prepared)
        move_exported_model_to_eval(prepared)
        converted: torch.nn.Module = convert_pt2e(prepared)
        return converted
