"""Stage `check_rules`: the graph must be one TensorRT builds with explicit quantization.

TensorRT reads int8 from QuantizeLinear/DequantizeLinear (Q/DQ) nodes and fuses each
DQ(x) -> op <- DQ(w) pattern into one int8 kernel. It only does so when the graph follows the
rules of its developer guide ("Working with Quantized Types": explicit quantization and Q/DQ
layer-placement recommendations); otherwise the engine build fails or silently runs the op
in float. `check(model)` tests those rules on any ONNX graph and names node and rule for every
break (one rule, `fusible-consumer`, is this exporter's own placement, stricter than
TensorRT: it refuses Q/DQ around an Add that TensorRT would fuse); the stage first gives
each DQ consumer its own DQ node (the one rewrite the rules need and the quantize stage does
not do: it shares one Q/DQ pair between Q, K and V) and refuses to bundle a graph that still
breaks a rule.

    >>> [str(v) for v in check(onnx.load("build/minilm-jetson/model.onnx"))]
    []
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph_file import FreshNames, save_model

# rule -> what it requires and why (TensorRT developer guide, explicit quantization).
RULES: dict[str, str] = {
    "standard-ops": "every node is a standard ONNX op: TensorRT's ONNX parser has none of "
                    "ONNX Runtime's com.microsoft contrib ops",
    "int8-zero-point": "every Q/DQ zero point is an int8 constant equal to 0: TensorRT "
                       "quantizes symmetrically, to int8 only",
    "constant-scale": "every Q/DQ scale is a constant, float, positive and finite",
    "weight-range": "int8 weights lie in [-127, 127] (TensorRT's weight range; -128 is "
                    "reserved to activations)",
    "per-channel-axis": "a per-channel weight scale runs along its consumer's output-channel "
                        "axis with one scale per channel; activation scales are per tensor",
    "dedicated-dq": "each DequantizeLinear output feeds exactly one node (TensorRT fuses a "
                    "DQ into its consumer, so a shared DQ cannot fuse with all of them)",
    "fusible-consumer": "a DequantizeLinear feeds only an int8 GEMM (MatMul, Gemm, Conv, "
                        "ConvTranspose). This is the exporter's placement policy, not a "
                        "TensorRT limit: TensorRT also fuses Q/DQ around element-wise ops "
                        "and pooling, but this exporter quantizes only GEMMs, so a DQ "
                        "anywhere else is one it did not mean to place",
    "q-then-dq": "a QuantizeLinear output feeds only DequantizeLinear nodes",
    "int8-only-in-qdq": "int8 constants feed only DequantizeLinear: TensorRT types int8 "
                        "tensors at Q/DQ boundaries only",
}

# op -> (input index of the weight, output-channel axis of that weight given the node and the
# weight's rank): where per-channel scales must run for TensorRT to fuse the int8 kernel.
INT8_OPS: dict[str, tuple[int, object]] = {
    "MatMul": (1, lambda node, rank: rank - 1),        # (in, out): out is the last axis
    "Gemm": (1, lambda node, rank: 0 if _attr(node, "transB", 0) else 1),
    "Conv": (1, lambda node, rank: 0),                  # (out, in/groups, kh, kw)
    "ConvTranspose": (1, lambda node, rank: 1),         # (in, out/groups, kh, kw)
}

STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Violation:
    node: str
    op: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op}) breaks rule {self.rule!r}: {self.detail}"


class GraphRuleError(ValueError):
    """The graph breaks target rules; the message lists node, rule and detail per break."""


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def check(model: onnx.ModelProto) -> list[Violation]:
    """Every break of TensorRT's explicit-quantization rules (RULES) in `model`.

        >>> check(graph_with_shared_dq)[0].rule
        'dedicated-dq'
    """
    graph = model.graph
    inits = constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    found: list[Violation] = []

    def add(node, rule, detail):
        found.append(Violation(_name(node), node.op_type, rule, detail))

    for node in graph.node:
        if node.domain not in STANDARD_DOMAINS:
            add(node, "standard-ops", f"op from domain {node.domain!r}")
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            for name in node.input:
                init = inits.get(name)
                if init is not None and init.data_type == TensorProto.INT8:
                    add(node, "int8-only-in-qdq", f"reads int8 constant {name!r}")
            continue
        _check_qdq_constants(node, inits, producer, add)
        users = consumers.get(node.output[0], [])
        if node.op_type == "QuantizeLinear":
            for user in users:
                if user.op_type != "DequantizeLinear":
                    add(node, "q-then-dq", f"output feeds {user.op_type} {_name(user)!r}")
            continue
        if len(users) + (node.output[0] in outputs) != 1:
            add(node, "dedicated-dq", f"output feeds {len(users)} nodes "
                                      f"({', '.join(_name(u) for u in users)})")
        for user in users:
            if user.op_type not in INT8_OPS:
                add(node, "fusible-consumer", f"output feeds {user.op_type} {_name(user)!r}")
            else:
                _check_axis(node, user, inits, producer, add)
    return found


def constants(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """Every constant tensor of `graph` by name: its initializers and the outputs of its
    Constant nodes (what exporters such as torch.onnx write for scales and zero points)."""
    found = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS and node.attribute:
            value = helper.get_attribute_value(node.attribute[0])
            if not isinstance(value, TensorProto):   # value_float(s), value_int(s)
                value = numpy_helper.from_array(np.asarray(
                    value, np.float32 if "float" in node.attribute[0].name else np.int64))
            tensor = TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            found[tensor.name] = tensor
    return found


def _int8_input(dq, inits, producer) -> bool:
    """Whether a DequantizeLinear reads int8: an int8 constant, or a QuantizeLinear's output
    whose zero point is int8 (without one, a DQ's zero point is 0 of its input's type)."""
    if dq.input[0] in inits:
        return inits[dq.input[0]].data_type == TensorProto.INT8
    q = producer.get(dq.input[0])
    zero = inits.get(q.input[2]) if q is not None and q.op_type == "QuantizeLinear" \
        and len(q.input) > 2 and q.input[2] else None
    return zero is not None and zero.data_type == TensorProto.INT8


def _check_qdq_constants(node, inits, producer, add) -> None:
    scale = inits.get(node.input[1])
    if scale is None:
        add(node, "constant-scale", f"scale {node.input[1]!r} is not a constant")
    elif scale.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        add(node, "constant-scale", f"scale has type "
                                    f"{TensorProto.DataType.Name(scale.data_type)}")
    else:
        values = numpy_helper.to_array(scale).astype(np.float64)
        if not (np.isfinite(values).all() and (values > 0).all()):
            add(node, "constant-scale", f"scale values {values.ravel()[:4]} are not all "
                                        f"positive and finite")
    missing = len(node.input) < 3 or not node.input[2]
    zero = None if missing else inits.get(node.input[2])
    if missing:
        # A DQ's default zero point is 0 of its input's type (int8 is fine); a Q's is uint8.
        if node.op_type != "DequantizeLinear" or not _int8_input(node, inits, producer):
            add(node, "int8-zero-point", "no int8 zero point (the default is uint8)")
    elif zero is None:
        add(node, "int8-zero-point", "zero point is not a constant")
    elif zero.data_type != TensorProto.INT8:
        add(node, "int8-zero-point", f"zero point has type "
                                     f"{TensorProto.DataType.Name(zero.data_type)}")
    elif np.any(numpy_helper.to_array(zero) != 0):
        add(node, "int8-zero-point", f"zero point {numpy_helper.to_array(zero).ravel()[:4]} "
                                     f"is not 0")
    if node.op_type == "DequantizeLinear" and node.input[0] in inits:
        weight = numpy_helper.to_array(inits[node.input[0]])
        if weight.dtype == np.int8 and weight.size and int(weight.min()) < -127:
            add(node, "weight-range", f"weight {node.input[0]!r} holds -128")


def _check_axis(dq, user, inits, producer, add) -> None:
    scale = inits.get(dq.input[1])
    if scale is None or len(scale.dims) == 0 or int(np.prod(scale.dims)) == 1:
        return  # per tensor: always fine
    weight_index, channel_axis = INT8_OPS[user.op_type]
    weight = inits.get(dq.input[0])
    q = producer.get(dq.input[0])
    if weight is None and q is not None and q.op_type == "QuantizeLinear":
        weight = inits.get(q.input[0])   # a float weight TensorRT quantizes when it builds
    if weight is None or list(user.input).index(dq.output[0]) != weight_index:
        add(dq, "per-channel-axis", f"per-channel scale on an activation input of "
                                    f"{_name(user)!r}")
        return
    rank = len(weight.dims)
    axis = _attr(dq, "axis", 1)
    axis = axis + rank if axis < 0 else axis
    expected = channel_axis(user, rank)
    if axis != expected:
        add(dq, "per-channel-axis", f"axis {axis}, but {user.op_type} {_name(user)!r} needs "
                                    f"its output-channel axis {expected}")
    elif int(np.prod(scale.dims)) != weight.dims[axis]:
        add(dq, "per-channel-axis", f"{int(np.prod(scale.dims))} scales for "
                                    f"{weight.dims[axis]} channels")


def dedicate_dequantize(model: onnx.ModelProto) -> int:
    """Give each consumer of a shared DequantizeLinear its own copy; returns copies made.

    Q -> DQ -> {MatMul q, MatMul k, MatMul v} becomes Q -> {DQ -> q, DQ_1 -> k, DQ_2 -> v}:
    the pattern TensorRT fuses (one Q may feed several DQs).
    """
    # Every input slot that reads a DQ output: a node may read one twice (MatMul(x, x)).
    slots: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for j, name in enumerate(node.input):
            slots.setdefault(name, []).append((node, j))
    outputs = {o.name for o in model.graph.output}
    fresh = FreshNames(model.graph)
    nodes, copies = [], 0
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type != "DequantizeLinear":
            continue
        readers = slots.get(node.output[0], [])
        # The original keeps its first reader, or the graph output if it is one.
        for i, (user, j) in enumerate(readers[node.output[0] not in outputs:], start=1):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{_name(node)}_{i}"
            copy.output[0] = fresh(node.output[0])   # taken: so output_1, output_2, ...
            user.input[j] = copy.output[0]
            nodes.append(copy)
            copies += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return copies


def check_rules(job) -> None:
    """Stage: for graph_rules = "tensorrt", rewrite shared DQs and refuse any rule break."""
    if job.target.graph_rules != "tensorrt":
        return
    model = onnx.load(job.quantized_onnx)
    copies = dedicate_dequantize(model)
    violations = check(model)
    job.records["graph_rules"] = {"rules": "tensorrt", "checked": sorted(RULES),
                                  "dequantize_copies": copies, "violations": len(violations)}
    if violations:
        shown = "\n  ".join(str(v) for v in violations[:20])
        more = f"\n  ... and {len(violations) - 20} more" if len(violations) > 20 else ""
        raise GraphRuleError(f"The graph breaks {len(violations)} TensorRT explicit-"
                             f"quantization rules; no bundle written:\n  {shown}{more}")
    save_model(model, job.quantized_onnx)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    job.log(f"  TensorRT rules: {len(RULES)} rules hold on {len(model.graph.node)} nodes "
            f"({qdq} Q/DQ, {copies} DQ copies made for dedicated consumers)")
