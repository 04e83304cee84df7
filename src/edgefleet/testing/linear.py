"""A tiny ONNX classifier of any input shape, and its predictions, for tests of the input pipelines."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper


def linear_model(shape: list[int], classes: int) -> bytes:
    """``x`` [N, *shape] float -> flatten -> a fixed matrix -> softmax ``probs`` [N, classes]. Packed without a
    pipeline, its input step is inferred from ``shape``: [C, T] a series, [C, H, W] an image, [F] a vector."""
    features = int(np.prod(shape))
    weights = np.sin(np.arange(features * classes, dtype=np.float32)).reshape(features, classes)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["y"]),
         helper.make_node("Softmax", ["y"], ["probs"], axis=1)],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, *shape])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, classes])],
        [onnx.numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgefleet-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def predictions(model: bytes, rows: np.ndarray) -> np.ndarray:
    """The class each row gets from ``model`` (ONNX Runtime on the rows as they are)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    scores = np.asarray(session.run(None, {session.get_inputs()[0].name: rows.astype(np.float32)})[0])
    best: np.ndarray = scores.argmax(axis=1)
    return best
