"""Bundles on a CUDA GPU against the same bundles on the CPU: the same embeddings (encoders)
or the same decoding (decoders), which device each pipeline stage got, and the speed.

    python benchmarks/bench_gpu.py --bundle build/minilm-x86-server --bundle build/minilm-jetson
                                   [--texts 512] [--batch-size 32] [--rounds 3]

Needs onnxruntime with CUDAExecutionProvider (the onnxruntime-gpu package) and a GPU that
this process sees (CUDA_VISIBLE_DEVICES applies); without either it stops at once and says
so. For each bundle it loads, in one process:

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
single-text calls.

A decoder bundle (text-generation) is loaded on the CPU and on CUDA alone. Each greedily
continues the same prompt by `--new-tokens` tokens through `runtime.generate.Decoder` (decode
tokens/s, the prompt's prefill timed apart), and measures perplexity on English prose (Python's
own documentation, 128-token windows). Then the cache is checked on each device: the prose's
first tokens fed one per step, each step's logits against one forward over them all from an
empty cache (argmax agreement and max |difference|); a cache that is not carried from step to
step (as on CUDA before the KV cache lived on the GPU) disagrees at once. Prints a table per
kind and writes benchmarks/results/bench_gpu.json. `--new-tokens` that do not fit a decoder
bundle's context (generation.context_length) after the prompt are refused at the start.
"""

from __future__ import annotations

import argparse
import json
import os
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
                        help="an encoder or decoder bundle (repeat for several)")
    parser.add_argument("--texts", type=argtypes.at_least(1), default=512)
    parser.add_argument("--batch-size", type=argtypes.at_least(1), default=32)
    parser.add_argument("--rounds", type=argtypes.at_least(1), default=3)
    parser.add_argument("--stages", type=argtypes.at_least(1), default=2,
                        help="pipeline stages to cut a single-graph bundle into (1: none)")
    parser.add_argument("--new-tokens", type=argtypes.at_least(1), default=64,
                        help="greedy tokens each decoder generates")
    parser.add_argument("--json", type=argtypes.result_file,
                        default=str(ROOT / "benchmarks" / "results" / "bench_gpu.json"),
                        help="where to write the results (default benchmarks/results/)")
    args = parser.parse_args(argv)
    for bundle in args.bundle:
        try:
            check_context(bundle, args.new_tokens)
        except ValueError as e:
            parser.error(str(e))

    import onnxruntime as ort

    from runtime.stages import visible_gpus

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"This onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                         f"(it has {', '.join(ort.get_available_providers())}): install "
                         f"onnxruntime-gpu on a machine with an NVIDIA GPU.")
    if visible_gpus() == 0:   # every "gpu" row would run on the CPU
        raise SystemExit(f"This onnxruntime {ort.__version__} has CUDAExecutionProvider, but "
                         f"this process sees no GPU (no CUDA driver, or CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}): run it where "
                         f"a GPU is visible.")
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
    rows, decoders = [], []
    for bundle in args.bundle:
        # the manifest alone: runtime.load verifies every file's sha256 when it loads them
        manifest = runtime.Bundle.open(bundle, verify=False).manifest
        if manifest.get("task") == "text-generation":
            decoders += decoder_rows(bundle, args.new_tokens)
            continue
        variants = [("cpu", bundle, ["CPUExecutionProvider"]), ("gpu", bundle, gpu)]
        if not manifest.get("stages") and args.stages > 1:
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

    print(f"\nonnxruntime {ort.__version__}, {visible_gpus()} GPU(s) visible, "
          f"{os.cpu_count()} CPUs")
    if decoders:
        print_decoder_table(decoders, args.new_tokens)
    if not rows:
        return write(args, rows, decoders)
    print(f"\n{len(texts)} texts in batches of {args.batch_size}, best of {args.rounds} "
          f"rounds\n")
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

    return write(args, rows, decoders)


def write(args, rows: list[dict], decoders: list[dict]) -> int:
    import onnxruntime as ort

    from runtime.stages import visible_gpus

    out = Path(args.json)
    argtypes.write_result(out, json.dumps({
        "rows": rows, "decoders": decoders, "texts": args.texts, "batch_size": args.batch_size,
        "rounds": args.rounds, "stages": args.stages, "new_tokens": args.new_tokens,
        "gpus_visible": visible_gpus(),
        "cpu": argtypes.cpu_name(), "cpus_visible": os.cpu_count(),
        "onnxruntime": ort.__version__,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


PROMPT = "The history of the railway"
CACHE_CHECK_PREFIX = 8   # tokens of prose fed at once before the cache's step-by-step check


def check_context(bundle: Path, new_tokens: int) -> None:
    """ValueError where `new_tokens` after the prompt do not fit a decoder `bundle`'s context
    (its KV cache): decoder_rows fed them, then failed with ContextError after the CPU's whole
    run, and the rows measured were lost. An encoder bundle passes."""
    import runtime

    manifest = json.loads((Path(bundle) / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("task") != "text-generation":
        return
    # as runtime.Model.context reads it (neither there: loading the bundle says so)
    context = (manifest.get("generation") or {}).get("context_length", manifest.get("max_length"))
    if not isinstance(context, int):
        return
    prompt = len(runtime.Tokenizer.from_file(Path(bundle) / "tokenizer.json").encode(PROMPT))
    first = max(prompt, CACHE_CHECK_PREFIX)   # the greedy run's prompt, the cache check's prefix
    if first + new_tokens > context:
        raise ValueError(f"--new-tokens {new_tokens}: {str(bundle)!r} holds {context} tokens "
                         f"(generation.context_length), {first} of them taken before the new "
                         f"tokens; give --new-tokens {context - first} at most.")


def decoder_rows(bundle: Path, new_tokens: int) -> list[dict]:
    """One row per device: decode speed, perplexity, the greedy tokens, and the cache's
    incremental logits against a whole-sequence forward."""
    import runtime
    from exporter.data import english_prose
    from runtime.generate import Decoder

    prose = ""
    for paragraph in english_prose():
        if len(prose) > 4000:   # about 1k tokens: 8 windows of 128
            break
        prose += paragraph + " "
    rows, reference = [], None
    for name, providers in (("cpu", ["CPUExecutionProvider"]),
                            ("gpu", ["CUDAExecutionProvider", "CPUExecutionProvider"])):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            model = runtime.load(bundle, providers=providers)
        prompt = model.tokenizer.encode(PROMPT)
        decoder = Decoder(model.session, context=model.context)
        decoder.forward(prompt)   # warm-up: kernels, allocations
        decoder.reset()
        started = time.perf_counter()
        logits = [decoder.forward(prompt)]
        prefill = time.perf_counter() - started
        tokens = []
        started = time.perf_counter()
        for _ in range(new_tokens):
            tokens.append(int(np.argmax(logits[-1])))
            logits.append(decoder.forward([tokens[-1]]))
        decode = time.perf_counter() - started
        # the cache from step to step, on real text: its first 8 tokens at once, then one
        # token per step, against one forward over all of them from an empty cache
        text = model.tokenizer.encode(prose)[:CACHE_CHECK_PREFIX + new_tokens]
        decoder.reset()
        steps = [decoder.forward(text[:CACHE_CHECK_PREFIX])]
        steps += [decoder.forward([t]) for t in text[CACHE_CHECK_PREFIX:]]
        steps = np.stack([row.reshape(-1) for row in steps]).astype(np.float32)
        decoder.reset()
        whole = decoder.forward(text, all_logits=True)[CACHE_CHECK_PREFIX - 1:].astype(
            np.float32)
        if reference is None:
            reference = tokens
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b),
                    len(tokens))
        row = {"bundle": Path(bundle).name, "variant": name,
               "providers": taken_providers(model),
               "decode_tokens_per_s": round(new_tokens / decode, 1),
               "prefill_ms": round(1e3 * prefill, 2),
               "perplexity": round(model.perplexity(prose, window=128), 4),
               "greedy_tokens_as_cpu": same,
               "incremental_argmax_agreement": round(float(
                   (steps.argmax(1) == whole.argmax(1)).mean()), 4),
               "incremental_max_abs_diff": round(float(np.abs(steps - whole).max()), 4),
               "text": model.tokenizer.decode(tokens),
               "warnings": [str(w.message) for w in said]}
        model.close()
        rows.append(row)
        print(row, flush=True)
    return rows


def print_decoder_table(rows: list[dict], new_tokens: int) -> None:
    print(f"\nDecoders: greedy continuation of {PROMPT!r} by {new_tokens} tokens; perplexity on "
          f"English prose in 128-token windows; the cache's steps against a whole forward on "
          f"{new_tokens} tokens of that prose\n")
    print("| bundle | variant | provider | decode tok/s | prefill ms | perplexity | greedy "
          "tokens as CPU | incremental vs whole: argmax agree / max diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bundle']} | {r['variant']} | "
              f"{r['providers'][0].replace('ExecutionProvider', '')} | "
              f"{r['decode_tokens_per_s']} | {r['prefill_ms']} | {r['perplexity']} | "
              f"{r['greedy_tokens_as_cpu']}/{new_tokens} | "
              f"{r['incremental_argmax_agreement']:.2f} / {r['incremental_max_abs_diff']} |")
    for r in rows:
        print(f"{r['bundle']} {r['variant']}: {r['text']!r}")


if __name__ == "__main__":
    argtypes.stop_on_signals()   # SIGTERM, SIGHUP: the work directory goes, as on Ctrl-C
    sys.exit(main())
