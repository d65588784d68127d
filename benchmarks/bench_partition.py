"""Throughput of a bundle cut into 1, 2 and 4 CPU pipeline stages against the single graph,
under a stream of batches.

    python benchmarks/bench_partition.py [--bundle build/minilm-arm-cpu] [--threads 2]
                                         [--batches 48] [--batch-size 8] [--rounds 3]
                                         [--json benchmarks/results/bench_partition.json]

Without --bundle it exports all-MiniLM-L6-v2 for arm-cpu (small calibration and evaluation
sets, a minute or two) into a temporary directory. The staged bundles are cut from the same
graph (`exporter.partition.restage`), so every variant computes the same numbers (checked:
the outputs must be bit-identical to the single graph's, or the benchmark stops).

What it measures: texts per second and ms per batch for a stream of `--batches` batches of
`--batch-size` held-out smart-home utterances (each batch padded to its longest text), run
through `runtime.load(...)`'s session with the batches pipelined across the stages (one thread
per stage). The variants share the CPU budget: the single graph `--threads` intra-op
threads, each of k stages threads // k, at least one (so with more stages than threads the
stages hold more threads in all; the table says how many). On a CPU-only machine the stages
compete for the same cores, so this measures what staging itself costs or gains on a CPU (extra
sessions, hand-offs between threads, against pipeline parallelism replacing intra-op
parallelism); with one GPU per stage the same pipeline overlaps stages on separate devices.

Each variant is warmed up and timed in its own block, `--rounds` times, keeping its best
round; the spread says how repeatable the figures are on a shared machine. Prints a table and
writes benchmarks/results/bench_partition.json (--json PATH: elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import _args as argtypes  # noqa: E402

STAGE_COUNTS = (1, 2, 4)


def export_bundle(directory: Path) -> Path:
    from exporter import export
    from exporter.data import smart_home_utterances

    calibration = [u.text for u in smart_home_utterances(100, split="calibration", seed=7)]
    evaluation = [u.text for u in smart_home_utterances(60, split="eval", seed=7)]
    return export("minilm", target="arm-cpu", output=directory / "minilm-arm-cpu",
                  calibration=calibration, evaluation=evaluation, log=lambda line: None)


def stream(model, texts: list[str], batch_size: int) -> list[dict]:
    from runtime.model import batches

    return [feeds for _, feeds in batches(model.tokenizer, texts, max_length=model.max_length,
                                          batch_size=batch_size, input_names=model.input_names)]


def time_stream(model, feeds: list[dict]) -> tuple[float, list]:
    from runtime.stages import run_batches

    started = time.perf_counter()
    outputs = [out[0] for out in run_batches(model.session, feeds)]
    return time.perf_counter() - started, outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=argtypes.single_graph_bundle,
                        help="a single-graph bundle (default: export)")
    parser.add_argument("--threads", type=argtypes.at_least(1), default=2,
                        help="CPU threads in all (default 2)")
    parser.add_argument("--batches", type=argtypes.at_least(1), default=48,
                        help="batches in the stream")
    parser.add_argument("--batch-size", type=argtypes.at_least(1), default=8,
                        help="texts per batch")
    parser.add_argument("--rounds", type=argtypes.at_least(1), default=3,
                        help="timed rounds per variant")
    parser.add_argument("--json", type=argtypes.result_file,
                        default=str(ROOT / "benchmarks" / "results" / "bench_partition.json"),
                        help="where to write the results (default benchmarks/results/)")
    args = parser.parse_args(argv)

    work = argtypes.work_directory("bench_partition.")
    try:
        return measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> int:
    """Export (without --bundle) and restage in `work`, time, print and write the results."""
    import runtime
    from exporter.data import smart_home_utterances
    from exporter.partition import restage

    bundle = args.bundle or export_bundle(work)
    texts = [u.text for u in smart_home_utterances(args.batches * args.batch_size,
                                                   split="eval", seed=11)]
    paths = {1: bundle}
    for k in STAGE_COUNTS[1:]:
        paths[k] = restage(bundle, k, work / f"stages-{k}")
    models = {k: runtime.load(p, threads=max(1, args.threads // k)) for k, p in paths.items()}
    feeds = stream(models[1], texts, args.batch_size)

    reference = None
    rounds: dict[int, list[float]] = {k: [] for k in STAGE_COUNTS}
    for _ in range(args.rounds):
        for k, model in models.items():
            time_stream(model, feeds[:4])   # warm-up
            seconds, outputs = time_stream(model, feeds)
            if reference is None:
                reference = outputs
            elif not all(np.array_equal(a, b) for a, b in zip(reference, outputs, strict=True)):
                raise SystemExit(f"{k} stages gave different outputs from the single graph.")
            rounds[k].append(seconds)
            time.sleep(0.2)   # let spinning worker threads park

    n_texts = sum(len(f["input_ids"]) for f in feeds)
    rows = []
    for k in STAGE_COUNTS:
        best = min(rounds[k])
        rows.append({"stages": k, "threads_per_stage": max(1, args.threads // k),
                     "threads_in_all": k * max(1, args.threads // k),
                     "texts_per_s": round(n_texts / best, 1),
                     "ms_per_batch": round(1e3 * best / len(feeds), 2),
                     "rounds_s": [round(s, 3) for s in rounds[k]]})
    single = rows[0]["texts_per_s"]
    for row in rows:
        row["vs_single_graph"] = round(row["texts_per_s"] / single, 3)

    print(f"\n{len(feeds)} batches x {args.batch_size} texts, {args.threads} CPU threads "
          f"shared by the stages (at least one each), best of {args.rounds} rounds "
          f"({os.cpu_count()} CPUs visible)\n")
    print("| stages | threads/stage | threads | texts/s | ms/batch | vs single graph | "
          "rounds (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stages']} | {r['threads_per_stage']} | {r['threads_in_all']} | "
              f"{r['texts_per_s']} | "
              f"{r['ms_per_batch']} | {r['vs_single_graph']:.2f}x | "
              f"{', '.join(map(str, r['rounds_s']))} |")
    print("\nOutputs of every staged variant are bit-identical to the single graph's.")

    argtypes.write_result(args.json, json.dumps({
        "rows": rows, "batches": len(feeds), "batch_size": args.batch_size,
        "threads": args.threads, "rounds": args.rounds, "bundle": str(bundle),
        "cpu": argtypes.cpu_name(), "cpus_visible": os.cpu_count(),
        "onnxruntime": metadata.version("onnxruntime"),
    }, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    argtypes.stop_on_signals()   # SIGTERM, SIGHUP: the work directory goes, as on Ctrl-C
    sys.exit(main())
