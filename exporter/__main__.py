"""Command line: python -m exporter --target arm-cpu [--model minilm] [...]

A thin layer over `exporter.export`: each flag is one argument of it.
Exit status: 0 bundle written, 2 bad input, 3 a budget (accuracy, size or latency) broken,
1 anything else; 128 + N when stopped by signal N (SIGTERM, SIGHUP: the export's temporary
files are removed first, as on Ctrl-C).
"""

from __future__ import annotations

import argparse
import dis
import importlib.util
import signal
import sys
import traceback
from pathlib import Path

from targets import available_targets, load_target

# What an export imports beyond the runtime's numpy + onnxruntime (the "export" extra).
EXPORT_STACK = ("torch", "transformers", "optimum", "onnx")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exporter",
        description="Export a Hugging Face transformer to a static-quantized ONNX bundle "
                    "for a hardware target.")
    parser.add_argument("--target", help=f"built-in target ({', '.join(available_targets())}) "
                                         f"or a path to a .toml profile")
    parser.add_argument("--model", default="minilm",
                        help="Hugging Face checkpoint directory, a .gguf file, or a packaged "
                             "model: 'minilm' (default, all-MiniLM-L6-v2), 'smollm2' "
                             "(SmolLM2-135M-Instruct)")
    parser.add_argument("--task", choices=("feature-extraction", "text-classification",
                                           "text-generation"),
                        help="default: read from the model")
    parser.add_argument("--calibration", metavar="FILE",
                        help=".txt (one text per line) or .jsonl with a \"text\" field "
                             "(and \"label\", a name or class index, for classifiers); "
                             "default: smart-home "
                             "utterances (decoders: English prose)")
    parser.add_argument("--eval", metavar="FILE",
                        help="held-out texts, same formats; default: other "
                             "smart-home utterances (decoders: English prose)")
    parser.add_argument("--output", metavar="DIR", help="default: build/<model>-<target>/")
    parser.add_argument("--tar", action="store_true",
                        help="also write <output>.tar, the bundle as one file for flashing "
                             "(runtime.unpack(path, directory) installs it, verified)")
    parser.add_argument("--sign-key", metavar="KEY.pem",
                        help="sign the bundle with this Ed25519 private key (manifest.sig; "
                             "python -m exporter.sign keygen makes one); the device loads it "
                             "with runtime.load(path, signed_by=KEY.pub)")
    parser.add_argument("--accuracy-budget", metavar="BUDGET",
                        help="e.g. 'cosine>=0.97' or 'cosine>=0.98,min-cosine>=0.9'; "
                             "default: the profile's")
    parser.add_argument("--precision", choices=("int8", "fp16", "int4", "float"),
                        help="encoders: int8 (static int8 QDQ) or fp16 (no int8, the whole "
                             "graph in float16); decoders: int4, int8 or float weights, or fp16 "
                             "(float16 weights and activations); "
                             "default: the profile's")
    parser.add_argument("--stages", type=int, metavar="N",
                        help="cut the graph into N pipeline stages, one per device "
                             "(1 = one graph); default: the profile's")
    parser.add_argument("--requantize", action="store_true",
                        help="GGUF sources: round the dequantized weights to the target's "
                             "format instead of carrying the file's blocks exactly (needed "
                             "for block types that cannot be carried, e.g. Q4_K)")
    parser.add_argument("--drop-layers", metavar="N|I,J",
                        help="drop N layers, the least important on calibration text, or the "
                             "layers with these indices")
    parser.add_argument("--prune-heads", type=float, default=0.0, metavar="F",
                        help="remove this fraction of attention heads, in [0, 1)")
    parser.add_argument("--prune-ffn", type=float, default=0.0, metavar="F",
                        help="remove this fraction of FFN neurons per layer, in [0, 1)")
    parser.add_argument("--sparsity", type=float, default=0.0, metavar="F",
                        help="zero this fraction of each layer matrix's weights, in [0, 1)")
    parser.add_argument("--sparsity-pattern", default="unstructured",
                        choices=("unstructured", "2:4", "4:8", "1:4"),
                        help="N:M keeps N of every M weights (default: unstructured)")
    parser.add_argument("--share-layers", action="store_true",
                        help="tie adjacent layers' attention, FFN or whole layer where sharing "
                             "costs little (measured)")
    parser.add_argument("--share-max-harm", type=float, metavar="H",
                        help="--share-layers: the most harm all ties together may cost: 1 - cosine "
                             "to the untied output, or a decoder's relative perplexity "
                             "increase (default 0.02)")
    parser.add_argument("--heal-steps", type=int, default=0, metavar="N",
                        help="distillation steps from the original after compressing")
    parser.add_argument("--max-model-mb", type=float, metavar="MB",
                        help="size budget for the model file(s); the exporter picks the "
                             "weakest compression that meets it within the accuracy budget; "
                             "default: the profile's (none)")
    parser.add_argument("--max-latency-ms", type=float, metavar="MS",
                        help="batch-1 latency budget (p50 on this machine), same search; "
                             "default: the profile's (none)")
    parser.add_argument("--list-targets", action="store_true",
                        help="print the built-in targets and exit")
    args = parser.parse_args(argv)

    try:
        if args.list_targets:
            for name in available_targets():
                print(f"{name:12s} {load_target(name).description}")
            return 0
        if not args.target:
            parser.error("--target is required (or --list-targets)")
        if args.share_max_harm is not None and not args.share_layers:
            raise ValueError("--share-max-harm sets how much --share-layers may cost; give "
                             "--share-layers too, or leave it out.")
        missing = [m for m in EXPORT_STACK + (("cryptography",) if args.sign_key else ())
                   if importlib.util.find_spec(m) is None]
        if missing:
            print(f"error: the exporter needs {', '.join(missing)}, which this environment "
                  f"lacks (the device runtime does not): pip install torch==2.13.0 && "
                  f"pip install 'edge-exporter[export]'", file=sys.stderr)
            return 1
        from exporter import BudgetError, Compression, export

        compression = Compression(
            drop_layers=Compression.parse_layers(args.drop_layers)   # "" is refused there
            if args.drop_layers is not None else 0,
            prune_heads=args.prune_heads, prune_ffn=args.prune_ffn, sparsity=args.sparsity,
            sparsity_pattern=args.sparsity_pattern, share_layers=args.share_layers,
            heal_steps=args.heal_steps, **({} if args.share_max_harm is None else
                                           {"share_max_harm": args.share_max_harm}))
        try:
            path = export(args.model, target=args.target, task=args.task, output=args.output,
                          calibration=args.calibration, evaluation=args.eval,
                          accuracy_budget=args.accuracy_budget, precision=args.precision,
                          stages=args.stages, requantize=args.requantize,
                          compression=compression, max_model_mb=args.max_model_mb,
                          max_latency_ms=args.max_latency_ms, tar=args.tar,
                          sign_key=args.sign_key)
        except BudgetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
    except (ValueError, TypeError) as e:
        culprit = _not_a_refusal(e)
        if culprit:   # most likely our code handed the library something wrong: our bug
            traceback.print_exc()
            print(f"error: {culprit} raised {type(e).__name__}: {e} (exit 1: the traceback "
                  f"above is worth reporting)", file=sys.stderr)
            return 1
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # the machine, not the request: a full disk, an I/O error
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # the export's work directory is gone by now
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(path)
    return 0


# Where this tool's code lives: a ValueError raised in it (or in the standard library, say
# json or tomllib reading a user's file) is a refusal of the input, exit 2; one raised by a
# third-party library's Python code (torch, onnx, numpy ...) is most likely a bug of ours,
# exit 1 with its traceback.
_OURS = tuple(str(Path(__file__).resolve().parent.parent / p) for p in
              ("exporter", "targets", "runtime"))


def _not_a_refusal(error: BaseException) -> str | None:
    """Who raised `error`, where it is most likely a bug of ours, not a refusal of the input:
    a third-party package's Python code ("numpy"), or a function written in C that this
    tool's code called ("a call at FILE:LINE": numpy's reshape, a builtin). None where a
    `raise` statement of this tool's, or of the standard library's Python code (json or
    tomllib reading a user's file), raised it: every refusal of an input is one of those."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return None
    code = tb.tb_frame.f_code
    where = Path(code.co_filename).resolve()
    if str(where).startswith(_OURS):
        op = next((i.opname for i in dis.get_instructions(code) if i.offset == tb.tb_lasti),
                  "RAISE_VARARGS")
        return None if op in ("RAISE_VARARGS", "RERAISE") else \
            f"a call at {code.co_filename}:{tb.tb_lineno}"
    parts = where.parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1].removesuffix(".py")
    return None


def _stop(signum, frame):
    raise _Stopped(128 + signum)   # unwinds through the export's cleanup, as Ctrl-C does


class _Stopped(SystemExit):
    """SIGTERM or SIGHUP: the process exits 128 + the signal's number, once cleaned up."""


if __name__ == "__main__":
    # A CI timeout or `docker stop` sends SIGTERM, a closed terminal SIGHUP: by default they end
    # the process on the spot and leave the work directory (hundreds of MB) behind.
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _stop)
    try:
        sys.exit(main())
    except _Stopped as stop:   # said as Ctrl-C's is: a CI log shows why the export ended
        name = signal.Signals(stop.code - 128).name
        print(f"stopped by {name}: nothing was written", file=sys.stderr)
        raise
