"""Exporter: Hugging Face model -> static-quantized ONNX bundle for a hardware target.

    >>> from exporter import export
    >>> export("minilm", target="arm-cpu")
    PosixPath('build/minilm-arm-cpu')
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import random
import shutil
import time
from collections.abc import Iterable, Mapping, Set
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")   # as runtime does: see its __init__

from runtime._files import check_name_room
from targets import CHOICES, Target, load_target, positive_number

from .budget import Budget, BudgetError
from .compress import Compression
from .data import (
    Utterance,
    check_characters,
    read_texts,
    smart_home_utterances,
    unlabelled_text,
)
from .report import (
    check_archive_replaceable,
    check_not_in_bundle,
    check_replaceable,
    remove_leftovers,
    written_here,
)

__all__ = ["BudgetError", "Compression", "export"]


# Fewer calibration or evaluation texts than this get a warning.
MIN_TEXTS = 32


def data_warnings(task: str, profile: Target, calibration: list[Utterance],
                  evaluation: list[Utterance],
                  compression: Compression | None = None) -> list[str]:
    """What about the calibration and evaluation texts weakens the export's claims."""
    lines = []
    if task != "text-generation":   # (decoders weigh windows of tokens, not texts)
        for what, texts, usual, harm in [
                ("calibration", calibration, profile.quantization.calibration_samples,
                 "int8 ranges taken from so few rarely cover what the device will see"),
                ("evaluation", evaluation, profile.validation.eval_samples,
                 "the accuracy figures rest on too few to mean much")]:
            if len(texts) < min(MIN_TEXTS, usual):
                lines.append(f"only {len(texts)} {what} texts: {harm} (the profile uses "
                             f"{usual}).")
    repeated = len(evaluation) - len({u.text for u in evaluation})
    if repeated and task != "text-generation":
        lines.append(f"{repeated} evaluation texts repeat an earlier one; each counts again "
                     f"in the accuracy figures (and in min-cosine's tail).")
    repeated = len(calibration) - len({u.text for u in calibration})
    if repeated and task != "text-generation":
        lines.append(f"{repeated} calibration texts repeat an earlier one; each weighs again "
                     f"in the int8 ranges, as if the device saw it that much more often.")
    overlap = also_calibration(fitted_calibration(task, profile, compression, calibration),
                               evaluation)
    if overlap:
        lines.append(f"{overlap} evaluation texts are also calibration texts; the "
                     f"accuracy figures are optimistic for those (the report says so).")
    return lines


def also_calibration(calibration: list[Utterance], evaluation: list[Utterance]) -> int:
    """How many evaluation texts are calibration texts too (each repeat counted)."""
    seen = {u.text for u in calibration}
    return sum(u.text in seen for u in evaluation)


def fitted_calibration(task: str, profile: Target, compression: Compression | None,
                       calibration: list[Utterance]) -> list[Utterance]:
    """The calibration texts the export fits the bundle to: an encoder's int8 ranges and
    SmoothQuant scales (`quantization.calibration_samples`) and the sensitivity search's
    choices (`sensitivity_samples`); where it compresses (`compression`, or a size / latency
    budget that picks one), the ranking, the strength search and healing (heal.py's
    ENCODER_BATCHES; a decoder's windows of the whole text). Each stage reads a prefix of the
    set (shuffled where longer than calibration_samples), so a text past the longest prefix
    is never read: an evaluation text found only there is still held out."""
    from .heal import ENCODER_BATCHES

    compresses = (compression is not None and compression.active) or \
        profile.validation.max_model_mb is not None or \
        profile.validation.max_latency_ms is not None
    if task == "text-generation":
        return list(calibration) if compresses else []
    settings, counts = profile.quantization, []
    if profile.precision == "int8":
        counts += [settings.calibration_samples, settings.sensitivity_samples]
    if compresses:
        counts += [settings.calibration_samples, ENCODER_BATCHES["score"][0],
                   ENCODER_BATCHES["heal"][0]]
    return calibration[:max(counts, default=0)]


def check_held_out(task: str, profile: Target, calibration: list[Utterance],
                   evaluation: list[Utterance], compression: Compression | None) -> int:
    """ValueError, before any work, where every evaluation text is a calibration text the
    export fits the bundle to (`fitted_calibration`): the budget would be checked on the
    very texts the bundle was fit to, which says nothing of text the device sees (one file
    for both held its budget at cosine 0.998; 300 unseen texts then gave 0.83). Returns how
    many evaluation texts are such texts (the report calls their figures optimistic)."""
    overlap = also_calibration(fitted_calibration(task, profile, compression, calibration),
                               evaluation)
    if overlap and overlap == len(evaluation):
        raise ValueError("Every evaluation text is also a calibration text: the accuracy "
                         "budget would be checked on the texts the bundle was fit to. Give "
                         "--eval texts kept out of --calibration (or leave --eval out for "
                         "the default held-out set).")
    return overlap


def _texts(source, *, default_split: str, count: int, what: str) -> list[Utterance]:
    if source is None:
        return smart_home_utterances(count, split=default_split)
    if isinstance(source, (str, Path)):
        return read_texts(source)
    if isinstance(source, (Mapping, Set)):   # its keys would be read, and a set's order is
        raise TypeError(f"{what} must be a list of texts (or Utterances, for labels) or a "
                        f"file, got a {type(source).__name__}: its keys would be read, not "
                        f"its values.")
    items = [u if isinstance(u, Utterance) else Utterance(u) for u in source]
    if not items or not all(isinstance(u.text, str) for u in items):
        raise ValueError(f"{what} must be a non-empty list of strings.")
    for i, u in enumerate(items):
        check_characters(u.text, f"{what}[{i}]")
    kept = [u for u in items if u.text.strip()]   # as a text file's blank lines are skipped
    if not kept:
        raise ValueError(f"{what} holds no text: its {len(items)} texts are all blank; give "
                         f"at least one.")
    return kept


def _check_utf8_names(**paths) -> None:
    """Refuse a path whose name is not UTF-8 (Python surrogate-escapes its bytes, "\\udce9"
    for a Latin-1 "\\xe9"): it passed every check, then failed minutes into the export, where
    report.md records it as UTF-8 text or onnxruntime opens a graph under it."""
    for what, path in paths.items():
        text = os.fspath(path) if isinstance(path, os.PathLike) else path
        if not isinstance(text, str):
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"The {what} path {ascii(text)} is not valid UTF-8 (a name written "
                             f"in another encoding, such as Latin-1): the export records it "
                             f"as UTF-8 text and onnxruntime opens files by UTF-8 name; "
                             f"rename it.") from None


def _shuffled(texts: list[Utterance], count: int) -> list[Utterance]:
    """`texts` in a seeded random order where there are more than `count`: each stage reads
    the first n it needs (calibration `count`, sensitivity fewer, healing more), and a file's
    first lines (one sorted by intent, say) cover a few of its kinds only."""
    if len(texts) <= count:
        return texts
    return random.Random(0).sample(texts, len(texts))


def _identity(path: Path) -> tuple[int, int] | None:
    """Which directory `path` is now (None where there is none): a directory written in its
    place since (replace_directory renames a new one in) is another."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _layers(model_dir: Path) -> int | None:
    """config.json's num_hidden_layers (None where it has none: transformers' default), or
    ValueError where it is no count: "6", 6.0 or null fail in transformers with a TypeError,
    and true or 0 build a model of one layer or none."""
    from .load import read_config

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = read_config(model_dir)
    if "num_hidden_layers" not in config:
        return None
    layers = config["num_hidden_layers"]
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"{path}: 'num_hidden_layers' is {json.dumps(layers)}; expected a "
                         f"whole number above 0, the model's layer count (6, not \"6\" or "
                         f"6.0): correct config.json.")
    return layers


def _shape(model: str, *, generative: bool, task: str) -> dict | None:
    """What the compress stage reads off the loaded model, read before loading it: config.json's
    model_type, num_hidden_layers, num_attention_heads, num_key_value_heads and
    intermediate_size, from config.json or a GGUF's metadata. None where one is unknown, or the
    loaded model may differ (config.pruned_heads) or is not one the stage compresses (BERT
    encoders, Llama decoders): the stage then decides."""
    if generative:
        from .gguf import is_gguf_path, llama_shape, packaged_gguf

        try:
            path = Path(model) if is_gguf_path(model) else packaged_gguf(model)
        except (ValueError, FileNotFoundError):
            return None   # not installed: loading says so
        shape = llama_shape(path)
        return None if shape is None else {"model_type": "llama", **shape}
    from .load import read_config, resolve_model_dir

    config = read_config(resolve_model_dir(model))
    kind = "llama" if task == "text-generation" else "bert"
    if config.get("model_type") != kind or config.get("pruned_heads"):
        return None
    shape = {"model_type": kind, **{name: config.get(name) for name in (
        "num_hidden_layers", "num_attention_heads", "intermediate_size")}}
    # BERT has one KV head per head; LlamaConfig's default is the same
    shape["num_key_value_heads"] = (config.get("num_key_value_heads") if kind == "llama"
                                    else None) or shape["num_attention_heads"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
               for k, v in shape.items() if k != "model_type"):
        return None
    return shape


def _dropped(compression: Compression | None) -> int:
    """How many layers `compression` drops."""
    drop = compression.drop_layers if compression is not None else 0
    return len(drop) if isinstance(drop, tuple) else drop


def _override(profile: Target, *, precision: str | None, stages: int | None,
              layers: int | None, dropped: int = 0) -> Target:
    """The profile with --precision / --stages applied, and the stage count checked against
    the `layers` left after `dropped` are dropped."""
    if precision is not None:
        if precision not in CHOICES["precision"]:
            raise ValueError(f"Unknown precision {precision!r}; expected one of "
                             f"{', '.join(CHOICES['precision'])}.")
        profile = dataclasses.replace(profile, precision=precision)
    if stages is not None:
        given = stages
        try:   # numpy's ints too, as the runtime takes them
            stages = operator.index(stages) if not isinstance(stages, bool) else 0
        except TypeError:
            stages = 0
        if stages < 1:
            raise ValueError(f"stages must be an int >= 1 (1 = one graph), got {given!r}.")
        profile = dataclasses.replace(
            profile, runtime=dataclasses.replace(profile.runtime, pipeline_stages=stages))
    count = profile.runtime.pipeline_stages
    kept = None if layers is None else layers - dropped
    if kept is not None and kept >= 1 and count > kept:   # none kept: compression's error
        after = f" after --drop-layers removes {dropped}" if dropped else ""
        raise ValueError(f"Cannot split a {layers}-layer model{after} into {count} pipeline "
                         f"stages: a stage needs at least one layer; use at most {kept} "
                         f"stages.")
    return profile


SDPA_OPSET = 14         # the first opset torch.onnx writes scaled_dot_product_attention in
LAYER_NORM_OPSET = 17   # LayerNormalization, which the transformer fusions write


def _check_encoder_profile(profile: Target) -> None:
    """Settings that contradict each other, refused before any work: each used to fail only at
    the stage that met it, minutes into the export."""
    where = profile.source or profile.name
    q = profile.quantization
    # the profile check takes opset 13 (per-channel QuantizeLinear); an encoder takes more
    if profile.opset < SDPA_OPSET:
        raise ValueError(f"{where}: 'opset' is {profile.opset}; the PyTorch exporter writes "
                         f"an encoder's attention (scaled_dot_product_attention) from opset "
                         f"{SDPA_OPSET}.")
    if profile.graph_optimization == "transformer" and profile.opset < LAYER_NORM_OPSET:
        raise ValueError(f"{where}: 'opset' is {profile.opset}; graph_optimization "
                         f"\"transformer\" writes LayerNormalization, an opset "
                         f"{LAYER_NORM_OPSET} op: set opset >= {LAYER_NORM_OPSET}, or "
                         f"graph_optimization = \"basic\".")
    if profile.graph_rules == "tensorrt" and profile.graph_optimization == "transformer":
        # the fusions write com.microsoft ops (MultiHeadAttention, BiasGelu), which the
        # tensorrt rules refuse at the end of the export, int8 or fp16
        raise ValueError(f"{where}: graph_rules \"tensorrt\" takes standard ONNX ops only, "
                         f"and graph_optimization \"transformer\" writes ONNX Runtime's "
                         f"com.microsoft fusions (MultiHeadAttention, BiasGelu); set "
                         f"graph_optimization = \"basic\" (TensorRT fuses attention itself).")
    if profile.precision != "int8":
        return
    from .float16 import FLOAT16_QDQ_OPSET

    if profile.float_type == "float16" and profile.opset < FLOAT16_QDQ_OPSET:
        raise ValueError(f"{where}: float_type \"float16\" with int8 needs opset "
                         f"{FLOAT16_QDQ_OPSET} or later (float16 Q/DQ scales); 'opset' is "
                         f"{profile.opset}.")
    if profile.graph_rules == "tensorrt":
        if q.activations != "int8" or not q.symmetric_activations:
            raise ValueError(f"{where}: graph_rules \"tensorrt\" takes symmetric int8 "
                             f"activations only (quantization.activations = \"int8\", "
                             f"symmetric_activations = true); the profile has "
                             f"{q.activations!r}, symmetric {q.symmetric_activations}.")
        if q.embeddings != "float":
            raise ValueError(f"{where}: graph_rules \"tensorrt\" needs quantization.embeddings "
                             f"= \"float\": TensorRT reads no int8 table outside Q/DQ; the "
                             f"profile has {q.embeddings!r}.")


def _decoder_profile(profile: Target, *, precision: str | None,
                     stages: int | None) -> Target:
    """The profile as decoders read it: `precision` picks the weights ("fp16": float weights
    and float16 activations); one stage; on TensorRT targets the CUDA provider runs the graph
    (GroupQueryAttention and MatMulNBits are ONNX Runtime ops TensorRT does not parse)."""
    choices = (*CHOICES["generation.weights"], "fp16")
    if precision not in (None, *choices):
        raise ValueError(f"Precision {precision!r} is not available for decoders: "
                         f"{', '.join(choices)}.")
    if stages not in (None, 1):
        raise ValueError("Pipeline stages are not available for decoders yet; "
                         "leave out --stages.")
    generation = profile.generation
    if precision == "fp16":
        generation = dataclasses.replace(generation, weights="float", activations="float16")
    elif precision:
        generation = dataclasses.replace(generation, weights=precision)
    providers = profile.runtime.execution_providers
    if profile.graph_rules == "tensorrt":
        providers = tuple(p for p in providers if p != "TensorrtExecutionProvider")
    return dataclasses.replace(profile, generation=generation, runtime=dataclasses.replace(
        profile.runtime, pipeline_stages=1, execution_providers=providers))


def _limits(profile: Target, *, max_model_mb, max_latency_ms, task: str,
            compression: Compression | None) -> Target:
    """The profile with --max-model-mb / --max-latency-ms applied, and the request checked."""
    limits = {}
    for name, value in (("max_model_mb", max_model_mb), ("max_latency_ms", max_latency_ms)):
        if value is not None:
            limits[name] = positive_number(value, "--" + name.replace("_", "-"))
    if limits:
        profile = dataclasses.replace(
            profile, validation=dataclasses.replace(profile.validation, **limits))
    v = profile.validation
    if v.max_model_mb is None and v.max_latency_ms is None:
        return profile
    given = [f"{k} {getattr(v, k):g}" for k in ("max_model_mb", "max_latency_ms")
             if getattr(v, k) is not None]
    source = (f"the size / latency budget ({', '.join(given)}"
              + ("" if limits else f", from the profile {profile.name!r}'s [validation]; use "
                                   f"a profile without it") + ")")
    if task == "text-generation":
        raise ValueError(f"A size / latency budget picks the compression of encoders only; "
                         f"for decoders choose it yourself (--drop-layers, --prune-ffn) and "
                         f"leave out {source}.")
    if compression is not None and compression.active:
        raise ValueError(f"A size / latency budget picks the compression strength itself: "
                         f"leave out --drop-layers, --prune-heads, --prune-ffn, --sparsity and "
                         f"--share-layers (--heal-steps is kept: every candidate is healed), "
                         f"or leave out {source}.")
    return profile


def _exportable_opset() -> int:
    """The highest opset torch's TorchScript ONNX exporter (what optimum-onnx runs) writes."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return 10**6   # not known here: the export stage says
    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 10**6))


def _check_compression(compression: Compression | None, profile: Target,
                       layers: int | None, shape: dict | None = None) -> None:
    """What compress() would refuse after loading the model, refused before any work: from
    the model's `layers` and `shape` (`_shape`), where known."""
    if compression is None:
        return
    v = profile.validation
    if compression.heal_steps and not compression.active \
            and v.max_model_mb is None and v.max_latency_ms is None:
        raise ValueError("--heal-steps needs a compression to heal (e.g. --drop-layers 1).")
    if layers is not None and compression.drop_layers:
        from .compress import choose_layers_to_drop

        choose_layers_to_drop(compression.drop_layers, [0.0] * layers)
    if shape is None or not (compression.prune_heads or compression.prune_ffn):
        return
    from .compress import check_removes_something, ffn_multiple

    kind, kv_heads = shape["model_type"], shape["num_key_value_heads"]
    kept = shape["num_hidden_layers"] - _dropped(compression)   # BERT counts heads of these
    if kept < 1 or shape["num_attention_heads"] % kv_heads:
        return   # loading or dropping says what is wrong
    check_removes_something(compression, kind, heads=[shape["num_attention_heads"]] * kept,
                            groups=kv_heads if kind == "llama" else 1,
                            widths=[shape["intermediate_size"]] * kept,
                            multiple=ffn_multiple(kind, profile, compression.sparsity_pattern))


def export(model: str | Path = "minilm", *, target: str | Path | Target,
           task: str | None = None,
           output: str | Path | None = None,
           calibration: str | Path | Iterable[str] | None = None,
           evaluation: str | Path | Iterable[str] | None = None,
           accuracy_budget: str | None = None, precision: str | None = None,
           stages: int | None = None, requantize: bool = False,
           compression: Compression | None = None, max_model_mb: float | None = None,
           max_latency_ms: float | None = None, tar: bool = False,
           sign_key: str | Path | None = None, log=None) -> Path:
    """Export `model` (a checkpoint directory, a .gguf file or a packaged name) for `target`.

    `calibration`/`evaluation` are .txt/.jsonl paths or lists of texts; by default, disjoint
    sets of smart-home utterances (decoders: held-out English prose). `accuracy_budget`
    (e.g. "cosine>=0.97", "perplexity-increase<=3") overrides the profile's. `precision`
    overrides the profile's number format: "int8" or "fp16" for encoders, "int4", "int8" or
    "float" weights for decoders ("fp16": float16 weights and activations); `stages`
    (pipeline stages, one per device; encoders) overrides the profile's. Returns the bundle
    directory; raises BudgetError when the budget is broken, and FileExistsError, before any
    work, when `output` (or `<output>.rejected`) holds anything but an earlier export. A
    GGUF's quantized blocks are carried into the bundle exactly; `requantize=True` rounds its
    dequantized weights to the target's format instead.
    `compression` (exporter.Compression) removes layers, heads, FFN neurons or weights before
    export and heals by distillation; the budget is then checked against the original model.
    `max_model_mb` / `max_latency_ms` override the profile's size / latency budget: the
    exporter then picks the weakest compression that meets it within the accuracy budget
    (`exporter.strength`; `compression` may then only set heal_steps, to heal each candidate).
    `tar=True` also writes `<output>.tar`, the bundle as one file for flashing
    (`runtime.unpack` installs it, verified). `sign_key` (an Ed25519 private key's PEM file,
    `exporter.sign`) signs the bundle: manifest.sig, which `runtime.load(path,
    signed_by=PUBLIC_KEY)` requires.

        >>> export("minilm", target="x86-server", accuracy_budget="cosine>=0.98")
        PosixPath('build/minilm-x86-server')
    """
    started = time.perf_counter()   # the report's export_seconds count from here
    from runtime.model import kernel_library

    kernel_library()   # a bad EDGE_Q4_ISA is refused before any work, not 30 s in
    from . import pipeline
    from .gguf import PACKAGED_GGUF, is_gguf_path
    from .load import TASKS, check_single_label, infer_task, packaged_names, resolve_model_dir

    _check_utf8_names(model=model, target=target, output=output, calibration=calibration,
                      evaluation=evaluation)
    if isinstance(model, os.PathLike):   # the manifest records it, as text; a Path of a
        model = os.fspath(model)           # .gguf file was read as a checkpoint directory
    if not isinstance(model, str):
        raise TypeError(f"model must be a checkpoint directory, a .gguf file or a packaged "
                        f"model name, got {type(model).__name__} {model!r:.80}.")
    if not model.strip():   # Path("") is ".": a config.json there would be exported
        raise ValueError(f"Model {model!r} names nothing: give a checkpoint directory, a "
                         f".gguf file or a packaged model name ({', '.join(packaged_names())}).")
    if task is not None and task not in TASKS:
        raise ValueError(f"Unknown task {task!r}. Available: {', '.join(TASKS)}.")
    for name, flag in (("tar", tar), ("requantize", requantize)):
        if not isinstance(flag, bool):   # "no" was true: it wrote the archive
            raise TypeError(f"{name} must be True or False, got {flag!r}.")
    if compression is not None and not isinstance(compression, Compression):
        raise TypeError(f"compression must be an exporter.Compression (e.g. "
                        f"Compression(drop_layers=2)), got {type(compression).__name__} "
                        f"{compression!r:.80}.")
    if isinstance(output, str) and not output.strip():
        raise ValueError(f"Output {output!r} names no directory; leave it out for the "
                         f"default (build/<model>-<target>/).")
    signing_key = None
    if sign_key is not None:   # a missing or wrong key is refused now, not after the work
        from .sign import load_signing_key

        if not isinstance(sign_key, (str, os.PathLike)):
            raise TypeError(f"sign_key must be the path of a private key (.pem), got "
                            f"{type(sign_key).__name__}.")
        signing_key = load_signing_key(sign_key)
    profile = target if isinstance(target, Target) else load_target(target)
    generative = model in PACKAGED_GGUF or is_gguf_path(model)
    inferred = infer_task(model if generative else resolve_model_dir(model))
    task = task or inferred
    if requantize and not generative:
        raise ValueError(f"requantize applies to GGUF sources only; {model!r} is not a .gguf "
                         f"file or a packaged GGUF model.")
    if generative and task != "text-generation":
        raise ValueError(f"{model!r} is a decoder (GGUF); it exports for text-generation only, "
                         f"not {task}. Leave out --task, or pass --task text-generation.")
    if task == "text-classification" and inferred != task:
        raise ValueError(f"{model!r} has no trained classification head (config.json names no "
                         f"*ForSequenceClassification architecture): a text-classification "
                         f"export would carry a randomly initialized one. Fine-tune it first "
                         f"(samples/train_intents.py shows how), or export it as "
                         f"feature-extraction.")
    if task == "text-classification":
        check_single_label(resolve_model_dir(model))
    layers = None if generative else _layers(resolve_model_dir(model))
    if task != "text-generation" and compression is not None and compression.active:
        # an encoder's model type, refused before loading (a decoder's: by load_decoder,
        # first thing, in its own words)
        from .compress import checked_kind
        from .load import read_config

        checked_kind(read_config(resolve_model_dir(model)).get("model_type"))
    if generative and compression is not None and compression.drop_layers:
        # a GGUF's layer count is in its metadata: --drop-layers beyond it is refused now,
        # not after loading and scoring the model (minutes)
        from .gguf import is_gguf_path, layer_count, packaged_gguf

        try:
            path = Path(model) if is_gguf_path(model) else packaged_gguf(model)
        except (ValueError, FileNotFoundError):
            path = None   # not installed: loading says so
        layers = None if path is None else layer_count(path)
    if task == "text-generation":
        profile = _decoder_profile(profile, precision=precision, stages=stages)
        default_budget = profile.generation.budget
    else:
        profile = _override(profile, precision=precision, stages=stages, layers=layers,
                            dropped=_dropped(compression))
        _check_encoder_profile(profile)
        default_budget = profile.validation.budget_for(task)
    profile = _limits(profile, max_model_mb=max_model_mb, max_latency_ms=max_latency_ms,
                      task=task, compression=compression)
    prunes = compression is not None and (compression.prune_heads or compression.prune_ffn)
    _check_compression(compression, profile, layers, _shape(
        model, generative=generative, task=task) if prunes else None)
    if task != "text-generation" and profile.opset > (most := _exportable_opset()):
        raise ValueError(f"{profile.source or profile.name}: 'opset' is {profile.opset}; the "
                         f"PyTorch exporter that writes encoders (TorchScript, through "
                         f"optimum-onnx) writes opsets up to {most}. Decoders take more.")
    budget = Budget.parse(default_budget if accuracy_budget is None else accuracy_budget)
    model_name = (Path(model).resolve().name if Path(model).is_dir() else
                  Path(model).stem if is_gguf_path(model) else model)
    output = Path(output) if output is not None else \
        Path("build") / f"{model_name}-{profile.name}"
    if output.name in ("", ".."):   # "." or "x/..": the directory it names
        output = output.resolve()
    for parent in output.parents:   # the nearest one that exists must be a directory
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise FileExistsError(f"Output {str(output)!r}: {str(parent)!r} exists and is "
                                      f"not a directory. Choose another --output.")
            break
    check_name_room(output)
    check_not_in_bundle(output)
    check_replaceable(output)  # before any work: the output, and where a rejection's report goes
    rejected = output.with_name(output.name + ".rejected")
    check_replaceable(rejected)
    archive = output.with_name(output.name + ".tar") if tar else None
    if archive:
        check_archive_replaceable(archive, output.name)
    freed = remove_leftovers(output) + remove_leftovers(rejected)
    calibration_set = _texts(calibration, default_split="calibration", what="calibration",
                             count=profile.quantization.calibration_samples)
    calibration_given = len(calibration_set)
    if task != "text-generation":   # (a decoder reads its text in order, as windows)
        calibration_set = _shuffled(calibration_set, profile.quantization.calibration_samples)
    evaluation_set = _texts(evaluation, default_split="eval", what="evaluation",
                            count=profile.validation.eval_samples)
    budget.check_measurable(task, labelled=all(u.intent is not None for u in evaluation_set),
                            unlabelled=unlabelled_text(evaluation_set))
    overlap = check_held_out(task, profile, calibration_set, evaluation_set, compression)
    made = [p for p in output.absolute().parents if not p.exists()]   # deepest first
    job = pipeline.new_job(model, target=profile, task=task, output=output,
                           calibration=calibration_set, evaluation=evaluation_set,
                           budget=budget, compression=compression, log=log)
    job.started = started
    earlier = _identity(rejected)   # an earlier attempt's rejection report, if any
    try:   # from here on, however the export ends, its work directory goes
        job.requantize = requantize
        job.archive = archive
        job.signing_key = signing_key
        if overlap:
            job.records["eval_texts_in_calibration"] = overlap
        for key, given, count in (("eval_source", evaluation, len(evaluation_set)),
                                  ("calibration_source", calibration, calibration_given)):
            if isinstance(given, (str, Path)):
                job.records[key] = str(given)
            elif given is not None:
                job.records[key] = f"{count} texts given"
        sampled = profile.quantization.calibration_samples
        if task != "text-generation" and calibration_given > sampled:
            job.records["calibration_source"] += (
                f" ({calibration_given} texts in a seeded random order; calibration reads "
                f"the first {sampled})")
            job.log(f"calibrating on {sampled} of the {calibration_given} calibration texts "
                    f"(quantization.calibration_samples), a seeded random sample")
        if freed:
            job.log(f"removed {freed / 1e6:.0f} MB that killed exports of {output} left beside it")
        if model in packaged_names() and Path(model).exists():
            # transformers' from_pretrained("minilm") would load ./minilm: say which is used
            job.log(f"warning: --model {model!r} is the packaged model, not the "
                    f"{'directory' if Path(model).is_dir() else 'file'} {model!r} here; "
                    f"pass './{model}' to export that instead.")
        for line in data_warnings(task, profile, calibration_set, evaluation_set, compression):
            job.log(f"warning: {line}")
        if task == "text-generation" and calibration is not None \
                and not (compression is not None and compression.active) \
                and profile.generation.activations != "float16":
            job.log("warning: a decoder's calibration text ranks and heals compression, and "
                    "this export compresses nothing, so it is not read (weight-only int4/int8 "
                    "needs no calibration; float16 profiles check their range on it).")
        return pipeline.run(job)
    except BudgetError:
        # A rejection before validation (compression alone breaks a decoder's budget, the
        # strength search reaches no rung) writes no report; an earlier attempt's report in
        # <output>.rejected would read as this one's. (Validation's rejection replaced it; a
        # bundle written removes it; an export that crashed leaves it, as it leaves a bundle.)
        if earlier is not None and _identity(rejected) == earlier and written_here(rejected):
            shutil.rmtree(rejected)
            job.log(f"removed {rejected}/: an earlier attempt's report, not this one's")
        raise
    finally:
        shutil.rmtree(job.workdir, ignore_errors=True)
        for parent in made if not output.exists() else ():   # a failed export's new parents
            try:
                parent.rmdir()   # only while empty: a rejection's report stays
            except OSError:
                break
