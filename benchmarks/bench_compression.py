"""Compression before export, each method and strength against plain int8, in one table.

    python benchmarks/bench_compression.py                       # MiniLM sentence embeddings
    python benchmarks/bench_compression.py --classifier build/intent-model --heal-steps 150
    python benchmarks/bench_compression.py --only int8 "drop 2" --heal-steps 0

Every variant goes through the exporter's own stages (load, compress, export_onnx, optimize,
smooth, quantize: the arm-cpu profile's static int8), once as compressed and, with
--heal-steps, once more after healing the same compressed model by distillation. Per row:
parameters, model.onnx size and its gzip size (a device image is compressed: this is where
unstructured sparsity shows), batch-1 latency p50 on ONNX Runtime CPU (every graph warmed up
and timed in its own block, blocks repeated --rounds times round-robin, best round kept: the
machine is shared), and quality against the ORIGINAL float PyTorch model on held-out text:
mean cosine of pooled sentence embeddings, or, for a classifier, accuracy on its test.jsonl
next to the float model's. Writes benchmarks/results/bench_compression.{json,md,png}: the JSON
holds the run's settings, host and versions beside the rows.

A variant the model cannot take ("drop 3" of a 2-layer model) is refused before anything is
built; one that still fails while building is recorded as failed, with its reason, beside the
rows of the others (exit status 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import _args as argtypes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# name -> Compression fields. "int8" is the baseline: the profile's int8, nothing removed.
VARIANTS: dict[str, dict] = {
    "int8": {},
    "drop 1": {"drop_layers": 1},
    "drop 2": {"drop_layers": 2},
    "drop 3": {"drop_layers": 3},
    "heads 0.5": {"prune_heads": 0.5},
    "ffn 0.5": {"prune_ffn": 0.5},
    "ffn 0.75": {"prune_ffn": 0.75},
    "sparse 0.5": {"sparsity": 0.5},
    "sparse 2:4": {"sparsity_pattern": "2:4"},
    "share": {"share_layers": True},
    "share 0.25": {"share_layers": True, "share_max_harm": 0.25},
    "drop 2 + heads 0.5 + ffn 0.5": {"drop_layers": 2, "prune_heads": 0.5, "prune_ffn": 0.5},
    "drop 3 + ffn 0.5": {"drop_layers": 3, "prune_ffn": 0.5},
}

BUILD = ("load", "compress", "export_onnx", "optimize", "smooth", "quantize")


def build(job, stages) -> None:
    for stage in stages:
        stage(job)


def fresh(job, tmp: Path):
    """The same job (same compressed PyTorch model) in a new work directory."""
    workdir = Path(tempfile.mkdtemp(dir=tmp))
    shutil.copyfile(job.workdir / "tokenizer.json", workdir / "tokenizer.json")
    return dataclasses.replace(job, workdir=workdir, records=dict(job.records))


def measure(job, name: str, healed: bool, threads: int) -> dict:

    from exporter.compress import parameters
    from exporter.feeds import ort_session
    from exporter.validate import classification_metrics, cosine_rows, outputs

    path = job.quantized_onnx
    session = ort_session(path, threads=threads, spinning=False)
    texts = [u.text for u in job.evaluation]
    ours, ref = outputs(job, session, texts)
    quality = {"cosine": round(float(cosine_rows(ours, ref).mean()), 5)}
    if job.task == "text-classification":
        quality.update(classification_metrics(job, ours, ref))
    data = path.read_bytes()
    return {"variant": name, "healed": healed, "parameters": parameters(job.torch_model),
            "layers": job.torch_model.config.num_hidden_layers,
            "model_bytes": len(data), "gzip_bytes": len(gzip.compress(data, 6)),
            "quality": quality, "session": session}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", type=argtypes.model, default="minilm",
                       help="encoder (feature-extraction; default minilm)")
    which.add_argument("--classifier", type=argtypes.classifier, metavar="DIR",
                       help="a trained classifier directory holding test.jsonl "
                            "(samples/train_intents.py), instead of --model")
    parser.add_argument("--target", type=argtypes.target, default="arm-cpu")
    parser.add_argument("--heal-steps", type=argtypes.at_least(0), default=100)
    parser.add_argument("--rounds", type=argtypes.at_least(1), default=5)
    parser.add_argument("--threads", type=argtypes.at_least(1), default=1,
                        help="ONNX Runtime intra-op threads, no spinning (default 1: steady "
                             "numbers on a shared machine)")
    parser.add_argument("--runs", type=argtypes.at_least(1), default=300,
                        help="timed runs per variant")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                        help="these variants only (int8, the baseline, is always measured)")
    parser.add_argument("--output", type=argtypes.result_file,
                        default=str(RESULTS / "bench_compression"))
    args = parser.parse_args(argv)
    for path in result_paths(args.output).values():   # what is written: each a file
        if path.is_dir():
            parser.error(f"--output {str(args.output)!r} writes {str(path)!r}, which is a "
                         f"directory; give another --output.")
    model = str(args.classifier) if args.classifier else args.model
    # int8, uncompressed, is every variant's baseline: always measured; each variant once
    names = list(dict.fromkeys(["int8", *(args.only or VARIANTS)]))
    try:
        refused = unfit_variants(model, names, args.target)
    except ValueError as e:   # config.json's layer count is no count
        parser.error(str(e))
    if refused:
        fit = [n for n in names if n not in refused]
        parser.error(f"{model!r} cannot take " + "; ".join(
            f"{name!r} ({why.rstrip('.')})" for name, why in refused.items())
            + f". Leave {'it' if len(refused) == 1 else 'them'} out: --only "
            + " ".join(repr(n) for n in fit))

    from exporter import pipeline
    from exporter.budget import Budget
    from exporter.compress import Compression
    from exporter.data import read_texts, smart_home_utterances
    from exporter.validate import latency_ms
    from targets import load_target

    target = load_target(args.target)
    evaluation = (read_texts(args.classifier / "test.jsonl") if args.classifier
                  else smart_home_utterances(target.validation.eval_samples, split="eval"))
    calibration = smart_home_utterances(target.quantization.calibration_samples,
                                        split="calibration")
    import torch  # noqa: F401  (first imported here, not in the work below: see stop_on_signals)

    tmp = argtypes.work_directory("bench_compression.")
    rows, failed, built = [], {}, None
    try:
        for name in names:
            started = time.perf_counter()
            job = pipeline.new_job(model, target=target, task=None, output=tmp / "out",
                                   calibration=calibration, evaluation=evaluation,
                                   budget=Budget.parse("cosine>=0"),
                                   compression=Compression(**VARIANTS[name]),
                                   log=lambda line: None)
            measured = len(rows)
            try:   # one variant that fails must not lose the others' rows (nor its own)
                for row in build_variant(job, name, tmp, args):
                    rows.append(row)
            except Exception as e:   # recorded with its reason, and said in the table
                which = f"{name}, healed" if len(rows) > measured else name
                failed[which] = f"{type(e).__name__}: {e}"
                print(f"{which} failed: {failed[which]}", file=sys.stderr, flush=True)
                continue
            built = built or job
            print(f"built {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr,
                  flush=True)
        if not rows:
            write(rows, failed, args, model)
            return 1
        sessions = {(r["variant"], r["healed"]): r.pop("session") for r in rows}
        texts = [u.text for u in evaluation]
        timed = latency_ms(built, {f"{k[0]}|{k[1]}": s for k, s in sessions.items()}, texts,
                           args.runs * args.rounds, rounds=args.rounds, seconds=None)
        for r in rows:
            r["latency_ms_p50"] = timed[f"{r['variant']}|{r['healed']}"]["p50"]
        base = next((r for r in rows if r["variant"] == "int8"), None)
        for r in rows:
            r["speedup_vs_int8"] = (round(base["latency_ms_p50"] / r["latency_ms_p50"], 3)
                                    if base else None)
        write(rows, failed, args, model)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


def unfit_variants(model: str, names: list[str], target: str) -> dict[str, str]:
    """Variant name -> why the model cannot take it ("drop 3" of a 2-layer model), asked of
    config.json as export() asks it before any work: the run failed there after building
    every variant before it, and wrote nothing."""
    import exporter
    from exporter.compress import Compression
    from exporter.load import infer_task, resolve_model_dir
    from targets import load_target

    profile = load_target(target)
    layers = exporter._layers(resolve_model_dir(model))
    shape = exporter._shape(model, generative=False, task=infer_task(resolve_model_dir(model)))
    refused = {}
    for name in names:
        try:
            exporter._check_compression(Compression(**VARIANTS[name]), profile, layers, shape)
        except ValueError as e:
            refused[name] = str(e)
    return refused


def build_variant(job, name: str, tmp: Path, args) -> Iterator[dict]:
    """The variant's row as compressed and, with --heal-steps, its row after healing."""
    from exporter import pipeline
    from exporter.heal import heal

    stages = {s.__name__: s for s in pipeline.STAGES}
    build(job, [stages[s] for s in BUILD])
    yield measure(job, name, healed=False, threads=args.threads)
    if args.heal_steps and VARIANTS[name]:
        healed = fresh(job, tmp)
        masks = ({p: p != 0 for p in healed.torch_model.parameters() if p.dim() == 2}
                 if "sparse" in name else {})
        record = heal(healed, healed.torch_model, healed.reference_model,
                      steps=args.heal_steps, masks=masks)
        healed.torch_model.eval()
        build(healed, [stages[s] for s in BUILD[2:]])
        yield {**measure(healed, name, healed=True, threads=args.threads), "healing": record}


def quality_key(rows) -> str:
    return "accuracy" if "accuracy" in rows[0]["quality"] else "cosine"


def result_paths(output: Path) -> dict[str, Path]:
    """The .json, .md and .png written for `--output`: its name plus each suffix, so that
    `--output run.1` and `--output run.2` stay apart (with_suffix made both run.json); a name
    already ending in one of them (`--output x.json`) is taken as the stem."""
    if output.suffix in (".json", ".md", ".png"):
        output = output.with_suffix("")
    return {s: output.with_name(output.name + s) for s in (".json", ".md", ".png")}


def write(rows, failed: dict[str, str], args, model: str) -> None:
    """The table (.md), the plot (.png) and, first, the JSON: the rows measured, the variants
    that failed and why, and the run's settings."""
    paths = result_paths(args.output)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    host = f"{argtypes.cpu_name()}, {os.cpu_count()} CPUs visible"
    # the measurements first: a plot that fails (or no matplotlib) must not lose them
    argtypes.write_result(paths[".json"], json.dumps({
        "model": model, "target": args.target, "threads": args.threads, "rounds": args.rounds,
        "runs": args.runs, "heal_steps": args.heal_steps, "cpu": argtypes.cpu_name(),
        "cpus_visible": os.cpu_count(),
        "versions": argtypes.versions("onnxruntime", "torch", "transformers", "onnx"),
        "rows": rows, "failed": failed}, indent=2, default=str) + "\n")
    lines = [f"# Compression + int8 on {model} ({args.target}, batch 1, ONNX Runtime CPU)", "",
             f"Latency: {args.threads} ONNX Runtime thread(s), best of {args.rounds} "
             f"round-robin rounds on {host}. "
             f"Quality against the original float PyTorch model."]
    if rows:
        key = quality_key(rows)
        lines += ["", f"| variant | healed | layers | params (M) | model.onnx (MB) | gzip (MB) "
                      f"| latency p50 (ms) | speed vs int8 | {key} |", "|" + "---|" * 9]
        for r in rows:
            q = r["quality"]
            value = (f"{100 * q['accuracy']:.2f}% (float {100 * q['float-accuracy']:.2f}%)"
                     if key == "accuracy" else f"{q['cosine']:.4f}")
            speed = "n/a" if r["speedup_vs_int8"] is None else f"{r['speedup_vs_int8']:.2f}x"
            lines.append(f"| {r['variant']} | {'yes' if r['healed'] else 'no'} | {r['layers']} | "
                         f"{r['parameters'] / 1e6:.2f} | {r['model_bytes'] / 1e6:.2f} | "
                         f"{r['gzip_bytes'] / 1e6:.2f} | {r['latency_ms_p50']:.3f} | "
                         f"{speed} | {value} |")
    lines += [f"\n{name}: failed: {why}" for name, why in failed.items()]
    if rows and plot(rows, quality_key(rows), paths[".png"], model):
        lines += ["", f"![quality against latency]({paths['.png'].name})", ""]
    text = "\n".join(lines)
    print(text)
    argtypes.write_result(paths[".md"], text)


def plot(rows, key: str, path: Path, model: str) -> bool:
    """Draw `path`, written whole (a temporary file, then a rename); False without
    matplotlib (the exporter's own reports treat it as optional too)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        y = r["quality"][key] * (100 if key == "accuracy" else 1)
        ax.scatter(r["latency_ms_p50"], y, marker="o" if r["healed"] else "x",
                   color="tab:green" if r["healed"] else "tab:red" if r["variant"] != "int8"
                   else "black")
        ax.annotate(r["variant"] + (" +heal" if r["healed"] else ""),
                    (r["latency_ms_p50"], y), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    if key == "accuracy":
        ax.axhline(100 * rows[0]["quality"]["float-accuracy"] - 1.0, ls="--", color="grey",
                   lw=0.8, label="float accuracy - 1 point")
        ax.legend(loc="lower right")
    ax.set_xlabel("batch-1 latency p50, ms (int8, ONNX Runtime CPU)")
    ax.set_ylabel("accuracy (%)" if key == "accuracy" else "embedding cosine to float")
    ax.set_title(f"Compression + int8: {Path(model).name} (x: not healed, o: healed)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(temporary, dpi=120, format="png")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        plt.close(fig)
    return True


if __name__ == "__main__":
    argtypes.stop_on_signals()   # SIGTERM, SIGHUP: the work directory goes, as on Ctrl-C
    sys.exit(main())
