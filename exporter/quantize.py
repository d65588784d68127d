"""Stage `quantize`: static int8 QDQ, calibrated on real text.

What gets quantized, and why (measured on all-MiniLM-L6-v2, see benchmarks/bench_encoder.py):

* Every MatMul with a weight initializer (Q, K, V, attention output, FFN in, FFN out):
  weights int8 symmetric per output channel, the activation input through one
  QuantizeLinear -> DequantizeLinear pair with a calibrated scale and zero point. The MatMul
  output stays float: ONNX Runtime then fuses DQ(x), DQ(W), MatMul into one
  MatMulIntegerToFloat kernel, and the bias Add, residual Add and LayerNorm keep float
  precision. onnxruntime's `quantize_static` also quantizes each MatMul output, which costs
  accuracy (MiniLM: mean cosine 0.94 -> 0.993 without it) and buys no speed on CPU.
* Activation x activation MatMuls (attention scores, attention x V), Softmax, LayerNorm, GELU
  and the residual Adds stay float: they hold no weights, and quantizing them both hurts
  accuracy and adds Q/DQ work that the CPU kernels do not fuse.
* Embedding tables (Gather on a 2-D initializer): int8 with one scale per row. Only the rows
  a text uses are gathered and rescaled (Gather int8 -> Cast -> Mul by the gathered row
  scale), all in standard ops, instead of dequantizing the whole 30522 x 384 table per call.

Calibration streams: pass 1 keeps a running min/max per activation, pass 2 (percentile only)
a fixed 2048-bin histogram per activation over that range, so memory does not grow with the
number of calibration texts.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .feeds import encoder_feeds, ort_session
from .progress import progress

HISTOGRAM_BINS = 2048

# Compute-heavy ops left in float on purpose -> why (reported per node in the manifest).
FLOAT_BY_DESIGN: dict[str, str] = {
    "MatMul": "activation x activation MatMul (attention scores or x V): no weight to "
              "quantize; static int8 here costs accuracy and the CPU kernels do not fuse it",
    "MultiHeadAttention": "fused attention core (scores, softmax, x V) runs in float; its "
                          "Q/K/V projections are int8",
}

# Activation dtype name -> (TensorProto type, numpy type, qmin, qmax).
INT_TYPES: dict[str, tuple[int, type, int, int]] = {
    "uint8": (TensorProto.UINT8, np.uint8, 0, 255),
    "int8": (TensorProto.INT8, np.int8, -128, 127),
}


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose second input is a 2-D float initializer (a Linear layer's weight)."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2
            and inits[n.input[1]].data_type == TensorProto.FLOAT]


def calibrate(model_path, tensors: list[str], feeds, *, method: str, percentile: float,
              total: int, threads: int = 0) -> dict[str, tuple[float, float]]:
    """(low, high) range per tensor over the calibration feeds.

    `feeds` is a zero-argument callable returning a fresh iterator of input dicts (percentile
    needs two passes). "minmax" returns the observed extremes; "percentile" clips each side
    to the range holding `percentile` % of the |values| (histogram over the minmax range).
    """
    model = onnx.load(model_path)
    known = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in known:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort_session(model.SerializeToString(), threads=threads)

    low = dict.fromkeys(tensors, np.inf)
    high = dict.fromkeys(tensors, -np.inf)
    for batch in progress(feeds(), total=total, desc="calibrating (min/max)"):
        for name, value in zip(tensors, session.run(tensors, batch), strict=True):
            low[name] = min(low[name], float(value.min()))
            high[name] = max(high[name], float(value.max()))
    if method == "minmax":
        return {t: (low[t], high[t]) for t in tensors}

    assert method == "percentile", method
    hist = {t: np.zeros(HISTOGRAM_BINS, np.int64) for t in tensors}
    edge = {t: max(abs(low[t]), abs(high[t]), 1e-12) for t in tensors}
    for batch in progress(feeds(), total=total, desc="calibrating (histogram)"):
        for name, value in zip(tensors, session.run(tensors, batch), strict=True):
            counts, _ = np.histogram(np.abs(value), bins=HISTOGRAM_BINS, range=(0, edge[name]))
            hist[name] += counts
    ranges = {}
    for t in tensors:
        cumulative = np.cumsum(hist[t]) / max(hist[t].sum(), 1)
        cut = (np.searchsorted(cumulative, percentile / 100.0) + 1) / HISTOGRAM_BINS * edge[t]
        ranges[t] = (max(low[t], -cut), min(high[t], cut))
    return ranges


def activation_qparams(low: float, high: float, *, dtype: str,
                       symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32 scalar) and zero point (dtype scalar) covering [low, high] and 0."""
    _, np_type, qmin, qmax = INT_TYPES[dtype]
    low, high = min(low, 0.0), max(high, 0.0)
    if symmetric:
        scale = max(-low, high) / ((qmax - qmin) / 2) or 1.0
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


def quantize_embeddings_by_row(model: onnx.ModelProto) -> list[str]:
    """Rewrite Gather(table, ids) on 2-D float tables as int8 rows times per-row scales."""
    inits = {i.name: i for i in model.graph.initializer}
    rewritten, nodes = [], []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or len(table.dims) != 2 or axis != 0 \
                or table.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        name, out = node.input[0], node.output[0]
        if name not in rewritten:
            w = numpy_helper.to_array(table)
            peak = np.abs(w).max(axis=1, keepdims=True)
            scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)  # (rows, 1)
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            model.graph.initializer.remove(table)
            model.graph.initializer.extend([numpy_helper.from_array(q, name + "_int8"),
                                            numpy_helper.from_array(scale, name + "_row_scale")])
            rewritten.append(name)
        nodes += [
            helper.make_node("Gather", [name + "_int8", node.input[1]], [out + "_int8"],
                             name=node.name + "_int8"),
            helper.make_node("Gather", [name + "_row_scale", node.input[1]], [out + "_scale"],
                             name=node.name + "_row_scale"),
            helper.make_node("Cast", [out + "_int8"], [out + "_float"], to=TensorProto.FLOAT,
                             name=node.name + "_cast"),
            helper.make_node("Mul", [out + "_float", out + "_scale"], [out],
                             name=node.name + "_rescale"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def insert_qdq(model: onnx.ModelProto, matmuls: list[onnx.NodeProto],
               ranges: dict[str, tuple[float, float]], settings) -> None:
    """Quantize the weights of `matmuls` and put Q -> DQ on their activation inputs."""
    inits = {i.name: i for i in model.graph.initializer}
    targets = {id(n) for n in matmuls}
    done: set[str] = set()
    nodes = []
    for node in model.graph.node:
        if id(node) in targets:
            x, w_name = node.input[0], node.input[1]
            if x not in done:  # one Q/DQ pair per activation, shared by Q, K and V
                done.add(x)
                scale, zero = activation_qparams(*ranges[x], dtype=settings.activations,
                                                 symmetric=settings.symmetric_activations)
                model.graph.initializer.extend([numpy_helper.from_array(scale, x + "_scale"),
                                                numpy_helper.from_array(zero, x + "_zero")])
                nodes += [
                    helper.make_node("QuantizeLinear", [x, x + "_scale", x + "_zero"],
                                     [x + "_q"], name=x + "_QuantizeLinear"),
                    helper.make_node("DequantizeLinear", [x + "_q", x + "_scale", x + "_zero"],
                                     [x + "_dq"], name=x + "_DequantizeLinear"),
                ]
            w = numpy_helper.to_array(inits[w_name])
            q, scale = quantize_weight(w, per_channel=settings.per_channel)
            model.graph.initializer.remove(inits[w_name])
            model.graph.initializer.extend([
                numpy_helper.from_array(q, w_name + "_int8"),
                numpy_helper.from_array(scale, w_name + "_scale"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), w_name + "_zero")])
            nodes.append(helper.make_node(
                "DequantizeLinear", [w_name + "_int8", w_name + "_scale", w_name + "_zero"],
                [w_name + "_dq"], name=w_name + "_DequantizeLinear",
                **({"axis": 1} if settings.per_channel else {})))
            node.input[0], node.input[1] = x + "_dq", w_name + "_dq"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def quantize(job) -> None:
    """Stage: job.quantized_onnx, static int8 QDQ per the target's [quantization] table."""
    settings = job.target.quantization
    source = job.smoothed_onnx or job.optimized_onnx
    if job.target.precision != "int8":   # the fp16-only variant: no int8 anywhere
        job.quantized_onnx = source
        job.records["quantization"] = {"mode": "none", "precision": job.target.precision}
        return
    model = onnx.load(source)
    matmuls = weight_matmuls(model)
    activations = sorted({n.input[0] for n in matmuls})

    texts = [u.text for u in job.calibration[:settings.calibration_samples]]
    if not texts:
        raise ValueError("Calibration needs at least one text; the calibration set is empty.")
    session = ort_session(source, threads=job.target.runtime.threads)

    def feeds():
        return encoder_feeds(job.workdir / "tokenizer.json", texts, session,
                             max_length=job.max_length)

    ranges = calibrate(source, activations, feeds, method=settings.calibration,
                       percentile=settings.percentile, total=len(texts),
                       threads=job.target.runtime.threads)
    insert_qdq(model, matmuls, ranges, settings)
    tables = quantize_embeddings_by_row(model) if settings.embeddings == "int8-rows" else []
    onnx.checker.check_model(model)
    job.quantized_onnx = job.workdir / "model.onnx"
    onnx.save(model, job.quantized_onnx)

    quantized = {n.name for n in matmuls}
    kept_float = [n for n in model.graph.node
                  if n.op_type in FLOAT_BY_DESIGN and n.name not in quantized]
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
        },
        "quantized_nodes": [n.name for n in matmuls],
        "embeddings": {"mode": settings.embeddings, "tables": tables},
        "outliers": job.records.get("smoothing", {"applied": False}),
        "excluded_nodes": [{"node": n.name, "op": n.op_type, "reason": FLOAT_BY_DESIGN[n.op_type]}
                           for n in kept_float],
        "activation_ranges": {t: [round(lo, 6), round(hi, 6)] for t, (lo, hi) in ranges.items()},
    }
    job.log(f"  {len(matmuls)} MatMuls int8 ({settings.calibration}, {len(texts)} texts), "
            f"{len(tables)} embedding tables int8 by row, {len(kept_float)} attention "
            f"nodes float; {job.quantized_onnx.stat().st_size / 1e6:.1f} MB")
