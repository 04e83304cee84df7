"""edgefleet.build.compact: shorter names, same computation, same inputs and outputs."""

from __future__ import annotations

import numpy as np
import onnx
from test_pipeline import FEATURES, outlier_model

from edgefleet.build.compact import compact
from edgefleet.build.evaluate import predict
from edgefleet.build.quantize import quantize_int8


def test_compact_keeps_outputs_and_io_names_and_shrinks_a_quantized_model() -> None:
    float_model = outlier_model(scale=1.0)
    x = np.random.default_rng(0).normal(size=(64, FEATURES)).astype(np.float32)
    quantized = quantize_int8(float_model, x)
    assert len(compact(quantized)) < len(quantized)
    for model in (float_model, quantized):
        small = compact(model)
        assert len(small) <= len(model)
        onnx.checker.check_model(onnx.load_from_string(small))
        np.testing.assert_array_equal(predict(small, x), predict(model, x))
        graph = onnx.load_from_string(small).graph
        assert [i.name for i in graph.input] == ["x"] and [o.name for o in graph.output] == ["probs"]
        assert all(not n.name for n in graph.node) and not graph.value_info
