"""Six ways to run a sentence encoder (and, with --classifier, an intent classifier) on a CPU,
side by side, in one run.

    python benchmarks/bench_encoder.py [--model minilm] [--target arm-cpu] [--threads 2]
    python benchmarks/bench_encoder.py --classifier build/intent-model   # + a second table

Every variant comes from the same checkpoint, the same float ONNX graph (the one the exporter
writes) and the same calibration texts:

    PyTorch eager fp32      transformers AutoModel (AutoModelForSequenceClassification)
    ORT fp32                the exporter's float ONNX graph in ONNX Runtime
    ORT dynamic int8        onnxruntime.quantization.quantize_dynamic on that graph
    Optimum static int8     optimum's ORTQuantizer, the target's static preset, minmax
    ORT quantize_static     onnxruntime.quantization.quantize_static, every default (every op)
    our bundle              built by the exporter's own pipeline (export wall time recorded)

Encoder, per variant: model file size; cosine of pooled sentence embeddings (the model's
pooling: mean + L2 norm for all-MiniLM-L6-v2) to PyTorch fp32 on held-out smart-home
utterances, mean and minimum; latency at batch 1 (each text at its natural length, p50/p95),
batch 1 at 128 tokens (p50) and batch 32 (texts padded to the longest of each batch, mean ms
per batch).

Classifier (a directory written by samples/train_intents.py): the same six variants of the
fine-tuned model, built the same way for task text-classification, our bundle validated on the
directory's test.jsonl. Per variant: size; test accuracy and macro-F1 against the test.jsonl
labels; top-1 agreement with PyTorch fp32; latency at batch 1 (p50) and batch 32. Only what is
compared differs from the encoder: logits -> argmax instead of pooled embeddings -> cosine.

It prints a table per model and writes benchmarks/results/bench_encoder.json (the classifier
in its "classifier" section).

Timing: the same thread count everywhere, and every ONNX Runtime session is built the way the
runtime builds a bundle's (`runtime.model.ort_session`). Each variant is warmed up and timed in
its own block, never interleaved with another: ONNX Runtime's (and PyTorch's) worker threads
keep spinning for a while after a call and would steal the cores of whatever runs next, so
blocks are also separated by a pause that lets them park. The whole timing pass runs
`--rounds` times; the table shows each figure's best round (the least disturbed one on a
shared machine), the JSON every round, and the spread between rounds says how repeatable the
figures are on this machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import _args as argtypes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_encoder.json"

# Latency scenario -> (warm-up calls, timed calls, statistics reported). Sized so that a
# figure moves by a few percent at most between rounds on a quiet 2-core machine while a whole
# run stays within a few minutes (PyTorch fp32, the slowest, takes about 7 s per round). A
# figure is named "<scenario>_<statistic>" (b1_p50, b32_mean) in the table and the JSON.
SCENARIOS: dict[str, tuple[int, int, tuple[str, ...]]] = {
    "b1": (30, 600, ("p50", "p95")),  # batch 1, timed texts at natural length (2 passes over 300)
    "b1_128": (5, 100, ("p50",)),     # batch 1, one long text truncated to exactly 128 tokens
    "b32": (3, 36, ("mean",)),        # batch 32, consecutive timed texts padded per batch
}                                     #   (4 passes over 9 batches)
STATISTICS: dict[str, Callable[[np.ndarray], float]] = {
    "p50": lambda ms: float(np.percentile(ms, 50)),
    "p95": lambda ms: float(np.percentile(ms, 95)),
    "mean": lambda ms: float(ms.mean()),
}
SETTLE_S = 1.0     # pause before each timing block, so the previous variant's threads park
BATCH = 32
LONG_TOKENS = 128
EVAL_TEXTS = 300   # the encoder's held-out smart-home utterances
TIMED_TEXTS = 300  # latency cycles through the first 300 eval texts (the classifier has 800)

# Target name -> Optimum's static preset (an AutoQuantizationConfig method). The two presets
# write byte-identical files today; a user's own profile gets arm64.
OPTIMUM_PRESETS: dict[str, str] = {"arm-cpu": "arm64", "x86-server": "avx512_vnni"}

# The dynamic int8 peer, the strongest of the four settings measured on MiniLM (2 threads,
# quiet 2-core x86, batch 1 p50 vs ORT fp32 2.0 ms):
#   MatMul,          per-tensor   58.7 MB  cosine 0.966 / min 0.82  1.07-1.13 ms
#   MatMul,          per-channel  58.7 MB  cosine 0.993 / min 0.96  1.24-1.29 ms
#   MatMul + Gather, per-tensor   22.8 MB  cosine 0.966 / min 0.80  1.06-1.16 ms
#   MatMul + Gather, per-channel  22.9 MB  cosine 0.992 / min 0.96  1.11-1.18 ms  <- this one
# Per-channel weight scales are what lift accuracy to our bundle's level; quantizing the
# embedding Gather (int8 table, only the gathered rows dequantized) brings the file to our
# bundle's size at no cost in speed. Anything weaker would flatter the bundle.
DYNAMIC_SETTINGS = {"op_types_to_quantize": ["MatMul", "Gather"], "per_channel": True}


# ---------------------------------------------------------------------------------- inputs


@dataclass
class Workload:
    """Int64 feeds for every measurement, one dict per call, keyed by graph input name.
    Latency scenarios read the field of their name (SCENARIOS)."""

    b1: list[dict]           # one timed text each, natural length: (1, seq)
    b1_128: list[dict]       # one text of exactly 128 tokens: (1, 128)
    b32: list[dict]          # full batches of 32 consecutive timed texts: (32, longest)
    accuracy: list[dict]     # every eval text, batches of 32 (the last may be smaller)
    calibration: list[dict]  # calibration texts, natural length: (1, seq)


def build_workload(tokenizer_json: Path, *, eval_texts: list[str], calibration_texts: list[str],
                   input_names: list[str], max_length: int) -> Workload:
    """Tokenize with the runtime's tokenizer and pad with its `pad_batch`, as on the device.
    Accuracy covers every eval text; latency the first TIMED_TEXTS of them."""
    from runtime.model import pad_batch
    from runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_json)

    def feeds(rows: list[list[int]]) -> dict:
        return pad_batch(rows, pad_id=tokenizer.pad_id, input_names=input_names)

    def chunks(rows: list[list[int]]) -> list[list[list[int]]]:
        return [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]

    ids = tokenizer.encode_batch(eval_texts, max_length=max_length)
    timed = ids[:TIMED_TEXTS]
    long = tokenizer.encode(". ".join(eval_texts), max_length=LONG_TOKENS)
    assert len(long) == LONG_TOKENS, "the eval texts joined should exceed 128 tokens"
    calibration = tokenizer.encode_batch(calibration_texts, max_length=max_length)
    return Workload(b1=[feeds([row]) for row in timed],
                    b1_128=[feeds([long])],
                    b32=[feeds(chunk) for chunk in chunks(timed) if len(chunk) == BATCH],
                    accuracy=[feeds(chunk) for chunk in chunks(ids)],
                    calibration=[feeds([row]) for row in calibration])


# -------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One way of running the model: what it stores and how it turns feeds into outputs."""

    files: list[Path]                    # what a device stores (sized in the table)
    run: Callable[[dict], np.ndarray]    # feeds -> the graph's first output: token states
    note: str                            #   (batch, seq, hidden) or logits (batch, labels)


@dataclass
class Context:
    """What the variant builders share."""

    model_dir: Path          # the Hugging Face checkpoint
    task: str                # feature-extraction or text-classification (exporter.load.TASKS)
    target: object           # targets.Target
    threads: int
    spinning: bool
    workdir: Path            # temporary, one per benchmarked model; removed at the end
    float_onnx: Path         # the exporter's float graph
    bundle_model: Path       # our bundle's model.onnx
    calibration: list[dict]  # calibration feeds, batch 1 at natural length
    budget_error: str = ""   # set when our export broke its accuracy budget


def ort_runner(path: Path, ctx: Context) -> Callable[[dict], np.ndarray]:
    """Run any graph the way the runtime runs a bundle (runtime.model.ort_session)."""
    from runtime.model import ort_session

    session = ort_session(path, threads=ctx.threads, spinning=ctx.spinning)
    names = [i.name for i in session.get_inputs()]
    output = session.get_outputs()[0].name  # last_hidden_state or logits

    def run(feeds: dict) -> np.ndarray:
        return session.run([output], {n: feeds[n] for n in names})[0]

    return run


def onnx_files(path: Path) -> list[Path]:
    """The graph file and any external-data files beside it."""
    return [path, *sorted(path.parent.glob(path.name + ".data*"))]


def pytorch_fp32(ctx: Context) -> Variant:
    import torch
    import transformers

    from exporter.load import TASKS
    from exporter.to_onnx import torch_output

    torch.set_num_threads(ctx.threads)
    auto_class = TASKS[ctx.task]  # the class the exporter loads for this task
    model = getattr(transformers, auto_class).from_pretrained(ctx.model_dir).eval()
    weights = sorted(ctx.model_dir.glob("*.safetensors")) or sorted(ctx.model_dir.glob("*.bin"))
    return Variant(weights, lambda feeds: torch_output(model, feeds),
                   note=f"transformers {auto_class}, torch {torch.__version__}")


def ort_fp32(ctx: Context) -> Variant:
    return Variant(onnx_files(ctx.float_onnx), ort_runner(ctx.float_onnx, ctx),
                   note="the exporter's float graph (optimum-onnx export)")


def ort_dynamic_int8(ctx: Context) -> Variant:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = ctx.workdir / "dynamic" / "model.onnx"
    out.parent.mkdir()
    quantize_dynamic(ctx.float_onnx, out, weight_type=QuantType.QInt8, **DYNAMIC_SETTINGS)
    ops = " + ".join(DYNAMIC_SETTINGS["op_types_to_quantize"])
    scales = "per-channel" if DYNAMIC_SETTINGS["per_channel"] else "per-tensor"
    return Variant(onnx_files(out), ort_runner(out, ctx),
                   note=f"quantize_dynamic: {ops}, int8 weights {scales}, uint8 activations")


class CalibrationRows:
    """The part of a `datasets.Dataset` that Optimum's minmax calibration touches, so that it
    calibrates on exactly our texts without the `datasets` package (whose pins break this
    environment). From optimum/onnxruntime: `AutoCalibrationConfig.minmax` reads
    `.info.builder_name`, `.info.config_name`, `.split` and `.num_rows` (labels only), and
    `ORTQuantizer.fit` iterates the rows through `ORTCalibrationDataReader`, which wraps each
    {input name: (seq,) ids} row in a list: one text per call at its natural length, as ours.
    """

    def __init__(self, feeds: list[dict]):
        self.rows = [{name: value[0] for name, value in f.items()} for f in feeds]
        self.info = types.SimpleNamespace(builder_name="smart-home-utterances",
                                          config_name="calibration")
        self.split = "calibration"
        self.num_rows = len(self.rows)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    def __iter__(self):
        return iter(self.rows)


def optimum_static_int8(ctx: Context) -> Variant:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoCalibrationConfig, AutoQuantizationConfig

    preset = OPTIMUM_PRESETS.get(ctx.target.name, "arm64")
    config = getattr(AutoQuantizationConfig, preset)(is_static=True)
    rows = CalibrationRows(ctx.calibration)
    quantizer = ORTQuantizer.from_pretrained(ctx.float_onnx.parent, file_name=ctx.float_onnx.name)
    ranges = quantizer.fit(rows, AutoCalibrationConfig.minmax(rows),
                           onnx_augmented_model_name=ctx.workdir / "augmented.onnx",
                           operators_to_quantize=config.operators_to_quantize)
    out_dir = ctx.workdir / "optimum"
    quantizer.quantize(config, out_dir, calibration_tensors_range=ranges)
    out = out_dir / f"{ctx.float_onnx.stem}_quantized.onnx"
    return Variant(onnx_files(out), ort_runner(out, ctx),
                   note=f"ORTQuantizer, AutoQuantizationConfig.{preset}(is_static=True), minmax "
                        f"on the same {rows.num_rows} calibration texts (plain-object dataset)")


class FeedReader:
    """onnxruntime.quantization's CalibrationDataReader over our calibration feeds."""

    def __init__(self, feeds: list[dict]):
        self.rows = iter(feeds)

    def get_next(self):
        return next(self.rows, None)


def ort_plain_static_int8(ctx: Context) -> Variant:
    from onnxruntime.quantization import quantize_static

    out = ctx.workdir / "plain-static" / "model.onnx"
    out.parent.mkdir()
    quantize_static(ctx.float_onnx, out, FeedReader(ctx.calibration))  # every default
    return Variant(onnx_files(out), ort_runner(out, ctx),
                   note=f"quantize_static with its defaults (QDQ, every op, per-tensor, "
                        f"minmax) on the same {len(ctx.calibration)} calibration texts")


def our_bundle(ctx: Context) -> Variant:
    rejected = f" (REJECTED, no bundle written: {ctx.budget_error})" if ctx.budget_error else ""
    return Variant(onnx_files(ctx.bundle_model), ort_runner(ctx.bundle_model, ctx),
                   note=f"exporter pipeline, target {ctx.target.name}, task {ctx.task}"
                        f"{rejected}")


# The variants, in table order: (name, builder). Accuracy is measured against the first
# (PyTorch fp32), the ratio columns against REFERENCE. The encoder and the classifier use
# the same builders.
VARIANTS: tuple[tuple[str, Callable[[Context], Variant]], ...] = (
    ("PyTorch eager fp32", pytorch_fp32),
    ("ORT fp32", ort_fp32),
    ("ORT dynamic int8", ort_dynamic_int8),
    ("Optimum static int8", optimum_static_int8),
    ("ORT quantize_static", ort_plain_static_int8),
    ("our bundle", our_bundle),
)
REFERENCE = "ORT fp32"
OURS = "our bundle"
# The peer tools' int8 variants: our bundle's ratios to each (the table's are to REFERENCE).
PEERS = ("ORT dynamic int8", "Optimum static int8", "ORT quantize_static")


# --------------------------------------------------------------------------------- export


def export_ours(model: str, target, *, task: str | None, calibration, evaluation,
                workdir: Path):
    """Run the exporter's pipeline; returns (job, seconds). Unlike `exporter.export` this
    keeps the job's work directory, so the float graph stays on disk for the peers."""
    from exporter import pipeline
    from exporter.budget import Budget
    from exporter.load import infer_task, resolve_model_dir
    from exporter.validate import BudgetError

    task = task or infer_task(resolve_model_dir(model))
    job = pipeline.new_job(model, target=target, task=task, output=workdir / "bundle",
                           calibration=calibration, evaluation=evaluation,
                           budget=Budget.parse(target.validation.budget_for(task)),
                           log=lambda line: print(f"  export {line}", file=sys.stderr,
                                                  flush=True))
    started = time.perf_counter()
    try:
        pipeline.run(job)
    except BudgetError as e:  # still worth measuring: the model is in the work directory
        print(f"  export: {e}", file=sys.stderr)
        job.records["budget_error"] = str(e).split(":")[0]
    return job, time.perf_counter() - started


def graph_inputs(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(path, load_external_data=False).graph.input]


# ----------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Comparison:
    """What the encoder and the classifier benchmarks differ in: how a batch's output becomes
    one row per text, what those rows score against PyTorch fp32's, and which figures the
    table shows. Variants, timing and the report are shared."""

    title: str
    reduce: Callable[[np.ndarray, dict], np.ndarray]   # (graph output, feeds) -> (batch, dim)
    score: Callable[[np.ndarray, np.ndarray], dict[str, float]]  # (ours, PyTorch's) -> figures
    columns: tuple[tuple[str, str, str], ...]          # scores shown: (key, header, format)
    scenarios: tuple[str, ...]                         # latency scenarios timed and shown
    legend: str                                        # what the columns mean
    reference: str                                     # what the scores are against (JSON)


def embedding_comparison(job) -> Comparison:
    """Encoder: cosine of pooled, L2-normalized sentence embeddings."""
    from runtime.model import pool

    mode = job.pooling["mode"]

    def cosine(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        per_text = (ours * reference).sum(axis=1)  # unit vectors
        return {"cosine_mean": float(per_text.mean()), "cosine_min": float(per_text.min())}

    return Comparison(
        title=f"encoder: {job.model}, {len(job.evaluation)} held-out smart-home utterances",
        reduce=lambda out, feeds: pool(out, feeds["attention_mask"], mode=mode, normalize=True),
        score=cosine,
        columns=(("cosine_mean", "cos", "6.4f"), ("cosine_min", "min", "6.4f")),
        scenarios=("b1", "b1_128", "b32"),
        legend="cos/min: cosine to PyTorch fp32 (mean, minimum)",
        reference=f"cosines to PyTorch fp32 (pooled: {mode} + L2 norm)")


def label_comparison(job) -> Comparison:
    """Classifier: argmax of the logits, against the eval labels and PyTorch fp32's argmax."""
    from exporter.validate import macro_f1

    classes = len(job.labels)
    unlabelled = next((u for u in job.evaluation if u.intent is None), None)
    if unlabelled:
        raise ValueError(f"{unlabelled.where or 'an evaluation text'} has no \"label\"; the "
                         f"classifier benchmark needs every test text labelled.")
    truth = np.array([job.labels.index(u.intent) for u in job.evaluation])  # (texts,)

    def labels(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        top, float_top = ours.argmax(axis=1), reference.argmax(axis=1)
        return {"accuracy": float((top == truth).mean()),
                "macro_f1": macro_f1(truth, top, classes),
                "agreement": float((top == float_top).mean())}

    return Comparison(
        title=f"classifier: {job.model}, {classes} labels, {len(truth)} test texts",
        reduce=lambda out, feeds: out,  # logits (batch, labels)
        score=labels,
        columns=(("accuracy", "acc", "7.2%"), ("macro_f1", "F1", "6.4f"),
                 ("agreement", "agree", "7.2%")),
        scenarios=("b1", "b32"),
        legend="acc: test accuracy, F1: macro-F1 (mean over the labels present), agree: "
               "top-1 agreement with PyTorch fp32",
        reference="accuracy and macro-F1 against the test.jsonl labels; agreement: top-1 "
                  "label equal to PyTorch fp32's")


# -------------------------------------------------------------------------------- measure


@dataclass
class Row:
    """One line of a table: a variant and what was measured on it."""

    name: str
    variant: Variant | None
    error: str = ""
    size_bytes: int = 0                                   # of variant.files, taken at build
    build_s: float = 0.0                                  # seconds to build (ours: export)
    scores: dict[str, float] = field(default_factory=dict)        # Comparison.score
    rounds: list[dict[str, float]] = field(default_factory=list)  # latency (ms) per round


def build(name: str, builder: Callable[[Context], Variant], ctx: Context) -> Row:
    """Build one variant; a peer that crashes becomes a row saying why, not a dead run."""
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            variant = builder(ctx)
    except Exception as e:  # noqa: BLE001 - a peer tool's failure is a result to report
        print(f"  {name}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        first_line = (str(e).splitlines() or [""])[0][:200]
        return Row(name, None, error=f"{type(e).__name__}: {first_line}")
    row = Row(name, variant, size_bytes=sum(f.stat().st_size for f in variant.files),
              build_s=time.perf_counter() - started)
    print(f"  built {name} in {time.perf_counter() - started:.1f} s "
          f"({row.size_bytes / 1e6:.1f} MB)", file=sys.stderr, flush=True)
    return row


def per_text(variant: Variant, batches: list[dict], comparison: Comparison) -> np.ndarray:
    """The variant's outputs reduced to one row per text, (texts, dim), in text order."""
    return np.concatenate([comparison.reduce(variant.run(feeds), feeds) for feeds in batches])


def time_calls(run: Callable, feeds: list[dict], *, warmup: int, calls: int) -> np.ndarray:
    """Milliseconds per call, cycling through `feeds`; the warm-up calls are not timed."""
    for i in range(warmup):
        run(feeds[i % len(feeds)])
    times = np.empty(calls)
    for i in range(calls):
        started = time.perf_counter()
        run(feeds[i % len(feeds)])
        times[i] = time.perf_counter() - started
    return times * 1e3


def latency(variant: Variant, work: Workload, scenarios: tuple[str, ...]) -> dict[str, float]:
    """One timing block for one variant: the scenarios back to back; figures in ms, named
    "<scenario>_<statistic>"."""
    figures = {}
    for scenario in scenarios:
        warmup, calls, statistics = SCENARIOS[scenario]
        ms = time_calls(variant.run, getattr(work, scenario), warmup=warmup, calls=calls)
        figures.update({f"{scenario}_{s}": STATISTICS[s](ms) for s in statistics})
    return figures


def measure(rows: list[Row], work: Workload, comparison: Comparison, *, rounds: int) -> None:
    """Scores against the first row (PyTorch fp32), then `rounds` timing passes, one block
    per variant per pass."""
    measured = [r for r in rows if r.variant]
    if not measured or measured[0] is not rows[0]:
        raise RuntimeError(f"{rows[0].name}, the accuracy reference, failed: {rows[0].error}")
    reference = per_text(rows[0].variant, work.accuracy, comparison)
    for r in measured:
        r.scores = comparison.score(per_text(r.variant, work.accuracy, comparison), reference)
    for round_ in range(rounds):
        print(f"  timing round {round_ + 1}/{rounds}", file=sys.stderr, flush=True)
        for r in measured:
            time.sleep(SETTLE_S)
            r.rounds.append(latency(r.variant, work, comparison.scenarios))


def best_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: min(r[key] for r in rounds) for key in rounds[0]}


def spread(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Slowest round over fastest round, minus one, per figure."""
    return {key: max(r[key] for r in rounds) / min(r[key] for r in rounds) - 1
            for key in rounds[0]}


def machine() -> dict:
    """CPU model, core count, int8-relevant ISA flags and tool versions."""
    flags = []
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("flags", "Features"):
            flags = [f for f in value.split() if f in ("avx2", "avx512f", "avx512_vnni",
                                                       "avx_vnni", "amx_int8", "asimddp", "i8mm")]
            break
    return {"cpu": argtypes.cpu_name(), "arch": platform.machine(), "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "int8_isa_flags": flags,
            "python": platform.python_version(),
            "versions": argtypes.versions("onnxruntime", "torch", "transformers", "optimum",
                                          "optimum-onnx", "onnx", "numpy")}


# --------------------------------------------------------------------------------- report

# Latency figure -> (table header, format). Each scenario is one group of columns, followed
# by the ratio of its first figure to REFERENCE's.
FIGURE_COLUMNS: dict[str, tuple[str, str]] = {
    "b1_p50": ("b1 p50", "6.2f"),
    "b1_p95": ("p95", "6.2f"),
    "b1_128_p50": ("@128", "6.2f"),
    "b32_mean": ("b32", "6.1f"),
}
LATENCY_LEGEND = {
    "b1": "b1 = batch 1 at natural length (p50, p95)",
    "b1_128": "@128 = batch 1 at 128 tokens (p50)",
    "b32": "b32 = batch 32 (mean per batch)",
}


def ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:5.2f}x" if reference else "     -"


def table(rows: list[Row], comparison: Comparison) -> str:
    """The side-by-side table: scores, best round per latency figure, ratios to REFERENCE."""
    ref = next((r for r in rows if r.name == REFERENCE and r.rounds), None)
    ref_lat, ref_size = (best_of(ref.rounds), ref.size_bytes) if ref else ({}, None)
    groups = [[f"{s}_{stat}" for stat in SCENARIOS[s][2]] for s in comparison.scenarios]
    head = f"{'variant':<20} {'MB':>5} {'size':>6} {'build':>6} " + " ".join(
        f"{header:>{len(format(0, spec))}}" for _, header, spec in comparison.columns)
    for group in groups:
        head += " │ " + " ".join(f"{FIGURE_COLUMNS[key][0]:>6}" for key in group) + \
                f" {'vs fp':>6}"
    lines = [comparison.title, head, "─" * len(head)]
    for r in rows:
        if r.error:
            lines.append(f"{r.name:<20} failed: {r.error}")
            continue
        lat = best_of(r.rounds)
        line = f"{r.name:<20} {r.size_bytes / 1e6:5.1f} {ratio(r.size_bytes, ref_size)} " \
            f"{r.build_s:5.1f}s " + \
            " ".join(format(r.scores[key], spec) for key, _, spec in comparison.columns)
        for group in groups:
            line += " │ " + " ".join(f"{lat[key]:{FIGURE_COLUMNS[key][1]}}" for key in group) + \
                    f" {ratio(lat[group[0]], ref_lat.get(group[0]))}"
        lines.append(line)
    lines.append(f"{comparison.legend}; latency in ms, best of rounds: "
                 + ", ".join(LATENCY_LEGEND[s] for s in comparison.scenarios)
                 + f"; size and 'vs fp' relative to {REFERENCE}; build: seconds to make "
                   f"the variant from the float graph (ours: the whole export).")
    return "\n".join(lines)


def row_json(r: Row, ref: Row | None) -> dict:
    if r.error:
        return {"name": r.name, "error": r.error}
    lat = best_of(r.rounds)
    out = {"name": r.name, "note": r.variant.note, "size_bytes": r.size_bytes,
           "build_seconds": round(r.build_s, 1),
           **{key: round(value, 5) for key, value in r.scores.items()},
           "latency_ms": {k: round(v, 3) for k, v in lat.items()},
           "latency_rounds_ms": [{k: round(v, 3) for k, v in x.items()} for x in r.rounds],
           "round_spread": {k: round(v, 3) for k, v in spread(r.rounds).items()}}
    if ref is not None:
        ref_lat = best_of(ref.rounds)
        out["vs_ort_fp32"] = {"size": round(r.size_bytes / ref.size_bytes, 3),
                              **{k: round(lat[k] / ref_lat[k], 3) for k in lat}}
    return out


def versus_peers(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Our bundle's size and best-round latency figures over each measured peer's (below 1:
    ours is smaller / faster), peer name -> figure -> ratio."""
    ours = next((r for r in rows if r.name == OURS and r.rounds), None)
    if ours is None:
        return {}
    lat = best_of(ours.rounds)
    out = {}
    for peer in (r for r in rows if r.name in PEERS and r.rounds):
        peer_lat = best_of(peer.rounds)
        out[peer.name] = {"size": round(ours.size_bytes / peer.size_bytes, 3),
                          **{k: round(lat[k] / peer_lat[k], 3) for k in lat}}
    return out


def versus_lines(rows: list[Row]) -> str:
    """One line per peer: our bundle's ratios to it, in the table's column names."""
    return "\n".join(
        f"  {OURS} vs {name}: size {ratios['size']:.2f}x, "
        + ", ".join(f"{FIGURE_COLUMNS[k][0]} {ratios[k]:.2f}x" for k in FIGURE_COLUMNS
                    if k in ratios)
        for name, ratios in versus_peers(rows).items())


def notes(rows: list[Row], rounds: int) -> str:
    """One line per variant: what it is, and how much its rounds differed."""
    lines = []
    for r in rows:
        if r.variant:
            worst = max(spread(r.rounds).values())
            repeat = f"; rounds differ by up to {100 * worst:.0f}%" if rounds > 1 else ""
            lines.append(f"  {r.name}: {r.variant.note}{repeat}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Setup:
    """What every benchmarked model shares."""

    target: object            # targets.Target
    threads: int
    spinning: bool
    rounds: int
    calibration: list         # exporter.data.Utterance, the same texts for every model


@dataclass
class Bench:
    """One benchmarked model: its export, its comparison and its table's rows."""

    job: object               # exporter.pipeline.Job
    export_s: float
    comparison: Comparison
    rows: list[Row]


def bench(model: str, *, task: str | None, evaluation: list,
          compare: Callable[[object], Comparison], setup: Setup, workdir: Path) -> Bench:
    """Export `model` with our pipeline, build every variant from its float graph, score
    them with `compare(job)` and time them."""
    workdir.mkdir()
    job, export_s = export_ours(model, setup.target, task=task, calibration=setup.calibration,
                                evaluation=evaluation, workdir=workdir)
    job.torch_model = None  # the PyTorch variant loads its own copy
    comparison = compare(job)
    work = build_workload(job.workdir / "tokenizer.json",
                          eval_texts=[u.text for u in evaluation],
                          calibration_texts=[u.text for u in setup.calibration],
                          input_names=graph_inputs(job.float_onnx),
                          max_length=job.max_length)
    # a bundle cut into pipeline stages (x86-server) holds stage*.onnx and no model.onnx: time
    # the single graph they were cut from (the partition stage checked them equal to it)
    bundle_model = (job.output / "model.onnx" if (job.output / "model.onnx").is_file()
                    else job.quantized_onnx)
    ctx = Context(model_dir=job.model_dir, task=job.task, target=setup.target,
                  threads=setup.threads, spinning=setup.spinning, workdir=workdir,
                  float_onnx=job.float_onnx, bundle_model=bundle_model,
                  calibration=work.calibration, budget_error=job.records.get("budget_error", ""))
    rows = [build(name, builder, ctx) for name, builder in VARIANTS]
    rows[-1].build_s = export_s   # ours: the whole export (every pipeline stage)
    measure(rows, work, comparison, rounds=setup.rounds)
    return Bench(job, export_s, comparison, rows)


def section(b: Bench) -> dict:
    """The JSON of one benchmarked model."""
    ref = next((r for r in b.rows if r.name == REFERENCE and r.variant), None)
    return {"reference": f"{b.comparison.reference}; latency figures are the best round; "
                         f"ratios to {REFERENCE}",
            "export_seconds": round(b.export_s, 1),
            "export_stage_seconds": b.job.timings,
            "variants": [row_json(r, ref) for r in b.rows],
            "ours_vs_peers": versus_peers(b.rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=argtypes.model, default="minilm",
                        help="checkpoint directory or packaged name (default: minilm)")
    parser.add_argument("--classifier", type=argtypes.labelled_classifier(BATCH),
                        metavar="DIR",
                        help="also benchmark this intent classifier (samples/train_intents.py "
                             "--output DIR), on its test.jsonl (at least 32 labelled texts)")
    parser.add_argument("--target", type=argtypes.target, default="arm-cpu",
                        help="built-in target or .toml profile (default: arm-cpu)")
    parser.add_argument("--threads", type=argtypes.at_least(1), default=2,
                        help="intra-op threads for every variant (default: 2)")
    parser.add_argument("--rounds", type=argtypes.at_least(1), default=3,
                        help="timing passes over all variants (default: 3)")
    parser.add_argument("--no-spinning", action="store_true",
                        help="turn ONNX Runtime's thread spinning off in every session")
    parser.add_argument("--output", type=argtypes.result_file, default=RESULTS,
                        help="JSON results file")
    args = parser.parse_args(argv)

    from exporter.data import read_texts, smart_home_utterances
    from targets import load_target

    started = time.perf_counter()
    logging.getLogger("optimum").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing advice
    target = load_target(args.target)
    setup = Setup(target=target, threads=args.threads, spinning=not args.no_spinning,
                  rounds=args.rounds,
                  calibration=smart_home_utterances(target.quantization.calibration_samples,
                                                    split="calibration"))
    evaluation = smart_home_utterances(EVAL_TEXTS, split="eval")
    import torch  # noqa: F401  (first imported here, not in the work below: see stop_on_signals)

    workdir = argtypes.work_directory("bench_encoder.")
    try:
        encoder = bench(args.model, task=None, evaluation=evaluation,
                        compare=embedding_comparison, setup=setup, workdir=workdir / "encoder")
        classifier = None
        if args.classifier:
            classifier = bench(str(args.classifier), task="text-classification",
                               evaluation=read_texts(args.classifier / "test.jsonl"),
                               compare=label_comparison, setup=setup,
                               workdir=workdir / "classifier")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wall_s = time.perf_counter() - started

    for b in [encoder, classifier] if classifier else [encoder]:
        print(table(b.rows, b.comparison))
        print(f"our export (every pipeline stage): {b.export_s:.1f} s")
        print(versus_lines(b.rows))
        print(notes(b.rows, args.rounds))
        print()
    print(f"whole benchmark {wall_s:.0f} s; {args.threads} threads, ONNX Runtime spinning "
          f"{'off' if args.no_spinning else 'on'}, {args.rounds} rounds")

    result = {
        "model": args.model, "target": target.name, "threads": args.threads,
        "spinning": not args.no_spinning, "rounds": args.rounds,
        "scenarios": {k: {"warmup": w, "calls": c, "statistics": list(s)}
                      for k, (w, c, s) in SCENARIOS.items()},
        "texts": {"calibration": len(setup.calibration), "eval": len(evaluation),
                  "timed": min(TIMED_TEXTS, len(evaluation)),
                  "long_text_tokens": LONG_TOKENS, "batch": BATCH},
        "wall_seconds": round(wall_s, 1),
        "machine": machine(),
        **section(encoder),
    }
    if classifier:
        result["classifier"] = {
            "model": str(args.classifier), "task": classifier.job.task,
            "labels": len(classifier.job.labels),
            "texts": {"calibration": len(setup.calibration),
                      "test": len(classifier.job.evaluation),
                      "timed": min(TIMED_TEXTS, len(classifier.job.evaluation))},
            **section(classifier)}
    argtypes.write_result(args.output, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    argtypes.stop_on_signals()   # SIGTERM, SIGHUP: the work directory goes, as on Ctrl-C
    sys.exit(main())
