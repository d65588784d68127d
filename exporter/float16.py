"""Stage `to_float16`: what stays in float runs in float16, for GPU targets.

With `float_type = "float16"` (and for the fp16-only variant, `precision = "fp16"`) every float
tensor of the graph becomes float16: weights that are not int8, LayerNorm, Softmax, GELU,
the residual Adds, the attention MatMuls, and the Q/DQ scales, so that QuantizeLinear reads
and DequantizeLinear writes float16 directly (opset 19 and later) with no Cast around them.
The graph's inputs (int64 token ids) and outputs stay as they were (outputs float32, through
one Cast each), so the runtime's pooling and the bundle's interface do not change.

The conversion is onnxruntime's `float16.convert_float_to_float16` (the onnxconverter-common
algorithm): constants are clipped to float16's finite range, which turns the float32-min
additive attention mask into -65504 instead of -inf (so a masked row never gives 0 * inf).

    >>> convert(onnx.load("model.onnx")).graph.output[0].type.tensor_type.elem_type
    1
"""

from __future__ import annotations

import heapq
import tempfile
from pathlib import Path

import onnx

from .feeds import encoder_feeds, ort_session
from .graph_file import check_and_save, copy_model, graph_bytes, graph_session, save_model, too_big

# ai.onnx opset from which QuantizeLinear/DequantizeLinear accept float16 scales.
FLOAT16_QDQ_OPSET = 19
FLOAT16_MAX = 65504.0      # float16's largest finite value: anything above becomes inf
RANGE_CHECK_TEXTS = 64     # calibration texts the float graph's value ranges are taken on


def convert(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its float tensors in float16; int64 inputs, float32 outputs kept."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    if has_qdq and opset < FLOAT16_QDQ_OPSET:
        raise ValueError(f"float16 with int8 Q/DQ needs opset {FLOAT16_QDQ_OPSET} or later "
                         f"(float16 scales); the graph has opset {opset}. Set opset = "
                         f"{FLOAT16_QDQ_OPSET} in the profile.")
    if too_big(model):   # by path: in memory its shape inference refuses a graph over 2 GB
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, Path(tmp) / "model.onnx")
            half = convert_float_to_float16(str(Path(tmp) / "model.onnx"), keep_io_types=True)
    else:
        half = convert_float_to_float16(model, keep_io_types=True)
    # The converter appends the Casts it adds (for a float graph input, or around an op it
    # keeps in float32: Max, Range, TopK ...) at the end of the node list.
    _sort_nodes(half.graph)
    return half


def float16_overflows(model: onnx.ModelProto, path, feeds, *,
                      total: int) -> tuple[dict[str, float], float]:
    """The float tensors of `model` (saved at `path`) whose |values| pass float16's range on
    `feeds` (name -> peak), and the largest |value| seen in any float tensor: the float32
    graph's min/max calibration (`calibrate_all`) over every float tensor.

    Only constants are clipped by the conversion; a value computed past 65504 becomes inf on
    the device. ONNX Runtime's CPU provider cannot be relied on to show it: it has no float16
    kernel for most ops and runs them in float32 with the Casts between them removed. The
    attention-mask fill (float32 min) is left out, as calibration leaves it out: its constant
    is clipped to -65504 on purpose.
    """
    from .quantize import calibrate_all

    tensors = float_tensors(model)
    ranges = calibrate_all(path, tensors, lambda: feeds, methods=("minmax",),
                           percentile=100.0, total=total).ranges["minmax"]
    peaks = {name: max(-low, high) for name, (low, high) in ranges.items()}
    over = {name: peak for name, peak in peaks.items() if peak > FLOAT16_MAX}
    return over, max(peaks.values(), default=0.0)


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """The float32 tensors the nodes of `model` compute, typed as ONNX Runtime types them.
    ONNX's own shape inference stops at com.microsoft ops: in a fused encoder the outputs of
    MultiHeadAttention and BiasGelu (the FFN's widest activation), and of the MatMuls that
    read them, would have no type and so no range check."""
    probe = copy_model(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for node in probe.graph.node
                              for name in node.output if name and name not in known)
    session = graph_session(probe)
    return [o.name for o in session.get_outputs() if o.type == "tensor(float)"]


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Put `graph`'s nodes in topological order, keeping the given order where it already
    is one (Kahn's algorithm, the earliest ready node first)."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waits = [0] * len(nodes)
    readers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for source in {producer[name] for name in node.input if name in producer}:
            waits[i] += 1
            readers[source].append(i)
    ready = [i for i, count in enumerate(waits) if count == 0]
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for reader in readers[i]:
            waits[reader] -= 1
            if waits[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) != len(nodes):
        raise RuntimeError("the float16 graph has a cycle; please report this export")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def to_float16(job) -> None:
    """Stage: job.quantized_onnx in float16 where the profile asks for it."""
    if job.target.float_type != "float16" and job.target.precision != "fp16":
        return
    model = onnx.load(job.quantized_onnx)
    before = graph_bytes(job.quantized_onnx)
    texts = [u.text for u in job.calibration[:RANGE_CHECK_TEXTS]]
    feeds = encoder_feeds(job.workdir / "tokenizer.json", texts, ort_session(job.quantized_onnx),
                          max_length=job.max_length)
    over, largest = float16_overflows(model, job.quantized_onnx, feeds, total=len(texts))
    if over:
        worst = sorted(over.items(), key=lambda item: -item[1])
        shown = ", ".join(f"{name!r} reaches {peak:.4g}" for name, peak in worst[:5])
        raise ValueError(f"float16 cannot hold this model's activations: {len(over)} float "
                         f"tensors pass float16's largest value, 65504, on {len(texts)} "
                         f"calibration texts ({shown}); on the device they become inf. Keep "
                         f"float_type = \"float32\" and precision = \"int8\" in the profile.")
    half = convert(model)
    # model.onnx in a directory of its own: over the size limit its weights are in
    # model.onnx.data, the name the bundle gives them (the strength search's recovery
    # converts a candidate a second time: it replaces the first)
    out = job.workdir / "float16" / "model.onnx"
    out.parent.mkdir(exist_ok=True)
    check_and_save(half, out)
    job.quantized_onnx = out
    job.records["float16"] = {"applied": True, "bytes_before": before,
                              "bytes_after": graph_bytes(out),
                              "io": "inputs and outputs kept (float32 outputs via Cast)",
                              "largest_activation": round(largest, 2),
                              "range_checked_on": f"{len(texts)} calibration texts"}
    job.log(f"  float16: {before / 1e6:.1f} -> {graph_bytes(out) / 1e6:.1f} MB")
