"""Stage `sensitivity`: measure what each node group's int8 costs, then give the most harmful
groups back to float until the accuracy budget holds.

Groups (one row each in the manifest and the report):

* int8 groups, candidates for float: the weight MatMuls that read one activation (a layer's
  Q/K/V projections share their input; attention output, FFN in and FFN out read one each),
  and the int8 embedding tables.
* float by design (measured, never quantized): per layer the attention core
  (MultiHeadAttention, or Softmax and the activation x activation MatMuls), the LayerNorms,
  GELU and the residual Adds. Their harm is what a quantizer that quantizes every op (plain
  `onnxruntime.quantization.quantize_static`) would add there: Q/DQ on their inputs.

Harm of group g = 1 - mean cosine of the output (pooled embedding or logits) to the float
graph (a compressed model's own) when *only g* is quantized, on the first
`sensitivity_samples` calibration texts. One graph per group, so the analysis is linear in
the number of groups (MiniLM: 51, about 16 s on 2 cores); the graphs are scored up to
MAX_SCORING_AT_ONCE at a time, one thread each, on the cores the profile's threads allow.

The budget search then starts from the full-int8 graph and, in order of harm, keeps one more
int8 group in float until the budget (the metrics validation checks, scored against the float
graph on the calibration texts: the evaluation texts are left to validation, see
score.selection_texts) holds, and stops there. A float MatMul costs 4x its int8 bytes
(2x where the profile's float_type is float16) and runs the float kernel: groups that would
take the model past `max_size_ratio` of the float graph are skipped. Sizes are those of the
model file as it ships, after the float16 stage where there is one: validation and the size
budget (max_model_mb) measure that file. When every group that fits is float and the budget
still fails, the export stops with BudgetError and the best figures reached.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import onnx
from onnx import helper, numpy_helper

from runtime.model import usable_cores

from .budget import Budget, rounded
from .feeds import encoder_feeds, host_threads, ort_session
from .float16 import convert
from .graph_file import FreshNames, check_and_save, copy_model, graph_bytes, model_bytes
from .progress import progress
from .quantize import (
    activation_qparams,
    build_int8,
    calibrate_all,
    float_by_design,
    int8_nodes,
    integer_kernels,
    weight_matmuls,
)
from .score import Scorer, selection_texts
from .tensorrt import dedicate_dequantize
from .validate import reject

# Group graphs scored at once, at most: each holds a copy of the float graph's weights
# three times over while it is built, handed to onnxruntime and run (MiniLM: ~300 MB).
MAX_SCORING_AT_ONCE = 4

# MatMul name fragment -> role, for readable group names (optimum's BERT export names);
# other models fall back to the name of the activation the group reads.
ROLES: tuple[tuple[str, str], ...] = (
    ("attention/self/", "attention Q/K/V"),
    ("attention/output/dense", "attention output"),
    ("intermediate/dense", "FFN in"),
    ("output/dense", "FFN out"),
)
# Float-by-design op -> (group role, input indices that carry float activations).
FLOAT_OPS: dict[str, tuple[str, tuple[int, ...]]] = {
    "MultiHeadAttention": ("attention core", (0, 1, 2)),
    "Softmax": ("attention core", (0,)),
    "LayerNormalization": ("LayerNorm", (0,)),
    "BiasGelu": ("GELU", (0,)),
    "Gelu": ("GELU", (0,)),
    "Erf": ("GELU", (0,)),
}


@dataclass
class Group:
    name: str
    kind: str                  # "int8" (a candidate for float) or "float by design"
    nodes: list[str]           # MatMul names (int8), or the float nodes measured
    tensors: list[str]         # float by design: the inputs given Q/DQ to measure harm


def layer_of(*names: str) -> str:
    """'layer N' from the first of `names` (node name, then its tensors) that has one;
    fused nodes (MultiHeadAttention_0, BiasGelu) only say it in their tensor names."""
    for name in names:
        match = re.search(r"layer[._/](\d+)", name)
        if match:
            return f"layer {match.group(1)}"
    return "embeddings" if any("embeddings" in n for n in names) else "model"


def node_groups(model: onnx.ModelProto, *, int8_tables: bool) -> list[Group]:
    """The int8 groups and the float-by-design groups of `model` (the float graph)."""
    inits = {i.name for i in model.graph.initializer}
    matmuls = weight_matmuls(model)
    weight_names = {n.name for n in matmuls}
    by_input: dict[str, list[str]] = {}
    for node in matmuls:
        by_input.setdefault(node.input[0], []).append(node.name)
    groups, used = [], set()
    for x, names in by_input.items():
        role = next((r for fragment, r in ROLES if fragment in names[0]), f"reads {x}")
        name = f"{layer_of(names[0])} {role}"
        if name in used:   # node names that say no layer: each group keeps its own name
            name = f"{name} ({names[0]})"
        used.add(name)
        groups.append(Group(name, "int8", names, []))
    if int8_tables:
        groups.append(Group("embeddings", "int8", [], []))

    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    floats: dict[str, Group] = {}

    def add(role: str, node: onnx.NodeProto, indices) -> None:
        name = f"{layer_of(node.name, *node.output, *node.input)} {role}"
        group = floats.setdefault(name, Group(name, "float by design", [], []))
        group.nodes.append(node.name)
        for i in indices:
            if i < len(node.input) and node.input[i] and node.input[i] not in inits \
                    and node.input[i] not in group.tensors:
                group.tensors.append(node.input[i])

    for node in model.graph.node:
        if node.op_type in FLOAT_OPS:
            role, indices = FLOAT_OPS[node.op_type]
            add(role, node, indices)
        elif node.op_type == "MatMul" and node.name not in weight_names:
            add("attention core", node, (0, 1))      # scores and x V
        elif node.op_type == "Add" and not set(node.input) & inits and any(
                r.op_type == "LayerNormalization" for r in readers.get(node.output[0], [])):
            add("residual Add", node, (0, 1))
    return groups + [g for g in floats.values() if g.tensors]


def fake_quantize(model: onnx.ModelProto, group: Group, ranges, settings) -> onnx.ModelProto:
    """A copy of the float `model` with Q -> DQ on `group.tensors` where `group.nodes` read
    them (one pair per tensor)."""
    out = copy_model(model)
    fresh = FreshNames(out.graph)
    names = {x: [fresh(x + suffix) for suffix in ("_fq_scale", "_fq_zero", "_fq_q", "_fq_dq")]
             for x in group.tensors if x in ranges}   # x -> its scale, zero, Q and DQ outputs
    members, nodes = set(group.nodes), []
    for node in out.graph.node:
        if node.name in members:
            for i, name in enumerate(node.input):
                if name in names:
                    node.input[i] = names[name][3]
        nodes.append(node)
    pairs = {}   # x's DQ output -> x's Q and DQ
    for x, (scale_name, zero_name, q, dq) in names.items():
        scale, zero = activation_qparams(*ranges[x], dtype=settings.activations,
                                         symmetric=settings.symmetric_activations)
        out.graph.initializer.extend([numpy_helper.from_array(scale, scale_name),
                                      numpy_helper.from_array(zero, zero_name)])
        pairs[dq] = [
            helper.make_node("QuantizeLinear", [x, scale_name, zero_name], [q], name=x + "_fq_Q"),
            helper.make_node("DequantizeLinear", [q, scale_name, zero_name], [dq],
                             name=x + "_fq_DQ")]
    # each pair right before the first reader of its output (the graph is topologically sorted)
    ordered = []
    for node in nodes:
        for dq in [dq for dq in pairs if dq in node.input]:
            ordered += pairs.pop(dq)
        ordered.append(node)
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    return out


def each_scored(items: list, score: Callable, *, workers: int, desc: str) -> list:
    """[score(item) for item in items], up to `workers` at once on threads (onnxruntime runs
    a graph without the GIL; building one holds it), in order, with a progress line. A
    failure, or a stop (SIGTERM), cancels the items not yet begun instead of waiting for
    them. Measured on 2 cores, the MiniLM sensitivity stage's 51 graphs: 16 s two at a time
    on one thread each, 19-24 s one at a time on two threads, the same harms."""
    if workers <= 1:
        return list(progress(map(score, items), total=len(items), desc=desc))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="scoring")
    try:
        return list(progress(pool.map(score, items), total=len(items), desc=desc))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def most_harmful_first(harm: float) -> float:
    """Sort key: larger harm first, and a NaN harm (the outputs were not finite numbers)
    before all; NaN compares false with everything, and one among the keys unsorted the rest."""
    return -harm if harm == harm else -math.inf


@dataclass
class Step:
    """One graph the budget search scored."""

    float_group: str | None    # the group given back to float at this step (None: full int8)
    metrics: dict[str, float]
    size_bytes: int
    holds: bool


def size_limit(max_bytes: int, ratio: float, float_bytes: int) -> str:
    """The search's size limit in words: "27.1 MB (30% of float)", and whether the size
    budget (max_model_mb) lowered it below the ratio's."""
    capped = ", capped by max_model_mb" if max_bytes < int(ratio * float_bytes) else ""
    return f"{max_bytes / 1e6:.1f} MB ({ratio:.0%} of float{capped})"


def shipped_bytes(model: onnx.ModelProto, target) -> int:
    """Bytes of `model`'s file as the bundle ships it, through the stages after this one: in
    float16 where the profile's float_type asks for it (to_float16), with a DequantizeLinear
    of its own for each reader where the target follows TensorRT's rules (check_rules; a
    few KB, which took a graph measured just under max_model_mb over it)."""
    tensorrt = target.graph_rules == "tensorrt"
    if target.float_type == "float16":
        model = convert(model)   # a new graph
    elif tensorrt:
        model = copy_model(model)
    if tensorrt:
        dedicate_dequantize(model)
    return model_bytes(model)


def search(order: list[str], *, build: Callable[[frozenset[str]], onnx.ModelProto],
           score: Callable[[onnx.ModelProto], dict[str, float]], budget: Budget,
           max_bytes: int, size: Callable[[onnx.ModelProto], int] = onnx.ModelProto.ByteSize,
           ) -> tuple[list[Step], list[str]]:
    """Greedy mixed precision: full int8 first, then one more group of `order` (most harmful
    first) in float per step, stopping at the first graph that holds the budget. A group that
    would take the model over `max_bytes` (its `size`) is skipped. Returns (steps scored,
    groups skipped for size); the last step is the chosen graph, or the best reached if none
    holds."""
    kept: list[str] = []
    model = build(frozenset())
    metrics = score(model)
    steps = [Step(None, metrics, size(model), not budget.check(metrics))]
    skipped = []
    for group in order:
        if steps[-1].holds:
            break
        model = build(frozenset([*kept, group]))
        bytes_ = size(model)
        if bytes_ > max(max_bytes, steps[0].size_bytes):
            skipped.append(group)
            continue
        kept.append(group)
        metrics = score(model)
        steps.append(Step(group, metrics, bytes_, not budget.check(metrics)))
    return steps, skipped


def sensitivity(job) -> None:
    """Stage: job.records["sensitivity"]; job.quantized_onnx replaced when groups go float."""
    settings = job.target.quantization
    if job.target.precision != "int8" or "quantize_inputs" not in job.records:
        job.records["sensitivity"] = {"applied": False}
        return
    inputs = job.records.pop("quantize_inputs")
    source = onnx.load(inputs["source"])
    threads = host_threads(job.target)
    tables = job.records["quantization"]["embeddings"]["tables"]
    groups = node_groups(source, int8_tables=bool(tables))
    matmul_groups = {g.name: g.nodes for g in groups if g.kind == "int8"}

    def build(float_groups: frozenset[str]) -> onnx.ModelProto:
        return build_int8(source, inputs["ranges"], settings, float_groups=float_groups,
                          groups=matmul_groups, lower=inputs["lower"])[0]

    # The budget search's texts, which validation does not report on (score.selection_texts).
    texts, described = selection_texts(job)
    selection = Scorer(job, texts, threads=threads)
    budget, unjudged = selection.search_budget()
    for note in unjudged:
        job.log(f"  left to validation: {note}")
    if getattr(job, "reference_model", None) is not None:
        # Scored against the original model: a compression that breaks the budget in float
        # breaks it whatever goes back to float (the search then spent its size limit and
        # told the user to raise it).
        whole = selection.score(source)
        if budget.check(whole):
            job.records["sensitivity"] = {"applied": False, "float_metrics": rounded(whole, 6),
                                          "data": f"{described}, vs {selection.against}"}
            reject(job, f"Compression alone breaks the accuracy budget {budget}: the "
                        f"compressed model's float graph, before any int8, against the "
                        f"original model on the search's {len(selection.texts)} texts: "
                        f"{'; '.join(budget.check(whole))}. No int8 group kept float "
                        f"can recover that. Compress less, heal (--heal-steps), or loosen "
                        f"the budget.")

    # Harm of each group alone, on calibration texts.
    probe = job.calibration[:settings.sensitivity_samples]
    extra = sorted({t for g in groups for t in g.tensors})
    session = ort_session(inputs["source"], threads=threads)
    fill = calibrate_all(inputs["source"], extra, lambda: encoder_feeds(
        job.workdir / "tokenizer.json", [u.text for u in probe], session,
        max_length=job.max_length), methods=("minmax",), percentile=100.0, total=len(probe),
        threads=threads).ranges["minmax"]
    ranges = {**fill, **inputs["ranges"]}
    # Each group's graph is scored on its own: several at once, one thread each, where the
    # export has cores for them (small batches leave a session's threads mostly idle).
    workers = min(threads or usable_cores(), MAX_SCORING_AT_ONCE, len(groups))
    # against the float graph even for a compressed model: what each group's int8 costs,
    # not that plus what compression lost (every group's harm was the same ~0.25 then)
    scorer = Scorer(job, probe, threads=1 if workers > 1 else threads, original=False)
    everything = frozenset(matmul_groups)

    def harm_of(group: Group) -> dict[str, float]:
        if group.kind == "int8":
            return scorer.score(build(everything - {group.name}))
        return scorer.score(fake_quantize(source, group, ranges, settings))

    measured = each_scored(groups, harm_of, workers=workers, desc="sensitivity (node groups)")
    rows = []
    for group, m in zip(groups, measured, strict=True):
        rows.append({"group": group.name, "kind": group.kind, "nodes": len(group.nodes),
                     **({"tables": tables} if group.name == "embeddings" else {}),
                     "harm": round(1 - m["cosine"], 7), "min-cosine": round(m["min-cosine"], 6)})
    harm = {r["group"]: r["harm"] for r in rows}
    order = sorted(matmul_groups, key=lambda g: most_harmful_first(harm[g]))

    # Budget search.
    float_bytes = graph_bytes(job.float_onnx)
    max_bytes = int(settings.max_size_ratio * float_bytes)
    if job.target.validation.max_model_mb is not None:   # the size budget caps it too
        max_bytes = min(max_bytes, int(job.target.validation.max_model_mb * 1e6))
    steps, skipped = search(order, build=build, score=selection.score, budget=budget,
                            max_bytes=max_bytes,
                            size=lambda model: shipped_bytes(model, job.target))
    chosen, best = steps[-1], len(steps) - 1
    if not chosen.holds:
        # Keeping a group float does not always help (min-cosine can drop): the step nearest
        # the budget, not the last, is the best reached, and what the records describe.
        best = min(range(len(steps)), key=lambda i: budget.shortfall(steps[i].metrics))
    kept = [s.float_group for s in steps[1:best + 1]]
    record = {
        "applied": True,
        "harm": "1 - mean cosine to the float graph with only this group quantized",
        "data": f"{len(probe)} calibration texts",
        "groups": sorted(rows, key=lambda r: most_harmful_first(r["harm"])),
        "search": {
            "budget": str(budget), "data": f"{described}, vs {selection.against}",
            **({"left_to_validation": unjudged} if unjudged else {}),
            "max_size_ratio": settings.max_size_ratio, "max_bytes": max_bytes,
            "steps": [{"float_group": s.float_group, "metrics": rounded(s.metrics, 6, job.budget),
                       "size_bytes": s.size_bytes, "holds": s.holds} for s in steps],
            "skipped_for_size": skipped, "best_step": best,
        },
    }
    job.records["sensitivity"] = record
    q = job.records["quantization"]
    q["kept_float_for_accuracy"] = [
        {"group": g, "nodes": matmul_groups[g] or ["embedding tables"], "harm": harm[g],
         "reason": "kept float by the budget search (measured harm when quantized)"}
        for g in kept]
    op = {n.name: n.op_type for n in source.graph.node}
    by_accuracy = [{"node": n, "op": op[n], "reason": f"accuracy budget: group '{g}' harm "
                    f"{harm[g]:.2e}"} for g in kept for n in matmul_groups[g]]
    if "embeddings" in kept:   # the tables ship float: the record says so
        q["embeddings"] = {**q["embeddings"], "tables": [],
                           "kept_float_for_accuracy": q["embeddings"]["tables"]}
    if kept:   # the records name the nodes of this graph (the best reached, if rejected)
        model, int8, _ = build_int8(source, inputs["ranges"], settings,
                                    float_groups=frozenset(kept), groups=matmul_groups,
                                    lower=inputs["lower"])
        q.update(int8_nodes(source, model, int8))
        # a layer whose Q, K or V stays float keeps its MultiHeadAttention (not QAttention)
        q["excluded_nodes"] = float_by_design(
            source, model, [n.name for n in weight_matmuls(source)]) + by_accuracy
        q["integer_kernels"] = integer_kernels(model, settings)
    top = ", ".join(f"{r['group']} {r['harm']:.1e}" for r in record["groups"][:3])
    job.log(f"  most harmful: {top}")
    if not chosen.holds:
        broken = budget.check(steps[best].metrics)
        reject(job, f"Accuracy budget {budget} broken on the search's "
                    f"{len(selection.texts)} texts: {'; '.join(broken)}. That is the "
                    f"best reached, with {best} of {len(order)} int8 groups kept float "
                    f"({', '.join(kept) or 'none'}) within the size limit of "
                    f"{size_limit(max_bytes, settings.max_size_ratio, float_bytes)}"
                    + (f" (skipped for size: {', '.join(skipped)})" if skipped else "")
                    + ". Loosen the budget, raise quantization.max_size_ratio, or calibrate "
                      "on text closer to the evaluation text.")
    if kept:
        check_and_save(model, job.quantized_onnx)
    job.log(f"  budget {budget if budget.clauses else '(no clause judged here)'} holds with "
            f"{len(kept)} "
            f"group(s) kept float after "
            f"{len(steps)} scored graph(s): {rounded(chosen.metrics, 6)}")
