"""Stage `choose_strength`: the weakest compression whose int8 model meets the profile's size
and latency budget (`validation.max_model_mb`, `max_latency_ms`) within the accuracy budget.

Runs after `load` and before `compress`, only when one of the two is set. It climbs a ladder
of compression strengths (`ladder`), weakest first. Each candidate goes through the exporter's
own stages on a copy of the loaded model (compress, with healing when --heal-steps was given;
export_onnx, optimize, smooth, quantize, to_float16: every weight MatMul int8, no sensitivity
search and no calibration comparison, which is what keeps a rung to seconds) and is measured:
model bytes; batch-1 latency p50 on calibration utterances at their natural length (best of 3
rounds, as validation times); the accuracy budget's metrics against the ORIGINAL float model
on the selection texts (score.selection_texts: calibration texts, so that validation's
evaluation texts stay unseen by every choice). The first rung meeting all three becomes
`job.compression`; the normal stages then build it again, run the sensitivity search (capped
at the size budget), validate (which checks size and latency once more on the final bundle)
and bundle it.

The rungs are cumulative: each removes what the one before removed and more (layer importance
and neuron scores are measured once per model, so a larger cut keeps the smaller one's choice).
A rung whose compression alone (its float graph) breaks the accuracy budget therefore ends the
climb; stronger rungs only lose more. A rung whose full-int8 graph breaks it while its float
graph holds gets the real sensitivity search, as the final export would.
A budget no rung meets raises BudgetError with the smallest and fastest candidates reached and
their accuracy, before anything is written.

    >>> export("minilm", target="arm-cpu", max_model_mb=20, accuracy_budget="cosine>=0.8")
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time

from .budget import Budget, decimals, rounded, significant
from .compress import Compression, layer_list, parameters

# The ladder, after the first rung (nothing removed): drop layers one by one (by measured
# importance) up to half of them, then prune the remaining layers' FFN neurons, then their
# attention heads. Beyond half the layers, dropping one more costs more quality per MB than
# pruning what is left (bench_compression: drop 3 + ffn 0.5 healed keeps the intent
# classifier within 2 points; dropping 4 of 6 layers leaves 2).
FFN_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75)
HEAD_FRACTIONS: tuple[float, ...] = (0.25, 0.5)

# Latency of a candidate: timed batch-1 runs (spread over 3 rounds, best round's p50 kept).
LATENCY_RUNS = 90

MB = 1e6

# The verdict of rung 0 (nothing removed) when its float graph already breaks the budget.
FLOAT_BREAKS = "the float model itself breaks the accuracy budget"


def ladder(layers: int, *, heal_steps: int = 0, keep: int = 1) -> list[Compression]:
    """Compression strengths for a `layers`-layer encoder, weakest first, each cumulative;
    no rung leaves fewer than `keep` layers (one per pipeline stage).

        >>> [describe(c) for c in ladder(4)][:4]
        ['none', 'drop 1', 'drop 2', 'drop 2 + ffn 0.25']
    """
    top = max(0, min(layers // 2, layers - keep))
    rungs = [{"drop_layers": k} for k in range(top + 1)]
    rungs += [{"drop_layers": top, "prune_ffn": f} for f in FFN_FRACTIONS]
    rungs += [{"drop_layers": top, "prune_ffn": FFN_FRACTIONS[-1], "prune_heads": h}
              for h in HEAD_FRACTIONS]
    return [Compression(**r, heal_steps=heal_steps if i else 0) for i, r in enumerate(rungs)]


def describe(c: Compression) -> str:
    parts = [f"drop {c.drop_layers}" if c.drop_layers else "",
             f"ffn {c.prune_ffn:g}" if c.prune_ffn else "",
             f"heads {c.prune_heads:g}" if c.prune_heads else ""]
    text = " + ".join(p for p in parts if p) or "none"
    return text + (f" (healed {c.heal_steps})" if c.heal_steps else "")


def limits_text(settings) -> str:
    """The size / latency budget as words: "model <= 15 MB, latency <= 0.5 ms"."""
    parts = []
    if settings.max_model_mb is not None:
        parts.append(f"model <= {settings.max_model_mb:g} MB")
    if settings.max_latency_ms is not None:
        parts.append(f"latency <= {settings.max_latency_ms:g} ms")
    return ", ".join(parts)


def limit_failures(settings, *, model_bytes: int, latency_ms: float) -> list[str]:
    """One line per broken size / latency limit; empty when both hold (or none is set)."""
    broken = []
    if settings.max_model_mb is not None and model_bytes > settings.max_model_mb * MB:
        broken.append(f"model {megabytes(model_bytes, settings.max_model_mb)} MB, above the "
                      f"budget of {settings.max_model_mb:g} MB")
    if settings.max_latency_ms is not None and latency_ms > settings.max_latency_ms:
        broken.append(f"latency p50 {milliseconds(latency_ms, settings.max_latency_ms)} ms, "
                      f"above the budget of {settings.max_latency_ms:g} ms")
    return broken


def megabytes(model_bytes: int, limit: float | None) -> str:
    """`model_bytes` in MB to 2 decimals, or as many more as keep it on its side of `limit`
    (a model 1 byte over 15 MB is "15.000001", not "15.00 MB, above the budget of 15 MB")."""
    mb = model_bytes / MB
    return f"{mb:.{decimals(mb, [] if limit is None else [limit], 2)}f}"


def milliseconds(latency_ms: float, limit: float | None) -> str:
    """`latency_ms` to 3 decimals, or as many more as keep it on its side of `limit`."""
    return f"{latency_ms:.{decimals(latency_ms, [] if limit is None else [limit], 3)}f}"


def _candidate(job, compression: Compression, index: int):
    """A copy of `job` (its own model copy and work directory) set to build `compression`
    quietly and quickly: full int8, no calibration comparison."""
    workdir = job.workdir / "strength" / str(index)
    workdir.mkdir(parents=True)
    shutil.copyfile(job.workdir / "tokenizer.json", workdir / "tokenizer.json")
    quantization = dataclasses.replace(job.target.quantization, compare_calibration=False)
    return dataclasses.replace(
        job, workdir=workdir, target=dataclasses.replace(job.target, quantization=quantization),
        compression=compression, torch_model=copy.deepcopy(job.torch_model),
        reference_model=None, records={"model": dict(job.records["model"])}, timings={},
        stages=[], output=workdir / "bundle", log=lambda line: None)


def _build(candidate) -> None:
    from .compress import compress
    from .float16 import to_float16
    from .optimize import optimize
    from .quantize import quantize
    from .smooth import smooth
    from .tensorrt import check_rules
    from .to_onnx import export_onnx

    # to check_rules, as the export builds it: TensorRT's DQ copies count in the size
    for stage in (compress, export_onnx, optimize, smooth, quantize, to_float16, check_rules):
        stage(candidate)


def _recover(candidate) -> str:
    """The sensitivity search on a candidate whose full-int8 graph breaks the accuracy budget
    while its float graph holds it; returns what it did."""
    from .float16 import to_float16
    from .sensitivity import sensitivity
    from .tensorrt import check_rules
    from .validate import BudgetError

    candidate.quantized_onnx = candidate.workdir / "model.onnx"   # quantize's, not fp16's
    try:
        sensitivity(candidate)
    except BudgetError:
        return "sensitivity search could not recover it within the size limit"
    to_float16(candidate)
    check_rules(candidate)
    kept = len(candidate.records["quantization"].get("kept_float_for_accuracy", []))
    return f"sensitivity search: {kept} group(s) kept float"


def check_size_floor(job) -> None:
    """Refuse, before any rung is built, a max_model_mb below what the word embeddings alone
    take in the bundle: no rung removes a row of them (9 rungs, 6 minutes on 2 cores, ended
    in "too large" on every one)."""
    limit = job.target.validation.max_model_mb
    if limit is None:
        return
    rows, width = job.torch_model.get_input_embeddings().weight.shape
    int8 = job.target.precision == "int8" and job.target.quantization.embeddings == "int8-rows"
    floor = rows * width + rows * 4 if int8 else rows * width * 2   # float: float16 at least
    if floor > limit * MB:
        raise ValueError(f"max_model_mb {limit:g} is below the {floor / MB:.1f} MB the word "
                         f"embeddings alone take ({rows} x {width}, "
                         f"{'int8 rows' if int8 else 'float16 at least'}), which no "
                         f"compression strength "
                         f"removes; raise it above that.")


def check_latency_floor(job, threads: int) -> None:
    """Refuse, before any rung is built, a max_latency_ms below what onnxruntime takes to run
    a graph of one Identity node on this host, with the threads the rungs are timed with:
    its per-call overhead, which no compression strength removes (1e-6 ms climbed the whole
    ladder, minutes on 2 cores, to end in "too slow" on every rung)."""
    limit = job.target.validation.max_latency_ms
    if limit is None:
        return
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])
    out = helper.make_tensor_value_info("out", TensorProto.INT64, [1, None])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["out"])],
                              "floor", [ids], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.ones((1, 16), np.int64)}
    times = []
    for _ in range(200):
        started = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - started) * 1e3)
    floor = sorted(times)[len(times) // 10]   # a fast run: a floor, not a typical time
    if limit < floor:
        raise ValueError(f"max_latency_ms {limit:g} is below the {floor:.4f} ms onnxruntime "
                         f"takes on this host to run a graph of one Identity node, which no "
                         f"compression strength removes; raise it above that.")


def choose_strength(job) -> None:
    """Stage: set job.compression to the weakest ladder rung that meets the size / latency
    budget and the accuracy budget; record every rung measured. Nothing when no budget."""
    import onnx

    from .feeds import ort_session
    from .graph_file import graph_bytes
    from .score import Scorer, selection_texts
    from .validate import BudgetError, host_threads, latency_ms

    settings = job.target.validation
    if settings.max_model_mb is None and settings.max_latency_ms is None:
        return
    check_size_floor(job)
    threads = host_threads(job.target)
    check_latency_floor(job, threads)
    texts, described = selection_texts(job)
    heal_steps = job.compression.heal_steps if job.compression else 0
    rungs = ladder(len(layer_list(job.torch_model)), heal_steps=heal_steps,
                   keep=job.target.runtime.pipeline_stages)
    latency_texts = [u.text for u in job.calibration[:50]]
    job.log(f"  size / latency budget {limits_text(settings)}, accuracy budget {job.budget}: "
            f"up to {len(rungs)} strengths, weakest first")

    def measure(candidate):
        path = candidate.quantized_onnx
        session = ort_session(path, threads=threads)
        latency = latency_ms(candidate, {"c": session}, latency_texts, LATENCY_RUNS)["c"]["p50"]
        return graph_bytes(path), latency, scorer.score(onnx.load(path))

    scorer, rows, chosen, unjudged = None, [], None, []
    # what a candidate is before any sensitivity search: int8 wherever it can be, or, with
    # --precision fp16, float16 (no int8 anywhere)
    plain = "full int8" if job.target.precision == "int8" else "float16, no int8"
    for index, compression in enumerate(rungs):
        started = time.perf_counter()
        candidate = _candidate(job, compression, index)
        _build(candidate)
        if scorer is None:   # rung 0 is the original model: its float graph is the reference
            scorer = Scorer(candidate, texts, threads=threads)
            budget, unjudged = scorer.search_budget()
            for note in unjudged:
                job.log(f"  left to validation: {note}")
        model_bytes, latency, metrics = measure(candidate)
        row = {"rung": index, "strength": describe(compression),
               "compression": dataclasses.asdict(compression),
               "layers": candidate.torch_model.config.num_hidden_layers,
               "parameters": parameters(candidate.torch_model), "quantized": plain}
        compression_breaks = False
        if budget.check(metrics):   # is it the compression, or the int8?
            float_metrics = scorer.score(onnx.load(candidate.float_onnx))
            row["float_metrics"] = rounded(float_metrics, 6, job.budget)
            compression_breaks = bool(budget.check(float_metrics))
            if not compression_breaks:
                row["quantized"] = _recover(candidate)
                if "kept float" in row["quantized"]:
                    model_bytes, latency, metrics = measure(candidate)
        over = limit_failures(settings, model_bytes=model_bytes, latency_ms=latency)
        broken = budget.check(metrics)
        verdict = ("fits" if not over and not broken else "; ".join(
            [*([FLOAT_BREAKS if not compression.active else
                "compression alone breaks the accuracy budget"] if compression_breaks else
               ["accuracy budget broken"] if broken else []),
             *(["too large"] if any("MB" in o for o in over) else []),
             *(["too slow"] if any(" ms" in o for o in over) else [])]))
        rows.append({**row, "model_bytes": model_bytes, "latency_ms_p50": latency,
                     "metrics": rounded(metrics, 6, job.budget), "verdict": verdict,
                     "seconds": round(time.perf_counter() - started, 1)})
        job.log(f"  [{index + 1}/{len(rungs)}] {describe(compression)}: "
                f"{row['parameters'] / 1e6:.2f}M params, "
                f"{megabytes(model_bytes, settings.max_model_mb)} MB, "
                f"{milliseconds(latency, settings.max_latency_ms)} ms, "
                f"{_metrics_text(metrics, job.budget)} ({row['quantized']}) "
                f"-> {verdict} ({rows[-1]['seconds']:.0f} s)")
        del candidate
        shutil.rmtree(job.workdir / "strength" / str(index), ignore_errors=True)
        if verdict == "fits":
            chosen = compression
            break
        if compression_breaks:   # cumulative ladder: every stronger rung removes more
            break
    record = {"budget": limits_text(settings),
              "limits": {"max_model_mb": settings.max_model_mb,
                         "max_latency_ms": settings.max_latency_ms},
              "accuracy_budget": str(job.budget),
              "accuracy_metrics": [c.metric for c in job.budget.clauses],
              **({"left_to_validation": unjudged} if unjudged else {}),
              "ladder": [describe(c) for c in rungs], "candidates": rows,
              "how": "each candidate compressed (and healed, if asked) from the loaded model, "
                     f"exported and made {plain} (the sensitivity search only where full "
                     "int8 broke the accuracy budget and the float graph did not); size of "
                     "the model file; latency batch-1 p50 on calibration utterances, best of "
                     f"3 rounds; accuracy against the original float model on "
                     f"{described}",
              "chosen": describe(chosen) if chosen else None}
    job.records["strength"] = record
    if chosen is None:
        raise BudgetError(_unreachable(record, rows, job, stopped=len(rows) < len(rungs)))
    job.compression = chosen if chosen.active else None
    job.log(f"  chose {describe(chosen)}: the weakest strength within {limits_text(settings)} "
            f"and {job.budget}")


def _metrics_text(metrics: dict, budget) -> str:
    """The budget's metrics in words, each with the digits that keep it on its side of its
    bounds: "cosine 0.999, min-cosine 0.9799996" (not 0.98) under min-cosine>=0.98."""
    names = [c.metric for c in budget.clauses]
    return ", ".join(f"{k} {significant(metrics[k], budget.bounds(k))}" for k in names
                     if k in metrics)


def _unreachable(record: dict, rows: list[dict], job, *, stopped: bool) -> str:
    smallest = min(rows, key=lambda r: r["model_bytes"])
    fastest = min(rows, key=lambda r: r["latency_ms_p50"])

    def line(r):
        return (f"{r['strength']}: {r['model_bytes'] / MB:.2f} MB, {r['latency_ms_p50']:.3f} "
                f"ms, {_metrics_text(r['metrics'], job.budget)} ({r['verdict']})")

    best = f"smallest reached {line(smallest)}" + (
        f"; fastest reached {line(fastest)}" if fastest is not smallest else "")
    if rows[-1]["verdict"].startswith(FLOAT_BREAKS):
        # rung 0 removes nothing: no strength, healing or size budget can help
        r = rows[-1]
        return (f"Size / latency budget {record['budget']} cannot be met within the accuracy "
                f"budget {record['accuracy_budget']}: the float model itself breaks the "
                f"accuracy budget, before any compression or int8 (float "
                f"{_metrics_text(r['float_metrics'], job.budget)}; {r['quantized']} "
                f"{_metrics_text(r['metrics'], job.budget)}), so no strength can meet it. "
                f"Loosen the accuracy budget. No bundle written.")
    why = (f"stopped at '{rows[-1]['strength']}', whose compression alone breaks the accuracy "
           f"budget (stronger rungs remove more)" if stopped
           else f"all {len(rows)} strengths tried")
    advice = ("Raise max_model_mb / max_latency_ms, loosen the accuracy budget, or heal the "
              "candidates (--heal-steps)" if any("accuracy" in r["verdict"] for r in rows)
              else "Every strength tried held the accuracy budget, so loosening it or healing "
                   "cannot help: raise max_model_mb / max_latency_ms")
    return (f"Size / latency budget {record['budget']} cannot be met within the accuracy "
            f"budget {record['accuracy_budget']}: {best}. {why.capitalize()}. {advice}. No "
            f"bundle written.")


def strength_lines(record: dict | None) -> list[str]:
    """The report's section on the size / latency budget search (markdown lines)."""
    if not record:
        return []
    lines = [f"## Size / latency budget: {record['budget']}", "",
             f"Accuracy budget `{record['accuracy_budget']}`. Chosen: "
             f"**{record['chosen'] or 'none met the budget'}**. Ladder (weakest first, "
             f"cumulative): {', '.join(record['ladder'])}. {record['how'].capitalize()}.", "",
             "| strength | layers | params (M) | model (MB) | latency p50 (ms) | accuracy | "
             "quantized | verdict |", "|---|---|---|---|---|---|---|---|"]
    budget = Budget.parse(record["accuracy_budget"])
    limits = record.get("limits", {})   # reports written before it had none
    for r in record["candidates"]:
        accuracy = _metrics_text(r["metrics"], budget)
        lines.append(f"| {r['strength']} | {r['layers']} | {r['parameters'] / 1e6:.2f} | "
                     f"{megabytes(r['model_bytes'], limits.get('max_model_mb'))} | "
                     f"{milliseconds(r['latency_ms_p50'], limits.get('max_latency_ms'))} | "
                     f"{accuracy} | {r['quantized']} | {r['verdict']} |")
    lines.append("")
    if record.get("left_to_validation"):
        lines += [*(f"Left to validation: {note}." for note in record["left_to_validation"]),
                  ""]
    return lines
