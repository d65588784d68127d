"""Graph rewrites name what they add after what they find (h -> h_scale, h_q, h_dq): a model
that already holds such a name must still give a valid graph that computes the same thing.
Small graphs, CPU numerics, a second."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.exact import exact_products, host_saturates
from exporter.graph_file import FreshNames, tensor_names
from exporter.quantize import build_int8
from exporter.sensitivity import Group, fake_quantize
from exporter.smooth import smooth_graph
from exporter.tensorrt import dedicate_dequantize
from runtime.model import ort_session
from targets import load_target

# arm-cpu's int8 settings, with the float64 LayerNorm / Softmax rewrite of portable rounding
SETTINGS = dataclasses.replace(load_target("arm-cpu").quantization, embeddings="int8-rows",
                               portable_rounding=True)
HIDDEN, VOCAB = 32, 1024
IDS = np.array([[3, 7, 1000, 5, 64]], np.int64)

# every suffix a rewrite adds to a name it found
SUFFIXES = ("_scale", "_zero", "_q", "_dq", "_int8", "_row_scale", "_float", "_by_row", "_f64",
            "_x_f64", "_y_f64", "_smoothed", "_inverse_scale", "_fq_scale", "_fq_zero", "_fq_q",
            "_fq_dq", "_zero_u8", "_1", "_2")


def embedding_projection(rng) -> onnx.ModelProto:
    """ids -> Gather(table) -> emb -> MatMul w0 (a projection reading the embedding directly,
    as OPT's project_in) -> LayerNorm -> MatMul w1 + MatMul w3 -> Softmax -> MatMul w2 -> y."""
    table = rng.normal(size=(VOCAB, 256)).astype(np.float32)   # 1 MiB: int8 rows
    weights = {"w0": rng.normal(size=(256, HIDDEN)) / 16, "w1": rng.normal(size=(HIDDEN, HIDDEN)),
               "w2": rng.normal(size=(HIDDEN, HIDDEN)), "w3": rng.normal(size=(HIDDEN, HIDDEN))}
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "w0"], ["a"], name="project_in"),
        helper.make_node("LayerNormalization", ["a", "gamma", "beta"], ["ln"], name="norm",
                         axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["h1"], name="mm1"),   # two read ln, as
        helper.make_node("MatMul", ["ln", "w3"], ["h3"], name="mm3"),   # Q and K read one x
        helper.make_node("Add", ["h1", "h3"], ["h"], name="add"),
        helper.make_node("Softmax", ["h"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "w2"], ["y"], name="mm2"),
    ]
    inits = [numpy_helper.from_array(table, "table"),
             numpy_helper.from_array(np.ones(HIDDEN, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "beta"),
             *(numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items())]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def crowded(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` that also defines every name a rewrite could derive from its names, each the
    output of a Constant and of the graph (so nothing prunes it)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = tensor_names(out.graph)
    for base in sorted(names):
        for suffix in SUFFIXES:
            if base + suffix not in names:
                out.graph.node.append(helper.make_node(
                    "Constant", [], [base + suffix], name=base + suffix,
                    value=numpy_helper.from_array(np.array(1.5, np.float32))))
                out.graph.output.append(helper.make_tensor_value_info(
                    base + suffix, TensorProto.FLOAT, []))
    return out


def ranges_of(model: onnx.ModelProto, tensors) -> dict[str, tuple[float, float]]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                              for t in tensors)
    values = ort_session(probe.SerializeToString()).run(list(tensors), {"ids": IDS})
    return {t: (float(v.min()), float(v.max())) for t, v in zip(tensors, values, strict=True)}


def run(model: onnx.ModelProto) -> np.ndarray:
    onnx.checker.check_model(model)   # names defined once, every input defined
    return ort_session(model.SerializeToString()).run(["y"], {"ids": IDS})[0]


@pytest.fixture(scope="module")
def graphs():
    model = embedding_projection(np.random.default_rng(0))
    return model, crowded(model), ranges_of(model, ["emb", "ln", "p"])


def dedicated(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` after the TensorRT rewrite, which had something to do."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert dedicate_dequantize(copy) > 0
    return copy


def test_fresh_names_skip_every_name_the_graph_holds():
    model = embedding_projection(np.random.default_rng(0))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32), "emb_scale"))
    fresh = FreshNames(model.graph)
    assert [fresh("emb_scale"), fresh("emb_scale"), fresh("emb_q"), fresh("ids")] \
        == ["emb_scale_1", "emb_scale_2", "emb_q", "ids_1"]


def test_fresh_names_see_inside_subgraphs():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["inner"])], "then", [],
                               [helper.make_tensor_value_info("inner", TensorProto.FLOAT, [])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=branch)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])])
    assert FreshNames(graph)("inner") == "inner_1"


def test_int8_of_a_projection_reading_the_embedding_directly(graphs):
    """The Gather's output gets an activation scale (insert_qdq) and a row scale (int8 rows):
    both were named emb_scale, and onnxruntime refused the graph ("Duplicate definition")."""
    model, _, ranges = graphs
    int8, _, tables = build_int8(model, ranges, SETTINGS)
    assert tables == ["table"]
    # on x86 without VNNI, the exact twin the exporter scores such a host's graphs on
    got = run(exact_products(int8) if host_saturates() else int8).ravel()
    want = run(model).ravel()
    assert got @ want / np.linalg.norm(got) / np.linalg.norm(want) > 0.995   # 0.9989 measured


@pytest.mark.parametrize("lower", [False, True])
def test_int8_of_a_graph_holding_every_derived_name(graphs, lower):
    model, busy, ranges = graphs
    plain = build_int8(model, ranges, SETTINGS, lower=lower)[0]
    int8 = build_int8(busy, ranges, SETTINGS, lower=lower)[0]
    assert "Cast" in {n.op_type for n in int8.graph.node}   # the float64 rewrite ran
    np.testing.assert_array_equal(run(int8), run(plain))


def test_tensorrt_and_exact_rewrites_of_a_graph_holding_every_derived_name(graphs):
    """The TensorRT rewrite copies ln's shared DQ (ln_dq_1); the exact twin writes the zero
    points a DQ left out (w1_int8_zero_u8)."""
    model, _, ranges = graphs
    plain = build_int8(model, ranges, SETTINGS)[0]
    for node in plain.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith("_int8"):
            del node.input[2]   # a zero point of 0, left out
    for rewrite in (exact_products, dedicated):
        np.testing.assert_array_equal(run(rewrite(crowded(plain))), run(rewrite(plain)))
    assert "ln_dq_1" in tensor_names(dedicated(plain).graph)


def test_smoothing_a_graph_holding_every_derived_name(graphs):
    model, busy, _ = graphs
    peaks = {"emb": np.linspace(1, 5, 256, dtype=np.float32),
             "ln": np.linspace(1, 40, HIDDEN, dtype=np.float32),
             "p": np.linspace(0.1, 1, HIDDEN, dtype=np.float32)}
    smoothed = {}
    for key, graph in (("plain", model), ("busy", busy)):
        copy = onnx.ModelProto()
        copy.CopyFrom(graph)
        scales = smooth_graph(copy, peaks, 0.7)
        assert sorted(scales) == ["emb", "ln", "p"]
        smoothed[key] = copy
    assert sum(n.op_type == "Mul" for n in smoothed["busy"].graph.node) == 3
    np.testing.assert_array_equal(run(smoothed["busy"]), run(smoothed["plain"]))
    np.testing.assert_allclose(run(smoothed["busy"]), run(model), rtol=1e-4, atol=1e-5)


def test_fake_quantizing_a_graph_holding_every_derived_name(graphs):
    model, busy, ranges = graphs
    group = Group("softmax", "float by design", ["mm2", "mm1", "mm3"], ["p", "ln"])
    outputs = [run(fake_quantize(graph, group, ranges, SETTINGS)) for graph in (model, busy)]
    np.testing.assert_array_equal(outputs[1], outputs[0])
    assert not np.array_equal(outputs[0], run(model))   # the Q/DQ pairs are in the path
