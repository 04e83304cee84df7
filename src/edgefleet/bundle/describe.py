"""The default input pipeline and output interpretation of a model, read from its own signature.

Inputs, by the rank of the model's first input: ``[N, C, T]`` a streamed time series of C channels cut into
windows of T samples every T samples (no scaling); ``[N, C, H, W]`` (or ``[N, H, W, C]`` when the last axis holds
1, 3 or 4 channels and the second does not) an image of that size; ``[N, F]`` a vector; any other rank a raw
tensor. Outputs: a float tensor ``[N, K]`` as class scores; an ONNX-ML classifier (scikit-learn through
skl2onnx: a label tensor and probabilities, a ZipMap of them or a tensor) as label + probabilities, its classes
read from the ZipMap or the classifier node. A signature with free axes beyond the batch cannot be described:
the caller must give the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgefleet.bundle.manifest import TensorSpec
from edgefleet.errors import BundleError
from edgefleet.runtime.inputs import ONNX_TO_DTYPE

CHANNEL_COUNTS = (1, 3, 4)


def default_preprocess(inputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """The input pipeline the first input's shape implies (see the module docstring)."""
    first = inputs[0]
    dims = first.shape[1:]
    if any(d is None or d <= 0 for d in dims):
        raise BundleError(f"the model's input {first.name!r} has free axes {first.shape}: give the input "
                          "pipeline (--pipeline FILE.yaml)", reason="incompatible")
    sizes = [int(d) for d in dims if d is not None]
    dtype = ONNX_TO_DTYPE.get(first.dtype)
    if dtype is None:
        raise BundleError(f"the model's input {first.name!r} takes {first.dtype}, which no pipeline feeds",
                          reason="incompatible")
    if len(sizes) == 2 and dtype == "float32":
        channels, window = sizes
        return {"kind": "sliding_window", "channels": channels, "window": window, "hop": window,
                "mean": [0.0] * channels, "std": [1.0] * channels}
    if len(sizes) == 3:
        if sizes[0] in CHANNEL_COUNTS or sizes[2] not in CHANNEL_COUNTS:
            channels, height, width, layout = sizes[0], sizes[1], sizes[2], "NCHW"
        else:
            height, width, channels, layout = sizes[0], sizes[1], sizes[2], "NHWC"
        if channels not in CHANNEL_COUNTS:
            return {"kind": "tensor", "shape": sizes, "dtype": dtype}
        return {"kind": "image", "height": height, "width": width, "channels": channels, "layout": layout,
                "color": "gray" if channels == 1 else "rgb", "dtype": dtype}
    if len(sizes) == 1:
        return {"kind": "vector", "features": sizes[0], "dtype": dtype}
    return {"kind": "tensor", "shape": sizes, "dtype": dtype}


def default_postprocess(model: bytes, outputs: Sequence[TensorSpec]) -> dict[str, Any] | None:
    """The output interpretation the model's outputs imply; None for plain class scores in the first output."""
    first = outputs[0]
    if first.dtype in ("float", "float16", "double"):
        return None
    if len(outputs) >= 2:
        probabilities = outputs[1]
        classes = _classifier_classes(model)
        if probabilities.dtype.startswith("seq"):
            if classes is None:
                raise BundleError(f"the model's output {probabilities.name!r} is a ZipMap whose classes cannot be "
                                  "read: give the output spec", reason="incompatible")
            return {"kind": "label_probabilities", "label": first.name, "probabilities": probabilities.name,
                    "zipmap": True, "classes": classes}
        if probabilities.dtype in ("float", "double"):
            spec: dict[str, Any] = {"kind": "label_probabilities", "label": first.name,
                                    "probabilities": probabilities.name}
            if classes is not None:
                spec["classes"] = classes
            return spec
    raise BundleError(f"the model's first output {first.name!r} ({first.dtype}) holds no scores: give the output "
                      "spec (scores, label_probabilities, regression or anomaly_score)", reason="incompatible")


def _classifier_classes(model: bytes) -> list[int | str] | None:
    """The class ids or names of an ONNX-ML classifier: its ZipMap's, else its classifier node's."""
    import onnx

    proto = onnx.load_model_from_string(model)
    for wanted in ("ZipMap", None):
        for node in proto.graph.node:
            if wanted is not None and node.op_type != wanted:
                continue
            if wanted is None and not node.op_type.endswith("Classifier"):
                continue
            for attribute in node.attribute:
                if attribute.name in ("classlabels_int64s", "classlabels_ints"):
                    return [int(v) for v in attribute.ints]
                if attribute.name == "classlabels_strings":
                    return [v.decode() for v in attribute.strings]
    return None
