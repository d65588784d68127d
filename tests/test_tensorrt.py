"""TensorRT explicit-quantization rules: a clean graph passes, each planted break is named."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.tensorrt import RULES, check, dedicate_dequantize


def linear_graph(*, consumers: int = 1) -> onnx.ModelProto:
    """x (1, 4) -> Q -> DQ -> MatMul with DQ(int8 weight (4, 3), per channel, axis 1) -> y;
    with consumers=2 the activation DQ is shared by two MatMuls (y and y2)."""
    w = np.array([[1, -127, 3], [4, 5, 6], [7, 8, 127], [0, 2, -5]], np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        numpy_helper.from_array(w, "w_int8"),
        numpy_helper.from_array(np.array([0.01, 0.02, 0.03], np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "w_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="x_Q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="x_DQ"),
        helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "w_zero"], ["w_dq"],
                         name="w_DQ", axis=1),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="matmul"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]
    if consumers == 2:
        nodes += [
            helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "w_zero"], ["w_dq2"],
                             name="w2_DQ", axis=1),
            helper.make_node("MatMul", ["x_dq", "w_dq2"], ["y2"], name="matmul2"),
        ]
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 3]))
    graph = helper.make_graph(nodes, "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    return model


def _init(model, name) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)


def _node(model, name) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set(model, name, array) -> None:
    _init(model, name).CopyFrom(numpy_helper.from_array(array, name))


def test_clean_graph_passes_and_runs():
    model = linear_graph()
    assert check(model) == []
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((1, 4), np.float32)})[0].shape == (1, 3)


def _contrib(model):
    model.graph.node.append(helper.make_node("BiasGelu", ["y", "b"], ["g"], name="bias_gelu",
                                             domain="com.microsoft"))


def _negative_scale(model):
    _set(model, "x_scale", np.array(-0.05, np.float32))


def _uint8_zero(model):
    _set(model, "x_zero", np.array(128, np.uint8))


def _nonzero_zero(model):
    _set(model, "w_zero", np.array([0, 1, 0], np.int8))


def _minus_128(model):
    _set(model, "w_int8", np.full((4, 3), -128, np.int8))


def _wrong_axis(model):
    _node(model, "w_DQ").attribute[0].i = 0


def _shared_dq(model):
    shared = linear_graph(consumers=2)
    _node(shared, "matmul2").input[1] = "w_dq"   # the second MatMul reads w_DQ's output too
    model.CopyFrom(shared)


def _dq_into_softmax(model):
    model.graph.node.append(helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"],
                                             ["s_dq"], name="softmax_DQ"))
    model.graph.node.append(helper.make_node("Softmax", ["s_dq"], ["s"], name="softmax"))


def _q_into_cast(model):
    model.graph.node.append(helper.make_node("Cast", ["x_q"], ["c"], name="cast_q",
                                             to=TensorProto.FLOAT))


def _int8_gather(model):
    model.graph.node.append(helper.make_node("Gather", ["w_int8", "idx"], ["g"], name="gather"))


def _scale_not_constant(model):
    _node(model, "x_Q").input[1] = "x"


PLANTED = [  # (break, rule, node named in the message)
    (_contrib, "standard-ops", "bias_gelu"),
    (_negative_scale, "constant-scale", "x_Q"),
    (_scale_not_constant, "constant-scale", "x_Q"),
    (_uint8_zero, "int8-zero-point", "x_Q"),
    (_nonzero_zero, "int8-zero-point", "w_DQ"),
    (_minus_128, "weight-range", "w_DQ"),
    (_wrong_axis, "per-channel-axis", "w_DQ"),
    (_shared_dq, "dedicated-dq", "w_DQ"),
    (_dq_into_softmax, "fusible-consumer", "softmax_DQ"),
    (_q_into_cast, "q-then-dq", "x_Q"),
    (_int8_gather, "int8-only-in-qdq", "gather"),
]


def test_every_rule_has_a_planted_break():
    assert {rule for _, rule, _ in PLANTED} == set(RULES)


@pytest.mark.parametrize("plant, rule, node", PLANTED, ids=[p[1] + ":" + p[0].__name__
                                                            for p in PLANTED])
def test_checker_rejects_planted_break_naming_node_and_rule(plant, rule, node):
    model = linear_graph()
    plant(model)
    found = check(model)
    named = [str(v) for v in found if v.rule == rule and v.node == node]
    assert named, [str(v) for v in found]
    assert repr(node) in named[0] and repr(rule) in named[0]


def test_dedicate_dequantize_gives_each_consumer_its_own_dq():
    model = linear_graph(consumers=2)
    assert [v.rule for v in check(model)] == ["dedicated-dq"]
    assert dedicate_dequantize(model) == 1
    assert check(model) == []
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, y2 = session.run(None, {"x": np.ones((1, 4), np.float32)})
    np.testing.assert_array_equal(y, y2)


def test_dedicate_dequantize_gives_each_input_slot_its_own_dq():
    """A node reading one DQ twice (x @ x) next to another reader: one DQ per slot, none left
    without a reader; and a DQ that is also a graph output keeps the output, not a reader."""
    model = linear_graph()
    x = np.arange(4, dtype=np.float32).reshape(1, 4) / 4
    model.graph.node.append(helper.make_node("Mul", ["x_dq", "x_dq"], ["sq"], name="square"))
    model.graph.output.extend([helper.make_tensor_value_info("sq", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("x_dq", TensorProto.FLOAT, [1, 4])])
    before = ort.InferenceSession(model.SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert dedicate_dequantize(model) == 3
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and
           n.input[0] == "x_q"]
    readers = {dq.output[0]: sum(name == dq.output[0] for n in model.graph.node
                                 for name in n.input) for dq in dqs}
    assert readers == {"x_dq": 0, "x_dq_1": 1, "x_dq_2": 1, "x_dq_3": 1}
    assert [v.rule for v in check(model)] == ["fusible-consumer"] * 2   # Mul: not int8 op
    onnx.checker.check_model(model)
    after = ort.InferenceSession(model.SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def _float_weight_quantized_in_graph(model):
    """Q(float W, per channel) -> DQ -> MatMul: TensorRT quantizes the weight itself when it
    builds (the form QAT exports write; its developer guide, "Quantized Weights")."""
    w = numpy_helper.to_array(_init(model, "w_int8")) * np.array([0.01, 0.02, 0.03])
    model.graph.initializer.remove(_init(model, "w_int8"))
    model.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), "w_float"))
    model.graph.node.insert(0, helper.make_node(
        "QuantizeLinear", ["w_float", "w_scale", "w_zero"], ["w_q"], name="w_Q", axis=1))
    _node(model, "w_DQ").input[0] = "w_q"


def _qparams_from_constant_nodes(model):
    """Scales and zero points written as Constant nodes (torch.onnx's way), not initializers."""
    for name in ("x_scale", "x_zero", "w_scale", "w_zero"):
        init = _init(model, name)
        model.graph.initializer.remove(init)
        model.graph.node.insert(0, helper.make_node("Constant", [], [name], value=init,
                                                    name=name + "_constant"))


def _dq_without_zero_point(model):
    """DQ(int8 W, scale): the zero point left out is 0 of W's type, int8."""
    del _node(model, "w_DQ").input[2]


@pytest.mark.parametrize("form", [_float_weight_quantized_in_graph,
                                  _qparams_from_constant_nodes, _dq_without_zero_point],
                         ids=lambda f: f.__name__)
def test_checker_accepts_the_other_valid_tensorrt_forms(form):
    """Each was refused: a per-channel scale 'on an activation input', scales 'not a
    constant', 'no int8 zero point (the default is uint8)'."""
    model = linear_graph()
    x = np.arange(4, dtype=np.float32).reshape(1, 4) / 4
    before = ort.InferenceSession(model.SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    form(model)
    onnx.checker.check_model(model, full_check=True)
    after = ort.InferenceSession(model.SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6)   # the same graph, written otherwise
    assert [str(v) for v in check(model)] == []


def test_checker_still_refuses_those_forms_broken():
    model = linear_graph()
    _float_weight_quantized_in_graph(model)
    _node(model, "w_DQ").attribute[0].i = 0          # axis 0 of (in, out): input channels
    _node(model, "w_Q").attribute[0].i = 0
    assert [v.rule for v in check(model)] == ["per-channel-axis"]
    model = linear_graph()
    _qparams_from_constant_nodes(model)
    _node(model, "x_zero_constant").attribute[0].t.CopyFrom(
        numpy_helper.from_array(np.array(3, np.int8), "x_zero"))
    assert {v.rule for v in check(model)} == {"int8-zero-point"}
    model = linear_graph()
    del _node(model, "x_Q").input[2], _node(model, "x_DQ").input[2]   # uint8 activations
    assert [v.node for v in check(model) if v.rule == "int8-zero-point"] == ["x_Q", "x_DQ"]


def test_the_size_search_measures_a_graph_with_the_dq_copies_tensorrt_adds():
    """The sensitivity search keeps a graph under max_model_mb by its size as shipped; on
    jetson check_rules then added a DequantizeLinear for each extra reader (a few KB), so a
    graph measured just under the budget could ship over it."""
    import dataclasses

    from exporter.float16 import convert
    from exporter.graph_file import model_bytes
    from exporter.sensitivity import shipped_bytes
    from targets import load_target

    model = linear_graph(consumers=2)
    before = model.SerializeToString()
    jetson = load_target("jetson")
    half = convert(model)
    half_bytes = model_bytes(half)
    assert dedicate_dequantize(half) == 1
    assert shipped_bytes(model, jetson) == model_bytes(half) > half_bytes
    fp32 = onnx.ModelProto.FromString(before)
    dedicate_dequantize(fp32)
    assert shipped_bytes(model, dataclasses.replace(jetson, float_type="float32")) \
        == model_bytes(fp32) > len(before)
    assert shipped_bytes(model, load_target("arm-cpu")) == len(before)
    assert model.SerializeToString() == before   # the search's graph is left as it was
