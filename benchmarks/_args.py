"""argparse types the benchmarks share, so that a bad argument is refused at once, with
its reason, rather than after minutes of exporting (or never: `--rounds 0` timed nothing);
`write_result`, which writes their result files whole or not at all; and `stop_on_signals`,
with which a run stopped by SIGTERM or SIGHUP removes its work directory, as on Ctrl-C.

    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--target", type=target, default="arm-cpu")
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer argument that must be `minimum` or more."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _passing(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argument that `check` must accept; its ValueError or OSError is the refusal."""

    def parse(text: str) -> str:
        try:
            check(text)
        except (ValueError, OSError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return parse


def _target(text: str) -> None:
    from targets import load_target

    load_target(text)


def _model(text: str) -> None:
    from exporter.gguf import PACKAGED_GGUF, is_gguf_path
    from exporter.load import PACKAGED_MODELS, infer_task, resolve_model_dir

    if text in PACKAGED_GGUF or is_gguf_path(text):
        raise ValueError(f"{text!r} is a decoder; this benchmark measures encoders: give "
                         f"{', '.join(PACKAGED_MODELS)} or a checkpoint directory "
                         f"(decoders: benchmarks/bench_decoder.py).")
    # the task is inferred from config.json: a classifier or a causal LM checkpoint was
    # exported in full, then the sentence-embedding comparison failed on it
    task = infer_task(resolve_model_dir(text))
    if task != "feature-extraction":
        where = ("give it as --classifier DIR" if task == "text-classification" else
                 "decoders: benchmarks/bench_decoder.py")
        raise ValueError(f"{text!r} is a {task} checkpoint; --model takes a sentence encoder "
                         f"(feature-extraction): {where}.")


def _bundle(text: str) -> None:
    from runtime.bundle import Bundle

    Bundle.open(text, verify=False)   # its files are verified when it is loaded


# A built-in target name or a .toml profile that loads (the name is what is kept).
target = _passing(_target)
# A packaged encoder name or a feature-extraction checkpoint directory (with a config.json).
model = _passing(_model)


def bundle(text: str) -> Path:
    """A bundle directory whose manifest reads."""
    return Path(_passing(_bundle)(text))


def result_file(text: str) -> Path:
    """A file to write results to, refused at once rather than after the whole run (when the
    write fails and the results are lost): not a directory, and in a directory that exists
    or can be made, where files can be written (tried: permissions alone do not tell root
    that /proc takes no files)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file path.")
    where = next(p for p in (path.parent, *path.parent.parents) if p.exists() or p == p.parent)
    if not where.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {str(where)!r} is a file, not a "
                                         f"directory; give a path in a directory.")
    try:   # a file where it goes, or a directory on the way to it: made, then removed
        if where == path.parent:
            with tempfile.NamedTemporaryFile(dir=where, prefix=f".{path.name}."):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=where, prefix=".results."))
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write in {str(where)!r} "
                                         f"({e.strerror}); give a path where files can be "
                                         f"written.") from None
    return path


def single_graph_bundle(text: str) -> Path:
    """An encoder bundle whose graph is not cut into pipeline stages yet."""
    import json

    path = bundle(text)
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("stages"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is already cut into {len(manifest['stages'])} stages; give a "
            f"single-graph bundle (e.g. an arm-cpu export).")
    if manifest.get("task") == "text-generation":
        raise argparse.ArgumentTypeError(f"{text!r} is a decoder bundle; give an encoder's.")
    return path


# bench_decoder's bundle flag -> (the manifest's quantization "weights", the "accuracy_level"
# of its 4-bit matrices or None for any, what the variant's label claims the bundle is).
DECODER_PRECISIONS: dict[str, tuple[str, int | None, str]] = {
    "int8": ("int8", None, "8-bit weights (--precision int8)"),
    "int4": ("int4", 0, "4-bit weights with exact activations (accuracy_level 0, as the "
                        "default profiles write)"),
    "fast": ("int4", 4, "4-bit weights with int8 activations (accuracy_level 4)"),
}


def decoder_precision(manifest: dict) -> dict:
    """What a decoder bundle's manifest says its weights and activations are."""
    q = manifest.get("quantization") or {}
    return {key: q.get(key) for key in ("weights", "accuracy_level", "int8_accuracy_level",
                                        "activations")}


def decoder_bundle(flag: str) -> Callable[[str], Path]:
    """A text-generation bundle (bench_decoder reads its tokenizer for every variant's
    prompt and text: an encoder's scored the peers on the wrong token ids) quantized as
    `flag` (a key of DECODER_PRECISIONS) says: one int4 bundle given as --int4, --int8 and
    --fast was measured three times under three labels."""
    weights, level, promise = DECODER_PRECISIONS[flag]

    def parse(text: str) -> Path:
        import json

        path = bundle(text)
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("task") != "text-generation":
            raise argparse.ArgumentTypeError(
                f"{text!r} is a {manifest.get('task', 'non-generative')} bundle; give a "
                f"SmolLM2 export (python -m exporter --model smollm2 ...).")
        has = decoder_precision(manifest)
        if has["weights"] == weights and level in (None, has["accuracy_level"]):
            return path
        if has["weights"] is None:
            raise argparse.ArgumentTypeError(
                f"{text!r}: its manifest records no quantization (\"quantization\": "
                f"{{\"weights\": ...}}); --{flag} takes {promise}.")
        other = next((f"; give it as --{name}" for name, (w, a, _) in DECODER_PRECISIONS.items()
                      if w == has["weights"] and a in (None, has["accuracy_level"])), "")
        raise argparse.ArgumentTypeError(
            f"{text!r} holds {has['weights']} weights at accuracy_level "
            f"{has['accuracy_level']}; --{flag} takes {promise}{other}, or leave out "
            f"--{flag} to export one.")

    return parse


def classifier(text: str) -> Path:
    """A trained intent classifier directory (samples/train_intents.py), holding test.jsonl."""
    path = Path(text)
    if not (path / "test.jsonl").is_file():
        raise argparse.ArgumentTypeError(
            f"{text!r} has no test.jsonl: give a directory written by "
            f"`python samples/train_intents.py --output {text}`.")
    return path


def labelled_classifier(min_texts: int) -> Callable[[str], Path]:
    """A classifier directory (as `classifier`) whose test.jsonl holds at least `min_texts`
    texts, every one labelled: bench_encoder scores accuracy on every test text and times
    full batches of them (with fewer than one batch it failed after both exports)."""

    def parse(text: str) -> Path:
        from exporter.data import read_texts

        path = classifier(text)
        try:
            texts = read_texts(path / "test.jsonl")
        except (ValueError, OSError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        unlabelled = next((u for u in texts if u.intent is None), None)
        if unlabelled:
            raise argparse.ArgumentTypeError(
                f"{unlabelled.where} has no \"label\"; the benchmark scores accuracy "
                f"against every test text's label.")
        if len(texts) < min_texts:
            raise argparse.ArgumentTypeError(
                f"{text!r}: test.jsonl holds {len(texts)} texts; the benchmark times batches "
                f"of {min_texts}: give at least {min_texts} (samples/train_intents.py "
                f"--test-size).")
        return path

    return parse


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it ("AMD EPYC"; platform.processor() is
    empty on Linux), else what platform says ("x86_64")."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("model name", "Model") and value:
            return value
    return platform.processor() or platform.machine()


def versions(*names: str) -> dict[str, str]:
    """The installed version of each distribution in `names`, or "not installed"."""
    from exporter.bundle import tool_versions

    return tool_versions(names)


def write_result(path: Path, text: str) -> None:
    """`path` holds `text`, or what it held before if the run is stopped: never a part of it
    (a temporary file beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# The work directories of this run (work_directory), removed by the signal handler itself.
_work_directories: list[Path] = []


def work_directory(prefix: str) -> Path:
    """A new directory in the system's temporary directory for a run's exported models, which
    a SIGTERM or SIGHUP (with stop_on_signals) removes however deep the run is stopped; the
    run's own `finally` removes it otherwise."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    _work_directories.append(work)
    return work


def stop_on_signals() -> None:
    """SIGTERM (a CI timeout, `kill`) and SIGHUP (a closed terminal) raise SystemExit(128 + N),
    as Ctrl-C raises KeyboardInterrupt, so that the run's `finally` blocks remove its work
    directory (by default those signals end the process on the spot and leave it, hundreds of
    MB of exported models, in /tmp). For a script's `__main__`, as exporter's CLI does.

    The handler removes the work directories itself first: raised inside Python code that a
    C++ library called (torch's first import, an ONNX export's tracing), SystemExit cannot
    unwind through that library and the process aborts (pybind11: "terminate called"),
    running no `finally`."""

    def stop(signum, frame):
        while _work_directories:
            shutil.rmtree(_work_directories.pop(), ignore_errors=True)
        raise SystemExit(128 + signum)

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)
