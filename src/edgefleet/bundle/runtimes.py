"""The runtimes a bundle can name and the model format each reads (plain constants: no pydantic, no runtime)."""

from __future__ import annotations

RUNTIMES = ("onnxruntime", "openvino", "litert")
"""The runtimes the agent can run a model on (``runtime.runner``)."""
DEFAULT_RUNTIME = "onnxruntime"
"""The runtime of a bundle whose manifest names none."""
MODEL_FORMATS = {"onnxruntime": "onnx", "openvino": "onnx", "litert": "tflite"}
"""The model file each runtime reads: ONNX for ONNX Runtime and OpenVINO, a ``.tflite`` flatbuffer for LiteRT."""
