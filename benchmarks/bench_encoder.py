"""Five ways to run a sentence encoder on a CPU, side by side, in one run.

    python benchmarks/bench_encoder.py [--model minilm] [--target arm-cpu] [--threads 2]

Every variant comes from the same checkpoint, the same float ONNX graph (the one the exporter
writes) and the same calibration texts:

    PyTorch eager fp32      transformers AutoModel
    ORT fp32                the exporter's float ONNX graph in ONNX Runtime
    ORT dynamic int8        onnxruntime.quantization.quantize_dynamic on that graph
    Optimum static int8     optimum's ORTQuantizer, the target's static preset, minmax
    our bundle              built by the exporter's own pipeline (export wall time recorded)

Per variant: model file size; cosine of pooled sentence embeddings (the model's pooling: mean
+ L2 norm for all-MiniLM-L6-v2) to PyTorch fp32 on held-out smart-home utterances, mean and
minimum; latency at batch 1 (each text at its natural length, p50/p95), batch 1 at 128 tokens
(p50) and batch 32 (texts padded to the longest of each batch, mean ms per batch). It prints a
table and writes benchmarks/results/bench_encoder.json.

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
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub

RESULTS = Path(__file__).resolve().parent / "results" / "bench_encoder.json"

# Latency scenario -> (warm-up calls, timed calls). Sized so that a figure moves by a few
# percent at most between rounds on a quiet 2-core machine while a whole run stays within a
# few minutes (PyTorch fp32, the slowest, takes about 7 s per round).
SCENARIOS: dict[str, tuple[int, int]] = {
    "b1": (30, 600),      # batch 1, eval texts at natural length, cycling (2 passes over 300)
    "b1_128": (5, 100),   # batch 1, one long text truncated to exactly 128 tokens
    "b32": (3, 36),       # batch 32, consecutive eval texts padded per batch (4 passes over 9)
}
SETTLE_S = 1.0     # pause before each timing block, so the previous variant's threads park
BATCH = 32
LONG_TOKENS = 128
EVAL_TEXTS = 300

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
    """Int64 feeds for every measurement, one dict per call, keyed by graph input name."""

    b1: list[dict]           # one eval text each, natural length: (1, seq)
    b1_128: list[dict]       # one text of exactly 128 tokens: (1, 128)
    b32: list[dict]          # full batches of 32 consecutive eval texts: (32, longest)
    accuracy: list[dict]     # every eval text, batches of 32 (the last may be smaller)
    calibration: list[dict]  # calibration texts, natural length: (1, seq)


def build_workload(tokenizer_json: Path, *, eval_texts: list[str], calibration_texts: list[str],
                   input_names: list[str], max_length: int) -> Workload:
    """Tokenize with the runtime's tokenizer and pad with its `pad_batch`, as on the device."""
    from runtime.model import pad_batch
    from runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_json)

    def feeds(rows: list[list[int]]) -> dict:
        return pad_batch(rows, pad_id=tokenizer.pad_id, input_names=input_names)

    ids = tokenizer.encode_batch(eval_texts, max_length=max_length)
    long = tokenizer.encode(". ".join(eval_texts), max_length=LONG_TOKENS)
    assert len(long) == LONG_TOKENS, "the eval texts joined should exceed 128 tokens"
    chunks = [ids[i:i + BATCH] for i in range(0, len(ids), BATCH)]
    calibration = tokenizer.encode_batch(calibration_texts, max_length=max_length)
    return Workload(b1=[feeds([row]) for row in ids],
                    b1_128=[feeds([long])],
                    b32=[feeds(chunk) for chunk in chunks if len(chunk) == BATCH],
                    accuracy=[feeds(chunk) for chunk in chunks],
                    calibration=[feeds([row]) for row in calibration])


# -------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One way of running the model: what it stores and how it turns feeds into states."""

    files: list[Path]                    # what a device stores (sized in the table)
    run: Callable[[dict], np.ndarray]    # feeds -> token states (batch, seq, hidden)
    note: str


@dataclass
class Context:
    """What the variant builders share."""

    model_dir: Path          # the Hugging Face checkpoint
    target: object           # targets.Target
    threads: int
    spinning: bool
    workdir: Path            # temporary; removed at the end
    float_onnx: Path         # the exporter's float graph
    bundle_model: Path       # our bundle's model.onnx
    calibration: list[dict]  # calibration feeds, batch 1 at natural length
    budget_error: str = ""   # set when our export broke its accuracy budget


def ort_runner(path: Path, ctx: Context) -> Callable[[dict], np.ndarray]:
    """Run any graph the way the runtime runs a bundle (runtime.model.ort_session)."""
    from runtime.model import ort_session

    session = ort_session(path, threads=ctx.threads, spinning=ctx.spinning)
    names = [i.name for i in session.get_inputs()]
    output = session.get_outputs()[0].name  # last_hidden_state

    def run(feeds: dict) -> np.ndarray:
        return session.run([output], {n: feeds[n] for n in names})[0]

    return run


def onnx_files(path: Path) -> list[Path]:
    """The graph file and any external-data files beside it."""
    return [path, *sorted(path.parent.glob(path.name + ".data*"))]


def pytorch_fp32(ctx: Context) -> Variant:
    import torch
    from transformers import AutoModel

    from exporter.to_onnx import torch_hidden_states

    torch.set_num_threads(ctx.threads)
    model = AutoModel.from_pretrained(ctx.model_dir).eval()
    weights = sorted(ctx.model_dir.glob("*.safetensors")) or sorted(ctx.model_dir.glob("*.bin"))
    return Variant(weights, lambda feeds: torch_hidden_states(model, feeds),
                   note=f"transformers AutoModel, torch {torch.__version__}")


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


def our_bundle(ctx: Context) -> Variant:
    rejected = f" (REJECTED, no bundle written: {ctx.budget_error})" if ctx.budget_error else ""
    return Variant(onnx_files(ctx.bundle_model), ort_runner(ctx.bundle_model, ctx),
                   note=f"exporter pipeline, target {ctx.target.name}{rejected}")


# The comparison, in table order: (name, builder). Cosines are to the first (PyTorch fp32),
# the ratio columns to REFERENCE.
VARIANTS: tuple[tuple[str, Callable[[Context], Variant]], ...] = (
    ("PyTorch eager fp32", pytorch_fp32),
    ("ORT fp32", ort_fp32),
    ("ORT dynamic int8", ort_dynamic_int8),
    ("Optimum static int8", optimum_static_int8),
    ("our bundle", our_bundle),
)
REFERENCE = "ORT fp32"


# --------------------------------------------------------------------------------- export


def export_ours(model: str, target, *, calibration, evaluation, workdir: Path):
    """Run the exporter's pipeline; returns (job, seconds). Unlike `exporter.export` this
    keeps the job's work directory, so the float graph stays on disk for the peers."""
    from exporter import pipeline
    from exporter.budget import Budget
    from exporter.validate import BudgetError

    job = pipeline.new_job(model, target=target, task=None, output=workdir / "bundle",
                           calibration=calibration, evaluation=evaluation,
                           budget=Budget.parse(target.validation.accuracy_budget),
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


# -------------------------------------------------------------------------------- measure


@dataclass
class Row:
    """One line of the table: a variant and what was measured on it."""

    name: str
    variant: Variant | None
    error: str = ""
    size_bytes: int = 0                                   # of variant.files, taken at build
    cosine: np.ndarray | None = None                      # per eval text
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
    row = Row(name, variant, size_bytes=sum(f.stat().st_size for f in variant.files))
    print(f"  built {name} in {time.perf_counter() - started:.1f} s "
          f"({row.size_bytes / 1e6:.1f} MB)", file=sys.stderr, flush=True)
    return row


def embeddings(variant: Variant, batches: list[dict], pooling: dict) -> list[np.ndarray]:
    """Pooled, L2-normalized sentence embeddings, (batch, hidden) per batch."""
    from runtime.model import pool

    return [pool(variant.run(feeds), feeds["attention_mask"], mode=pooling["mode"],
                 normalize=True) for feeds in batches]


def cosines(ours: list[np.ndarray], reference: list[np.ndarray]) -> np.ndarray:
    """Per-text cosine of unit vectors, batches flattened."""
    return np.concatenate([(a * b).sum(axis=1) for a, b in zip(ours, reference, strict=True)])


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


def latency(variant: Variant, work: Workload) -> dict[str, float]:
    """One timing block for one variant: every scenario, back to back (ms)."""
    def timed(feeds: list[dict], scenario: str) -> np.ndarray:
        warmup, calls = SCENARIOS[scenario]
        return time_calls(variant.run, feeds, warmup=warmup, calls=calls)

    b1, b128, b32 = timed(work.b1, "b1"), timed(work.b1_128, "b1_128"), timed(work.b32, "b32")
    return {"b1_p50": float(np.percentile(b1, 50)), "b1_p95": float(np.percentile(b1, 95)),
            "b1_128_p50": float(np.percentile(b128, 50)), "b32_mean": float(b32.mean())}


def best_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: min(r[key] for r in rounds) for key in rounds[0]}


def spread(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Slowest round over fastest round, minus one, per figure."""
    return {key: max(r[key] for r in rounds) / min(r[key] for r in rounds) - 1
            for key in rounds[0]}


def machine() -> dict:
    """CPU model, core count, int8-relevant ISA flags and tool versions."""
    cpu, flags = platform.processor() or platform.machine(), []
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("model name", "Model") and cpu in (platform.processor(), platform.machine()):
            cpu = value
        if key in ("flags", "Features") and not flags:
            flags = [f for f in value.split() if f in ("avx2", "avx512f", "avx512_vnni",
                                                       "avx_vnni", "amx_int8", "asimddp", "i8mm")]
    versions = {}
    for name in ("onnxruntime", "torch", "transformers", "optimum", "optimum-onnx", "onnx",
                 "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "int8_isa_flags": flags,
            "python": platform.python_version(), "versions": versions}


# --------------------------------------------------------------------------------- report


def ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:5.2f}x" if reference else "     -"


def table(rows: list[Row]) -> str:
    """The side-by-side table: best round per latency figure, ratios to REFERENCE."""
    ref = next((r for r in rows if r.name == REFERENCE and r.rounds), None)
    ref_lat, ref_size = (best_of(ref.rounds), ref.size_bytes) if ref else ({}, None)
    head = (f"{'variant':<20} {'MB':>5} {'size':>6} {'cos':>6} {'min':>6} │ {'b1 p50':>6} "
            f"{'p95':>6} {'vs fp':>6} │ {'@128':>6} {'vs fp':>6} │ {'b32':>6} {'vs fp':>6}")
    lines = [head, "─" * len(head)]
    for r in rows:
        if r.error:
            lines.append(f"{r.name:<20} failed: {r.error}")
            continue
        lat = best_of(r.rounds)
        lines.append(
            f"{r.name:<20} {r.size_bytes / 1e6:5.1f} {ratio(r.size_bytes, ref_size)} "
            f"{r.cosine.mean():6.4f} {r.cosine.min():6.4f} │ {lat['b1_p50']:6.2f} "
            f"{lat['b1_p95']:6.2f} {ratio(lat['b1_p50'], ref_lat.get('b1_p50'))} │ "
            f"{lat['b1_128_p50']:6.2f} {ratio(lat['b1_128_p50'], ref_lat.get('b1_128_p50'))} │ "
            f"{lat['b32_mean']:6.1f} {ratio(lat['b32_mean'], ref_lat.get('b32_mean'))}")
    lines.append(f"cos/min: cosine to PyTorch fp32 (mean, minimum); latency in ms, best of "
                 f"rounds: b1 = batch 1 at natural length (p50, p95), @128 = batch 1 at 128 "
                 f"tokens (p50), b32 = batch 32 (mean per batch); size and 'vs fp' relative "
                 f"to {REFERENCE}.")
    return "\n".join(lines)


def row_json(r: Row, ref: Row | None) -> dict:
    if r.error:
        return {"name": r.name, "error": r.error}
    lat = best_of(r.rounds)
    out = {"name": r.name, "note": r.variant.note, "size_bytes": r.size_bytes,
           "cosine_mean": round(float(r.cosine.mean()), 5),
           "cosine_min": round(float(r.cosine.min()), 5),
           "latency_ms": {k: round(v, 3) for k, v in lat.items()},
           "latency_rounds_ms": [{k: round(v, 3) for k, v in x.items()} for x in r.rounds],
           "round_spread": {k: round(v, 3) for k, v in spread(r.rounds).items()}}
    if ref is not None:
        ref_lat = best_of(ref.rounds)
        out["vs_ort_fp32"] = {"size": round(r.size_bytes / ref.size_bytes, 3),
                              **{k: round(lat[k] / ref_lat[k], 3) for k in lat}}
    return out


# ----------------------------------------------------------------------------------- main


def measure(rows: list[Row], work: Workload, *, pooling: dict, rounds: int) -> None:
    """Cosines to the first row (PyTorch fp32), then `rounds` timing passes, one block per
    variant per pass."""
    measured = [r for r in rows if r.variant]
    if not measured or measured[0] is not rows[0]:
        raise RuntimeError(f"{rows[0].name}, the accuracy reference, failed: {rows[0].error}")
    reference = embeddings(rows[0].variant, work.accuracy, pooling)
    for r in measured:
        r.cosine = cosines(embeddings(r.variant, work.accuracy, pooling), reference)
    for round_ in range(rounds):
        print(f"  timing round {round_ + 1}/{rounds}", file=sys.stderr, flush=True)
        for r in measured:
            time.sleep(SETTLE_S)
            r.rounds.append(latency(r.variant, work))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm",
                        help="checkpoint directory or packaged name (default: minilm)")
    parser.add_argument("--target", default="arm-cpu",
                        help="built-in target or .toml profile (default: arm-cpu)")
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads for every variant (default: 2)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timing passes over all variants (default: 3)")
    parser.add_argument("--no-spinning", action="store_true",
                        help="turn ONNX Runtime's thread spinning off in every session")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)

    from exporter.data import smart_home_utterances
    from targets import load_target

    started = time.perf_counter()
    logging.getLogger("optimum").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing advice
    target = load_target(args.target)
    calibration = smart_home_utterances(target.quantization.calibration_samples,
                                        split="calibration")
    evaluation = smart_home_utterances(EVAL_TEXTS, split="eval")
    workdir = Path(tempfile.mkdtemp(prefix="bench_encoder."))
    try:
        job, export_s = export_ours(args.model, target, calibration=calibration,
                                    evaluation=evaluation, workdir=workdir)
        job.torch_model = None  # the PyTorch variant loads its own copy
        work = build_workload(job.workdir / "tokenizer.json",
                              eval_texts=[u.text for u in evaluation],
                              calibration_texts=[u.text for u in calibration],
                              input_names=graph_inputs(job.float_onnx),
                              max_length=job.max_length)
        bundle_model = job.output / "model.onnx" if job.output.is_dir() else job.quantized_onnx
        ctx = Context(model_dir=job.model_dir, target=target, threads=args.threads,
                      spinning=not args.no_spinning, workdir=workdir, float_onnx=job.float_onnx,
                      bundle_model=bundle_model, calibration=work.calibration,
                      budget_error=job.records.get("budget_error", ""))
        rows = [build(name, builder, ctx) for name, builder in VARIANTS]
        measure(rows, work, pooling=job.pooling, rounds=args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wall_s = time.perf_counter() - started

    print(table(rows))
    print(f"our export (every pipeline stage): {export_s:.1f} s; whole benchmark {wall_s:.0f} s;"
          f" {args.threads} threads, ONNX Runtime spinning "
          f"{'off' if args.no_spinning else 'on'}, {args.rounds} rounds")
    for r in rows:
        if r.variant:
            worst = max(spread(r.rounds).values())
            repeat = f"; rounds differ by up to {100 * worst:.0f}%" if args.rounds > 1 else ""
            print(f"  {r.name}: {r.variant.note}{repeat}")

    ref = next((r for r in rows if r.name == REFERENCE and r.variant), None)
    result = {
        "model": args.model, "target": target.name, "threads": args.threads,
        "spinning": not args.no_spinning, "rounds": args.rounds,
        "scenarios": {k: {"warmup": w, "calls": c} for k, (w, c) in SCENARIOS.items()},
        "texts": {"calibration": len(calibration), "eval": len(evaluation),
                  "long_text_tokens": LONG_TOKENS, "batch": BATCH},
        "reference": f"cosines to {rows[0].name} (pooled: {job.pooling['mode']} + L2 norm); "
                     f"latency figures are the best round; ratios to {REFERENCE}",
        "export_seconds": round(export_s, 1),
        "export_stage_seconds": job.timings,
        "wall_seconds": round(wall_s, 1),
        "machine": machine(),
        "variants": [row_json(r, ref) for r in rows],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
