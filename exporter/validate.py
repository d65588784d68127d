"""Stage `validate`: the bundle's model against PyTorch float, on held-out text.

Measures what a user deciding whether to ship needs: accuracy (cosine of pooled sentence
embeddings to PyTorch float, per text; mean and minimum), batch-1 latency p50/p95 of the float
ONNX graph and of the quantized one, file sizes, and peak memory of a fresh process that loads
the model and runs a full batch. If the accuracy budget is broken the export stops here with
the numbers, and no bundle is written (the report goes to `<output>.rejected/`).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time

import numpy as np
import onnx

from runtime.model import usable_cores

from .budget import BudgetError, decimals, rounded
from .data import unlabelled_text
from .exact import exact_products, host_saturates, scores_exactly
from .feeds import encoder_batches, encoder_feeds, host_threads, ort_session, pad_batch, pool
from .graph_file import graph_bytes, graph_session
from .progress import progress
from .quantize import kib_to_mb
from .report import truncation_text, write_report
from .strength import limit_failures, limits_text
from .to_onnx import torch_output


def outputs(job, session, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-text output vectors of the session and of PyTorch float, (texts, dim) each:
    pooled sentence embeddings for feature-extraction, logits for text-classification."""
    ours, ref, order = [], [], []
    batches = encoder_batches(job.workdir / "tokenizer.json", texts, session,
                              max_length=job.max_length, batch_size=16)
    for indices, feeds in progress(batches, total=-(-len(texts) // 16),
                                   desc="validating (accuracy)"):
        reference = job.torch_model if job.reference_model is None else job.reference_model
        pair = session.run(None, feeds)[0], torch_output(reference, feeds)
        if job.pooling:
            pair = tuple(pool(x, feeds["attention_mask"], mode=job.pooling["mode"],
                              normalize=False) for x in pair)
        ours.append(pair[0])
        ref.append(pair[1])
        order += indices
    rows = np.argsort(order)   # the batches' order (by length) back to the texts'
    return np.concatenate(ours)[rows], np.concatenate(ref)[rows]


def truncation(job, texts: list[str], input_names: list[str]) -> dict:
    """How many of `texts` the bundle cuts at its max_length, and what the cut alone costs:
    the float model's cosine, cut against whole (at the model's own limit). Accuracy above
    compares the bundle with float on the same cut texts, which is the quantization's harm;
    this is the profile's max_sequence_length's."""
    from runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(job.workdir / "tokenizer.json")
    lengths = [len(ids) for ids in tokenizer.encode_batch(texts)]
    cut = [t for t, n in zip(texts, lengths, strict=True) if n > job.max_length]
    record = {"max_length": job.max_length, "model_max_length": job.model_max_length,
              "texts_cut": len(cut), "longest_tokens": max(lengths, default=0)}
    if cut and job.model_max_length > job.max_length:
        reference = job.torch_model if job.reference_model is None else job.reference_model
        rows = []
        for limit in (job.max_length, job.model_max_length):
            out = []
            for start in range(0, len(cut), 16):
                ids = tokenizer.encode_batch(cut[start:start + 16], max_length=limit)
                feeds = pad_batch(ids, pad_id=tokenizer.pad_id,
                                  input_names=input_names)
                x = torch_output(reference, feeds)
                out.append(pool(x, feeds["attention_mask"], mode=job.pooling["mode"],
                                normalize=False) if job.pooling else x)
            rows.append(np.concatenate(out))
        cos = cosine_rows(*rows)
        record["float_cosine_cut_vs_whole"] = {"mean": round(float(cos.mean()), 5),
                                               "min": round(float(cos.min()), 5)}
    return record


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def macro_f1(truth, predicted, classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in `truth` or `predicted`."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    scores = []
    for c in range(classes):
        tp = int(((truth == c) & (predicted == c)).sum())
        wrong = int(((truth == c) != (predicted == c)).sum())   # false positives + negatives
        if tp + wrong:
            scores.append(2 * tp / (2 * tp + wrong))
    return float(np.mean(scores)) if scores else 0.0


def classification_metrics(job, ours: np.ndarray, ref: np.ndarray, *,
                           utterances=()) -> dict[str, float]:
    """Agreement with float, and accuracy / macro-F1 of both when every text has a label
    (labels from `utterances`, by default the evaluation set; None: no labels)."""
    bundle_top, float_top = ours.argmax(axis=1), ref.argmax(axis=1)
    metrics = {"agreement": float((bundle_top == float_top).mean())}
    if utterances == ():
        utterances = job.evaluation
    labels = [u.intent for u in (utterances or [])[:len(ours)]] or [None]
    if all(label is not None for label in labels):
        truth = np.array([job.labels.index(label) for label in labels])
        float_right = int((float_top == truth).sum())
        bundle_right = int((bundle_top == truth).sum())
        metrics.update({
            "accuracy": bundle_right / len(truth),
            "float-accuracy": float_right / len(truth),
            # from whole counts: 100 * (0.95 - 0.94) is 1.0000000000000009, over a budget of 1
            "accuracy-drop": 100 * (float_right - bundle_right) / len(truth),
            "macro-f1": macro_f1(truth, bundle_top, len(job.labels)),
            "float-macro-f1": macro_f1(truth, float_top, len(job.labels)),
        })
    return metrics   # unrounded: budgets are checked on these (budget.rounded for records)


def cpu_target(target) -> bool:
    return target.runtime.execution_providers[0] == "CPUExecutionProvider"


def timed_on(target) -> str:
    """Where the export times the float graph and the bundle: this host's CPU, which is the
    device only where the export runs on it; for a target whose bundle runs on other
    execution providers, these are plainly not the device's timings."""
    import platform

    threads, wanted = host_threads(target), target.runtime.threads
    capped = f", the profile's {wanted} capped at this host's cores" if threads != wanted else ""
    where = f"this host's CPU ({platform.machine()}, {usable_cores()} cores, " \
            f"CPUExecutionProvider, {threads or 'all'} threads{capped})"
    if cpu_target(target):
        return where + ", not the target device unless the export ran on it"
    return where + f"; the target runs {target.runtime.execution_providers[0]}, so these " \
                   f"timings are not the device's speed"


def timing_rounds(target) -> int:
    """How many rounds validation times each graph in (latency_ms keeps the quietest): 3
    where the host's timing is the target's (a CPU target) or judges a latency budget, else
    1. A GPU target's bundle, run on this host's CPU, is timed for a figure the report says
    is not the device's: two more rounds of its float16 Q/DQ on the CPU were 11 s of a
    jetson export."""
    return 3 if cpu_target(target) or target.validation.max_latency_ms is not None else 1


# An export times each graph for at most this long per round (and no less than MIN_RUNS
# runs): a graph slow on this host took most of the export to time. A jetson bundle, float16
# and Q/DQ on the CPU, runs 196 ms a call here; 3 rounds of 20 warm-up and 66 timed runs were
# 50 s of its 3.8 min export, for a speed the report says is not the device's.
ROUND_SECONDS = 4.0
WARMUP_SECONDS = 1.0
MIN_RUNS = 10


def latency_ms(job, sessions: dict, texts: list[str], runs: int, rounds: int = 3, *,
               seconds: float | None = ROUND_SECONDS) -> dict[str, dict[str, float]]:
    """Batch-1 latency p50/p95 (ms) per session at natural length, cycling through `texts`,
    and how many runs were timed.

    Each session is warmed up and timed in its own block (ONNX Runtime's worker threads keep
    spinning after a call and would slow whatever is timed next), and the blocks are repeated
    `rounds` times, keeping each session's quietest round: a 2-core build machine is rarely
    idle, and a burst of other work should not decide the comparison. A round times
    runs // rounds runs, or as many as `seconds` allow (at least MIN_RUNS; None: all of them).
    """
    first = next(iter(sessions.values()))
    feeds = list(encoder_feeds(job.workdir / "tokenizer.json", texts[:50], first,
                               max_length=job.max_length))
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for name, session in sessions.items():
            started = time.perf_counter()
            for f in feeds[:20]:
                session.run(None, f)
                if seconds is not None and time.perf_counter() - started > WARMUP_SECONDS:
                    break
            times: list[float] = []
            started = time.perf_counter()
            for i in range(max(runs // rounds, MIN_RUNS)):
                if seconds is not None and len(times) >= MIN_RUNS \
                        and time.perf_counter() - started > seconds:
                    break
                run_started = time.perf_counter()
                session.run(None, feeds[i % len(feeds)])
                times.append((time.perf_counter() - run_started) * 1e3)
            result = {"p50": round(float(np.percentile(times, 50)), 3),
                      "p95": round(float(np.percentile(times, 95)), 3), "runs": len(times)}
            if name not in best or result["p50"] < best[name]["p50"]:
                best[name] = result
            time.sleep(0.05)  # let the spinning worker threads go idle
    return best


_MEMORY_PROBE = """
import resource, sys, numpy as np, onnxruntime as ort
opts = ort.SessionOptions(); opts.intra_op_num_threads = int(sys.argv[2])
s = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
batch, n = int(sys.argv[3]), int(sys.argv[4])
feeds = {i.name: np.ones((batch, n), np.int64) for i in s.get_inputs()}
s.run(None, feeds)
# VmHWM is per address space, so it starts afresh at exec; ru_maxrss would carry over the
# high-water mark of the (large, torch-holding) parent this process was forked from.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(model_path, *, threads: int, batch: int, seq: int) -> float:
    """Peak RSS (MB) of a new process that loads the graph and runs a batch of batch x seq
    (the profile's runtime.batch_size: what embed() runs on the device)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(model_path), str(threads),
                          str(batch), str(seq)], capture_output=True, text=True, check=True)
    return round(kib_to_mb(int(out.stdout.split()[-1])), 1)


EXCERPT_CHARS = 200   # of a text the manifest and report quote


def excerpt(text: str) -> dict[str, str | int]:
    """{"text": `text`}, or its first EXCERPT_CHARS characters and its length where longer:
    a 2 MB evaluation line among the worst texts went whole into manifest.json (read at
    every runtime.load) and both reports."""
    if len(text) <= EXCERPT_CHARS:
        return {"text": text}
    return {"text": text[:EXCERPT_CHARS] + "…", "chars": len(text)}


def sizes(job) -> dict[str, int | float]:
    """validation.size_bytes: the bundle's model file against the float graph, and, where
    compressed, against the original model too (its parameters in float32): the float
    graph is then the compressed model's, so it alone hides what compression saved."""
    float_bytes = graph_bytes(job.float_onnx)   # with their external data, if any
    # as shipped: a staged bundle's stage files (each with the small tensors it recomputes;
    # ~200 bytes from the single graph either way), which the size budget is checked on
    quant_bytes = sum(graph_bytes(job.workdir / "stages" / s["file"]) for s in job.stages) \
        if getattr(job, "stages", None) else graph_bytes(job.quantized_onnx)
    size: dict[str, int | float] = {"float_onnx": float_bytes, "bundle_model": quant_bytes,
                                    "ratio": round(quant_bytes / float_bytes, 4)}
    model = job.records.get("model", {})
    if "parameters_after_compression" in model:
        size["original_float32"] = 4 * model["parameters"]
        size["ratio_to_original"] = round(quant_bytes / size["original_float32"], 4)
    return size


def size_text(size: dict) -> str:
    """"model 23.6 MB (26% of float)", with the original's share where compressed."""
    text = f"model {size['bundle_model'] / 1e6:.1f} MB ({100 * size['ratio']:.0f}% of float"
    if "original_float32" in size:
        text += (f"; {100 * size['ratio_to_original']:.0f}% of the original's "
                 f"{size['original_float32'] / 1e6:.1f} MB before compression")
    return text + ")"


def validate(job) -> None:
    """Stage: fill job.records["validation"]; raise BudgetError if the budget is broken."""
    settings = job.target.validation
    texts = [u.text for u in job.evaluation]   # default sets hold eval_samples texts
    if not texts:
        raise ValueError("Validation needs at least one evaluation text; the set is empty.")
    threads, batch = host_threads(job.target), job.target.runtime.batch_size
    float_session = ort_session(job.float_onnx, threads=threads)
    quant_session = ort_session(job.quantized_onnx, threads=threads)
    # Accuracy as the device computes it: where this host's integer products saturate and
    # the device's do not, on the bundle's exact twin (exact.py); latency is the bundle's.
    exact = scores_exactly(job.target)
    scored = (graph_session(exact_products(onnx.load(job.quantized_onnx)), threads=threads)
              if exact else quant_session)

    ours, ref = outputs(job, scored, texts)
    cos = cosine_rows(ours, ref)
    measured = {"cosine": float(cos.mean()), "min-cosine": float(cos.min())}
    if job.task == "text-classification":
        measured.update(classification_metrics(job, ours, ref))
    metrics = rounded(measured, budget=job.budget)
    size = sizes(job)
    quant_bytes = size["bundle_model"]
    rounds = timing_rounds(job.target)
    timed = latency_ms(job, {"float": float_session, "bundle": quant_session}, texts,
                       settings.latency_runs, rounds)
    float_latency, quant_latency = timed["float"], timed["bundle"]
    record = {
        "eval_texts": len(texts),
        "eval_data": job.records.get("eval_source", "smart-home utterances"),
        **({"eval_texts_in_calibration": job.records["eval_texts_in_calibration"]}
           if "eval_texts_in_calibration" in job.records else {}),
        "metrics": metrics,
        **({"unlabelled": unlabelled_text(job.evaluation)}
           if job.task == "text-classification" and "accuracy" not in metrics else {}),
        "cosine_percentiles": {p: round(float(np.percentile(cos, p)), 5) for p in (1, 5, 50)},
        "cosine_histogram": cosine_histogram(cos),
        "worst_texts": [{**excerpt(texts[i]), "cosine": round(float(cos[i]), 5)}
                        for i in np.argsort(cos)[:5]],
        "truncation": truncation(job, texts, [i.name for i in float_session.get_inputs()]),
        "budget": str(job.budget),
        # an fp16-only bundle has none to describe
        **({"integer_products": integer_products(exact)}
           if job.target.precision == "int8" else {}),
        "latency_ms_batch1": {"float_onnx": float_latency, "bundle": quant_latency,
                              "ratio_p50": round(quant_latency["p50"] / float_latency["p50"], 3),
                              "rounds": rounds, "round_seconds": ROUND_SECONDS,
                              "timed_on": timed_on(job.target)},
        "size_bytes": size,
        "peak_rss_mb": {
            # on the device's threads: each holds its own buffers (a process of its own, so
            # no contention with this one to avoid)
            "float_onnx": peak_rss_mb(job.float_onnx, threads=job.target.runtime.threads,
                                      batch=batch, seq=job.max_length),
            "bundle": peak_rss_mb(job.quantized_onnx, threads=job.target.runtime.threads,
                                  batch=batch, seq=job.max_length),
            "what": f"new process: load the graph, run a batch of {batch} x {job.max_length} "
                    f"tokens (runtime.batch_size x max_sequence_length)",
            "exporter": round(kib_to_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1),
        },
    }
    inaccurate, over = job.budget.check(measured), []
    if settings.max_model_mb is not None or settings.max_latency_ms is not None:
        over = limit_failures(settings, model_bytes=quant_bytes, latency_ms=quant_latency["p50"])
        record["size_latency_budget"] = {"budget": limits_text(settings), "holds": not over,
                                         "model_mb": round(quant_bytes / 1e6, decimals(
                                             quant_bytes / 1e6, [settings.max_model_mb]
                                             if settings.max_model_mb is not None else [], 3)),
                                         "latency_ms_p50": quant_latency["p50"]}
    broken = inaccurate + over
    record["accuracy_budget_holds"] = not inaccurate
    record["budget_holds"] = not broken   # accuracy, and size / latency where set
    job.records["validation"] = record
    if "agreement" in metrics:
        job.log(f"  top-1 agreement with float {100 * metrics['agreement']:.2f}%"
                + (f"; accuracy {100 * metrics['accuracy']:.2f}% (float "
                   f"{100 * metrics['float-accuracy']:.2f}%), macro-F1 "
                   f"{100 * metrics['macro-f1']:.2f} (float {100 * metrics['float-macro-f1']:.2f})"
                   if "accuracy" in metrics else
                   f"; no accuracy: {record.get('unlabelled', 'no labels')}"))
    job.log(f"  cosine to PyTorch float: mean {metrics['cosine']:.4f}, min "
            f"{metrics['min-cosine']:.4f} on {len(texts)} texts; latency p50 "
            f"{quant_latency['p50']:.2f} ms vs float {float_latency['p50']:.2f} ms"
            f" ({'this host' if cpu_target(job.target) else 'host CPU, not the target device'}); "
            f"{size_text(size)}" + ("; accuracy as the device computes it (exact integer "
                                    "products, which this host's CPU saturates)" if exact else ""))
    if record["truncation"]["texts_cut"]:
        job.log(f"  warning: {truncation_text(record['truncation'], len(texts))}")
    if broken:
        search = job.records.get("sensitivity", {}).get("search")
        held = f" The sensitivity search held it on {search['data'].split(' (')[0]}, not on " \
               f"these held-out texts: calibrate on more text like them, or loosen the " \
               f"budget." if inaccurate and search and search["steps"] \
            and search["steps"][-1]["holds"] else ""
        which = " and ".join([*([f"accuracy budget {job.budget}"] if inaccurate else []),
                              *([f"size / latency budget {limits_text(settings)}"]
                                if over else [])])
        reject(job, f"{which[0].upper()}{which[1:]} broken on {len(texts)} evaluation texts: "
                    f"{'; '.join(broken)}.{held}")


def cosine_histogram(cos: np.ndarray, bins: int = 40) -> dict:
    """Counts of per-text cosines in `bins` equal bins from the lowest to 1 (the report's
    plot: where the tail lies reads better there than in percentiles)."""
    cos = np.minimum(cos.astype(np.float64), 1.0)
    cos = cos[np.isfinite(cos)]   # (a NaN breaks the budget; the plot shows the rest)
    low = min(float(cos.min(initial=1.0)), 1.0 - 1e-4)   # fp16 bundles: every text within 1e-5 of 1
    counts, edges = np.histogram(cos, bins=bins, range=(low, 1.0))
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}


def integer_products(exact: bool) -> str:
    """How the accuracy above multiplied int8 (exact.py), for the report."""
    if exact:
        return ("exact, as the device makes them: this x86 host (no VNNI) saturates u8 x s8, "
                "so accuracy is of the bundle's uint8-weight twin")
    if host_saturates():
        return ("as ONNX Runtime computes them on this host, whose x86 CPU (no VNNI) saturates "
                "u8 x s8: so will a device with such a CPU, not one with VNNI or aarch64")
    return "as ONNX Runtime computes them on this host (exact: no saturation here)"


def reject(job, message: str) -> None:
    """Write the report to `<output>.rejected/` and raise BudgetError(message)."""
    rejected = job.output.with_name(job.output.name + ".rejected")
    write_report(job, rejected)
    raise BudgetError(f"{message} No bundle written; the report is in {rejected}/.")
