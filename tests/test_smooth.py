"""SmoothQuant rewrites must leave the float computation unchanged."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.smooth import smooth_graph
from runtime.model import ort_session


def two_layer_graph(rng) -> onnx.ModelProto:
    """x -> LayerNorm -> (MatMul W1, MatMul W2 sharing the input) -> Add, and a residual."""
    w1 = rng.normal(size=(16, 8)).astype(np.float32)
    w2 = rng.normal(size=(16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1),
        helper.make_node("MatMul", ["h", "w1"], ["a"], name="mm1"),
        helper.make_node("MatMul", ["h", "w2"], ["b"], name="mm2"),
        helper.make_node("Add", ["a", "b"], ["y"]),
        helper.make_node("ReduceSum", ["h", "axis0"], ["residual"], keepdims=0),  # h used elsewhere
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8]),
         helper.make_tensor_value_info("residual", TensorProto.FLOAT, [16])],
        [numpy_helper.from_array(np.ones(16, np.float32), "gamma"),
         numpy_helper.from_array(np.zeros(16, np.float32), "beta"),
         numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.array([0], np.int64), "axis0")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_smoothing_is_exact_in_float_and_scales_outlier_channels():
    rng = np.random.default_rng(0)
    model = two_layer_graph(rng)
    x = rng.normal(size=(5, 16)).astype(np.float32)
    x[:, 3] *= 50  # an outlier channel
    before = ort_session(model.SerializeToString()).run(None, {"x": x})

    peaks = {"h": np.abs(x).max(axis=0)}  # stand-in for the calibration pass
    scales = smooth_graph(model, peaks, alpha=0.7)
    onnx.checker.check_model(model)
    after = ort_session(model.SerializeToString()).run(None, {"x": x})

    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(after[1], before[1], rtol=1e-6)  # residual path untouched
    assert scales["h"].argmax() == 3
    muls = [n for n in model.graph.node if n.op_type == "Mul"]
    assert len(muls) == 1  # one Mul shared by both MatMuls that read h
