"""Stage `quantize`: static int8 QDQ, calibrated on real text.

What gets quantized, and why (measured on all-MiniLM-L6-v2, see benchmarks/bench_encoder.py):

* Every MatMul with a weight initializer (Q, K, V, attention output, FFN in, FFN out), and
  every Gemm with one (a classifier's pooler and head, after onnxruntime's basic level):
  weights int8 symmetric per output channel, the activation input through one
  QuantizeLinear -> DequantizeLinear pair with a calibrated scale and zero point, shared by
  every MatMul that reads it (Q, K and V: one QuantizeLinear for three). The MatMul output
  stays float: ONNX Runtime then fuses DQ(x), DQ(W), MatMul into one MatMulIntegerToFloat
  kernel, and the residual Add and LayerNorm keep float precision. Where the target allows
  com.microsoft ops, the graph says MatMulIntegerToFloat itself, with the bias Add inside
  (fuse_integer_matmuls). onnxruntime's `quantize_static` also quantizes each MatMul output,
  which costs accuracy (MiniLM: mean cosine 0.94 -> 0.993 without it) and buys no speed on CPU.
* Activation x activation MatMuls (attention scores, attention x V), Softmax, LayerNorm, GELU
  and the residual Adds stay float: they hold no weights, and quantizing them both hurts
  accuracy and adds Q/DQ work that the CPU kernels do not fuse.
* Embedding tables (Gather on a 2-D initializer) of 1 MiB or more: int8 with one scale per
  row. Only the rows a text uses are gathered and rescaled (Gather int8 -> Cast -> Mul by the
  gathered row scale), all in standard ops, instead of dequantizing the whole 30522 x 384
  table per call. Smaller tables (position, token type) stay float: see SMALL_TABLE_BYTES.

Calibration streams: pass 1 keeps a running min/max per activation, pass 2 (percentile and
entropy) a fixed 2048-bin histogram per activation over that range, so memory does not grow
with the number of calibration texts. Every export scores the three methods' full-int8 graphs
on the evaluation texts (compare_calibration); the profile picks the one shipped. Measured on
MiniLM with SmoothQuant (300 held-out texts, vs float): minmax 0.9981 / 0.9884, percentile
99.999 0.9982 / 0.9897, entropy 0.9942 / 0.933 (entropy clips the outlier channels that carry
signal). Which node groups stay float beyond this is the sensitivity stage's decision.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .feeds import encoder_feeds, host_threads, ort_session
from .graph_file import (
    FreshNames,
    check_and_save,
    copy_model,
    graph_bytes,
    graph_session,
    save_model,
)
from .progress import progress

HISTOGRAM_BINS = 2048
ENTROPY_STRIDE = 16        # thresholds tried by entropy calibration: every 16th bin
MASK_FILL_LIMIT = 1e30     # |x| at or above this is attention-mask fill, not a value
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# Embedding tables below this many float bytes stay float: the int8-rows rewrite turns one
# Gather into four nodes, which costs more per call than 0.6 MB saves (MiniLM's position and
# token-type tables, 0.79 MB together: batch-1 latency about 7% lower with them float).
SMALL_TABLE_BYTES = 1 << 20

# Compute-heavy ops left in float on purpose -> why (reported per node in the manifest).
FLOAT_BY_DESIGN: dict[str, str] = {
    "MatMul": "activation x activation MatMul (attention scores or x V): no weight to "
              "quantize; static int8 here costs accuracy and the CPU kernels do not fuse it",
    "MultiHeadAttention": "fused attention core (scores, softmax, x V) runs in float; its "
                          "Q/K/V projections are int8",
    "QAttention": "attention core (scores, softmax, x V) runs in float, after one int8 GEMM "
                  "for its Q/K/V projections",
}


def float_by_design(model: onnx.ModelProto, shipped: onnx.ModelProto,
                    quantized: list[str]) -> list[dict]:
    """The manifest's entries for the nodes of float graph `model` that stay float on
    purpose (FLOAT_BY_DESIGN), each under its op in `shipped`: a MultiHeadAttention whose
    Q/K/V MatMuls went int8 ships as a QAttention where the target lowers to contrib ops."""
    op = {n.name: n.op_type for n in shipped.graph.node}
    done = set(quantized)
    entries = []
    for node in model.graph.node:
        if node.op_type in FLOAT_BY_DESIGN and node.name not in done:
            kind = op.get(node.name, node.op_type)
            entries.append({"node": node.name, "op": kind,
                            "reason": FLOAT_BY_DESIGN.get(kind, FLOAT_BY_DESIGN[node.op_type])})
    return entries


def int8_nodes(model: onnx.ModelProto, shipped: onnx.ModelProto, matmuls: list[str]) -> dict:
    """The manifest's names for the int8 MatMuls `matmuls` of float graph `model`, as nodes
    of `shipped`: "quantized_nodes" (a MatMul that ships under its own name, and each
    QAttention once) and "fused_matmuls" (QAttention -> the Q, K and V MatMuls it runs as
    one int8 GEMM; named for the MultiHeadAttention they fed, the MatMuls are gone).

        >>> int8_nodes(model, shipped, ["q", "k", "v", "out"])["fused_matmuls"]
        {'Attention_0': ['q', 'k', 'v']}
    """
    op = {n.name: n.op_type for n in shipped.graph.node}
    output = {n.name: n.output[0] for n in model.graph.node}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    names, fused = [], {}
    for matmul in matmuls:
        if matmul in op:
            names.append(matmul)
            continue
        into = [r for r in readers.get(output[matmul], []) if op.get(r) == "QAttention"]
        assert len(into) == 1, f"int8 MatMul {matmul!r} is neither in the shipped graph nor " \
                               f"in one QAttention ({into})"
        if into[0] not in fused:
            names.append(into[0])
        fused.setdefault(into[0], []).append(matmul)
    return {"quantized_nodes": names, "fused_matmuls": fused}

# Activation dtype name -> (TensorProto type, numpy type, qmin, qmax).
INT_TYPES: dict[str, tuple[int, type, int, int]] = {
    "uint8": (TensorProto.UINT8, np.uint8, 0, 255),
    "int8": (TensorProto.INT8, np.int8, -128, 127),
}


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose second input is a 2-D float initializer (a Linear layer's weight),
    and Gemm nodes whose B is one: onnxruntime's "basic" level (jetson) rewrites a 2-D
    MatMul + bias Add, a classifier's pooler and head, as Gemm."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node
            if (n.op_type == "MatMul" or n.op_type == "Gemm" and not _attribute(n, "transA"))
            and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2
            and inits[n.input[1]].data_type == TensorProto.FLOAT]


def output_axis(node: onnx.NodeProto) -> int:
    """The axis of a weight MatMul's or Gemm's B that indexes output channels: B is
    (in, out), or (out, in) for a Gemm with transB."""
    return 0 if node.op_type == "Gemm" and _attribute(node, "transB") else 1


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


@dataclass
class Calibration:
    """Activation ranges per calibration method, from one streamed pass (two with histograms).

    `ranges[method][tensor] = (low, high)`; `peak_rss_mb` is the highest resident set size seen
    while calibrating and `start_rss_mb` the size before it began: the difference is what
    calibration itself held, and it does not grow with the number of texts (min/max and a
    fixed-size histogram per tensor are all that is kept between batches).
    """

    ranges: dict[str, dict[str, tuple[float, float]]]
    samples: int
    start_rss_mb: float
    peak_rss_mb: float
    dropped_fill: dict[str, int] = field(default_factory=dict)  # tensor -> values ignored
    not_a_number: dict[str, int] = field(default_factory=dict)  # tensor -> NaNs ignored


def rss_mb() -> float:
    """Current resident set size of this process (MB), from /proc; 0 where there is none."""
    try:
        with open("/proc/self/status") as status:
            line = next(x for x in status if x.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0
    return kib_to_mb(int(line.split()[1]))


def kib_to_mb(kib: float) -> float:
    """/proc's and getrusage's KiB in MB (1e6 bytes), the unit of every size the report
    gives (model files, max_model_mb)."""
    return kib * 1024 / 1e6


def _finite(value: np.ndarray) -> np.ndarray:
    """`value` without attention-mask fill: exported BERT graphs fill masked scores with
    float32 min (-3.4e38); a range or histogram that includes it is useless (and crashes
    onnxruntime's percentile calibrator with "Too many bins for data range"). Infinities
    and NaN (a -inf mask's softmax over a row masked whole) go too."""
    return value[np.abs(value) < MASK_FILL_LIMIT]


def _smoothed(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Counts `p` with each empty bin given `eps` (taken evenly from the others), normalized,
    so that KL(P || Q) is finite where Q is empty and P is not: the outliers folded into P's
    last bin land where Q (built without them) can be empty. onnxruntime's and MXNet's
    entropy calibration do the same (smooth_distribution, on counts). None when `p` has no
    count to spare."""
    zeros = p == 0
    nonzero = p.size - zeros.sum()
    if not nonzero:
        return None
    out = p + eps * zeros - (eps * zeros.sum() / nonzero) * ~zeros
    if not (out > 0).all():
        return None
    return out / out.sum()


def kl_threshold(hist: np.ndarray, edge: float, *, levels: int = 128) -> float:
    """Clipping threshold for |x| that minimizes KL(P || Q), P the histogram clipped at the
    threshold (outliers folded into the last bin), Q that P merged into `levels` bins: the
    entropy calibration of TensorRT (Migacz, "8-bit Inference with TensorRT", GTC 2017).

    Q spreads each of its bins evenly over the bins of P it merges that are non-zero, as in
    TensorRT's reference and onnxruntime. Where P has only the folded outliers in its last
    bin, a Q built on the clipped histogram's own non-zero bins is empty there, and the
    candidate's KL huge: a sparse tail (a Laplace-like activation) was never clipped."""
    bins = len(hist)
    counts = hist.astype(np.float64)
    best, best_i = np.inf, bins
    for i in range(levels, bins + 1, ENTROPY_STRIDE):
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        if p.sum() == 0:
            continue
        # np.array_split(range(i), levels): the first i % levels chunks one bin longer
        size, longer = divmod(i, levels)
        sizes = np.full(levels, size)
        sizes[:longer] += 1
        starts = np.concatenate(([0], np.cumsum(sizes[:-1])))
        nonzero = p > 0
        merged = np.add.reduceat(counts[:i], starts)        # the clipped histogram's counts
        spread = np.add.reduceat(nonzero.astype(np.int64), starts)
        q = np.where(nonzero, np.repeat(merged / np.maximum(spread, 1), sizes), 0.0)
        pn, qn = _smoothed(p), _smoothed(q)
        if pn is None or qn is None:
            continue
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best:
            best, best_i = kl, i
    return best_i / bins * edge


def calibrate_all(model_path, tensors: list[str], feeds, *, methods: tuple[str, ...],
                  percentile: float, total: int, threads: int = 0) -> Calibration:
    """(low, high) range per tensor for each of `methods` over the calibration feeds.

    `feeds` is a zero-argument callable returning a fresh iterator of input dicts; each batch
    is run, reduced and dropped (streaming). "minmax" keeps the observed extremes. "percentile"
    and "entropy" share one histogram of |x| per tensor (HISTOGRAM_BINS bins over the min/max
    range, a second pass): percentile clips each side at the range holding `percentile` % of
    the values, entropy at the KL-optimal threshold (kl_threshold).
    """
    unknown = set(methods) - set(CALIBRATION_METHODS)
    if unknown:
        raise ValueError(f"Unknown calibration method {sorted(unknown)[0]!r}; expected one of "
                         f"{', '.join(CALIBRATION_METHODS)}.")
    model = onnx.load(model_path)
    known = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in known:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = graph_session(model, threads=threads)

    start = peak = rss_mb()
    low = dict.fromkeys(tensors, np.inf)
    high = dict.fromkeys(tensors, -np.inf)
    dropped: dict[str, int] = {}
    nans: dict[str, int] = {}
    seen = 0
    for batch in progress(feeds(), total=total, desc="calibrating (min/max)"):
        seen += 1
        for name, value in zip(tensors, session.run(tensors, batch), strict=True):
            lo, hi = float(value.min()), float(value.max())
            if max(-lo, hi) >= MASK_FILL_LIMIT or lo != lo or hi != hi:   # fill, inf, NaN
                kept = _finite(value)
                if lo != lo or hi != hi:   # a NaN is no value (the batch's others still are)
                    nans[name] = nans.get(name, 0) + int(np.isnan(value).sum())
                dropped[name] = dropped.get(name, 0) + value.size - kept.size
                if not kept.size:
                    continue
                lo, hi = float(kept.min()), float(kept.max())
            low[name], high[name] = min(low[name], lo), max(high[name], hi)
        peak = max(peak, rss_mb())
    if not seen:
        raise ValueError("Calibration needs at least one batch; the calibration feeds are empty.")
    for t in tensors:   # a tensor holding only mask fill: an empty range at 0
        if low[t] > high[t]:
            low[t] = high[t] = 0.0
    ranges = {"minmax": {t: (low[t], high[t]) for t in tensors}}
    if set(methods) <= {"minmax"}:
        return Calibration(ranges, seen, round(start, 1), round(peak, 1), dropped, nans)

    hist = {t: np.zeros(HISTOGRAM_BINS, np.int64) for t in tensors}
    edge = {t: max(abs(low[t]), abs(high[t]), 1e-12) for t in tensors}
    for batch in progress(feeds(), total=total, desc="calibrating (histogram)"):
        for name, value in zip(tensors, session.run(tensors, batch), strict=True):
            if name in dropped:
                value = _finite(value)
            counts, _ = np.histogram(np.abs(value), bins=HISTOGRAM_BINS, range=(0, edge[name]))
            hist[name] += counts
        peak = max(peak, rss_mb())
    for method in methods:
        if method == "minmax":
            continue
        ranges[method] = {}
        for t in tensors:
            if method == "percentile":
                cumulative = np.cumsum(hist[t]) / max(hist[t].sum(), 1)
                index = min(int(np.searchsorted(cumulative, percentile / 100.0)) + 1,
                            HISTOGRAM_BINS)
                cut = index / HISTOGRAM_BINS * edge[t]
            else:
                cut = kl_threshold(hist[t], edge[t])
            ranges[method][t] = (max(low[t], -cut), min(high[t], cut))
    return Calibration(ranges, seen, round(start, 1), round(peak, 1), dropped, nans)


def calibrate(model_path, tensors: list[str], feeds, *, method: str, percentile: float,
              total: int, threads: int = 0) -> dict[str, tuple[float, float]]:
    """(low, high) per tensor for one method (see calibrate_all)."""
    return calibrate_all(model_path, tensors, feeds, methods=(method,), percentile=percentile,
                         total=total, threads=threads).ranges[method]


def activation_qparams(low: float, high: float, *, dtype: str,
                       symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32 scalar) and zero point (dtype scalar) covering [low, high] and 0."""
    _, np_type, qmin, qmax = INT_TYPES[dtype]
    low, high = min(low, 0.0), max(high, 0.0)
    if np.float32(max(-low, high) / (qmax - qmin)) < np.finfo(np.float32).tiny:
        low = high = 0.0   # a float32 scale would be 0 or subnormal: the empty range's 1.0
    if symmetric:
        # amax / 127: +amax and -amax both land on a code (TensorRT's and onnxruntime's
        # symmetric range); / 127.5 put +amax half a step past 127, clipped.
        scale = max(-low, high) / ((qmax - qmin) // 2) or 1.0
        zero = 0 if dtype == "int8" else 128
    else:
        scale = (high - low) / (qmax - qmin) or 1.0
        zero = int(np.clip(round(qmin - low / scale), qmin, qmax))
    return np.array(scale, np.float32), np.array(zero, np_type)


def quantize_weight(w: np.ndarray, *, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in [-127, 127]; scales per column (output channel) of w (in, out)."""
    peak = np.abs(w).max(axis=0) if per_channel else np.abs(w).max(keepdims=True)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale if per_channel else scale.reshape(())


def subgraph_reads(nodes) -> set[str]:
    """Names the subgraphs of `nodes` read (an If's branches, a Loop's body, nested too):
    outer-scope tensors that no top-level node lists as an input. DeBERTa's exported
    relative-position code reads an initializer only from inside an If."""
    names: set[str] = set()
    for node in nodes:
        for a in node.attribute:
            for graph in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                names.update(name for n in graph.node for name in n.input)
                names |= subgraph_reads(graph.node)
    return names


def quantize_embeddings_by_row(model: onnx.ModelProto, *,
                               min_bytes: int = SMALL_TABLE_BYTES) -> list[str]:
    """Rewrite Gather(table, ids) on 2-D float tables of at least `min_bytes` as int8 rows
    times per-row scales."""
    inits = {i.name: i for i in model.graph.initializer}

    def rows_of(node: onnx.NodeProto):
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or len(table.dims) != 2 or axis != 0 \
                or table.data_type != TensorProto.FLOAT \
                or 4 * int(np.prod(table.dims)) < min_bytes:
            return None
        return table

    # a table another node reads too (a tied output projection): its float copy stays
    float_readers = {name for n in model.graph.node if rows_of(n) is None for name in n.input}
    float_readers |= subgraph_reads(model.graph.node)
    fresh = FreshNames(model.graph)
    rewritten: dict[str, tuple[str, str]] = {}   # table -> (int8 rows, row scales)
    nodes = []
    for node in model.graph.node:
        table = rows_of(node)
        if table is None:
            nodes.append(node)
            continue
        name, out = node.input[0], node.output[0]
        if name not in rewritten:
            w = numpy_helper.to_array(table)
            peak = np.abs(w).max(axis=1, keepdims=True)
            scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)  # (rows, 1)
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            if name not in float_readers:
                model.graph.initializer.remove(table)
            rewritten[name] = fresh(name + "_int8"), fresh(name + "_row_scale")
            model.graph.initializer.extend([numpy_helper.from_array(q, rewritten[name][0]),
                                            numpy_helper.from_array(scale, rewritten[name][1])])
        rows, row_scales = rewritten[name]
        out_int8, out_scale, out_float = (fresh(out + suffix)
                                          for suffix in ("_int8", "_scale", "_float"))
        nodes += [
            helper.make_node("Gather", [rows, node.input[1]], [out_int8],
                             name=node.name + "_int8"),
            helper.make_node("Gather", [row_scales, node.input[1]], [out_scale],
                             name=node.name + "_row_scale"),
            helper.make_node("Cast", [out_int8], [out_float], to=TensorProto.FLOAT,
                             name=node.name + "_cast"),
            helper.make_node("Mul", [out_float, out_scale], [out],
                             name=node.name + "_rescale"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return list(rewritten)


def insert_qdq(model: onnx.ModelProto, matmuls: list[onnx.NodeProto],
               ranges: dict[str, tuple[float, float]], settings) -> None:
    """Quantize the weights of `matmuls` and put Q -> DQ on their activation inputs."""
    inits = {i.name: i for i in model.graph.initializer}
    targets = {id(n) for n in matmuls}
    # Tied layers (--share-layers) read one weight from several MatMuls: it is quantized
    # once, and its float copy stays only if a MatMul left in float still reads it.
    float_readers = {name for n in model.graph.node if id(n) not in targets for name in n.input}
    float_readers |= subgraph_reads(model.graph.node)
    weights = {n.input[1] for n in matmuls}
    fresh = FreshNames(model.graph)
    dq_of: dict = {}   # activation, or (weight, axis) -> its DequantizeLinear's output
    nodes = []
    for node in model.graph.node:
        if id(node) in targets:
            x, w_name = node.input[0], node.input[1]
            if x not in dq_of:  # one Q/DQ pair per activation, shared by Q, K and V
                scale, zero = activation_qparams(*ranges[x], dtype=settings.activations,
                                                 symmetric=settings.symmetric_activations)
                s_name, z_name, q_name, dq_of[x] = (
                    fresh(x + suffix) for suffix in ("_scale", "_zero", "_q", "_dq"))
                model.graph.initializer.extend([numpy_helper.from_array(scale, s_name),
                                                numpy_helper.from_array(zero, z_name)])
                nodes += [
                    helper.make_node("QuantizeLinear", [x, s_name, z_name],
                                     [q_name], name=x + "_QuantizeLinear"),
                    helper.make_node("DequantizeLinear", [q_name, s_name, z_name],
                                     [dq_of[x]], name=x + "_DequantizeLinear"),
                ]
            # One int8 copy per weight and output axis: a tied weight that a Gemm reads
            # transposed has its output channels in rows (axis 0).
            axis = output_axis(node)
            w_q = w_name if axis == 1 else w_name + "_by_row"
            if (w_name, axis) not in dq_of:
                w = numpy_helper.to_array(inits[w_name])
                q, scale = quantize_weight(w if axis == 1 else w.T,
                                           per_channel=settings.per_channel)
                q = q if axis == 1 else np.ascontiguousarray(q.T)
                q_name, s_name, z_name, dq = (
                    fresh(w_q + suffix) for suffix in ("_int8", "_scale", "_zero", "_dq"))
                dq_of[w_name, axis] = dq
                model.graph.initializer.extend([
                    numpy_helper.from_array(q, q_name),
                    numpy_helper.from_array(scale, s_name),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), z_name)])
                nodes.append(helper.make_node(
                    "DequantizeLinear", [q_name, s_name, z_name],
                    [dq], name=w_q + "_DequantizeLinear",
                    **({"axis": axis} if settings.per_channel else {})))
            node.input[0], node.input[1] = dq_of[x], dq_of[w_name, axis]
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for w_name in weights - float_readers:
        model.graph.initializer.remove(inits[w_name])


def fuse_integer_matmuls(model: onnx.ModelProto, *, bias: bool = True) -> int:
    """DQ(x_q), DQ(W_int8) -> MatMul [-> Add bias] becomes one com.microsoft
    MatMulIntegerToFloat with the bias inside; returns how many were written.

    ONNX Runtime makes the same MatMulIntegerToFloat from the QDQ pattern at load time, but
    leaves the bias Add as its own node; written directly, the kernel adds the bias itself
    (MiniLM: 12 fewer nodes, batch-1 latency about 6% lower). `bias=False` leaves the Add
    out (portable_rounding): with the bias inside, the x86 and aarch64 kernels differ in the
    last bit (measured on MiniLM's attention output: 28k of 74k values, up to 4.8e-7);
    without it, and with the bias as a separate Add, the two are bit-identical. Only for
    targets whose graphs may use com.microsoft ops (graph_optimization "transformer" on
    ONNX Runtime).
    """
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    replaced: dict[int, onnx.NodeProto | None] = {}   # id(old node) -> new node or None
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"
                and dq_w.input[0] in inits and dq_x.input[1] in inits
                and not inits[dq_x.input[1]].dims and len(dq_x.input) == 3
                and len(dq_w.input) == 3):
            continue
        inputs = [dq_x.input[0], dq_w.input[0], dq_x.input[1], dq_w.input[1],
                  dq_x.input[2], dq_w.input[2]]
        output, after = node.output[0], readers.get(node.output[0], [])
        if bias and len(after) == 1 and after[0].op_type == "Add" \
                and output not in graph_outputs:
            bias_name = next((b for b in after[0].input if b != output), "")
            if bias_name in inits and len(inits[bias_name].dims) == 1:
                inputs.append(bias_name)
                output = after[0].output[0]
                replaced[id(after[0])] = None
        replaced[id(node)] = helper.make_node("MatMulIntegerToFloat", inputs, [output],
                                              name=node.name, domain="com.microsoft")
    nodes = [replaced.get(id(n), n) for n in model.graph.node]
    nodes = [n for n in nodes if n is not None]
    used = {name for n in nodes for name in n.input} | graph_outputs | subgraph_reads(nodes)
    nodes = [n for n in nodes if not (n.op_type == "DequantizeLinear" and n.output[0] not in used)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return sum(n is not None for n in replaced.values())


def fuse_quantized_attention(model: onnx.ModelProto) -> int:
    """Q, K and V MatMulIntegerToFloat nodes that read the same quantized input and feed one
    MultiHeadAttention become one com.microsoft QAttention: a single int8 GEMM against the
    concatenated [hidden, 3 x hidden] weights (per-column scales kept), then the same
    attention core. Returns how many were written.

    Same arithmetic, fewer and larger kernels: the outputs are bit-identical on MiniLM. A
    layer whose Q, K or V the sensitivity search kept in float is left as it is, and so is
    one with int8 activations (a profile's `activations = "int8"`), which QAttention has
    no CPU kernel for (MatMulIntegerToFloat has).
    """
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    replaced: dict[int, onnx.NodeProto | None] = {}
    concatenated: dict[tuple[str, ...], str] = {}
    for node in model.graph.node:
        if node.op_type != "MultiHeadAttention" or len(node.input) != 5 or any(
                a.name not in ("num_heads", "mask_filter_value") for a in node.attribute):
            continue   # QAttention has no equivalent of MHA's scale or other options
        qkv = [producer.get(name) for name in node.input[:3]]
        if not all(m is not None and m.op_type == "MatMulIntegerToFloat" and len(m.input) == 6
                   and readers[m.output[0]] == 1 for m in qkv):
            continue
        first = qkv[0]
        if any(list(m.input[i] for i in (0, 2, 4)) != list(first.input[i] for i in (0, 2, 4))
               for m in qkv) or node.input[3] not in inits:
            continue
        if first.input[4] not in inits or \
                inits[first.input[4]].data_type != TensorProto.UINT8:
            continue   # onnxruntime's CPU QAttention takes uint8 activations only
        mask = node.input[4]
        if mask and mask in producer and producer[mask].op_type != "ReduceSum":
            continue   # QAttention takes a 1-D mask index (sequence lengths) only
        fused = []
        for i, what in ((1, "weight"), (3, "weight_scale"), (5, "weight_zero_point")):
            sources = tuple(m.input[i] for m in qkv)
            if sources not in concatenated:   # layers sharing weights share the fused ones
                name = f"{node.name}_qkv_{what}"
                # per-tensor weights: one scale (zero point) per matrix, as one per column
                columns = [inits[m.input[1]].dims[-1] for m in qkv]
                parts = [np.broadcast_to(numpy_helper.to_array(inits[source]), (n,))
                         if i != 1 else numpy_helper.to_array(inits[source])
                         for source, n in zip(sources, columns, strict=True)]
                model.graph.initializer.append(numpy_helper.from_array(
                    np.concatenate(parts, axis=-1), name))
                concatenated[sources] = name
            fused.append(concatenated[sources])
        heads = next(a.i for a in node.attribute if a.name == "num_heads")
        replaced[id(node)] = helper.make_node(
            "QAttention", [first.input[0], fused[0], node.input[3], first.input[2], fused[1],
                           mask, first.input[4], fused[2]],
            list(node.output), name=node.name, domain="com.microsoft", num_heads=heads)
        for m in qkv:
            replaced[id(m)] = None
    nodes = [replaced.get(id(n), n) for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(n for n in nodes if n is not None)
    used = {name for n in model.graph.node for name in n.input}
    used |= subgraph_reads(model.graph.node)
    stale = [i for i in model.graph.initializer if i.name not in used]
    for init in stale:
        model.graph.initializer.remove(init)
    return sum(n is not None for n in replaced.values())


def float64_where_cpus_differ(model: onnx.ModelProto) -> int:
    """Run each LayerNormalization whose output is quantized (directly or through the
    SmoothQuant Mul), and each Softmax, in float64 between two Casts; returns how many.

    ONNX Runtime's float32 LayerNorm and Softmax give different last bits on its x86 and
    aarch64 builds (measured on MiniLM, same input: 3 of 4 LayerNorm outputs differ, by up
    to 1.9e-6 after the embeddings and 1.1e-5 in layer 0; softmax up to 6e-8), and a
    quantizer then rounds a value that sits on a step boundary up on one CPU and down on the
    other. In float64 the two results differ by ~1e-16 and round to the same float32, so the
    uint8 codes match. What else reaches a quantizer in MiniLM (Add, Mul, Erf, BiasGelu,
    float MatMul, the integer MatMuls without fused bias) was measured bit-identical on both.
    The fused MultiHeadAttention computes its softmax inside, out of reach: use
    graph_optimization "basic" with this (measured on 1000 texts with the fused attention:
    3 texts still get a different code).

    Costs time: float64 LayerNorm is ~9x slower than float32 in ONNX Runtime (measured).
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def quantized(name: str) -> bool:
        return any(r.op_type == "QuantizeLinear" or (r.op_type == "Mul" and quantized(r.output[0]))
                   for r in readers.get(name, []))

    inits = {i.name: i for i in model.graph.initializer}
    fresh = FreshNames(model.graph)
    in_f64: dict[str, str] = {}   # parameter -> its float64 copy
    nodes, count = [], 0
    for node in model.graph.node:
        if not (node.op_type == "Softmax" or node.op_type == "LayerNormalization"
                and quantized(node.output[0]) and all(p in inits for p in node.input[1:])):
            nodes.append(node)
            continue
        x, out, tag = node.input[0], node.output[0], node.name or node.output[0]
        for p in node.input[1:]:
            if p not in in_f64:
                in_f64[p] = fresh(p + "_f64")
                model.graph.initializer.append(numpy_helper.from_array(
                    numpy_helper.to_array(inits[p]).astype(np.float64), in_f64[p]))
        x_f64, y_f64 = fresh(tag + "_x_f64"), fresh(tag + "_y_f64")
        nodes += [
            helper.make_node("Cast", [x], [x_f64], to=TensorProto.DOUBLE,
                             name=tag + "_to_f64"),
            helper.make_node(node.op_type, [x_f64, *(in_f64[p] for p in node.input[1:])],
                             [y_f64], name=node.name, domain=node.domain,
                             **{a.name: helper.get_attribute_value(a) for a in node.attribute}),
            helper.make_node("Cast", [y_f64], [out], to=TensorProto.FLOAT,
                             name=tag + "_to_f32"),
        ]
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for n in nodes for name in n.input}
    for name in set(in_f64) - used:
        model.graph.initializer.remove(inits[name])
    return count


def name_nodes(model: onnx.ModelProto) -> int:
    """Give each unnamed node, and each but the first of nodes sharing a name, a name of its
    own (`<op>_<index>`): the int8 / float choices are made by node name, and a name shared
    by several nodes (or "", which ONNX allows) would keep all of them float. Returns how
    many were renamed."""
    taken = {n.name for n in model.graph.node if n.name}
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        name, k = f"{node.op_type}_{index}", 0
        while name in taken:
            k += 1
            name = f"{node.op_type}_{index}_{k}"
        node.name = name
        taken.add(name)
        seen.add(name)
        renamed += 1
    return renamed


def integer_kernels(model: onnx.ModelProto, settings) -> str:
    """The manifest's words for what runs `model`'s int8 MatMuls: the com.microsoft kernels
    the graph names (only BERT's attention fuses, so only it gets QAttention), else Q/DQ."""
    ops = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    kernels = []
    if "MatMulIntegerToFloat" in ops:
        kernels.append("com.microsoft MatMulIntegerToFloat" + (
            " (bias as its own Add)" if settings.portable_rounding else " (bias fused)"))
    if "QAttention" in ops:
        kernels.append("QAttention (one int8 GEMM for Q, K and V)")
    return "; ".join(kernels) or "QDQ (fused by the runtime)"


def lowers_to_contrib_ops(target) -> bool:
    """Whether the bundle may use onnxruntime's com.microsoft int8 kernels directly: only
    where the graph runs first on the CPU, which alone has them (MatMulIntegerToFloat).

    On a GPU first (x86-server: stage i on CUDA device i) the graph stays QDQ, which CUDA runs
    as DequantizeLinear and cuBLAS MatMuls and TensorRT as int8 GEMMs. Measured on an H200
    (onnxruntime-gpu 1.31.1, MiniLM int8, 512 texts in batches of 32): the CPU-lowered graph
    ran 3,826 texts/s on CUDA, its int8 GEMMs falling back to the CPU with copies around each;
    the QDQ graph 11,160. On the CPU (16 cores) the lowered graph is faster: 5,093 texts/s
    against 4,125, batch-1 1.19 against 1.50 ms; a server without GPUs gets it by listing
    CPUExecutionProvider first (a profile that extends x86-server)."""
    return target.graph_rules == "onnxruntime" and target.graph_optimization == "transformer" \
        and target.runtime.execution_providers[0] == "CPUExecutionProvider"


def build_int8(source: onnx.ModelProto, ranges: dict[str, tuple[float, float]], settings, *,
               float_groups=frozenset(), groups: dict[str, list[str]] | None = None,
               lower: bool = False) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """A copy of `source` with every weight MatMul int8 except those of `float_groups`
    (names in `groups`, group -> MatMul names; "embeddings" keeps the tables float).
    Returns (model, quantized MatMul names, int8 embedding tables)."""
    model = copy_model(source)
    keep = {name for g in float_groups for name in (groups or {}).get(g, [])}
    matmuls = [n for n in weight_matmuls(model) if n.name not in keep]
    insert_qdq(model, matmuls, ranges, settings)
    tables = quantize_embeddings_by_row(model) \
        if settings.embeddings == "int8-rows" and "embeddings" not in float_groups else []
    if settings.portable_rounding:
        float64_where_cpus_differ(model)
    if lower:
        fuse_integer_matmuls(model, bias=not settings.portable_rounding)
        fuse_quantized_attention(model)
    return model, [n.name for n in matmuls], tables


def quantize(job) -> None:
    """Stage: job.quantized_onnx, static int8 QDQ per the target's [quantization] table,
    every weight MatMul int8 (the sensitivity stage may give some back to float)."""
    from .score import Scorer

    settings = job.target.quantization
    source = job.smoothed_onnx or job.optimized_onnx
    if job.target.precision != "int8":   # the fp16-only variant: no int8 anywhere
        job.quantized_onnx = source
        job.records["quantization"] = {"mode": "none", "precision": job.target.precision}
        return
    model = onnx.load(source)
    if name_nodes(model):   # int8 / float choices name nodes: each name must be one node
        source = job.workdir / "named.onnx"
        save_model(model, source)
    matmuls = weight_matmuls(model)
    activations = sorted({n.input[0] for n in matmuls})

    texts = [u.text for u in job.calibration[:settings.calibration_samples]]
    if not texts:
        raise ValueError("Calibration needs at least one text; the calibration set is empty.")
    threads = host_threads(job.target)
    session = ort_session(source, threads=threads)

    def feeds():
        return encoder_feeds(job.workdir / "tokenizer.json", texts, session,
                             max_length=job.max_length)

    methods = CALIBRATION_METHODS if settings.compare_calibration else (settings.calibration,)
    result = calibrate_all(source, activations, feeds, methods=methods,
                           percentile=settings.percentile, total=len(texts),
                           threads=threads)
    ranges = result.ranges[settings.calibration]
    lower = lowers_to_contrib_ops(job.target)
    quantized, names, tables = build_int8(model, ranges, settings, lower=lower)
    compared = {}
    if len(methods) > 1:   # each method's full-int8 graph against the float graph: what the
        # int8 alone changes (against a compressed model's original, its compression's
        # error swamped the methods' differences, under the label "vs the float graph")
        scorer = Scorer(job, job.evaluation, threads=threads,
                        original=False)
        for method in methods:
            graph = quantized if method == settings.calibration else \
                build_int8(model, result.ranges[method], settings, lower=lower)[0]
            m = scorer.score(graph)
            compared[method] = {"cosine": m["cosine"], "min-cosine": m["min-cosine"]}
        compared["data"] = f"{len(scorer.texts)} evaluation texts vs {scorer.against}, " \
                           f"every weight MatMul int8"
    job.quantized_onnx = job.workdir / "model.onnx"
    check_and_save(quantized, job.quantized_onnx)
    job.records["quantize_inputs"] = {"source": source, "ranges": ranges, "lower": lower}

    kept_float = float_by_design(model, quantized, names)
    job.records["quantization"] = {
        "mode": "static-int8-qdq",
        "weights": f"{settings.weights} symmetric, "
                   f"{'per-channel' if settings.per_channel else 'per-tensor'}",
        "activations": f"{settings.activations} "
                       f"{'symmetric' if settings.symmetric_activations else 'asymmetric'}",
        "calibration": {
            "method": settings.calibration,
            **({"percentile": settings.percentile} if settings.calibration == "percentile"
               else {}),
            "samples": len(texts),
            "data_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
            "streamed": True,
            "peak_rss_mb": result.peak_rss_mb,
            "rss_before_mb": result.start_rss_mb,
            "mask_fill_values_ignored": sum(result.dropped_fill.values())
            - sum(result.not_a_number.values()),
            "nan_values_ignored": sum(result.not_a_number.values()),
            **({"methods_compared": compared} if compared else {}),
        },
        **int8_nodes(model, quantized, names),
        "integer_kernels": integer_kernels(quantized, settings),
        "portable_rounding": settings.portable_rounding,
        "embeddings": {"mode": settings.embeddings, "tables": tables,
                       "float_below_bytes": SMALL_TABLE_BYTES},
        "outliers": job.records.get("smoothing", {"applied": False}),
        "excluded_nodes": kept_float,
        "activation_ranges": {t: [round(lo, 6), round(hi, 6)] for t, (lo, hi) in ranges.items()},
    }
    if compared:
        job.log("  calibration methods (mean / min cosine, full int8): " + ", ".join(
            f"{k} {v['cosine']:.4f}/{v['min-cosine']:.4f}" for k, v in compared.items()
            if k != "data"))
    job.log(f"  {len(names)} MatMuls int8 ({settings.calibration}, {len(texts)} texts, "
            f"calibration peak RSS {result.peak_rss_mb:.0f} MB), {len(tables)} embedding "
            f"tables int8 by row, {len(kept_float)} attention nodes float"
            f"{', LayerNorm/Softmax in float64' if settings.portable_rounding else ''}; "
            f"{graph_bytes(job.quantized_onnx) / 1e6:.1f} MB")
