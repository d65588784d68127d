"""Hardware target profiles: one commented TOML file per target, read into a frozen dataclass.

A profile is data, never code: it is parsed with `tomllib`, every key is checked against the
dataclass fields below, and an unknown key or a wrong type is an error that names the file, the
key and what was expected. Built-in profiles live beside this file; any other `.toml` path is a
user's own profile.

    >>> target = load_target("arm-cpu")
    >>> target.opset, target.quantization.activations
    (18, 'uint8')
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

PROFILE_DIR = Path(__file__).parent


@dataclass(frozen=True)
class QuantizationSettings:
    """How the exporter turns the float graph into static int8 QDQ."""

    weights: str                 # "int8": symmetric, zero point 0, range [-127, 127]
    per_channel: bool            # one weight scale per output channel (MatMul column)
    activations: str             # "uint8" (asymmetric) or "int8"
    symmetric_activations: bool  # zero point 0 for activations (int8 only)
    calibration: str             # "minmax", "percentile" or "entropy"
    percentile: float            # kept share of |activation| values for "percentile"
    calibration_samples: int     # texts used to calibrate (from the calibration set)
    embeddings: str              # "int8-rows": int8 table with one scale per row; "float"
    smoothing_alpha: float       # SmoothQuant migration strength, 0 = off
    compare_calibration: bool = True   # also score the other calibration methods (report)
    sensitivity_samples: int = 100     # calibration texts the per-group harm is measured on
    max_size_ratio: float = 0.30       # budget search: model bytes at most this x float's
    portable_rounding: bool = False    # x86 and aarch64 round every activation alike
    exact_integer_products: bool = True  # the device's int8 products do not saturate


@dataclass(frozen=True)
class RuntimeSettings:
    """How the on-device runtime runs a bundle built for this target."""

    execution_providers: tuple[str, ...]  # tried in order; CPU is always the last resort
    threads: int                          # ONNX Runtime intra-op threads (0: let ORT decide)
    max_sequence_length: int              # tokens per text, special tokens included
    batch_size: int                       # texts per inference call in embed()
    pipeline_stages: int = 1              # contiguous graph stages, one per device (1: whole)


@dataclass(frozen=True)
class ValidationSettings:
    """What an export must prove before it becomes a bundle."""

    accuracy_budget: str      # feature-extraction, e.g. "cosine>=0.97" (embeddings vs float)
    classification_budget: str  # text-classification, e.g. "accuracy-drop<=1.0,agreement>=0.98"
    eval_samples: int         # default held-out texts (an --eval file is used whole)
    latency_runs: int         # timed batch-1 runs per model for p50/p95 latency
    float_check_tolerance: float  # max |ONNX float - PyTorch| allowed on hidden states
    # Size / latency budget (None: no budget). When set, the exporter picks the compression
    # strength that meets it within the accuracy budget (exporter.strength).
    max_model_mb: float | None = None    # model file(s), 1e6 bytes
    max_latency_ms: float | None = None  # batch-1 p50 on the build machine, ms

    def budget_for(self, task: str) -> str:
        return self.classification_budget if task == "text-classification" \
            else self.accuracy_budget


@dataclass(frozen=True)
class GenerationSettings:
    """How a decoder (text-generation) model is exported for this target."""

    weights: str             # "int4" | "int8" (MatMulNBits blocks) | "float"
    block_size: int          # weights per quantization block along the input dimension
    accuracy_level: int      # MatMulNBits compute for int4 blocks: 0 float activations, 4 int8
    int8_accuracy_level: int  # the same for 8-bit blocks (int8 weights, the int8 LM head)
    context_length: int      # KV cache capacity in tokens (prompt + generated)
    budget: str              # e.g. "perplexity-increase<=10,greedy-agreement>=0.9"
    perplexity_window: int   # tokens per window when measuring perplexity
    perplexity_windows: int  # windows of held-out text measured at export
    activations: str = "float32"  # activations, KV cache and float weights: "float16" on GPUs
    # an 8-bit LM head runs with int8 activations and its K largest logits per position are
    # recomputed with float ones (0: the head at int8_accuracy_level like other 8-bit blocks)
    exact_top_logits: int = 0


DEFAULT_GENERATION = GenerationSettings(
    weights="int4", block_size=32, accuracy_level=4, int8_accuracy_level=4, context_length=1024,
    budget="perplexity-increase<=10", perplexity_window=256, perplexity_windows=8)


@dataclass(frozen=True)
class Target:
    """A hardware target: what to build for it and how to run it there."""

    name: str
    description: str
    opset: int                  # ai.onnx opset of the exported graph
    graph_optimization: str     # offline, before quantization: "none" | "basic" | "transformer"
    quantization: QuantizationSettings
    runtime: RuntimeSettings
    validation: ValidationSettings
    precision: str = "int8"     # "int8": static int8 QDQ; "fp16": no int8, the whole graph fp16
    float_type: str = "float32"  # dtype of what stays in float: "float32" | "float16"
    graph_rules: str = "onnxruntime"  # rules checked before bundling: "onnxruntime" | "tensorrt"
    extends: str = ""           # the profile this one starts from ("" for none)
    generation: GenerationSettings = DEFAULT_GENERATION   # decoders only
    source: str = ""            # the file the profile was read from

    def to_dict(self) -> dict:
        """The whole profile as plain data (what the bundle manifest records)."""
        return dataclasses.asdict(self)


# Allowed values of the string-valued settings: (section.key) -> choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "graph_optimization": ("none", "basic", "transformer"),
    "precision": ("int8", "fp16"),
    "float_type": ("float32", "float16"),
    "graph_rules": ("onnxruntime", "tensorrt"),
    "quantization.weights": ("int8",),
    "quantization.activations": ("uint8", "int8"),
    "quantization.calibration": ("minmax", "percentile", "entropy"),
    "quantization.embeddings": ("int8-rows", "float"),
    "generation.weights": ("int4", "int8", "float"),
    "generation.activations": ("float32", "float16"),
}


# Numeric settings and the values they may take, inclusive (None: no bound). A profile is
# checked when it is read, so a wrong number fails before an export starts, naming its key.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "opset": (13, None),                     # per-channel QuantizeLinear needs 13
    "quantization.percentile": (50.0, 100.0),
    "quantization.calibration_samples": (1, None),
    "quantization.smoothing_alpha": (0.0, 1.0),
    "quantization.sensitivity_samples": (1, None),
    "quantization.max_size_ratio": (0.01, 1.0),
    "generation.block_size": (16, 4096),        # a power of two, as MatMulNBits takes
    "generation.accuracy_level": (0, 4),
    "generation.int8_accuracy_level": (0, 4),
    "generation.context_length": (2, None),
    "generation.perplexity_window": (2, None),
    "generation.perplexity_windows": (1, None),
    "generation.exact_top_logits": (0, None),
    "runtime.threads": (0, 1024),            # 0: onnxruntime decides; more than any CPU has
    "runtime.max_sequence_length": (4, None),   # room for special tokens and some text
    "runtime.batch_size": (1, None),
    "runtime.pipeline_stages": (1, None),
    "validation.eval_samples": (1, None),
    "validation.latency_runs": (1, None),
    "validation.float_check_tolerance": (1e-9, 1.0),
}


# Settings that must be a finite number above zero when set.
POSITIVE: tuple[str, ...] = ("validation.max_model_mb", "validation.max_latency_ms")


def positive_number(value, what: str) -> float:
    """`value` as a float, or ValueError naming `what` unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number above 0, got {value!r}.")
    return float(value)


def available_targets() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_target(name_or_path: str | Path) -> Target:
    """The profile for a built-in target name or a path to a user's `.toml` file.

    A profile may start from another with `extends = "arm-cpu"` (a built-in name, or a
    `.toml` path relative to the profile's own directory) and set only what differs: its
    tables are merged key by key over the parent's.

        >>> load_target("x86-server").runtime.execution_providers
        ('CUDAExecutionProvider', 'CPUExecutionProvider')
    """
    if not isinstance(name_or_path, (str, os.PathLike)):   # None read as "Unknown target 'None'"
        raise TypeError(f"target must be a built-in target name or a .toml path, got "
                        f"{type(name_or_path).__name__} {name_or_path!r:.80}.")
    path = _resolve(name_or_path)
    origins: dict[str, Path] = {}   # dotted key -> the file in the extends chain that set it
    raw = _read_merged(path, chain=(), origins=origins)
    raw.setdefault("name", path.stem)
    target = _build(Target, raw, path, prefix="", origins=origins)
    block = target.generation.block_size
    if block & (block - 1):
        raise ValueError(f"{origins.get('generation.block_size', path)}: "
                         f"'generation.block_size' is {block}; expected a power of "
                         f"two (16, 32, 64, 128, ...).")
    if target.name in ("", ".", "..") or "/" in target.name or "\\" in target.name \
            or target.name.startswith(".") or not target.name.isprintable():
        # isprintable: no newline, NUL or other control character in a directory name
        raise ValueError(f"{path}: 'name' is {target.name!r}; it names the output directory "
                         f"(build/<model>-<name>): printable characters only, no path "
                         f"separators or leading dot.")
    _check_budgets(target, path, origins)
    if not target.runtime.execution_providers:
        raise ValueError(f"{path}: 'runtime.execution_providers' is empty; list at least "
                         f"\"CPUExecutionProvider\".")
    import onnxruntime  # the runtime refuses a name it does not know: so does the profile

    known = onnxruntime.get_all_providers()
    for name in target.runtime.execution_providers:
        if name not in known:
            raise ValueError(f"{path}: 'runtime.execution_providers' lists {name!r}, which "
                             f"onnxruntime does not know; its providers: {', '.join(known)}.")
    from runtime.bundle import installed_max_opset

    most = installed_max_opset()
    if target.opset > most:
        raise ValueError(f"{path}: 'opset' is {target.opset}; onnxruntime "
                         f"{onnxruntime.__version__} runs opsets up to {most}.")
    return dataclasses.replace(target, source=str(path))


def _check_budgets(target: Target, path: Path, origins: dict[str, Path]) -> None:
    """Each of the profile's accuracy budgets parsed, and measurable by its task, when the
    profile is read (not when an export of that task first needs it)."""
    from exporter.budget import Budget

    for where, text, task in (
            ("validation.accuracy_budget", target.validation.accuracy_budget,
             "feature-extraction"),
            ("validation.classification_budget", target.validation.classification_budget,
             "text-classification"),
            ("generation.budget", target.generation.budget, "text-generation")):
        try:
            Budget.parse(text).check_measurable(task, labelled=True)
        except ValueError as e:
            raise ValueError(f"{origins.get(where, path)}: {where!r} is {text!r}: {e}") \
                from None


def _resolve(name_or_path: str | Path, *, relative_to: Path | None = None) -> Path:
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text or "\\" in text:
        path = Path(text)
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            builtin = path.stem if (PROFILE_DIR / f"{path.stem}.toml").is_file() else None
            hint = ""
            if builtin and not path.exists():   # Path() drops "./": say what was given
                hint = (f"; built-in profiles are named by bare name: {builtin!r}, not {text!r}"
                        if "/" in text or "\\" in text else
                        f"; the built-in profile is named {builtin!r}, without .toml")
            raise FileNotFoundError(f"Target profile {str(path)!r} {what}{hint}.")
        return path
    path = PROFILE_DIR / f"{text}.toml"
    if not path.is_file():
        raise ValueError(f"Unknown target {text!r}. Available: "
                         f"{', '.join(available_targets())} (or a path to a .toml profile).")
    return path


def _read(path: Path) -> dict:
    try:
        # utf-8-sig: a BOM (Windows editors write one) is not TOML, and tomllib refuses it
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"Target profile {str(path)!r} is not valid TOML: {e}") from e
    except RecursionError:   # the parser recurses per nested [ or {
        raise ValueError(f"Target profile {str(path)!r} is not valid TOML: arrays or inline "
                         f"tables nested too deeply to read (no setting takes nested ones).") \
            from None
    except ValueError as e:   # an integer past Python's digits limit (4300)
        raise ValueError(f"Target profile {str(path)!r} is not valid TOML: a number too long "
                         f"to read ({str(e).split(';')[0]}).") from e


def _read_merged(path: Path, *, chain: tuple[Path, ...], origins: dict[str, Path]) -> dict:
    """The profile's table with its `extends` chain merged underneath (child keys win).
    `origins` gets the file each dotted key was set in, for errors to name the file to edit
    (a typo in a base profile is not in the board profile that extends it)."""
    if path.resolve() in chain:
        names = " -> ".join(p.stem for p in (*chain, path.resolve()))
        raise ValueError(f"{path}: 'extends' forms a cycle ({names}); a profile cannot "
                         f"extend itself, directly or through others.")
    raw = _read(path)
    parent = raw.get("extends")
    if parent is None or parent == "":   # "": none (what a manifest records)
        _note_origins(raw, path, origins)
        return raw
    if not isinstance(parent, str):
        raise ValueError(f"{path}: 'extends' must be a target name or .toml path, "
                         f"got {parent!r}.")
    try:
        parent_path = _resolve(parent, relative_to=path.parent)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{path}: 'extends' names a profile that cannot be found: {e}") from e
    base = _read_merged(parent_path, chain=(*chain, path.resolve()), origins=origins)
    base.pop("name", None)   # a board profile is named after its own file
    origins.pop("name", None)
    _note_origins(raw, path, origins)   # after the parent's: the child's keys win
    return _merge(base, raw)


def _note_origins(raw: dict, path: Path, origins: dict[str, Path], prefix: str = "") -> None:
    for key, value in raw.items():
        origins[prefix + key] = path
        if isinstance(value, dict):
            _note_origins(value, path, origins, prefix + key + ".")


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _build(cls, raw: dict, path: Path, prefix: str, origins: dict[str, Path]):
    """Instantiate dataclass `cls` from a TOML table, checking keys, types and choices.
    Errors name the file `origins` says set the key (`path`, the profile, by default)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{origins.get(prefix + unknown[0], path)}: unknown key "
                         f"{prefix + unknown[0]!r}. "
                         f"Expected keys: {', '.join(prefix + k for k in fields)}.")
    values = {}
    for key, field in fields.items():
        where = prefix + key
        if key not in raw:
            if field.default is dataclasses.MISSING:
                raise ValueError(f"{path}: missing key {where!r}.")
            continue
        values[key] = _convert(raw[key], hints[key], path, where, origins)
    return cls(**values)


def _convert(value, hint, root: Path, where: str, origins: dict[str, Path]):
    path = origins.get(where, root)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: {where!r} must be a table [{where}], "
                             f"not {type(value).__name__}.")
        return _build(hint, value, root, prefix=where + ".", origins=origins)
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise ValueError(f"{path}: {where!r} must be a list of {item.__name__}, "
                             f"got {value!r}.")
        return tuple(value)
    if origin in (typing.Union, types.UnionType):   # `float | None`: TOML has no null,
        (hint,) = {a for a in typing.get_args(hint) if a is not type(None)}   # absent is None
    if where in POSITIVE:
        try:
            return positive_number(value, f"{path}: {where!r}")
        except ValueError as e:
            raise ValueError(f"{e} Leave the key out for no budget.") from None
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"{path}: {where!r} must be {hint.__name__}, "
                         f"got {type(value).__name__} {value!r}.")
    choices = CHOICES.get(where)
    if choices and value not in choices:
        raise ValueError(f"{path}: {where!r} is {value!r}; expected one of {', '.join(choices)}.")
    low, high = RANGES.get(where, (None, None))
    if not ((low is None or value >= low) and (high is None or value <= high)):  # nan too
        bounds = (f"from {low} to {high}" if high is not None and low is not None
                  else f"{low} or more" if low is not None else f"at most {high}")
        raise ValueError(f"{path}: {where!r} is {value!r}; expected {bounds}.")
    return value
