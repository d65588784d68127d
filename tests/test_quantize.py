"""Static int8: calibration methods, streaming memory, the fused integer MatMul, sensitivity
and the budget search. Small graphs first (CPU numerics, seconds), then the real MiniLM
bundle's manifest."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.budget import Budget, BudgetError
from exporter.exact import exact_products, host_saturates
from exporter.quantize import (
    CALIBRATION_METHODS,
    activation_qparams,
    calibrate_all,
    float64_where_cpus_differ,
    fuse_integer_matmuls,
    insert_qdq,
    kl_threshold,
    weight_matmuls,
)
from exporter.sensitivity import Step, each_scored, search, size_limit
from runtime.model import ort_session
from targets import load_target

SETTINGS = load_target("arm-cpu").quantization


def linear_graph(rng, hidden=64, out=32, *, fill_mask=False) -> onnx.ModelProto:
    """x (batch, seq, hidden) -> Relu -> h -> MatMul W + b -> y; with `fill_mask` the graph
    also makes `scores` = x + where(mask, 0, float32 min), like a BERT attention mask."""
    w = rng.normal(size=(hidden, out)).astype(np.float32)
    b = rng.normal(size=(out,)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="bias")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    if fill_mask:
        nodes += [helper.make_node("Less", ["x", "zero"], ["masked"]),
                  helper.make_node("Where", ["masked", "fill", "zero"], ["bias_mask"]),
                  helper.make_node("Add", ["x", "bias_mask"], ["scores"])]
        inits += [numpy_helper.from_array(np.array(0, np.float32), "zero"),
                  numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32),
                                          "fill")]
        outputs.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, hidden])],
        outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def feeds_of(rng, count, seq=16, hidden=64):
    def make():
        local = np.random.default_rng(1)
        for _ in range(count):
            x = local.normal(size=(1, seq, hidden)).astype(np.float32)
            x[0, 0, 3] = 40.0   # one outlier channel, as in transformer activations
            yield {"x": x}
    return make


def test_every_calibration_method_gives_a_valid_range(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "g.onnx"
    onnx.save(linear_graph(rng), path)
    result = calibrate_all(path, ["h", "y"], feeds_of(rng, 50), methods=CALIBRATION_METHODS,
                           percentile=99.9, total=50)
    assert set(result.ranges) == set(CALIBRATION_METHODS) and result.samples == 50
    lo_max, hi_max = result.ranges["minmax"]["h"]
    assert lo_max == 0.0 and hi_max == pytest.approx(40.0)   # Relu output, the outlier
    for method, ranges in result.ranges.items():
        for t, (lo, hi) in ranges.items():
            assert np.isfinite(lo) and np.isfinite(hi) and lo <= hi, (method, t)
            mlo, mhi = result.ranges["minmax"][t]
            assert mlo <= lo and hi <= mhi, (method, t)   # clipping only ever narrows
    # percentile 99.9 and entropy both clip the single 40.0 outlier
    assert result.ranges["percentile"]["h"][1] < 10
    assert result.ranges["entropy"]["h"][1] < 40.0


def test_kl_threshold_clips_a_long_tail():
    rng = np.random.default_rng(0)
    values = np.abs(np.concatenate([rng.normal(size=100_000), [60.0]]))
    hist, _ = np.histogram(values, bins=2048, range=(0, 60.0))
    cut = kl_threshold(hist, 60.0)
    assert 2.5 < cut < 20, cut   # keeps the Gaussian body, drops the lone outlier


def test_kl_threshold_clips_an_outlier_far_beyond_the_body():
    # The body under 128/2048 of the range: every candidate below the edge had an empty last
    # bin with the outlier folded into it, Q = 0 < P there, and was skipped: no clipping.
    rng = np.random.default_rng(0)
    for outlier in (40.0, 100.0, 1000.0):
        values = np.abs(np.concatenate([rng.normal(size=100_000), [outlier]]))
        hist, _ = np.histogram(values, bins=2048, range=(0, outlier))
        cut = kl_threshold(hist, outlier)
        assert cut <= outlier / 8, (outlier, cut)


def test_kl_threshold_clips_a_sparse_heavy_tail():
    # Laplace's tail thins out into single values with empty bins between them; every
    # candidate cut on an empty bin had Q = 0 where the folded tail made P > 0, and the
    # tail was kept whole (cut = the edge).
    rng = np.random.default_rng(0)
    values = np.abs(rng.laplace(size=100_000))
    hist, _ = np.histogram(values, bins=2048, range=(0, values.max()))
    cut = kl_threshold(hist, values.max())
    assert 5 < cut < 0.95 * values.max(), (cut, values.max())


def _kl_threshold_by_chunks(hist, edge, levels=128):
    """kl_threshold as TensorRT's reference writes it, one merged bin at a time."""
    from exporter.quantize import ENTROPY_STRIDE, _smoothed

    bins = len(hist)
    best, best_i = np.inf, bins
    for i in range(levels, bins + 1, ENTROPY_STRIDE):
        p = hist[:i].astype(np.float64)
        p[-1] += hist[i:].sum()
        if p.sum() == 0:
            continue
        q = np.zeros(i)
        for idx in np.array_split(np.arange(i), levels):
            nonzero = p[idx] > 0
            if nonzero.any():
                q[idx[nonzero]] = hist[idx].sum() / nonzero.sum()
        pn, qn = _smoothed(p), _smoothed(q)
        if pn is None or qn is None:
            continue
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best:
            best, best_i = kl, i
    return best_i / bins * edge


def test_kl_threshold_is_the_reference_merged_bin_by_bin():
    # kl_threshold merges P's bins with reduceat; the reference loops over the merged bins.
    # Same threshold on bodies, tails, sparse and empty histograms (bins not a multiple of
    # the levels, so merged bins of two lengths).
    rng = np.random.default_rng(3)
    samples = [np.abs(rng.normal(size=50_000)), np.abs(rng.laplace(size=50_000)),
               np.abs(np.concatenate([rng.normal(size=20_000), [80.0]])),
               np.abs(rng.standard_cauchy(size=5_000)), rng.uniform(0, 1, size=300)]
    for values in samples:
        for bins in (2048, 1000):
            hist, _ = np.histogram(values, bins=bins, range=(0, values.max()))
            assert kl_threshold(hist, values.max()) == _kl_threshold_by_chunks(hist, values.max())
    assert kl_threshold(np.zeros(2048, np.int64), 1.0) == _kl_threshold_by_chunks(
        np.zeros(2048, np.int64), 1.0) == 1.0


def test_nan_in_a_batch_hides_none_of_its_other_values(tmp_path):
    # min()/max() of a batch holding a NaN are NaN, and Python's min(low, nan) kept the old
    # value: the whole batch's range was ignored, silently (an all-NaN tensor got 0..0).
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 17)]), path)
    batches = [np.array([0.0, 1.0, 2.0, np.nan], np.float32),
               np.array([0.1, 0.2, 0.3, 0.4], np.float32)]
    result = calibrate_all(path, ["y"], lambda: ({"x": b} for b in batches),
                           methods=CALIBRATION_METHODS, percentile=99.99, total=2)
    assert result.ranges["minmax"]["y"] == (0.0, 2.0)
    for method in CALIBRATION_METHODS:
        lo, hi = result.ranges[method]["y"]
        assert np.isfinite([lo, hi]).all() and hi > 0.3, (method, lo, hi)
    assert result.not_a_number == {"y": 1}


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_symmetric_activation_scale_keeps_both_ends(dtype):
    # amax / 127 (TensorRT's and onnxruntime's symmetric int8): +amax and -amax round to a
    # code and back exactly; amax / 127.5 clipped +amax by half a step.
    scale, zero = activation_qparams(-0.5, 1.0, dtype=dtype, symmetric=True)
    lowest, highest = (-128, 127) if dtype == "int8" else (0, 255)
    for x in (1.0, -1.0):
        q = np.clip(np.round(x / scale) + zero.astype(np.int64), lowest, highest)
        assert (q - zero.astype(np.int64)) * scale == pytest.approx(x, rel=1e-6)
    assert float(scale) == pytest.approx(1.0 / 127)


def test_attention_mask_fill_does_not_reach_a_range(tmp_path):
    """DESIGN.md pitfall: float32 min from the attention mask crashed percentile calibration."""
    rng = np.random.default_rng(0)
    path = tmp_path / "g.onnx"
    onnx.save(linear_graph(rng, fill_mask=True), path)
    result = calibrate_all(path, ["scores"], feeds_of(rng, 20), methods=CALIBRATION_METHODS,
                           percentile=99.99, total=20)
    for method in CALIBRATION_METHODS:
        lo, hi = result.ranges[method]["scores"]
        assert -100 < lo <= hi < 100, (method, lo, hi)
    assert result.dropped_fill["scores"] > 0


# Run in a new process by the test below: the calibration's RSS growth over 300 batches and
# over 3000, as JSON.
CALIBRATION_MEMORY = """
import json, sys
import numpy as np, onnx
sys.path.insert(0, sys.argv[1])
from test_quantize import CALIBRATION_METHODS, calibrate_all, feeds_of, linear_graph
rng = np.random.default_rng(0)
onnx.save(linear_graph(rng, hidden=512, out=64), sys.argv[2])
grown = {}
for count in (300, 3000):
    result = calibrate_all(sys.argv[2], ["h", "y"], feeds_of(rng, count, seq=64, hidden=512),
                           methods=CALIBRATION_METHODS, percentile=99.9, total=count)
    assert result.samples == count, result.samples
    grown[count] = result.peak_rss_mb - result.start_rss_mb
print(json.dumps(grown))
"""


def test_calibration_memory_does_not_grow_with_samples(tmp_path):
    """3000 batches of (1, 64, 512) activations (128 KB each, 390 MB if kept) calibrate in
    the memory of 300: batches are reduced and dropped. Measured in a new process: in a test
    worker that had run other files first, the 3000 batches once grew its RSS by 25 MB and
    the 300 by none, from the state of its heap (alone, both grow by 0-2.5 MB)."""
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", CALIBRATION_MEMORY, str(Path(__file__).parent),
                             str(tmp_path / "g.onnx")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    grown = {int(k): v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    assert grown[3000] <= grown[300] + 20, grown


def test_fused_integer_matmul_equals_onnxruntime_qdq(tmp_path):
    """Our MatMulIntegerToFloat with the bias inside gives what onnxruntime's own QDQ fusion
    (MatMulIntegerToFloat, then the bias Add) gives."""
    rng = np.random.default_rng(0)
    model = linear_graph(rng)
    matmul = [n for n in model.graph.node if n.op_type == "MatMul"]
    insert_qdq(model, matmul, {"h": (0.0, 4.0)}, SETTINGS)
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert fuse_integer_matmuls(fused) == 1
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 1 and "Add" not in ops and "MatMul" not in ops
    x = {"x": rng.normal(size=(1, 7, 64)).astype(np.float32)}
    expected = ort_session(model.SerializeToString()).run(None, x)[0]
    got = ort_session(fused.SerializeToString()).run(None, x)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # portable_rounding: the bias stays a separate Add after the integer MatMul
    unbiased = onnx.ModelProto()
    unbiased.CopyFrom(model)
    assert fuse_integer_matmuls(unbiased, bias=False) == 1
    ops = [n.op_type for n in unbiased.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 1 and ops.count("Add") == 1
    got = ort_session(unbiased.SerializeToString()).run(None, x)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_quantized_layer_norms_and_softmax_run_in_float64():
    """LayerNorm -> Mul -> QuantizeLinear and Softmax move to float64 between Casts; a
    LayerNorm that no quantizer reads (the graph output) stays float32; same values."""
    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT
    inits = [numpy_helper.from_array(rng.normal(size=64).astype(np.float32), n)
             for n in ("g1", "b1", "g2", "b2", "smooth")]
    inits += [numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
              numpy_helper.from_array(np.array(128, np.uint8), "zero")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["n1"], name="ln1"),
             helper.make_node("Mul", ["n1", "smooth"], ["s1"], name="smooth"),
             helper.make_node("QuantizeLinear", ["s1", "scale", "zero"], ["q"], name="q"),
             helper.make_node("LayerNormalization", ["n1", "g2", "b2"], ["y"], name="ln2"),
             helper.make_node("Softmax", ["n1"], ["p"], name="softmax")]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f32, ["b", "s", 64])],
                          [helper.make_tensor_value_info(o, t, ["b", "s", 64])
                           for o, t in (("q", TensorProto.UINT8), ("y", f32), ("n1", f32),
                                        ("p", f32))],
                          inits), opset_imports=[helper.make_opsetid("", 18)])
    portable = onnx.ModelProto()
    portable.CopyFrom(model)
    assert float64_where_cpus_differ(portable) == 2
    onnx.checker.check_model(portable)
    ops = [(n.op_type, n.name) for n in portable.graph.node]
    assert ops[:3] == [("Cast", "ln1_to_f64"), ("LayerNormalization", "ln1"),
                       ("Cast", "ln1_to_f32")] and ("LayerNormalization", "ln2") in ops
    assert ops[-3:] == [("Cast", "softmax_to_f64"), ("Softmax", "softmax"),
                        ("Cast", "softmax_to_f32")]
    assert {"g1", "b1"}.isdisjoint(i.name for i in portable.graph.initializer)
    x = {"x": rng.normal(size=(2, 5, 64)).astype(np.float32) * 3}
    expected = ort_session(model.SerializeToString()).run(None, x)
    got = ort_session(portable.SerializeToString()).run(None, x)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g.astype(np.float32), e.astype(np.float32), atol=1e-5)


def fake_search(cosines: dict[frozenset, float], sizes: dict[str, int], budget: str,
                max_bytes: int):
    """search() over fake graphs: cosine per set of float groups, bytes per group."""
    scored = []

    def build(groups):
        model = onnx.ModelProto()
        model.doc_string = "x" * (1000 + sum(sizes[g] for g in groups))
        model.producer_name = ",".join(sorted(groups))
        return model

    def score(model):
        groups = frozenset(filter(None, model.producer_name.split(",")))
        scored.append(groups)
        return {"cosine": cosines[groups], "min-cosine": cosines[groups]}

    steps, skipped = search(["a", "b", "c"], build=build, score=score,
                            budget=Budget.parse(budget), max_bytes=max_bytes)
    return steps, skipped, scored


COSINES = {frozenset(): 0.990, frozenset("a"): 0.994, frozenset("ab"): 0.996,
           frozenset("abc"): 0.998, frozenset("ac"): 0.995}


def test_budget_search_stops_as_soon_as_the_budget_holds():
    steps, skipped, scored = fake_search(COSINES, dict.fromkeys("abc", 10), "cosine>=0.995",
                                         max_bytes=10_000)
    assert [s.float_group for s in steps] == [None, "a", "b"]
    assert [s.holds for s in steps] == [False, False, True]
    assert scored == [frozenset(), frozenset("a"), frozenset("ab")]   # c never built
    assert not skipped and isinstance(steps[-1], Step)


def test_budget_search_holds_at_full_int8_without_a_second_graph():
    steps, _, scored = fake_search(COSINES, dict.fromkeys("abc", 10), "cosine>=0.98",
                                   max_bytes=10_000)
    assert [s.float_group for s in steps] == [None] and steps[0].holds and len(scored) == 1


def test_budget_search_skips_a_group_over_the_size_limit():
    steps, skipped, _ = fake_search(COSINES, {"a": 10, "b": 5000, "c": 10}, "cosine>=0.995",
                                    max_bytes=2000)
    assert skipped == ["b"]
    assert [s.float_group for s in steps] == [None, "a", "c"] and steps[-1].holds


def test_budget_search_too_strict_ends_on_the_best_reached():
    steps, _, _ = fake_search(COSINES, dict.fromkeys("abc", 10), "cosine>=0.9999",
                              max_bytes=10_000)
    assert not any(s.holds for s in steps)
    assert [s.float_group for s in steps] == [None, "a", "b", "c"]
    assert steps[-1].metrics["cosine"] == 0.998


def test_graphs_scored_at_once_come_back_in_order():
    """The sensitivity stage scores its group graphs on several threads: the results keep
    the groups' order, and the threads did overlap."""
    import threading
    import time

    running, most = [0], [0]
    lock = threading.Lock()

    def score(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02 * (i % 3))   # later items finish first
        with lock:
            running[0] -= 1
        return i * i

    assert each_scored(list(range(12)), score, workers=3, desc="t") == [i * i for i in range(12)]
    assert most[0] == 3
    assert each_scored(list(range(5)), score, workers=1, desc="t") == [0, 1, 4, 9, 16]


def test_a_failed_scoring_cancels_the_graphs_not_yet_begun():
    """A failure (or a SIGTERM, raised in the main thread) does not wait for the other 40
    graphs of the stage: those not begun are cancelled."""
    import time

    begun = []

    def score(i):
        begun.append(i)
        if i == 1:
            raise RuntimeError("graph 1 failed")
        time.sleep(0.05)
        return i

    with pytest.raises(RuntimeError, match="graph 1 failed"):
        each_scored(list(range(40)), score, workers=2, desc="t")
    assert len(begun) < 10, begun


def test_bundle_records_sensitivity_for_every_group(minilm_bundle):
    import onnx as onnx_

    manifest = json.loads((minilm_bundle / "manifest.json").read_text())
    q = manifest["quantization"]
    cal = q["calibration"]
    assert set(cal["methods_compared"]) == {*CALIBRATION_METHODS, "data"}
    for method in CALIBRATION_METHODS:
        figures = cal["methods_compared"][method]
        assert 0.5 < figures["min-cosine"] <= figures["cosine"] <= 1.0
    assert cal["peak_rss_mb"] >= cal["rss_before_mb"] > 0

    report = json.loads((minilm_bundle / "report.json").read_text())
    sensitivity = report["sensitivity"]
    groups = {g["group"]: g for g in sensitivity["groups"]}
    # 6 layers x (Q/K/V, attention output, FFN in, FFN out) int8, and the word embeddings
    int8 = [g for g in groups.values() if g["kind"] == "int8"]
    assert len(int8) == 6 * 4 + 1 and sum(g["nodes"] for g in int8) == 36
    kinds = {name.split(" ", 2)[-1] for name, g in groups.items() if g["kind"] != "int8"}
    assert {"LayerNorm", "residual Add", "attention core", "GELU"} <= kinds
    assert all(np.isfinite(g["harm"]) for g in groups.values())
    # harms are sorted, and a post-LayerNorm encoder's LayerNorm input hurts far more
    # quantized than any int8 MatMul group does (why they stay float by design)
    harms = [g["harm"] for g in sensitivity["groups"]]
    assert harms == sorted(harms, reverse=True)
    worst_int8 = max(g["harm"] for g in int8)
    assert max(g["harm"] for g in groups.values() if "LayerNorm" in g["group"]) > worst_int8
    # the search stopped at the first graph that holds, and lists what it kept float
    steps = sensitivity["search"]["steps"]
    assert steps[-1]["holds"] and not any(s["holds"] for s in steps[:-1])
    assert [k["group"] for k in q["kept_float_for_accuracy"]] == \
        [s["float_group"] for s in steps[1:]]
    graph = onnx_.load(minilm_bundle / "model.onnx", load_external_data=False)
    assert "Sensitivity" in (minilm_bundle / "report.md").read_text()
    # each QAttention is one int8 GEMM for a layer's Q, K and V MatMuls
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QAttention") == 6
    assert "| embeddings | int8 | 1 embedding table |" in (minilm_bundle / "report.md").read_text()
    # each int8 node the manifest names is one of the shipped graph (the Q/K/V MatMuls that
    # one QAttention fuses are gone: it named 18 of them), and the report counts MatMuls
    shipped = {n.name: n.op_type for n in graph.graph.node}
    assert sorted(shipped[n] for n in q["quantized_nodes"]) == \
        sorted(op for op in ops if op in ("MatMulIntegerToFloat", "QAttention"))
    fused = q["fused_matmuls"]
    assert sorted(fused) == sorted(n for n, op in shipped.items() if op == "QAttention")
    assert all(len(m) == 3 and "/attention/self/" in m[0] for m in fused.values())
    matmuls = ops.count("MatMulIntegerToFloat") + 3 * ops.count("QAttention")
    assert f"- {matmuls} MatMuls int8;" in (minilm_bundle / "report.md").read_text()
    # each node the manifest says stays float is named with its op in the shipped graph
    assert {(e["node"], e["op"]) for e in q["excluded_nodes"]} <= set(shipped.items())
    assert sum(e["op"] == "QAttention" for e in q["excluded_nodes"]) == 6


# ------------------------------------------------- exact integer products (exporter/exact.py)


def test_exact_twin_holds_the_same_numbers(minilm_bundle):
    from exporter.exact import WEIGHT_INPUTS

    model = onnx.load(minilm_bundle / "model.onnx")
    original = model.SerializeToString()
    twin = exact_products(model)
    assert model.SerializeToString() == original  # a copy: the bundle's graph is untouched
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in twin.graph.initializer}
    checked = 0
    for old, new in zip(model.graph.node, twin.graph.node, strict=True):
        weight, zero = WEIGHT_INPUTS.get(old.op_type, (0, 0))
        if old.op_type not in WEIGHT_INPUTS or before[old.input[weight]].dtype != np.int8:
            continue
        assert after[new.input[weight]].dtype == np.uint8 == after[new.input[zero]].dtype
        numbers = before[old.input[weight]].astype(np.int16) - before[old.input[zero]]
        same = after[new.input[weight]].astype(np.int16) - after[new.input[zero]]
        assert np.array_equal(numbers, same), old.name
        checked += 1
    assert checked == 24  # 18 MatMulIntegerToFloat and 6 QAttention in the default bundle
    # The twin runs; where this CPU multiplies u8 x s8 exactly, to the bundle's own outputs.
    session = ort_session(str(minilm_bundle / "model.onnx"))
    feeds = {i.name: np.array([[101, 7592, 2088, 102]] if i.name == "input_ids" else
                              [[1, 1, 1, 1]] if i.name == "attention_mask" else [[0] * 4],
                              np.int64) for i in session.get_inputs()}
    ours = session.run(None, feeds)[0].ravel()
    exact = ort_session(twin.SerializeToString()).run(None, feeds)[0].ravel()
    cosine = ours @ exact / np.linalg.norm(ours) / np.linalg.norm(exact)
    assert cosine > (0.99 if host_saturates() else 0.999999), cosine
    # a graph with no int8 weight (the twin itself; a float graph) is handed back as it is
    assert exact_products(twin) is twin


def test_host_saturates_reads_the_cpu_flags(tmp_path, monkeypatch):
    from exporter import exact

    vnni, avx2 = tmp_path / "vnni", tmp_path / "avx2"
    vnni.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    avx2.write_text("flags\t\t: fpu sse2 avx2 fma\n")
    monkeypatch.setattr(exact.platform, "machine", lambda: "x86_64")
    assert not exact.host_saturates(vnni)
    assert exact.host_saturates(avx2)
    assert exact.host_saturates(tmp_path / "missing")  # flags unknown: x86 is taken to saturate
    monkeypatch.setattr(exact.platform, "machine", lambda: "aarch64")
    exact.host_saturates.cache_clear()
    assert not exact.host_saturates(avx2)
    exact.host_saturates.cache_clear()


def test_choices_are_scored_on_texts_validation_does_not_report_on():
    # The budget and strength searches chose on the evaluation texts, so validation's
    # "held-out" check passed by construction; they now score calibration texts.
    from types import SimpleNamespace

    from exporter.data import Utterance
    from exporter.score import selection_texts

    calibration = [Utterance(f"turn on lamp {i}", "HassTurnOn") for i in range(50)]
    evaluation = [Utterance(f"dim the hall {i}", "HassLightSet") for i in range(20)]
    job = SimpleNamespace(calibration=calibration, evaluation=evaluation, labels=None,
                          budget=Budget.parse("cosine>=0.99,min-cosine>=0.9"),
                          target=SimpleNamespace(
                              quantization=SimpleNamespace(calibration_samples=30)))
    texts, described = selection_texts(job)   # as many as calibration uses
    assert texts == calibration[:30] and "30 calibration texts" in described
    # a labelled budget, and calibration texts without labels: the evaluation texts, said so
    job.budget, job.labels = Budget.parse("accuracy-drop<=1"), ["HassTurnOn", "HassLightSet"]
    job.calibration = [Utterance(u.text, None) for u in calibration]
    texts, described = selection_texts(job)
    assert texts == evaluation and "need" in described and "labels" in described
    job.calibration = calibration   # labelled: calibration again
    assert selection_texts(job)[0] == calibration[:30]


def test_the_best_step_reached_is_the_one_nearest_the_budget():
    budget = Budget.parse("cosine>=0.99,min-cosine>=0.9")
    steps = [{"cosine": 0.90, "min-cosine": 0.8}, {"cosine": 0.95, "min-cosine": 0.85},
             {"cosine": 0.93, "min-cosine": 0.85}, {"cosine": float("nan"), "min-cosine": 1}]
    assert min(range(4), key=lambda i: budget.shortfall(steps[i])) == 1
    assert budget.shortfall({"cosine": 0.995, "min-cosine": 0.95}) == 0


def test_node_choices_hold_for_unnamed_nodes_and_names_without_a_layer():
    # Groups were keyed by a name that said no layer here ("model attention Q/K/V" twice: one
    # group lost), and float-keeping matched node names, so unnamed MatMuls all went float.
    from exporter.quantize import build_int8, name_nodes
    from exporter.sensitivity import node_groups

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), f"w{i}")
             for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"],
                              name="/enc/block0/attention/self/query/MatMul"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w1"], ["b"],
                              name="/enc/block1/attention/self/query/MatMul"),
             helper.make_node("Relu", ["b"], ["s"]),
             helper.make_node("MatMul", ["s", "w2"], ["y"])]   # unnamed
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits),
        opset_imports=[helper.make_opsetid("", 17)])
    assert name_nodes(model) == 3   # the two Relus and the last MatMul
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names) and all(names)
    groups = [g for g in node_groups(model, int8_tables=False) if g.kind == "int8"]
    assert len(groups) == 3 and len({g.name for g in groups}) == 3
    ranges = {t: (-4.0, 4.0) for t in ("x", "r", "s")}
    for group in groups:   # each group float alone: exactly its MatMul stays float
        _, quantized, _ = build_int8(model, ranges, SETTINGS, float_groups={group.name},
                                     groups={g.name: g.nodes for g in groups})
        assert set(quantized) == {n for g in groups for n in g.nodes} - set(group.nodes)


def test_size_limit_says_capped_only_when_max_model_mb_lowered_it():
    """int(ratio * float bytes) is what the search is given; the message compared it with
    the unrounded product and said "capped by max_model_mb" with no size budget at all."""
    float_bytes = 90_333_333
    own = int(0.3 * float_bytes)
    assert size_limit(own, 0.3, float_bytes) == "27.1 MB (30% of float)"
    assert size_limit(20_000_000, 0.3, float_bytes) == \
        "20.0 MB (30% of float, capped by max_model_mb)"


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weights_are_int8_per_output_channel(trans_b):
    """What onnxruntime's basic level makes of a classifier head (Gemm, its weight (in, out)
    or transposed) is quantized like a MatMul: one scale per output channel."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 4)).astype(np.float32) * np.array([1, 10, 100, 0.01], np.float32)
    b = rng.normal(size=(4,)).astype(np.float32)
    stored = w.T.copy() if trans_b else w
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="head", transB=trans_b)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(stored, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert [n.name for n in weight_matmuls(model)] == ["head"]
    insert_qdq(model, weight_matmuls(model), {"x": (-4.0, 4.0)}, SETTINGS)
    onnx.checker.check_model(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert "w" not in inits
    scale = next(v for k, v in inits.items() if k.startswith("w") and k.endswith("_scale"))
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    x = np.clip(rng.normal(size=(3, 16)), -4, 4).astype(np.float32)
    got = ort_session(model.SerializeToString()).run(None, {"x": x})[0]
    # every column within its own int8 step: a per-tensor scale would lose the small one
    x_step = 8.0 / 255
    bound = np.abs(x).sum(axis=1, keepdims=True) * scale / 2 + np.abs(w).sum(axis=0) * x_step
    assert np.all(np.abs(got - (x @ w + b)) <= bound + 1e-5)


def test_a_weight_read_as_is_and_transposed_gets_an_int8_copy_for_each():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 8)).astype(np.float32) * np.linspace(0.01, 10, 8, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
         helper.make_node("Gemm", ["x", "w"], ["b"], name="head", transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    insert_qdq(model, weight_matmuls(model), {"x": (-3.0, 3.0)}, SETTINGS)
    onnx.checker.check_model(model)
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node
                   if n.op_type == "DequantizeLinear"}
    int8 = [dequantized[n.input[1]] for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert len(set(int8)) == 2 and "w" not in {i.name for i in model.graph.initializer}
    x = rng.uniform(-3, 3, size=(2, 8)).astype(np.float32)
    # x86 without VNNI saturates the u8 x s8 products of the fused MatMul (errors of 50 here;
    # MLAS's AVX2 kernel adds pairs of them in int16); the exporter scores such a host's graphs
    # on their exact twin (exporter/exact.py), and so do the tests that bound int8 errors.
    runs = exact_products(model) if host_saturates() else model
    a, b = ort_session(runs.SerializeToString()).run(None, {"x": x})
    for got, exact, weight in ((a, x @ w, w), (b, x @ w.T, w.T)):
        step = np.abs(weight).max(axis=0) / 127           # per output channel
        assert np.all(np.abs(got - exact) <= np.abs(x).sum(axis=1, keepdims=True) * step / 2
                      + np.abs(weight).sum(axis=0) * 6 / 255 / 2 + 1e-5)


def attention_graph(rng, hidden: int, *, out: bool = False) -> onnx.ModelProto:
    """MatMuls q, k and v into a MultiHeadAttention "mha" (and, with `out`, a MatMul "out"
    after it): what QAttention fuses."""
    inits = [numpy_helper.from_array(rng.normal(size=(hidden, hidden)).astype(np.float32), n)
             for n in ("wq", "wk", "wv", "wo")[:4 if out else 3]]
    inits.append(numpy_helper.from_array(rng.normal(size=(3 * hidden,)).astype(np.float32), "b"))
    nodes = [helper.make_node("MatMul", ["x", w], [o], name=o)
             for w, o in (("wq", "q"), ("wk", "k"), ("wv", "v"))]
    nodes.append(helper.make_node("MultiHeadAttention", ["q", "k", "v", "b", ""],
                                  ["a" if out else "y"], name="mha", domain="com.microsoft",
                                  num_heads=2))
    if out:
        nodes.append(helper.make_node("MatMul", ["a", "wo"], ["y"], name="out"))
    return helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, hidden])], inits),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def test_int8_nodes_are_named_as_they_ship():
    """Q, K and V fused into one QAttention are that node in the record (the manifest listed
    the three MatMuls, which the shipped graph no longer has); with one of them float, the
    others ship under their own names."""
    from exporter.quantize import build_int8, int8_nodes
    model = attention_graph(np.random.default_rng(0), 16, out=True)
    ranges = {"x": (-3.0, 3.0), "a": (-3.0, 3.0)}
    fused, names, _ = build_int8(model, ranges, SETTINGS, lower=True)
    assert names == ["q", "k", "v", "out"]
    assert int8_nodes(model, fused, names) == {
        "quantized_nodes": ["mha", "out"], "fused_matmuls": {"mha": ["q", "k", "v"]}}
    assert {n.name: n.op_type for n in fused.graph.node}["mha"] == "QAttention"
    kept, names, _ = build_int8(model, ranges, SETTINGS, lower=True,
                                float_groups=frozenset({"Q"}), groups={"Q": ["q"]})
    assert int8_nodes(model, kept, names) == {
        "quantized_nodes": ["k", "v", "out"], "fused_matmuls": {}}
    assert int8_nodes(model, build_int8(model, ranges, SETTINGS)[0], ["q", "k", "v", "out"]) \
        == {"quantized_nodes": ["q", "k", "v", "out"], "fused_matmuls": {}}


def test_quantized_attention_with_per_tensor_weights():
    """per_channel = false on a transformer target: one scale per Q, K and V matrix, which
    QAttention takes as per-column scales (np.concatenate of three 0-d scales raised)."""
    import dataclasses

    from exporter.quantize import build_int8
    rng = np.random.default_rng(0)
    hidden = 16
    model = attention_graph(rng, hidden)
    x = rng.normal(size=(1, 5, hidden)).astype(np.float32)
    settings = dataclasses.replace(SETTINGS, per_channel=False, portable_rounding=False)
    ranges = {"x": (float(x.min()), float(x.max()))}
    fused = build_int8(model, ranges, settings, lower=True)[0]
    assert "QAttention" in [n.op_type for n in fused.graph.node]
    plain = build_int8(model, ranges, settings, lower=False)[0]
    run = [ort_session(m.SerializeToString()).run(None, {"x": x})[0] for m in (fused, plain)]
    np.testing.assert_allclose(run[0], run[1], atol=1e-5)


def test_int8_rows_keep_the_float_table_another_node_reads():
    """A table a Gather and a tied output projection both read: the projection still needs
    the float table (it was removed, and the graph no longer loaded)."""
    from exporter.quantize import quantize_embeddings_by_row
    rng = np.random.default_rng(0)
    table = rng.normal(size=(1024, 256)).astype(np.float32)   # 1 MiB: int8 rows
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
         helper.make_node("Transpose", ["table"], ["table_t"], name="tie", perm=[1, 0]),
         helper.make_node("MatMul", ["emb", "table_t"], ["logits"], name="head")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, 1024])],
        [numpy_helper.from_array(table, "table")]),
        opset_imports=[helper.make_opsetid("", 18)])
    assert quantize_embeddings_by_row(model) == ["table"]
    ids = np.array([[3, 7, 1000]], np.int64)
    logits = ort_session(model.SerializeToString()).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(logits, table[ids] @ table.T, rtol=0.02, atol=0.5)


def test_record_says_float_when_the_search_keeps_the_tables_float(tmp_path, monkeypatch):
    """The budget search gives the "embeddings" group back to float: the manifest's
    quantization.embeddings.tables must not still list the table as int8."""
    import dataclasses

    import exporter.sensitivity as S
    rng = np.random.default_rng(0)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
         helper.make_node("MatMul", ["emb", "w"], ["y"], name="layer.0/output/dense/MatMul")],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, 256])],
        [numpy_helper.from_array(rng.normal(size=(1024, 256)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.normal(size=(256, 256)).astype(np.float32), "w")]),
        opset_imports=[helper.make_opsetid("", 18)])
    target = load_target("arm-cpu")
    target = dataclasses.replace(target, quantization=dataclasses.replace(
        target.quantization, max_size_ratio=1.0))
    # the int8 table breaks the budget, the int8 MatMul does not
    job, _ = fake_sensitivity_job(tmp_path, monkeypatch, model, target, hurts="table_int8")
    assert job.records["quantization"]["embeddings"]["tables"] == ["table"]
    S.sensitivity(job)
    shipped = {i.name for i in onnx.load(tmp_path / "model.onnx").graph.initializer}
    assert "table" in shipped and "table_int8" not in shipped   # the table ships float
    assert job.records["quantization"]["embeddings"]["tables"] == []
    # its row in report.md says what the group is: a table, where it said "0" nodes
    from exporter.report import render_markdown
    report = render_markdown({"name": "x", "task": "feature-extraction", "target": "arm-cpu",
                              "budget": "cosine>=0.99", "sensitivity": job.records["sensitivity"]})
    assert "| embeddings **(kept float)** | int8 | 1 embedding table | 2.00e-02 |" in report


def test_records_name_the_nodes_of_the_graph_the_search_keeps(tmp_path, monkeypatch):
    """The search keeps a layer's Q/K/V float: its attention ships as MultiHeadAttention,
    not QAttention, and the records name what ships (no QAttention left in them)."""
    import dataclasses

    import exporter.sensitivity as S
    from exporter.quantize import build_int8, int8_nodes
    model = attention_graph(np.random.default_rng(0), 16, out=True)
    target = load_target("arm-cpu")
    target = dataclasses.replace(target, quantization=dataclasses.replace(
        target.quantization, max_size_ratio=1.0))
    job, _ = fake_sensitivity_job(tmp_path, monkeypatch, model, target, hurts="mha_qkv_weight")
    inputs, q = job.records["quantize_inputs"], job.records["quantization"]
    inputs["lower"] = True   # as quantize() records a target that lowers to contrib ops
    lowered, names, _ = build_int8(model, inputs["ranges"], target.quantization, lower=True)
    q.update(int8_nodes(model, lowered, names))
    assert q["quantized_nodes"] == ["mha", "out"]
    S.sensitivity(job)
    shipped = {n.name: n.op_type for n in onnx.load(tmp_path / "model.onnx").graph.node}
    assert shipped["mha"] == "MultiHeadAttention"
    assert q["quantized_nodes"] == ["out"] and q["fused_matmuls"] == {}
    assert [(e["node"], e["op"]) for e in q["excluded_nodes"]] == [
        ("mha", "MultiHeadAttention"), ("q", "MatMul"), ("k", "MatMul"), ("v", "MatMul")]


def fake_sensitivity_job(tmp_path, monkeypatch, model, target, *, hurts="", budget="cosine>=0.99",
                         reference_model=None, float_cosine=1.0, cosine=None):
    """A job at the sensitivity stage for the float `model`, quantized full int8 for `target`;
    its Scorer gives cosine 0.98 to a graph where initializer `hurts` is present (an int8
    weight that breaks the budget), 0.999 to another int8 graph, and at most `float_cosine`
    (the float graph's, against the original model when `reference_model` is given); or
    `cosine(initializer names)` where that is given."""
    import types

    import exporter.sensitivity as S
    from exporter.quantize import build_int8
    onnx.save(model, tmp_path / "float.onnx")
    ranges = {n.input[0]: (-4.0, 4.0) for n in weight_matmuls(model)}
    quantized, names, tables = build_int8(model, ranges, target.quantization)
    onnx.save(quantized, tmp_path / "model.onnx")
    scored = []

    class Fake:
        texts, against = ["t"], "the float graph"

        def __init__(self, job, *args, **kwargs):
            self.job = job

        def search_budget(self):   # no absolute clause here: the budget as it is
            return self.job.budget, []

        def score(self, m):
            inits = {i.name: i.data_type for i in m.graph.initializer}
            scored.append(inits)
            if cosine is not None:
                c = cosine(set(inits))
                return {"cosine": c, "min-cosine": c}
            c = 0.98 if hurts in inits else 0.999
            if not any(t == TensorProto.INT8 for t in inits.values()):
                c = float_cosine
            c = min(c, float_cosine)   # int8 does not undo what compression lost
            return {"cosine": c, "min-cosine": c}

    monkeypatch.setattr(S, "Scorer", Fake)
    monkeypatch.setattr(S, "ort_session", lambda *a, **k: None)
    monkeypatch.setattr(S, "encoder_feeds", lambda *a, **k: iter(()))
    monkeypatch.setattr(S, "calibrate_all", lambda path, tensors, *a, **k: types.SimpleNamespace(
        ranges={"minmax": {t: (-1.0, 1.0) for t in tensors}}))
    monkeypatch.setattr(S, "selection_texts", lambda job: (["t"], "1 calibration text"))

    def reject(job, message):   # (without the report: these records are not a whole export's)
        raise BudgetError(message)

    monkeypatch.setattr(S, "reject", reject)
    job = types.SimpleNamespace(
        target=target, workdir=tmp_path, calibration=[types.SimpleNamespace(text="t")],
        max_length=8, float_onnx=tmp_path / "float.onnx", quantized_onnx=tmp_path / "model.onnx",
        budget=Budget.parse(budget), log=lambda line: None, reference_model=reference_model,
        records={"quantize_inputs": {"source": str(tmp_path / "float.onnx"), "ranges": ranges,
                                     "lower": False},
                 "quantization": {"embeddings": {"mode": target.quantization.embeddings,
                                                 "tables": tables},
                                  "quantized_nodes": names, "excluded_nodes": []}})
    return job, scored


def table_and_two_matmuls(opset: int) -> onnx.ModelProto:
    """A 1 MiB embedding table (jetson keeps it float), then two 256 x 256 MatMuls."""
    rng = np.random.default_rng(0)
    return helper.make_model(helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
         helper.make_node("Relu", ["emb"], ["x"], name="relu"),
         helper.make_node("MatMul", ["x", "w1"], ["h"], name="layer.0/intermediate/dense/MatMul"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="layer.0/output/dense/MatMul")],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, 256])],
        [numpy_helper.from_array(rng.normal(size=(1024, 256)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.normal(size=(256, 256)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(size=(256, 256)).astype(np.float32), "w2")]),
        opset_imports=[helper.make_opsetid("", opset)])


def test_float16_target_search_measures_the_float16_file(tmp_path, monkeypatch):
    """jetson ships what stays float in float16: the size limit holds for that file (what
    validation and max_model_mb measure). Measured in float32, the float table alone put the
    full-int8 graph over the limit, and no group could ever go back to float."""
    import dataclasses

    import exporter.sensitivity as S
    target = load_target("jetson")
    # 50% of float: the float16 file with layer 0's FFN in kept float fits (0.72 MB of
    # 1.57 MB); float32 full int8 alone is 1.18 MB
    target = dataclasses.replace(target, quantization=dataclasses.replace(
        target.quantization, max_size_ratio=0.5))
    model = table_and_two_matmuls(target.opset)
    job, scored = fake_sensitivity_job(tmp_path, monkeypatch, model, target, hurts="w1_int8")
    S.sensitivity(job)
    search = job.records["sensitivity"]["search"]
    assert [s["float_group"] for s in search["steps"]] == [None, "layer 0 FFN in"]
    assert search["steps"][-1]["holds"] and not search["skipped_for_size"]
    assert all(s["size_bytes"] <= search["max_bytes"] for s in search["steps"])
    # the graphs scored are the float32 ones (float16 is the next stage's)
    assert all(t != TensorProto.FLOAT16 for inits in scored for t in inits.values())
    shipped = {i.name for i in onnx.load(tmp_path / "model.onnx").graph.initializer}
    assert "w1" in shipped and "w1_int8" not in shipped and "w2_int8" in shipped


def test_search_refuses_at_once_when_compression_alone_breaks_the_budget(tmp_path, monkeypatch):
    """A compressed model is scored against the original: when its float graph already
    misses the budget, no group kept float can recover it. The search used to try every
    group within the size limit, then advise raising max_size_ratio."""
    import exporter.sensitivity as S
    target = load_target("arm-cpu")
    job, scored = fake_sensitivity_job(tmp_path, monkeypatch, table_and_two_matmuls(18), target,
                                       hurts="w1_int8", reference_model=object(),
                                       float_cosine=0.95)
    with pytest.raises(BudgetError, match="Compression alone breaks the accuracy budget "
                                          "cosine>=0.99") as refused:
        S.sensitivity(job)
    assert "max_size_ratio" not in str(refused.value)
    assert len(scored) == 1   # the float graph only: no per-group harm, no search


def test_a_group_whose_int8_gives_nan_is_the_most_harmful(tmp_path, monkeypatch):
    """A NaN harm (outputs not finite numbers) ranks first: NaN compares false with every
    number, and one in the sort keys left the finite harms out of order too."""
    import dataclasses

    import exporter.sensitivity as S
    target = load_target("arm-cpu")
    target = dataclasses.replace(target, quantization=dataclasses.replace(
        target.quantization, max_size_ratio=1.0))

    def cosine(inits):   # FFN in costs 0.001, the table 0.002, FFN out makes NaN
        if "w2_int8" in inits:
            return float("nan")
        return 1 - 0.001 * ("w1_int8" in inits) - 0.002 * ("table_int8" in inits)

    job, _ = fake_sensitivity_job(tmp_path, monkeypatch, table_and_two_matmuls(18), target,
                                  cosine=cosine)
    S.sensitivity(job)
    record = job.records["sensitivity"]
    assert [g["group"] for g in record["groups"] if g["kind"] == "int8"] == \
        ["layer 0 FFN out", "embeddings", "layer 0 FFN in"]
    assert [s["float_group"] for s in record["search"]["steps"]] == [None, "layer 0 FFN out"]


def test_a_rejected_search_records_its_best_step_not_every_group_tried(tmp_path, monkeypatch):
    """The rejected report listed every group the search tried as kept float (and dropped
    their nodes from quantized_nodes), where the message named the best step's groups."""
    import dataclasses

    import exporter.sensitivity as S
    target = load_target("arm-cpu")
    target = dataclasses.replace(target, quantization=dataclasses.replace(
        target.quantization, max_size_ratio=1.0))
    # cosine by the groups still int8 (T table, 1 FFN in, 2 FFN out): harm orders T, 1, 2;
    # keeping T float is the best step, keeping 1 float too makes it worse
    table = {"T12": 0.95, "12": 0.99, "2": 0.985, "1": 0.98, "T": 0.97, "": 0.96}

    def cosine(inits):
        int8 = "".join(k for k, name in (("T", "table_int8"), ("1", "w1_int8"),
                                         ("2", "w2_int8")) if name in inits)
        return table.get(int8, 0.9)

    job, _ = fake_sensitivity_job(tmp_path, monkeypatch, table_and_two_matmuls(18), target,
                                  budget="cosine>=0.995", cosine=cosine)
    quantized = list(job.records["quantization"]["quantized_nodes"])
    with pytest.raises(BudgetError, match=r"best reached, with 1 of 3 int8 groups kept float "
                                          r"\(embeddings\)"):
        S.sensitivity(job)
    search = job.records["sensitivity"]["search"]
    assert [s["float_group"] for s in search["steps"]] == [
        None, "embeddings", "layer 0 FFN in", "layer 0 FFN out"]
    assert search["best_step"] == 1
    q = job.records["quantization"]
    assert [g["group"] for g in q["kept_float_for_accuracy"]] == ["embeddings"]
    assert q["quantized_nodes"] == quantized and q["embeddings"]["tables"] == []


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_a_range_too_small_for_float32_gets_a_usable_scale(dtype, symmetric):
    # 1e-44 / 255 is 0 in float32: QDQ with scale 0 makes every value 0 (onnxruntime), and
    # TensorRT refuses it; such a range is empty, as onnxruntime's compute_scale_zp treats it
    scale, _ = activation_qparams(0.0, 1e-44, dtype=dtype, symmetric=symmetric)
    assert scale > 0 and np.isfinite(scale)
    scale, _ = activation_qparams(0.0, 1e-30, dtype=dtype, symmetric=symmetric)
    assert scale == np.float32(1e-30 / (127 if symmetric else 255))


def test_an_initializer_read_only_inside_an_if_branch_is_kept():
    """DeBERTa's exported relative-position code reads a constant only from inside an If
    branch (outer scope). The fused graph's clean-up dropped it as unused, and the int8
    graph no longer loaded: "input '70' of node Gather ... is not output of any previous
    nodes", a crash in the quantize stage of a valid checkpoint's export."""
    from exporter.quantize import build_int8

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4)).astype(np.float32)

    def branch(name):   # reads "k" from the outer graph
        return helper.make_graph([helper.make_node("Identity", ["k"], [name])], name, [],
                                 [helper.make_tensor_value_info(name, TensorProto.INT64, [])])

    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
         helper.make_node("If", ["cond"], ["z"], name="if", then_branch=branch("then"),
                          else_branch=branch("else"))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("z", TensorProto.INT64, [])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(7), "k")]),
        opset_imports=[helper.make_opsetid("", 18)])
    x = rng.normal(size=(1, 8)).astype(np.float32)
    for lower in (False, True):
        quantized, names, _ = build_int8(model, {"x": (float(x.min()), float(x.max()))},
                                         SETTINGS, lower=lower)
        assert names == ["mm"]
        runs = exact_products(quantized) if host_saturates() else quantized   # see above
        y, z = ort_session(runs.SerializeToString()).run(None, {"x": x, "cond": np.array(True)})
        assert z == 7 and np.abs(y - x @ w).max() < 0.1


def test_int8_activations_keep_q_k_v_as_integer_matmuls():
    """A profile's `activations = "int8"` (S8S8, which aarch64 has kernels for): onnxruntime's
    CPU QAttention takes uint8 activations only, so fusing Q, K and V into it made a graph
    no session could load, and the export died in the sensitivity search with a
    NOT_IMPLEMENTED traceback. Those layers stay three MatMulIntegerToFloat."""
    import dataclasses

    from exporter.quantize import build_int8
    rng = np.random.default_rng(0)
    hidden = 16
    model = attention_graph(rng, hidden)
    x = rng.normal(size=(1, 5, hidden)).astype(np.float32)
    ranges = {"x": (float(x.min()), float(x.max()))}
    settings = dataclasses.replace(SETTINGS, activations="int8", symmetric_activations=True,
                                   portable_rounding=False)
    fused = build_int8(model, ranges, settings, lower=True)[0]
    ops = [n.op_type for n in fused.graph.node]
    assert "QAttention" not in ops and ops.count("MatMulIntegerToFloat") == 3
    plain = build_int8(model, ranges, settings, lower=False)[0]
    run = [ort_session(m.SerializeToString()).run(None, {"x": x})[0] for m in (fused, plain)]
    np.testing.assert_allclose(run[0], run[1], atol=1e-5)
