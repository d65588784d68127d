"""Encoder bundles on a CUDA GPU against the same bundles on the CPU: the same embeddings,
which device each pipeline stage got, and texts per second.

    python benchmarks/bench_gpu.py --bundle build/minilm-x86-server --bundle build/minilm-jetson
                                   [--texts 512] [--batch-size 32] [--rounds 3]

Needs onnxruntime with CUDAExecutionProvider (the onnxruntime-gpu package) and a GPU; on a
machine without either it stops at once and says so. For each bundle it loads, in one process:

- `cpu`: `runtime.load(bundle, providers=["CPUExecutionProvider"])`, the reference;
- `gpu`: `runtime.load(bundle, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])`.
  A bundle cut into pipeline stages asks for one GPU per stage (stage i on cuda:i); a stage
  whose GPU this process does not see runs on the CPU, and the runtime warns. The table says
  which provider each stage's onnxruntime session actually took;
- `gpu, N stages`, for a single-graph bundle: the same graph cut into `--stages` pipeline
  stages (`exporter.partition.restage`, default 2), stage i asking for cuda:i.

Every variant embeds the same `--texts` held-out smart-home utterances in batches of
`--batch-size`. The embeddings are compared (cosine, mean and minimum) with the CPU's and, where
PyTorch and the bundle's source model are installed, with the PyTorch float model's: the
bundle's accuracy as the validation report measures it, on this device's kernels. Throughput
is the best of `--rounds` timed passes after a warm-up pass; batch-1 latency the median of 100
single-text calls. Prints a table and writes benchmarks/results/bench_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import _args as argtypes  # noqa: E402


def taken_providers(model) -> list[str]:
    """The provider each of the model's onnxruntime sessions took, per stage."""
    session = model.session
    sessions = getattr(session, "sessions", [session])
    return [s.get_providers()[0] for s in sessions]


def embed_timed(model, texts: list[str], batch_size: int, rounds: int) -> tuple[np.ndarray, float]:
    model.embed(texts[:batch_size], batch_size=batch_size)   # warm-up: kernels, allocations
    best, vectors = float("inf"), None
    for _ in range(rounds):
        started = time.perf_counter()
        vectors = model.embed(texts, batch_size=batch_size)
        best = min(best, time.perf_counter() - started)
    return vectors, best


def single_latency_ms(model, texts: list[str], runs: int = 100) -> float:
    for text in texts[:10]:
        model.embed([text])
    times = []
    for text in (texts * (runs // len(texts) + 1))[:runs]:
        started = time.perf_counter()
        model.embed([text])
        times.append(time.perf_counter() - started)
    return 1e3 * float(np.median(times))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)


def float_embeddings(model, texts: list[str], batch_size: int) -> np.ndarray | None:
    """PyTorch float embeddings of `texts` by the bundle's source model, tokenized and pooled
    as the bundle does; None where PyTorch or that model is not installed here."""
    manifest = model.bundle.manifest
    try:
        import transformers

        from exporter.load import TASKS, resolve_model_dir
        from exporter.to_onnx import torch_output
        directory = resolve_model_dir(manifest["model"]["source"])
    except (ImportError, ValueError, OSError, KeyError):
        return None
    from runtime.model import batches, pool

    net = getattr(transformers, TASKS[manifest["task"]]).from_pretrained(directory).eval()
    vectors = None
    for chosen, feeds in batches(model.tokenizer, texts, max_length=model.max_length,
                                 batch_size=batch_size, input_names=model.input_names):
        out = torch_output(net, feeds)
        if manifest.get("pooling"):
            out = pool(out, feeds["attention_mask"], mode=manifest["pooling"]["mode"],
                       normalize=manifest["pooling"].get("normalize", False))
        if vectors is None:
            vectors = np.zeros((len(texts), out.shape[-1]), dtype=np.float32)
        vectors[chosen] = out
    return vectors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=argtypes.bundle, action="append", required=True,
                        help="an encoder bundle (repeat for several)")
    parser.add_argument("--texts", type=argtypes.at_least(1), default=512)
    parser.add_argument("--batch-size", type=argtypes.at_least(1), default=32)
    parser.add_argument("--rounds", type=argtypes.at_least(1), default=3)
    parser.add_argument("--stages", type=argtypes.at_least(1), default=2,
                        help="pipeline stages to cut a single-graph bundle into (1: none)")
    parser.add_argument("--json", type=argtypes.result_file,
                        default=ROOT / "benchmarks" / "results" / "bench_gpu.json",
                        help="where to write the results (default benchmarks/results/)")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"This onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                         f"(it has {', '.join(ort.get_available_providers())}): install "
                         f"onnxruntime-gpu on a machine with an NVIDIA GPU.")
    work = argtypes.work_directory("bench_gpu.")
    try:
        return measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> int:
    import onnxruntime as ort

    import runtime
    from exporter.data import smart_home_utterances
    from runtime.stages import visible_gpus

    texts = [u.text for u in smart_home_utterances(args.texts, split="eval", seed=11)]
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    rows = []
    for bundle in args.bundle:
        variants = [("cpu", bundle, ["CPUExecutionProvider"]), ("gpu", bundle, gpu)]
        if not runtime.Bundle.open(bundle).manifest.get("stages") and args.stages > 1:
            from exporter.partition import restage

            staged = restage(bundle, args.stages, work / f"{Path(bundle).name}-{args.stages}")
            variants.append((f"gpu, {args.stages} stages", staged, gpu))
        reference = floats = None
        for name, path, providers in variants:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                model = runtime.load(path, providers=providers)
            vectors, seconds = embed_timed(model, texts, args.batch_size, args.rounds)
            if reference is None:
                reference = vectors
                floats = float_embeddings(model, texts, args.batch_size)
            to_cpu = cosines(vectors, reference)
            to_float = None if floats is None else cosines(vectors, floats)
            row = {"bundle": Path(bundle).name, "variant": name,
                   "providers": taken_providers(model),
                   "texts_per_s": round(len(texts) / seconds, 1),
                   "batch1_p50_ms": round(single_latency_ms(model, texts), 3),
                   "cosine_to_cpu": [round(float(to_cpu.mean()), 6), round(float(to_cpu.min()), 6)],
                   "cosine_to_float": None if to_float is None else
                   [round(float(to_float.mean()), 6), round(float(to_float.min()), 6)],
                   "warnings": [str(w.message) for w in said]}
            model.close()
            rows.append(row)
            print(row, flush=True)   # kept in the log should a later variant fail

    print(f"\n{len(texts)} texts in batches of {args.batch_size}, best of {args.rounds} rounds; "
          f"onnxruntime {ort.__version__}, {visible_gpus()} GPU(s) visible, "
          f"{os.cpu_count()} CPUs\n")
    print("| bundle | variant | stage providers | texts/s | batch-1 p50 ms | cosine to CPU "
          "mean / min | cosine to PyTorch float mean / min |")
    print("|---|---|---|---|---|---|---|")
    def pair(figures):
        return "n/a" if figures is None else f"{figures[0]:.5f} / {figures[1]:.5f}"

    for r in rows:
        print(f"| {r['bundle']} | {r['variant']} | "
              f"{', '.join(p.replace('ExecutionProvider', '') for p in r['providers'])} | "
              f"{r['texts_per_s']} | {r['batch1_p50_ms']} | "
              f"{pair(r['cosine_to_cpu'])} | {pair(r['cosine_to_float'])} |")
    for r in rows:
        for message in r["warnings"]:
            print(f"{r['bundle']} {r['variant']}: warned: {message}")

    out = Path(args.json)
    argtypes.write_result(out, json.dumps({
        "rows": rows, "texts": len(texts), "batch_size": args.batch_size,
        "rounds": args.rounds, "stages": args.stages, "gpus_visible": visible_gpus(),
        "cpu": platform.processor() or platform.machine(), "cpus_visible": os.cpu_count(),
        "onnxruntime": ort.__version__,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    argtypes.stop_on_signals()   # SIGTERM, SIGHUP: the work directory goes, as on Ctrl-C
    sys.exit(main())
