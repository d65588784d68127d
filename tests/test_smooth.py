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


def attention_graph(rng, hidden: int = 8, *, attention_also_read: bool) -> onnx.ModelProto:
    """Q/K/V MatMuls -> MultiHeadAttention -> output MatMul; the attention output also feeds a
    residual Add (and is a graph output) when `attention_also_read`."""
    weights = {n: rng.normal(size=(hidden, hidden)).astype(np.float32)
               for n in ("wq", "wk", "wv", "wo")}
    nodes = [helper.make_node("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"]
    nodes += [helper.make_node("MultiHeadAttention", ["q", "k", "v", "bias"], ["attn"],
                               domain="com.microsoft", num_heads=2),
              helper.make_node("MatMul", ["attn", "wo"], ["o"])]
    outputs = ["o"]
    if attention_also_read:
        nodes.append(helper.make_node("Add", ["o", "attn"], ["y"]))
        outputs = ["y", "attn"]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, hidden])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(w, n) for n, w in weights.items()]
        + [numpy_helper.from_array(rng.normal(size=3 * hidden).astype(np.float32), "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def smoothed_outputs(model, feeds, peaks, alpha=0.8):
    before = ort_session(model.SerializeToString()).run(None, feeds)
    scales = smooth_graph(model, peaks, alpha)
    return before, ort_session(model.SerializeToString()).run(None, feeds), scales


def test_attention_output_with_other_readers_is_not_folded_into_v():
    """1/s folded into V reaches every reader of the attention output, but only the output
    MatMul gets s back: with a residual reader (and the graph's caller) it needs a Mul."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(1, 4, 8)) * np.r_[1, 1, 1, 30, 1, 1, 1, 1]).astype(np.float32)
    attn_peak = np.abs(rng.normal(size=8)).astype(np.float32) * 20
    for also_read in (False, True):
        model = attention_graph(np.random.default_rng(1), attention_also_read=also_read)
        before, after, _ = smoothed_outputs(
            model, {"x": x}, {"x": np.abs(x).reshape(-1, 8).max(0), "attn": attn_peak})
        for a, b in zip(before, after, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-3)
        folded = not any(n.input[0] == "attn_smoothed" for n in model.graph.node)
        assert folded == (not also_read)


def test_a_weight_read_by_other_nodes_keeps_its_values():
    """A tied embedding: Gather(W, ids) and MatMul(e, W). Scaling W's rows for the MatMul
    would change the Gather's table."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "ids"], ["e"]),
         helper.make_node("MatMul", ["e", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before, after, scales = smoothed_outputs(
        model, {"ids": np.array([[0, 2, 3]], np.int64)}, {"e": np.abs(w).max(0) * 40})
    assert scales == {}
    np.testing.assert_array_equal(after[0], before[0])


def test_nan_channel_peaks_give_finite_scales():
    """A channel whose calibration peak is NaN (a NaN activation) is left unscaled, not
    turned into NaN weights that every later float check would then have to catch."""
    rng = np.random.default_rng(0)
    model = two_layer_graph(rng)
    x = rng.normal(size=(5, 16)).astype(np.float32)
    peaks = np.abs(x).max(axis=0)
    peaks[2] = np.nan
    before, after, scales = smoothed_outputs(model, {"x": x}, {"h": peaks})
    assert np.isfinite(scales["h"]).all() and scales["h"][2] == 1.0
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-4)


def test_channel_peaks_leave_nan_out():
    from exporter.smooth import channel_absmax

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["h"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    batches = [{"x": np.array([[1, np.nan, np.nan], [-4, 2, np.nan]], np.float32)},
               {"x": np.array([[np.nan, -3, np.nan]], np.float32)}]
    peak = channel_absmax(model, ["h"], batches, total=2)["h"]
    np.testing.assert_array_equal(peak[:2], [4, 3])
    assert np.isnan(peak[2])   # only NaN seen: smooth_graph leaves that channel at scale 1


def test_float_checks_do_not_lose_a_nan():
    """max(0.0, nan) is 0.0: the checks' running maximum would pass a graph that makes NaN."""
    from exporter.to_onnx import masked_max_abs

    ours = np.ones((1, 3, 4), np.float32)
    theirs = ours.copy()
    theirs[0, 1, 2] = np.nan
    worst = max(0.0, masked_max_abs(ours, theirs, np.ones((1, 3), np.int64)))
    assert worst == float("inf")
    assert masked_max_abs(ours, ours, np.ones((1, 3), np.int64)) == 0.0
