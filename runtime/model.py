"""Running a verified bundle: sessions, batching, padding, pooling.

    >>> import runtime
    >>> model = runtime.load("build/minilm-arm-cpu")
    >>> model.embed(["turn on the kitchen lights"]).shape
    (1, 384)
"""

from __future__ import annotations

import os
import posixpath
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ._checks import count
from ._graph_refs import external_locations
from .bundle import Bundle, BundleError
from .generate import (
    ContextError,
    Decoder,
    check_sampling,
    generate_tokens,
    perplexity,
    render_chat,
    stop_strings,
    stream_text,
)
from .stages import StagedSession, run_batches
from .tokenizer import Tokenizer


def kernel_library() -> str | None:
    """Path of runtime._kernels, our onnxruntime custom-op library, or None where it was not
    built (no C compiler at install) or runs nothing on this CPU (`_kernels.isa()` "off")."""
    try:
        from . import _kernels
    except ImportError:
        return None
    try:
        isa = _kernels.isa()
    except ValueError as e:   # EDGE_Q4_ISA names no path: the user's setting, in words
        raise ValueError(str(e)) from None
    return None if isa == "off" else _kernels.__file__


def usable_cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the
    machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1


def available_providers(providers: Sequence) -> list:
    """`providers` (names, or (name, options) as onnxruntime takes them) that this
    onnxruntime build has, in order; the CPU where it has none of them."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in providers
            if (p[0] if isinstance(p, tuple) else p) in available] or ["CPUExecutionProvider"]


# onnxruntime's session log: errors only by default. Its warnings are the optimizer's notes to
# itself: a float16 decoder (jetson) loaded on a CPU printed 240 lines of "can't constant fold"
# on every load. A provider that did not start is said by `ort_session`'s own warning.
ORT_LOG_LEVELS = {"verbose": 0, "info": 1, "warning": 2, "error": 3, "fatal": 4}


def ort_log_level() -> int:
    """The session log severity: EDGE_ORT_LOG (verbose, info, warning, error, fatal, in any
    case), else error (set but empty counts as unset, as for EDGE_Q4_ISA)."""
    asked = os.environ.get("EDGE_ORT_LOG") or "error"
    if asked.lower() not in ORT_LOG_LEVELS:
        raise ValueError(f"The environment variable EDGE_ORT_LOG is {asked!r}; it takes "
                         f"{', '.join(ORT_LOG_LEVELS)} (unset: error).")
    return ORT_LOG_LEVELS[asked.lower()]


def ort_session(path: str | Path | bytes, *, threads: int = 0, spinning: bool = True,
                providers: Sequence[str] = ("CPUExecutionProvider",), kernels: bool = True,
                external_data: dict[str, bytes] | None = None):
    """An onnxruntime session with explicit threading.

    `spinning=False` stops ONNX Runtime's worker threads from busy-waiting after each call:
    on a device that also runs the application, spinning threads steal its cores (measured:
    latency doubles on a busy 2-core machine).

    `kernels` registers our custom-op library (runtime/_kernels.c) in a CPU-only session:
    graph nodes it implements (4-bit GGUF blocks with float activations) then run our
    kernel instead of their function body in standard ops. Bundles do not need it: without
    the library, or with `kernels=False`, the same graph runs on standard ops.

    `external_data` ({file name: its bytes}) holds the external data of a graph given as
    bytes (a graph at a path reads its own, beside it).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = ort_log_level()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chosen = available_providers(providers)
    library = kernel_library() if kernels else None
    if library is not None and all((p[0] if isinstance(p, tuple) else p)
                                   == "CPUExecutionProvider" for p in chosen):
        # in a GPU session the node stays a function, which the GPU provider can take
        options.register_custom_ops_library(library)
    if external_data:
        names = list(external_data)
        options.add_external_initializers_from_files_in_memory(
            names, [external_data[n] for n in names], [len(external_data[n]) for n in names])
    model = path if isinstance(path, bytes) else str(path)
    if isinstance(model, str) and not model.isascii():
        try:   # onnxruntime takes a path as UTF-8 text: not a name in another encoding
            model.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"onnxruntime opens only paths that are UTF-8, and {model!r} is "
                             f"not (a directory named in another encoding); rename it, or "
                             f"move the bundle to a directory that is.") from None
    session = ort.InferenceSession(model, options, providers=chosen)
    wanted = chosen[0][0] if isinstance(chosen[0], tuple) else chosen[0]
    taken = session.get_providers()
    if wanted not in taken:
        # in the build, but it did not start: onnxruntime-gpu without CUDA's libraries or a
        # GPU, or TensorRT without libnvinfer; onnxruntime logs it and falls back by itself
        warnings.warn(f"{wanted} is in this onnxruntime build but did not start here (its "
                      f"libraries or the GPU are missing; onnxruntime's log above says which): "
                      f"{Path(str(path)).name if not isinstance(path, bytes) else 'the graph'} "
                      f"runs on {taken[0]}.", RuntimeWarning, stacklevel=2)
    return session


def known_providers(providers, name: str = "providers") -> list:
    """`providers` (names, or (name, options) pairs as onnxruntime takes them, best first),
    each a name onnxruntime knows, whether or not this build has it."""
    import onnxruntime as ort

    if isinstance(providers, str) or not isinstance(providers, (list, tuple)):
        raise TypeError(f"{name} must be a list of onnxruntime provider names, "
                        f"got {providers!r}.")
    names = [p[0] if isinstance(p, tuple) and len(p) == 2 else p for p in providers]
    if not names:
        raise ValueError(f"{name} is empty: name at least one, e.g. ['CPUExecutionProvider'].")
    known = ort.get_all_providers()
    for provider in names:
        if not isinstance(provider, str) or provider not in known:
            raise ValueError(f"Unknown execution provider {provider!r} in {name}; "
                             f"onnxruntime's are: {', '.join(known)}.")
    return list(providers)


def checked_providers(providers) -> list:
    """`providers` checked against onnxruntime (`known_providers`); when the best ones are
    missing from this build, the session falls back to the next, with a warning."""
    import onnxruntime as ort

    providers = known_providers(providers)
    names = [p[0] if isinstance(p, tuple) and len(p) == 2 else p for p in providers]
    available = ort.get_available_providers()
    usable = [n for n in names if n in available] or ["CPUExecutionProvider"]
    skipped = names[:names.index(usable[0])] if usable[0] in names else names
    if skipped:
        warnings.warn(f"{', '.join(skipped)} not in this onnxruntime build (it has "
                      f"{', '.join(available)}); running on {usable[0]}.",
                      RuntimeWarning, stacklevel=4)
    return list(providers)


def pad_batch(ids: list[list[int]], *, pad_id: int, input_names: Sequence[str]) -> dict:
    """Right-pad token ids into the int64 feeds a BERT-style graph takes.

    Right padding is part of the contract: graphs whose attention was fused into
    MultiHeadAttention read the mask as one length per row.

    Returns {"input_ids": (batch, seq), "attention_mask": (batch, seq), and
    "token_type_ids": zeros (batch, seq) when the graph has that input}.
    """
    width = max(len(row) for row in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    feeds = {"input_ids": input_ids, "attention_mask": mask}
    if "token_type_ids" in input_names:
        feeds["token_type_ids"] = np.zeros_like(input_ids)
    unknown = set(input_names) - set(feeds)
    if unknown:   # Model refuses such a graph at load; this is for other callers
        raise ValueError(f"The graph's inputs {sorted(unknown)} have no feed: an encoder "
                         f"takes {', '.join(ENCODER_INPUTS)}.")
    return feeds


def pool(hidden: np.ndarray, mask: np.ndarray, *, mode: str, normalize: bool) -> np.ndarray:
    """Sentence embeddings from token states (batch, seq, dim) and mask (batch, seq)."""
    mask = mask[..., None].astype(hidden.dtype)
    if mode == "mean":
        out = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)
    elif mode == "cls":
        out = hidden[:, 0]
    elif mode == "max":
        out = np.where(mask > 0, hidden, -np.inf).max(axis=1)
    else:
        raise BundleError(f"Unknown pooling mode {mode!r} in manifest.json.")
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)


def batches(tokenizer: Tokenizer, texts: Sequence[str], *, max_length: int,
            batch_size: int, input_names: Sequence[str],
            cut: list[int] | None = None) -> Iterator[tuple[list[int], dict]]:
    """(original indices, feeds) per batch; texts of similar length share a batch so
    little compute goes to padding. `cut` gets the indices of the texts that max_length cut."""
    texts = list(texts)
    ids = tokenizer.encode_batch(texts, max_length=max_length)
    if cut is not None:   # a text at the limit encoded once more, one id past it
        cut.extend(i for i, row in enumerate(ids) if len(row) == max_length
                   and len(tokenizer.encode(texts[i], max_length=max_length + 1)) > max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        yield chosen, pad_batch([ids[i] for i in chosen], pad_id=tokenizer.pad_id,
                                input_names=input_names)


def _runtime_settings(bundle: Bundle) -> dict:
    settings = bundle.manifest["target"].get("runtime", {})
    if not isinstance(settings, dict):
        raise BundleError(f"{bundle.path / 'manifest.json'}: target.runtime must be an object "
                          f"of settings, got {settings!r}.")
    return settings


def checked_settings(bundle: Bundle) -> tuple[int, int]:
    """(max_length, batch_size) of `bundle`, with every manifest setting load reads checked
    (BundleError naming the field): at load, and by unpack before anything is written."""
    settings = _runtime_settings(bundle)
    max_length = bundle.manifest.get("max_length", settings.get("max_sequence_length"))
    batch_size = settings.get("batch_size", 32)
    _check_settings(bundle, max_length, batch_size)
    _manifest_runtime(bundle)
    return max_length, batch_size


def _check_settings(bundle: Bundle, max_length, batch_size) -> None:
    """The manifest fields every call reads, checked once at load with the field named."""
    where = bundle.path / "manifest.json"
    for name, value in (("max_length (or target.runtime.max_sequence_length)", max_length),
                        ("target.runtime.batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BundleError(f"{where}: {name} must be a positive int, got {value!r}; "
                              f"export the bundle again.")
    task = bundle.manifest["task"]
    if task not in TASKS:
        raise BundleError(f"{where}: task {task!r} is not one this runtime runs "
                          f"({', '.join(TASKS)}).")
    pooling = bundle.manifest.get("pooling")
    if task == "feature-extraction" and pooling is not None and not (
            isinstance(pooling, dict) and pooling.get("mode") in POOLING_MODES
            and isinstance(pooling.get("normalize"), bool)):
        raise BundleError(f"{where}: pooling must be {{\"mode\": one of "
                          f"{', '.join(POOLING_MODES)}, \"normalize\": bool}}, got {pooling!r}.")
    if task == "text-generation":
        _check_generation(where, bundle.manifest.get("generation"))
    _check_positions(where, bundle.manifest, max_length)


def _check_positions(where: Path, manifest: dict, max_length: int) -> None:
    """max_length (and a decoder's context_length) within the positions the graph was built
    for, model.positions (bundles from before it have none): a manifest edited past them
    failed in onnxruntime at the first text that long."""
    record = manifest.get("model")
    positions = record.get("positions") if isinstance(record, dict) else None
    if positions is None:
        return
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise BundleError(f"{where}: model.positions must be a positive int, got "
                          f"{positions!r}; export the bundle again.")
    generation = manifest.get("generation") or {}
    lengths = [("max_length (or target.runtime.max_sequence_length)", max_length)]
    if manifest["task"] == "text-generation":
        lengths.append(("generation.context_length", generation.get("context_length")))
    for name, length in lengths:
        if length is not None and length > positions:
            setting = ("generation.context_length" if manifest["task"] == "text-generation"
                       else "runtime.max_sequence_length")
            raise BundleError(f"{where}: {name} is {length}, but the graph embeds "
                              f"{positions} token positions (model.positions); a longer "
                              f"text would fail in onnxruntime. Lower it, or export again "
                              f"with a longer {setting} in the profile (an export takes "
                              f"at most what the model was made for).")


def _check_generation(where: Path, generation) -> None:
    """The manifest's "generation" object: what generate(), chat() and the KV cache read."""
    if generation is None:
        return
    if not isinstance(generation, dict):
        raise BundleError(f"{where}: generation must be an object, got {generation!r}.")
    context = generation.get("context_length", 2)
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise BundleError(f"{where}: generation.context_length must be an int >= 2 (tokens "
                          f"the KV cache holds), got {context!r}.")
    eos = generation.get("eos_token_ids", [])
    if not isinstance(eos, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**32 for i in eos):
        raise BundleError(f"{where}: generation.eos_token_ids must be a list of token ids, "
                          f"got {eos!r}.")
    chat = generation.get("chat")
    if chat is not None and not (
            isinstance(chat, dict) and isinstance(chat.get("roles"), dict)
            and all(isinstance(k, str) and isinstance(v, str)
                    for k, v in chat["roles"].items())
            and isinstance(chat.get("default_system"), str)
            and isinstance(chat.get("generation_prompt"), str)
            and isinstance(chat.get("first_system", ""), str)
            and isinstance(chat.get("trim_content", False), bool)
            and isinstance(chat.get("any_role", "{role}{content}"), str)
            and "{role}" in chat.get("any_role", "{role}")
            and all(pattern.count("{content}") == 1 for pattern in (
                *chat["roles"].values(), chat.get("first_system", "{content}"),
                chat.get("any_role", "{content}")))):
        raise BundleError(f"{where}: generation.chat must be {{\"roles\": {{role: pattern}}, "
                          f"\"default_system\": str, \"generation_prompt\": str}} (and "
                          f"optionally \"first_system\": str, \"trim_content\": bool, "
                          f"\"any_role\": str with {{role}}); each pattern holds {{content}} "
                          f"once.")


def _onnxruntime_errors() -> tuple[type[Exception], ...]:
    """onnxruntime's own exception classes (Fail, InvalidGraph, InvalidProtobuf ...): what a
    graph it cannot load raises; not an ImportError, a MemoryError or an OSError."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values()
                 if isinstance(v, type) and issubclass(v, Exception)) + (RuntimeError,)


def _manifest_runtime(bundle: Bundle) -> tuple[int, list]:
    """target.runtime's threads and execution_providers, checked as load uses them."""
    settings = _runtime_settings(bundle)
    try:
        return (_threads(settings.get("threads", 0), "target.runtime.threads"),
                known_providers(settings.get("execution_providers", ["CPUExecutionProvider"]),
                                "target.runtime.execution_providers"))
    except (TypeError, ValueError) as e:
        raise BundleError(f"{bundle.path / 'manifest.json'}: {e}") from None


# More intra-op threads than any CPU has cores; onnxruntime makes each one (2**31 - 1 of them:
# std::bad_alloc; 10,000: a process that stalled, spinning on 2 cores).
MAX_THREADS = 1024   # targets' RANGES["runtime.threads"] too (tests/test_targets.py)


def _threads(value, name: str) -> int:
    """An intra-op thread count: 0 (onnxruntime's default) up to MAX_THREADS."""
    threads = count(value, name, least=0)
    if threads > MAX_THREADS:
        raise ValueError(f"{name} is {threads}; a session takes 0 (onnxruntime picks) to "
                         f"{MAX_THREADS} threads, and runs best with at most the cores it may "
                         f"use ({usable_cores()} here).")
    return threads


POOLING_MODES = ("mean", "cls", "max")
# Batches per chunk of texts that embed()/classify() tokenize and sort by length at once.
SORTED_BATCHES = 32
TASKS = ("feature-extraction", "text-classification", "text-generation")
# What each task's graph takes: a decoder's KV cache, or an encoder's token ids alone.
DECODER_INPUTS = ("input_ids", "past_key.0", "seqlens_k")
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")   # the last optional


class _Closed:
    """A closed Model's session: any use says so."""

    def __init__(self, path: Path):
        self.path = path

    def error(self) -> ValueError:
        return ValueError(f"The model of {self.path} is closed (Model.close()); load the "
                          f"bundle again to use it.")

    def __getattr__(self, name: str):
        raise self.error()


def _named(manifest: dict, key: str) -> list[dict]:
    """A staged bundle's manifest `inputs` or `outputs`: a list of {"name": str, ...}."""
    value = manifest.get(key, [])
    if not isinstance(value, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) for t in value):
        raise BundleError(f"manifest.json: {key!r} must be a list of {{\"name\": str, ...}}, "
                          f"got {value!r}.")
    return value


def _check_external_data(bundle: Bundle, entry: dict, whose: str) -> None:
    """The files `entry` (the manifest, or one of its stages) names as its graph's
    "external_data" (the weights of a graph over 2 GB), each one listed, so verified."""
    if "external_data" not in entry:
        return
    names = entry["external_data"]
    if not isinstance(names, list):
        raise BundleError(f"{bundle.path / 'manifest.json'}: {whose}'external_data' must be a "
                          f"list of file names, got {names!r}; re-export the bundle.")
    for name in names:
        bundle.file(name)


def _check_graph_reads(bundle: Bundle, name: str) -> Path:
    """The path of graph `name`, once every external-data file it reads (onnxruntime opens
    each beside the graph) is one the manifest lists, so verified: the manifest's
    "external_data" could name one file while the graph read another, unchecked."""
    graph = bundle.file(name)
    listed = bundle._listed()
    for location in sorted(external_locations(graph)):
        inside = posixpath.normpath(posixpath.join(posixpath.dirname(name),
                                                   location.replace("\\", "/")))
        if inside not in listed:
            raise BundleError(f"{graph}: its weights are read from {location!r}, which "
                              f"manifest.json does not list, so it cannot be verified; "
                              f"re-export the bundle.")
    return graph


class Model:
    """A loaded bundle. Build one with `runtime.load(path)`."""

    def __init__(self, bundle: Bundle, *, threads: int | None = None, spinning: bool = True,
                 providers: Sequence[str] | None = None, pipeline: str = "threads"):
        if pipeline not in ("threads", "ray"):
            raise ValueError(f"pipeline must be 'threads' or 'ray', got {pipeline!r}.")
        if not isinstance(spinning, bool):   # "no" was true: spinning stayed on
            raise TypeError(f"spinning must be True or False, got {spinning!r}.")
        # what a pickled Model is loaded again with, in the process that unpickles it
        self._options = {"threads": threads, "spinning": spinning, "providers": providers,
                         "pipeline": pipeline}
        manifest = bundle.manifest
        self.bundle = bundle
        self.manifest = manifest
        self.task: str = manifest["task"]
        self.max_length, self.batch_size = checked_settings(bundle)
        self._said_cut = False   # texts cut to max_length: said once (_warn_cut)
        try:
            self.tokenizer = Tokenizer.from_file(bundle.file("tokenizer.json"))
        except (ValueError, TypeError) as e:   # BundleError (a ValueError) passes as it is
            where = str(bundle.file("tokenizer.json"))
            raise e if isinstance(e, BundleError) else BundleError(
                str(e) if where in str(e) else f"{where}: {e}") from e
        if self.task != "text-generation":
            try:   # room for the special tokens every text gets: checked at load, not per call
                self.tokenizer.encode("", max_length=self.max_length)
            except ValueError as e:
                raise BundleError(f"{bundle.path / 'manifest.json'}: max_length "
                                  f"{self.max_length} is too short for this tokenizer ({e}); "
                                  f"export the bundle again.") from None
        if threads is None or providers is None:
            own_threads, own_providers = _manifest_runtime(bundle)
        threads = own_threads if threads is None else _threads(threads, "threads")
        providers = checked_providers(own_providers if providers is None else providers)
        kernel_library(), ort_log_level()   # EDGE_Q4_ISA, EDGE_ORT_LOG: not the bundle's fault
        try:
            self.session = self._session(bundle, threads, spinning, providers, pipeline)
        except BundleError:
            raise
        except (ValueError, TypeError) as e:   # a stage that needs a tensor none makes
            raise BundleError(f"{bundle.path}: {e}") from e
        except _onnxruntime_errors() as e:   # they derive from Exception alone
            raise BundleError(f"{bundle.path}: onnxruntime cannot load its graph: "
                              f"{type(e).__name__}: {e}") from e
        try:
            self._check_graph(bundle)
        except BaseException:   # what the session holds (a Ray pipeline: GPUs) goes back now
            if callable(getattr(self.session, "close", None)):
                self.session.close()
            raise
        self._idle: Decoder | None = None   # a KV cache no generation holds
        self._lock = threading.Lock()

    def _check_graph(self, bundle: Bundle) -> None:
        """Refuse at load what the graph and the manifest disagree on."""
        self.input_names = [i.name for i in self.session.get_inputs()]
        decoder = all(name in self.input_names for name in DECODER_INPUTS)
        if decoder != (self.task == "text-generation"):
            raise BundleError(f"{bundle.path / 'manifest.json'}: task is {self.task!r}, but "
                              f"the graph {'is' if decoder else 'is not'} a decoder with a "
                              f"KV cache (inputs {', '.join(self.input_names)}).")
        if decoder:
            self._check_vocabulary(bundle)
        elif (unfed := [n for n in self.input_names if n not in ENCODER_INPUTS]) or \
                not {"input_ids", "attention_mask"} <= set(self.input_names):
            what = (f"inputs {unfed}, which the runtime has no feed for" if unfed else
                    "no input_ids or attention_mask input")
            raise BundleError(f"{bundle.path / 'manifest.json'}: the graph has {what}; an "
                              f"encoder takes {', '.join(ENCODER_INPUTS[:2])} and optionally "
                              f"{ENCODER_INPUTS[2]} (graph inputs: "
                              f"{', '.join(self.input_names)}); export the bundle again.")
        elif self.tokenizer.pad_id is None:   # after the graph: a decoder has none
            raise BundleError(f"{bundle.file('tokenizer.json')} names no pad id (no "
                              f"padding.pad_id, no [PAD]), and batches need one; export the "
                              f"bundle again: the exporter adds the model's.")
        if self.task == "text-classification":
            self._checked_labels()   # refused at load, not at the first classify()
        elif self.task == "feature-extraction":
            _ = self.prompts   # checked at load, not at the first embed(); so is
            try:               # the default prompt's name
                self._prompt(None)
            except BundleError:
                raise
            except (TypeError, ValueError) as e:
                raise BundleError(f"{bundle.path / 'manifest.json'}: pooling.default_prompt "
                                  f"must name one of pooling.prompts ({e})") from None

    def _check_vocabulary(self, bundle: Bundle) -> None:
        """A decoder's token ids (the tokenizer's, the eos ids) within the rows of its logits:
        an added token past them failed in onnxruntime's Gather mid-generation, and an eos id
        past them never ended a generation."""
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        rows = logits.shape[-1] if logits is not None and logits.shape else None
        if isinstance(rows, bool) or not isinstance(rows, int):
            return   # a symbolic vocabulary: nothing to compare with
        largest = max(self.tokenizer._id_to_token, default=-1)
        if largest >= rows:
            raise BundleError(f"{bundle.file('tokenizer.json')}: token id {largest} "
                              f"({self.tokenizer.id_to_token(largest)!r}) is past the "
                              f"{rows} rows of the graph's logits: the tokenizer is not this "
                              f"model's; export the bundle again.")
        eos = [i for i in self._generation.get("eos_token_ids", []) if i >= rows]
        if eos:
            raise BundleError(f"{bundle.path / 'manifest.json'}: generation.eos_token_ids "
                              f"{eos} are past the {rows} rows of the graph's logits; export "
                              f"the bundle again.")

    @staticmethod
    def _session(bundle: Bundle, threads: int, spinning: bool, providers, pipeline: str):
        """The bundle's graph (or pipeline of stages) as one session."""
        manifest = bundle.manifest
        if manifest.get("stages"):   # pipeline stages, each on its own device
            for stage in manifest["stages"]:
                if isinstance(stage, dict):
                    _check_external_data(bundle, stage, "a stage's ")
                if isinstance(stage, dict) and "file" in stage:
                    # listed, so verified, and its weights too (Stages checks the rest)
                    _check_graph_reads(bundle, stage["file"])
            outputs = [o["name"] for o in _named(manifest, "outputs")]
            inputs = _named(manifest, "inputs")   # none listed: the first stage's inputs
            if pipeline == "ray":
                from .ray_stages import RayStagedSession

                return RayStagedSession(bundle.path, manifest["stages"], outputs=outputs,
                                        inputs=inputs, threads=threads,
                                        providers=providers)
            return StagedSession(bundle.path, manifest["stages"], outputs=outputs,
                                 inputs=inputs, threads=threads,
                                 spinning=spinning, providers=providers)
        if pipeline == "ray":
            warnings.warn(f"pipeline='ray' runs the stages of a bundle cut into stages; "
                          f"{bundle.path} is one graph, so it runs in this process.",
                          RuntimeWarning, stacklevel=4)
        _check_external_data(bundle, manifest, "")   # onnxruntime reads it from beside graph
        graph = _check_graph_reads(bundle, manifest.get("model_file", "model.onnx"))
        return ort_session(graph, threads=threads, spinning=spinning, providers=providers)

    def close(self) -> None:
        """Release the bundle's sessions now, and a Ray pipeline's stage actors, which hold a
        GPU each until then; the Model starts nothing after (a call under way in another
        thread, or an open stream, ends as it would). `with runtime.load(path) as model:`
        closes it at the end of the block. Closing twice is fine."""
        with self._lock:   # a generation ending now keeps its KV cache only while open
            if isinstance(self.session, _Closed):
                return
            session, self.session = self.session, _Closed(self.bundle.path)
            self._idle = None
        if callable(getattr(session, "close", None)):
            session.close()

    def __reduce__(self) -> tuple:
        """Pickled as its bundle's path and load options, loaded again (verified) where it
        is unpickled: a Model can go to worker processes (multiprocessing, a process pool),
        each with its own sessions. The bundle must still be the one loaded here.

        Example:
            >>> pickle.loads(pickle.dumps(model)).embed(["hi"]).shape
            (1, 384)
        """
        if isinstance(self.session, _Closed):
            raise TypeError(f"{self!r} is closed; a closed Model cannot be pickled.")
        return _reloaded, (os.path.abspath(self.bundle.path), self.manifest, self._options)

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dim(self) -> int:
        """Width of the graph's first output: the embedding size (feature-extraction), the
        class count (text-classification), the vocabulary size (text-generation's logits)."""
        return int(self.session.get_outputs()[0].shape[-1])

    @property
    def labels(self) -> list[str] | None:
        """Class names by id for text-classification bundles, else None."""
        return self.manifest.get("labels")

    def embed(self, texts: Sequence[str], *, batch_size: int | None = None,
              prompt_name: str | None = None, prompt: str | None = None) -> np.ndarray:
        """Sentence embeddings, (len(texts), dim) float32, in the order of `texts`.

        Each text is tokenized, truncated to the bundle's max length, padded per batch and
        pooled the way the source model pools (mean + L2 norm for all-MiniLM-L6-v2).
        A model with sentence-transformers prompts (`prompts`, e.g. {"query": "query: "})
        gets the one named `prompt_name` before each text, else its default prompt if it
        has one, as sentence-transformers does; `prompt` is the text itself, overriding both
        (`prompt=""`: none).

            >>> model.embed(["turn on the kitchen lights", "lock the front door"]).shape
            (2, 384)
        """
        self._require("feature-extraction", "embed")
        pooling = self.manifest.get("pooling") or {"mode": "mean", "normalize": True}
        if prompt is None:
            prompt = self._prompt(prompt_name)
        elif prompt_name is not None:
            raise ValueError("Give prompt_name or prompt, not both.")
        elif not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str or None, got {type(prompt).__name__}.")
        return self._run(texts, batch_size, lambda out, mask: pool(
            out, mask, mode=pooling["mode"], normalize=pooling["normalize"]), prompt=prompt)

    @property
    def prompts(self) -> dict[str, str]:
        """The model's sentence-transformers prompts by name ({} for most models)."""
        prompts = (self.manifest.get("pooling") or {}).get("prompts", {})
        if not isinstance(prompts, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
            raise BundleError(f"{self.bundle.path / 'manifest.json'}: pooling.prompts must "
                              f"map names to prompt strings.")
        return prompts

    def _prompt(self, name: str | None) -> str:
        """The text to put before each text: the named prompt, else the default one."""
        if name is None:
            name = (self.manifest.get("pooling") or {}).get("default_prompt")
            if name is None:
                return ""
        elif not isinstance(name, str):
            raise TypeError(f"prompt_name must be a str or None, got {type(name).__name__}.")
        prompts = self.prompts
        if name not in prompts:
            known = ", ".join(map(repr, prompts)) or "none"
            raise ValueError(f"Unknown prompt_name {name!r}; this model's prompts: {known}.")
        return prompts[name]

    def _checked_labels(self) -> list[str]:
        """The manifest's labels, one per output of the classifier (checked at load)."""
        labels = self.labels
        width = self.session.get_outputs()[0].shape[-1]
        if not isinstance(labels, list) or not labels or \
                (isinstance(width, int) and len(labels) != width):
            raise BundleError(f"{self.bundle.path / 'manifest.json'} has no usable \"labels\" "
                              f"list (one name per output class); re-export the bundle.")
        return labels

    def classify(self, texts: Sequence[str], *, top_k: int = 1,
                 batch_size: int | None = None) -> list:
        """The most likely label of each text with its softmax probability.

        Returns [(label, score), ...], one pair per text; with top_k > 1, one list of the
        top_k pairs (best first) per text.

            >>> model.classify(["turn on the kitchen lights"])
            [('HassTurnOn', 0.98)]
        """
        self._require("text-classification", "classify")
        labels = self._checked_labels()
        top_k = count(top_k, "top_k", least=1)
        if top_k > len(labels):
            raise ValueError(f"top_k must be from 1 to {len(labels)}, got {top_k}.")
        logits = self._run(texts, batch_size, lambda out, mask: out)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        best = np.argsort(-probs, axis=1)[:, :top_k]
        ranked = [[(labels[j], float(row[j])) for j in order]
                  for row, order in zip(probs, best, strict=True)]
        return [r[0] for r in ranked] if top_k == 1 else ranked

    # --- text-generation bundles ---------------------------------------------------------

    @property
    def _generation(self) -> dict:
        return self.manifest.get("generation") or {}   # checked at load

    @property
    def context(self) -> int:
        """Tokens the KV cache holds (prompt + generated), text-generation bundles."""
        return int(self._generation.get("context_length", self.max_length))

    @contextmanager
    def _decoder(self) -> Iterator[Decoder]:
        """A KV cache for one generation alone: the idle one, or a new one while it is held
        (by a stream not yet finished, or by another thread). One cache is kept for the next
        generation; others are freed, so memory falls back once concurrent work ends."""
        with self._lock:
            decoder, self._idle = self._idle, None
            session = self.session
        if decoder is None:
            decoder = Decoder(session, context=self.context)   # closed: says so
        try:
            yield decoder
        finally:
            with self._lock:   # one that ends after close() is dropped, not kept for more
                if self._idle is None and not isinstance(self.session, _Closed):
                    self._idle = decoder

    def _tokens(self, ids: list[int], **options) -> Iterator[int]:
        with self._decoder() as decoder:   # held until the stream ends or is closed
            yield from generate_tokens(decoder, ids, **options)

    def generate(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = (), stream: bool = False):
        """Continue `prompt`; returns the new text, or with stream=True an iterator of text
        pieces (each piece whole characters, so printing them as they come is safe).

        Greedy by default; temperature > 0 samples, restricted to the top_k tokens and/or the
        smallest set of tokens with probability top_p, reproducibly for a given seed.
        Generation ends at the model's end-of-sequence token, at a `stop` string (not
        included), after max_new_tokens, or when the context is full. A prompt that does not
        fit the context raises runtime.ContextError.

            >>> model.generate("The capital of France is", max_new_tokens=16, stop=["\\n"])
            ' Paris.'
            >>> for piece in model.generate("Tell me a story", stream=True): print(piece, end="")
        """
        self._require("text-generation", "generate")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be str, got {type(prompt).__name__}.")
        return self._continue(self.tokenizer.encode(prompt), max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              stop=stop, stream=stream)

    def _continue(self, ids: list[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                  stop: str | Sequence[str] | None = (), stream: bool = False):
        """generate() from the prompt's ids."""
        if not isinstance(stream, bool):   # "no" was true: a generator came back
            raise TypeError(f"stream must be True or False, got {stream!r}.")
        if isinstance(self.session, _Closed):   # now, not at a stream's first piece
            raise self.session.error()
        stop = stop_strings(stop)
        options = check_sampling(max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed)
        if not ids:
            raise ValueError("The prompt is empty: give at least one token of text.")
        if len(ids) > self.context:   # a full cache still gives the next token
            raise ContextError(f"The prompt is {len(ids)} tokens; this bundle's context holds "
                               f"{self.context} (the prompt and every generated token but "
                               f"the last). Shorten the prompt.")
        eos = set(self._generation.get("eos_token_ids", []))
        tokens = self._tokens(ids, eos=eos, **options)
        decoding = self.tokenizer.decode_stream()
        pieces = stream_text(tokens, decoding.step, stop, decoding.flush)
        return pieces if stream else "".join(pieces)

    def chat(self, messages: Sequence[dict], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, stop: str | Sequence[str] | None = (),
             stream: bool = False):
        """Answer a conversation [{"role": "user", "content": ...}, ...] using the model's
        chat template; options as for generate().

            >>> model.chat([{"role": "user", "content": "What is the capital of France?"}])
            'The capital of France is Paris.'
        """
        self._require("text-generation", "chat")
        fmt = self._generation.get("chat")
        if not fmt:
            raise ValueError(f"{self.bundle.path} has no chat template (its model has none, "
                             f"or it is not a plain per-message template); use generate().")
        # the rendered template holds its special tokens (a BOS too, where the model has
        # one): encoded as Hugging Face's apply_chat_template does, without adding them again
        text = render_chat(fmt, messages)
        return self._continue(self.tokenizer.encode(text, add_special_tokens=False),
                              max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, stop=stop, stream=stream)

    def perplexity(self, text: str, *, window: int = 512) -> float:
        """Perplexity of the model on `text`, in non-overlapping windows of `window` tokens
        (capped at the context), each starting from an empty cache."""
        self._require("text-generation", "perplexity")
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}.")
        with self._decoder() as decoder:
            return perplexity(decoder, self.tokenizer.encode(text), window)

    def _require(self, task: str, method: str) -> None:
        if self.task != task:
            raise ValueError(f"{method}() needs a {task} bundle; {self.bundle.path} is a "
                             f"{self.task} bundle.")

    def _run(self, texts: Sequence[str], batch_size: int | None, reduce,
             prompt: str = "") -> np.ndarray:
        """reduce(graph output, attention mask) per batch -> one row per text, text order;
        `prompt` goes before each text."""
        if isinstance(texts, str):
            raise TypeError("Pass a list of strings; wrap a single text in a list.")
        if isinstance(texts, (bytes, bytearray, memoryview)):   # iterated, "item 0 is int"
            raise TypeError(f"Pass a list of strings, not {type(texts).__name__}; decode "
                            f"bytes first, e.g. [data.decode('utf-8')].")
        if isinstance(texts, (AbstractSet, Mapping)):   # iterable, but not what is meant
            why = ("its order is not the one it was built in, and the rows come back in "
                   "the order of the texts; e.g. sorted(texts)"
                   if isinstance(texts, AbstractSet) else
                   "its keys would be run, not its values; e.g. list(texts.values())")
            raise TypeError(f"Pass a list of strings, not a {type(texts).__name__}: {why}.")
        try:
            iterator = iter(texts)
        except TypeError:
            raise TypeError(f"Pass a list of strings, not {type(texts).__name__}.") from None
        texts = list(iterator)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be str; item {i} is {type(text).__name__}.")
        batch_size = self.batch_size if batch_size is None else count(
            batch_size, "batch_size", least=1)
        # A chunk of texts is tokenized and padded as its batches are about to run, so memory
        # follows batch_size, not len(texts) (the whole list first: 100k texts of 128 tokens
        # held 0.6 GB of ids and feeds). Texts of similar length share a batch within a chunk.
        chunk = batch_size * SORTED_BATCHES
        sent: deque = deque()   # (indices in texts, attention mask) of each batch handed on
        cut: list[int] = []

        def feeds() -> Iterator[dict]:
            for start in range(0, len(texts), chunk):
                part = [prompt + text for text in texts[start:start + chunk]]
                before = len(cut)
                for index, feed in batches(self.tokenizer, part, max_length=self.max_length,
                                           batch_size=batch_size, input_names=self.input_names,
                                           cut=None if self._said_cut else cut):
                    sent.append(([start + i for i in index], feed["attention_mask"]))
                    yield feed
                cut[before:] = [start + i for i in cut[before:]]

        # staged bundles pipeline the batches through their stages (one batch, handed over
        # as a list, runs them in turn in this thread)
        work = feeds() if len(texts) > batch_size else list(feeds())
        rows: np.ndarray | None = None
        for result in run_batches(self.session, work):
            index, mask = sent.popleft()
            out = reduce(result[0], mask)
            if rows is None:
                rows = np.zeros((len(texts), out.shape[-1]), dtype=np.float32)
            rows[index] = out
        if cut and not self._said_cut:
            self._said_cut = True
            self._warn_cut(cut)
        return rows if rows is not None else np.zeros((0, self.dim), dtype=np.float32)

    def _warn_cut(self, cut: list[int]) -> None:
        """Once per loaded model: texts were cut to max_length, as sentence-transformers cuts
        them, silently, at the model's own limit, which a profile may have set lower."""
        truncation = (self.manifest.get("validation") or {}).get("truncation") or {}
        longest = truncation.get("model_max_length")
        more = (f"; the model itself takes up to {longest}: export with a profile whose "
                f"[runtime] max_sequence_length is higher for longer texts whole"
                if isinstance(longest, int) and longest > self.max_length else "")
        warnings.warn(f"{len(cut)} text(s) longer than this bundle's max_length of "
                      f"{self.max_length} tokens were cut to it (the first: item {cut[0]})"
                      f"{more}. Said once per loaded model.", RuntimeWarning, stacklevel=4)

    def __repr__(self) -> str:
        return f"<runtime.Model {self.manifest.get('name')!r} task={self.task!r}>"


def _reloaded(path: str, manifest: dict, options: dict) -> Model:
    """A pickled Model, loaded again from `path`: BundleError where the bundle there is no
    longer the one it was (an update replaced it), rather than another model silently."""
    from . import load

    model = load(path, **options)
    if model.manifest != manifest:
        model.close()
        raise BundleError(f"{path} changed since the Model was pickled (another bundle was "
                          f"installed there); load it again.")
    return model
