"""Decoder LLMs (text-generation): the stages that differ from the encoder path.

    load_decoder   packaged name / GGUF file / HF directory -> PyTorch model + tokenizer + chat
    build_float    the float ONNX graph (decoder_graph: fused ops, preallocated KV cache)
    check_decoder  float ONNX vs PyTorch: logits on a prompt, greedy tokens on several prompts
    quantize_decoder  weight-only int4/int8 MatMulNBits blocks (GGUF blocks carried exactly)
    validate_decoder  perplexity on held-out prose, greedy agreement, decode speed, size, memory

The bundle stage is shared with the encoders.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from runtime.generate import Decoder, render_chat
from runtime.generate import perplexity as window_perplexity
from runtime.model import usable_cores

from .budget import rounded
from .decoder_graph import DecoderShape, DecoderWeights, Linear, build_file, float_weights, pack
from .graph_file import graph_bytes
from .load import (
    check_vocabulary_fits,
    follow_tokenizer_config,
    load_weights,
    write_tokenizer,
)
from .quantize import kib_to_mb
from .report import write_report
from .validate import BudgetError, cpu_target, host_threads, size_text, sizes, timed_on

# Architectures the graph builder covers: Llama (RMSNorm, rotary, GQA, SwiGLU, no bias) and
# GPT-2 (LayerNorm, learned positions, biases, GELU MLP).
SUPPORTED = ("llama", "gpt2")

CHECK_TOKENS = 32   # greedy tokens validation and the decode speed measurement generate

# Prompts for the greedy check: short factual and chat-like openings.
PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
)
FLOAT_CHECK_PROMPT = PROMPTS[0] + " a city that"   # check_decoder's logits, then greedy


# --- load -----------------------------------------------------------------------------------

def load_decoder(job) -> None:
    """Stage: resolve the source, load the PyTorch model, write tokenizer.json, read the chat
    template and end-of-sequence tokens."""
    from . import gguf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source = job.model
    if source in gguf.PACKAGED_GGUF:
        job.gguf = gguf.packaged_gguf(source)
    elif gguf.is_gguf_path(source):
        job.gguf = Path(source)
        if not job.gguf.is_file():
            what = "is not a regular file" if job.gguf.exists() else "does not exist"
            raise FileNotFoundError(f"GGUF file {source!r} {what}.")
    if job.gguf is not None:
        rounded = job.compression is not None and job.compression.changes_weights
        gguf.preflight(job.gguf, architectures=SUPPORTED, carry=(   # what quantized_weights
            job.target.generation.weights == "int4" and not job.requantize and not rounded))
        job.model_dir = gguf.checkpoint(job.gguf, log=job.log)
    else:
        from .load import resolve_model_dir

        job.model_dir = resolve_model_dir(source)
    from .load import read_config

    config = read_config(job.model_dir)
    if config.get("model_type") not in SUPPORTED:
        raise ValueError(f"text-generation supports {' and '.join(SUPPORTED)}-family "
                         f"decoders; {source!r} is {config.get('model_type')!r}.")
    if job.compression is not None and job.compression.active \
            and config["model_type"] != "llama":
        raise ValueError(f"Compression of {config['model_type']}-family decoders is not "
                         f"supported yet (llama family only); export without it.")

    import transformers

    tokenizer = write_tokenizer(job.model_dir, job.workdir / "tokenizer.json")   # it may refuse
    followed = []
    if job.gguf is None and (job.model_dir / "tokenizer_config.json").is_file():
        # as transformers loads it: add_bos_token in tokenizer_config.json rebuilds the
        # post-processor, and a bundle that kept the file's gave prompts without their BOS.
        # (A GGUF's tokenizer.json is as llama.cpp reads it: exporter/gguf.py. Without the
        # file transformers takes the class's defaults from config.json's model_type, such as
        # LlamaTokenizerFast's BOS "<s>", which a byte-level vocabulary may lack.)
        _, followed = follow_tokenizer_config(job.model_dir, job.workdir / "tokenizer.json",
                                              tokenizer)
    try:
        config_object = transformers.AutoConfig.from_pretrained(job.model_dir)
    except Exception:   # (which error depends on the file) load_weights names what is wrong
        config_object = None
    if config_object is not None:   # what the graph does not build (an activation, a rope
        DecoderShape.from_config(config_object,   # scaling), refused before the weights load
                                 job.target.generation.context_length)
    job.torch_model = load_weights(transformers.AutoModelForCausalLM, job.model_dir,
                                   "text-generation", dtype="float32")
    check_vocabulary_fits(job.workdir / "tokenizer.json", job.torch_model)

    model = job.torch_model
    settings = job.target.generation
    job.max_length = min(settings.context_length, model.config.max_position_embeddings)
    # The checks' positions, refused now rather than mid-validation: greedy feeds a prompt
    # and each token it generates but the last, decode_speed PROMPTS[0] and CHECK_TOKENS
    # more, check_decoder FLOAT_CHECK_PROMPT once.
    lengths = [len(encode(job, p)) for p in PROMPTS]
    needed = max(max(lengths) + CHECK_TOKENS - 1, lengths[0] + CHECK_TOKENS,
                 len(encode(job, FLOAT_CHECK_PROMPT)))
    if job.max_length < needed:
        if model.config.max_position_embeddings < needed:
            raise ValueError(f"This model's context (max_position_embeddings "
                             f"{model.config.max_position_embeddings}) is shorter than the "
                             f"{needed} tokens the export's checks use (greedy text of "
                             f"{CHECK_TOKENS} tokens after each prompt); it cannot be "
                             f"exported as a text generator.")
        raise ValueError(f"generation.context_length {settings.context_length} is too small: "
                         f"the export's checks use {needed} tokens (greedy text of "
                         f"{CHECK_TOKENS} tokens after each prompt); set it to at least "
                         f"{needed}.")
    if settings.weights != "float" and (job.gguf is None or settings.weights != "int4"
                                        or job.requantize):   # rounded from float: blocks
        shape = shape_of(job)
        widths = {shape.hidden}   # pruning changes the others (quantize_decoder checks them)
        if job.compression is None or not job.compression.active:
            widths |= {shape.heads * shape.head_dim, shape.intermediate}
        check_block_size(settings.block_size, settings.weights, widths)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
    job.generation = {"eos_token_ids": eos_ids, "context_length": job.max_length,
                      "chat": chat_format(job.model_dir)}
    params = sum(p.numel() for p in model.parameters())
    job.records["model"] = {
        "source": str(source), "directory": str(job.model_dir),
        **({"gguf": str(job.gguf)} if job.gguf else {}),
        "architecture": model.config.model_type, "parameters": params,
        "hidden_size": model.config.hidden_size, "layers": model.config.num_hidden_layers,
        "heads": model.config.num_attention_heads,
        "kv_heads": getattr(model.config, "num_key_value_heads",
                            model.config.num_attention_heads),
        # the graph's position table (and KV cache) length: the runtime refuses a
        # context_length above it
        "positions": job.max_length}
    if followed:
        job.records["model"]["tokenizer_sections_from_transformers"] = followed
        job.log(f"  tokenizer.json's {', '.join(followed)} as transformers loads "
                f"{job.model_dir.name} (tokenizer_config.json changes them)")
    job.log(f"  {model.config.model_type} decoder, {model.config.num_hidden_layers} layers, "
            f"{params / 1e6:.1f}M parameters, context {job.max_length}, eos {eos_ids}")
    eval_windows(job)   # too little evaluation text: refused now, not after the build
    if job.records.get("calibration_source") and (
            job.compression is not None and job.compression.active   # ranked and healed on
            or job.target.generation.activations == "float16"):     # check_float16_range's
        _user_windows(job, job.calibration, "calibration")


def chat_format(model_dir: Path) -> dict | None:
    """The checkpoint's chat template reduced to plain strings the runtime can fill in without
    Jinja: per role a `{content}` pattern, the default system message and the generation
    prompt. The reduction is checked by rendering conversations both ways; a template that is
    not a plain concatenation of per-message parts is refused (None: no chat in the bundle)."""
    from jinja2 import TemplateError
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return _reduced_chat_template(tokenizer)
    except TemplateError:   # raise_exception() on a conversation it refuses: no system role
        return None         # say ("System role not supported"); the reduction needs one


def _reduced_chat_template(tokenizer) -> dict | None:
    """chat_format of a tokenizer that has a chat template."""
    from jinja2 import TemplateError

    mark = "\x00CONTENT\x00"

    def render(messages, prompt=False):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=prompt)

    system_only = render([{"role": "system", "content": mark}])
    if system_only.count(mark) != 1:
        return None
    roles = {"system": system_only.replace(mark, "{content}")}
    base = render([{"role": "system", "content": "S"}])
    for role in ("user", "assistant"):
        full = render([{"role": "system", "content": "S"}, {"role": role, "content": mark}])
        if not full.startswith(base) or full[len(base):].count(mark) != 1:
            return None
        roles[role] = full[len(base):].replace(mark, "{content}")
    # a system message after the first: some templates write the first one with more around
    # it (a BOS, Llama 3's date block) than a later one
    first = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    try:
        later = render([*first, {"role": "system", "content": mark}])
    except TemplateError:   # a template that takes a system message first only
        later = None
    if later is not None:
        if not later.startswith(render(first)) or later[len(render(first)):].count(mark) != 1:
            return None
        roles["system"] = later[len(render(first)):].replace(mark, "{content}")
    user = [{"role": "user", "content": "U"}]
    generation_prompt = render(user, prompt=True)[len(render(user)):]
    user_part = roles["user"].replace("{content}", "U")
    if not render(user).endswith(user_part):
        return None
    default_system = render(user)[:-len(user_part)]
    fmt = {"roles": roles, "default_system": default_system,
           "generation_prompt": generation_prompt}
    if any(p.count("{content}") != 1 for p in (*roles.values(), system_only.replace(
            mark, "{content}"))):   # the template's own text holds "{content}"
        return None
    if roles["system"] != system_only.replace(mark, "{content}"):
        fmt["first_system"] = system_only.replace(mark, "{content}")
    samples = [[{"role": "user", "content": "Hi there"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why?"}]]
    if later is not None:
        samples.append([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Why?"}])
    # content with whitespace around it: Llama 3's templates write message['content'] | trim
    padded = [{"role": "system", "content": " \nBe brief. "}, {"role": "user", "content": "\tHi\n"},
              {"role": "assistant", "content": " Yo  "}, {"role": "user", "content": "Why?\n\n"}]
    if render(padded, True) != render_chat(fmt, padded):
        fmt["trim_content"] = True
    samples.append(padded)
    for messages in samples:
        if render(messages, True) != render_chat(fmt, messages):  # the runtime's reading
            return None
    other = _any_role(render, base, mark)
    if other is not None:   # kept only where it writes roles as the template does
        with_other = {**fmt, "any_role": other}
        tools = [[{"role": "tool", "content": "T"}],
                 [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                  {"role": "assistant", "content": "A"}, {"role": "tool", "content": " {x}\n"},
                  {"role": "ipython", "content": "I"}, {"role": "user", "content": "V"}]]
        try:
            if all(render(m, True) == render_chat(with_other, m) for m in tools):
                fmt = with_other
        except TemplateError:
            pass
    return fmt


def _any_role(render, base: str, mark: str) -> str | None:
    """The pattern a template writes a message of any other role with (a tool's result, say:
    SmolLM2's writes '<|im_start|>' + role + ...), `{role}` and `{content}` in it; None
    where it writes no such role, refuses one, or writes the role name other than once."""
    from jinja2 import TemplateError

    role = "\x00ROLE\x00"
    try:
        full = render([{"role": "system", "content": "S"}, {"role": role, "content": mark}])
    except TemplateError:
        return None
    part = full[len(base):] if full.startswith(base) else ""
    if part.count(mark) != 1 or part.count(role) != 1 or "{" in part:
        return None
    return part.replace(role, "{role}").replace(mark, "{content}")


# --- build and check the float graph ----------------------------------------------------------

def shape_of(job) -> DecoderShape:
    return DecoderShape.from_config(job.torch_model.config, job.max_length)


def build_float(job) -> None:
    """Stage: the float decoder graph (over 2 GB, its weights in float.onnx.data beside it)."""
    job.decoder_shape = shape_of(job)
    job.float_onnx = job.workdir / "float.onnx"
    # the joined q|k|v and gate|up copies live only while a graph is built from them
    build_file(job.float_onnx, job.decoder_shape, float_weights(job.torch_model))
    job.log(f"  float graph {graph_bytes(job.float_onnx) / 1e6:.0f} MB, KV cache "
            f"{job.decoder_shape.layers} x 2 x {job.decoder_shape.kv_heads} x "
            f"{job.max_length} x {job.decoder_shape.head_dim}")


class OnnxDecoder:
    """Greedy decoding and perplexity with an exported graph, through the runtime's Decoder
    (IO binding, KV cache in place): what the device will run."""

    def __init__(self, path: Path, shape: DecoderShape, threads: int = 0):
        from .feeds import ort_session

        self.session = ort_session(path, threads=threads)
        self.shape = shape
        self.decoder = Decoder(self.session, context=shape.context)

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        self.decoder.reset()
        logits = self.decoder.forward(ids)[-1]
        out = []
        for _ in range(new_tokens):
            out.append(int(logits.argmax()))
            if len(out) == new_tokens:
                break
            logits = self.decoder.forward([out[-1]])[-1]
        return out

    def logits(self, ids: list[int]) -> np.ndarray:
        self.decoder.reset()
        return self.decoder.forward(ids, all_logits=True)


def torch_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """The PyTorch model's argmax tokens after `ids`, up to its end-of-sequence token
    (included), as generation ends there: a plain loop over the logits with the KV cache.
    (generate(do_sample=False) also applies what the checkpoint's generation_config asks,
    a repetition_penalty say, which OnnxDecoder.greedy does not.)"""
    import torch

    eos = model.generation_config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    out: list[int] = []
    step, past = torch.tensor([ids]), None
    with torch.no_grad():
        while len(out) < new_tokens and not (out and out[-1] in eos):
            result = model(input_ids=step, past_key_values=past, use_cache=True)
            out.append(int(result.logits[0, -1].argmax()))
            step, past = torch.tensor([[out[-1]]]), result.past_key_values
    return out


def torch_references(job) -> list[list[int]]:
    """PyTorch's greedy tokens after each of PROMPTS (CHECK_TOKENS of them), computed once
    per export: the float check compares the first 16, validation all of them (a greedy run
    is a prefix of a longer one). Before any ONNX Runtime session is open, and on no more
    threads than the cores other processes leave idle: PyTorch's threads, decoding step by
    step, wait for each other after every small matmul, so one thread on a busy core slows
    them all (SmolLM2, 158 tokens on a 2-core host: 10 s on 2 threads and 15 s on 1 when
    quiet, 36 s on 2 and 15 s on 1 while another process held a core)."""
    if not hasattr(job, "_torch_references"):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, min(threads, idle_cores())))
        try:
            job._torch_references = [torch_greedy(job.torch_model, encode(job, p),
                                                  CHECK_TOKENS) for p in PROMPTS]
        finally:
            torch.set_num_threads(threads)
    return job._torch_references


def idle_cores(window: float = 0.1) -> int:
    """How many of the cores this process may run on other processes leave idle, measured
    over `window` seconds while this one sleeps (Linux's /proc/stat); elsewhere all of them."""
    cores = usable_cores()
    try:
        before = _cpu_times()
        time.sleep(window)
        after = _cpu_times()
    except (OSError, ValueError):
        return cores
    allowed = os.sched_getaffinity(0)
    busy = total = 0
    for cpu in allowed & before.keys() & after.keys():
        (busy0, total0), (busy1, total1) = before[cpu], after[cpu]
        busy, total = busy + busy1 - busy0, total + total1 - total0
    if total <= 0:
        return cores
    return max(0, round(cores * (1 - busy / total)))


def _cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU from /proc/stat: (busy, total) clock ticks since boot; idle and iowait are
    the idle ticks, guest time is already counted in user."""
    times = {}
    with open("/proc/stat") as stat:
        for line in stat:
            name, *ticks = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            ticks = [int(t) for t in ticks[:8]]
            times[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return times


def encode(job, text: str) -> list[int]:
    from tokenizers import Tokenizer

    if not hasattr(job, "_hf_tokenizer"):
        job._hf_tokenizer = Tokenizer.from_file(str(job.workdir / "tokenizer.json"))
    return job._hf_tokenizer.encode(text).ids


def agreement(ours: list[int], ref: list[int]) -> float:
    """Share of tokens equal to the reference up to the first difference."""
    same = 0
    for a, b in zip(ours, ref, strict=False):
        if a != b:
            break
        same += 1
    return same / max(len(ref), 1)


def check_decoder(job) -> None:
    """Stage: the float graph computes what PyTorch computes."""
    import torch

    ids = encode(job, FLOAT_CHECK_PROMPT)
    with torch.no_grad():
        ref = job.torch_model(torch.tensor([ids])).logits[0].numpy()
    references = torch_references(job)   # before a session's threads compete with PyTorch's
    decoder = OnnxDecoder(job.float_onnx, job.decoder_shape, host_threads(job.target))
    diff = float(np.abs(decoder.logits(ids) - ref).max())
    tokens = 16
    greedy = [agreement(decoder.greedy(encode(job, p), tokens), r[:tokens])
              for p, r in zip(PROMPTS, references, strict=True)]
    tolerance = 1e-3 * max(1.0, float(np.abs(ref).max()))
    job.records["float_check"] = {
        "max_abs_diff": diff, "tolerance": tolerance, "texts": 1,
        "greedy_agreement": round(float(np.mean(greedy)), 4), "greedy_tokens": tokens,
        "prompts": len(PROMPTS)}
    job.log(f"  float ONNX vs PyTorch: logits max abs diff {diff:.2e}; greedy tokens "
            f"identical on {sum(g == 1.0 for g in greedy)}/{len(PROMPTS)} prompts")
    if not diff <= tolerance:   # NaN too
        raise RuntimeError(f"The float decoder graph differs from PyTorch by {diff:.3g} "
                           f"(> {tolerance:.3g}): an export bug, please report it.")


# --- weight-only quantization ------------------------------------------------------------------

def round_to_nearest(weight: np.ndarray, bits: int, block: int) -> Linear:
    """Blocks of `block` input weights: int8 symmetric (zero point 128 implied) or int4 with a
    per-block minimum/maximum range and a uint4 zero point."""
    out, k = weight.shape
    if k % block:
        raise ValueError(f"input size {k} is not a multiple of the block size {block}")
    w = weight.reshape(out, k // block, block).astype(np.float32)
    if bits == 8:
        scale = _half(np.abs(w).max(axis=-1) / 127.0)
        q = np.clip(np.rint(w / scale[..., None]), -127, 127) + 128
        return Linear(bits=8, block_size=block, codes=q.astype(np.uint8),
                      scales=scale.astype(np.float32))
    lo = np.minimum(w.min(axis=-1), 0.0)
    hi = np.maximum(w.max(axis=-1), 0.0)
    scale = _half((hi - lo) / 15.0)
    zero = np.clip(np.rint(-lo / scale), 0, 15)
    q = np.clip(np.rint(w / scale[..., None]) + zero[..., None], 0, 15)
    return Linear(bits=4, block_size=block, codes=pack(q, 4), scales=scale.astype(np.float32),
                  zero_points=pack(zero, 4))


def check_block_size(block: int, weights: str, widths: set[int]) -> None:
    """Refuse a profile block size that does not divide every matrix's input width (the
    weights are rounded in blocks of `block` along it), naming the block size that does."""
    bad = sorted(k for k in widths if k % block)
    if not bad:
        return
    common = math.gcd(*widths)
    fits = common & -common   # the largest power of two dividing every width
    fix = (f"Set block_size = {fits} in the profile's [generation] table" if fits >= 16
           else "No block size a profile allows (a power of two, 16 or more) divides "
                "them all: export with --precision float or fp16")
    raise ValueError(f"generation.block_size {block} does not divide this model's matrix "
                     f"input width{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}: "
                     f"{weights} weights are rounded in blocks of {block} inputs. {fix}.")


def _half(scale: np.ndarray) -> np.ndarray:
    """Scales rounded to float16 (how the graph stores them) before the codes are chosen, so
    the codes are rounded against the scale the device will use; never zero."""
    scale = np.maximum(scale, 1e-7).astype(np.float16).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(6e-8))


def quantized_weights(job, weights: str) -> tuple[DecoderWeights, dict]:
    """The weights in the target's form, and a record of how each kind was stored."""
    settings = job.target.generation
    if weights == "float":
        return float_weights(job.torch_model), {
            "weights": "float", "matrices": settings.activations,
            "embedding": settings.activations}
    bits = 4 if weights == "int4" else 8
    if job.gguf is not None and bits == 4 and not job.requantize:
        from .gguf import carried_weights

        try:
            carried = tie_carried(carried_weights(job.gguf, job.torch_model.config,
                                                  layers=job.gguf_layers), job.gguf_ties)
        except ValueError as e:
            raise ValueError(f"{e} To round the dequantized weights to {weights} blocks "
                             f"instead (a second rounding: quality is lost and reported), "
                             f"pass --requantize.") from e
        else:
            matrices = carried.qkv + carried.o + carried.gate_up + carried.down
            kinds = sorted({_form(m) for m in matrices})
            (carried_block,) = {m.block_size for m in matrices}   # ggml's: 32
            if settings.block_size != carried_block:   # the profile's asks for another
                job.log(f"  warning: generation.block_size {settings.block_size} is not "
                        f"applied: the GGUF's blocks of {carried_block} weights are carried "
                        f"exactly. To round the weights to blocks of {settings.block_size} "
                        f"instead (a second rounding), pass --requantize.")
            bits = sorted({m.bits for m in matrices})   # a Q8_0 file's are 8-bit blocks
            return carried, {
                "weights": " + ".join(f"int{b}" for b in bits),
                "source": f"GGUF blocks carried exactly ({job.gguf.name})",
                "matrices": ", ".join(kinds), "embedding": _form(carried.embedding),
                "lm_head": "tied: the embedding's blocks" if carried.lm_head is None
                else _form(carried.lm_head), "block_size": carried_block,
                "accuracy_level": settings.accuracy_level,
                "int8_accuracy_level": settings.int8_accuracy_level,
                "exact_top_logits": settings.exact_top_logits}

    block = settings.block_size
    f = float_weights(job.torch_model)
    check_block_size(block, weights, {m.in_features for m in (
        f.embedding, *f.qkv, *f.o, *f.gate_up, *f.down)})

    def q(lin: Linear, bits: int = bits) -> Linear:
        return dataclasses.replace(round_to_nearest(lin.weight, bits, block), bias=lin.bias)

    out = dataclasses.replace(
        f, embedding=q(f.embedding, 8), lm_head=None if f.lm_head is None else q(f.lm_head, 8),
        qkv=[q(m) for m in f.qkv], o=[q(m) for m in f.o], gate_up=[q(m) for m in f.gate_up],
        down=[q(m) for m in f.down])
    error = _weight_error(f, out)
    job.log(f"  rounded to {weights} blocks: mean |w - w_float| {error['mean_abs']:.2e}, "
            f"max {error['max_abs']:.2e}")
    return out, {"weights": weights, "source": "round-to-nearest from float",
                 "weight_error": error,
                 "matrices": _form(out.o[0]), "embedding": _form(out.embedding),
                 "lm_head": "tied: the embedding's int8 blocks" if out.lm_head is None
                 else _form(out.lm_head), "block_size": block,
                 "accuracy_level": settings.accuracy_level,
                "int8_accuracy_level": settings.int8_accuracy_level,
                "exact_top_logits": settings.exact_top_logits}


def tie_carried(weights: DecoderWeights, ties: list) -> DecoderWeights:
    """The carried blocks with --share-layers' ties applied: the tied layer's attention
    (q|k|v, o), FFN (gate|up, down) or whole layer (both, and its norms) are the source
    layer's own blocks, which the graph then stores once."""
    roles = {"attention": ("qkv", "o"), "ffn": ("gate_up", "down"),
             "layer": ("qkv", "o", "gate_up", "down", "input_norms", "post_attention_norms")}
    lists = {name: list(getattr(weights, name)) for name in roles["layer"]}
    for source, dest, part in ties:
        for name in roles[part]:
            lists[name][dest] = lists[name][source]
    return dataclasses.replace(weights, **lists)


def _weight_error(ref: DecoderWeights, ours: DecoderWeights) -> dict:
    """How far the rounded matrices are from the float ones (mean and max absolute)."""
    total = count = 0.0
    worst = 0.0
    for a, b in zip(ref.qkv + ref.o + ref.gate_up + ref.down,
                    ours.qkv + ours.o + ours.gate_up + ours.down, strict=True):
        diff = np.abs(b.dequantize() - a.weight)
        total, count, worst = total + float(diff.sum()), count + diff.size, max(
            worst, float(diff.max()))
    return {"mean_abs": total / count, "max_abs": worst}


def _form(lin: Linear) -> str:
    if lin.weight is not None:
        return "float32"
    if lin.offsets is not None:
        return f"int{lin.bits} blocks of {lin.block_size}, scale + exact float offset (Q4_1)"
    if lin.zero_points is not None:
        return f"int{lin.bits} blocks of {lin.block_size}, scale + zero point"
    return f"int{lin.bits} blocks of {lin.block_size}, symmetric"


def activation_peaks(model, batches) -> dict[str, float]:
    """The largest |value| each submodule of the PyTorch `model` reads (its first argument) or
    writes over `batches`, by module name. Every tensor of the decoder graph is one of these:
    a residual stream is what the next norm reads, the SwiGLU product what down_proj reads
    (the attention mask, a keyword argument filled with float32's minimum, is not read)."""
    import torch

    peaks: dict[str, float] = {}

    def watch(name):
        def hook(module, args, output):
            if hasattr(output, "to_tuple"):   # a ModelOutput
                output = output.to_tuple()
            for value in (args[0] if args else None,
                          output[0] if isinstance(output, tuple | list) and output else output):
                if isinstance(value, torch.Tensor) and value.is_floating_point() \
                        and value.numel():
                    peaks[name] = max(peaks.get(name, 0.0), float(value.abs().max()))
        return hook

    handles = [m.register_forward_hook(watch(name))
               for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return peaks


def check_float16_range(job) -> dict:
    """A float16-activation profile (jetson) refused, before its graph is built and
    validated, for a model whose activations pass 65504 on calibration text: on the device
    they are inf (validation saw NaN logits only at the end). The record says the headroom."""
    from .float16 import FLOAT16_MAX
    from .heal import DECODER_WINDOW, calibration_batches

    # the windows compression ranks on: SmolLM2's peak is 22,172 / 26,080 / 25,500 / 24,330
    # on each batch of 4 (a maximum grows with the text seen; the record says the headroom)
    batches = calibration_batches(job, purpose="score")
    peaks = activation_peaks(job.torch_model, batches)
    windows = sum(len(b["input_ids"]) for b in batches)
    checked_on = f"{windows} windows of {DECODER_WINDOW} tokens of calibration text"
    over = sorted(((peak, name) for name, peak in peaks.items() if not peak <= FLOAT16_MAX),
                  reverse=True)
    if over:
        shown = ", ".join(f"{name} reaches {peak:.4g}" for peak, name in over[:5])
        raise ValueError(
            f"float16 cannot hold this model's activations: {len(over)} of its modules read or "
            f"write values past float16's largest, 65504, on {checked_on} ({shown}); on the "
            f"device they become inf. This profile runs the decoder's activations in float16 "
            f"(generation.activations) because ONNX Runtime's CUDA attention kernel takes "
            f"float16 or bfloat16 only; a CPU profile (arm-cpu, x86-server: float32 "
            f"activations) exports this model as it is.")
    largest, where = max((peak, name) for name, peak in peaks.items())
    share = largest / FLOAT16_MAX
    job.log(f"  float16 range: largest activation {largest:.4g} ({where}), "
            f"{100 * share:.0f}% of {FLOAT16_MAX:.0f}")
    return {"largest_activation": round(largest, 2), "share_of_float16_max": round(share, 4),
            "in": where, "range_checked_on": checked_on}


def quantize_decoder(job) -> None:
    """Stage: the bundle's graph with weight-only quantized matrices (over 2 GB, its weights
    in model.onnx.data beside it); float16 activations only where the model's fit."""
    settings = job.target.generation
    float16 = check_float16_range(job) if settings.activations == "float16" else None
    quantized, record = quantized_weights(job, settings.weights)
    job.quantized_onnx = job.workdir / "model.onnx"
    build_file(job.quantized_onnx, job.decoder_shape, quantized,
               accuracy_level=settings.accuracy_level,
               int8_accuracy_level=settings.int8_accuracy_level, float_type=settings.activations,
               exact_top_logits=settings.exact_top_logits)
    record["activations"] = settings.activations
    if settings.activations == "float16":
        record["float16"] = {"what": "activations, KV cache, norms and float weights in "
                                     "float16; int blocks keep float16 scales; logits cast "
                                     "to float32", **float16}
    job.records["quantization"] = {"mode": "weight-only", **record}
    job.log(f"  {record['weights']}: {record['matrices']}; embedding {record['embedding']} "
            f"({record.get('source', '')}), {graph_bytes(job.quantized_onnx) / 1e6:.1f} MB")


# --- validate ----------------------------------------------------------------------------------

def token_windows(ids: list[int], width: int) -> list[list[int]]:
    """`ids` cut into whole, non-overlapping windows of `width` tokens (a short tail dropped)."""
    return [ids[i:i + width] for i in range(0, len(ids) - width + 1, width)]


def _user_windows(job, texts, what: str, width: int = 128) -> list[list[int]]:
    """Windows of `width` tokens of the user's `texts` (their --calibration or --eval)."""
    ids = encode(job, "\n\n".join(u.text for u in texts))
    windows = token_windows(ids, width)
    if not windows:
        raise ValueError(f"The {what} text ({job.records[what + '_source']}) has {len(ids)} "
                         f"tokens; a decoder needs at least one window of {width}.")
    return windows


def eval_windows(job) -> list[list[int]]:
    """Token windows of held-out text: the --eval file's texts, else English prose."""
    from .data import english_prose, split_of

    settings = job.target.generation
    if job.records.get("eval_source"):
        texts = [u.text for u in job.evaluation]
        source = job.records["eval_source"]
    else:
        texts = [t for t in english_prose() if split_of(t) in ("eval", "test")]
        source = "pydoc_data English prose (held-out paragraphs)"
    ids = encode(job, "\n\n".join(texts))
    width = min(settings.perplexity_window, job.max_length)
    windows = token_windows(ids, width)
    windows = windows[:settings.perplexity_windows]
    if not windows:
        raise ValueError(f"The evaluation text has {len(ids)} tokens; perplexity needs at "
                         f"least one window of {width}.")
    job.records["perplexity_data"] = {"source": source, "windows": len(windows),
                                      "window": width}
    return windows


def perplexity(decoder: OnnxDecoder, windows: list[list[int]]) -> float:
    """Perplexity over all windows together (each window from an empty cache)."""
    width = len(windows[0])
    return window_perplexity(decoder.decoder, [t for w in windows for t in w], width)


def decode_speed(decoder: OnnxDecoder, prompt: list[int], tokens: int = CHECK_TOKENS) -> dict:
    """Prefill latency (ms) and greedy decode tokens/s, best of 2."""
    best = {}
    d = decoder.decoder
    for _ in range(2):
        d.reset()
        started = time.perf_counter()
        token = int(d.forward(prompt)[-1].argmax())
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(tokens):
            token = int(d.forward([token])[-1].argmax())
        rate = tokens / (time.perf_counter() - started)
        if not best or rate > best["decode_tokens_per_s"]:
            best = {"prefill_ms": round(prefill * 1e3, 1), "prefill_tokens": len(prompt),
                    "decode_tokens_per_s": round(rate, 1)}
    return best


_MEMORY_PROBE = """
import sys, numpy as np
sys.path.insert(0, sys.argv[7])
from runtime.model import ort_session   # as the device runs it: with our kernels, if built
s = ort_session(sys.argv[1])
layers, kv, ctx, hd, n = map(int, sys.argv[2:7])
kind = s.get_inputs()[1].type   # past_key.0: float32, or float16 in GPU graphs
dtype = np.float16 if kind == "tensor(float16)" else np.float32
feeds = {"input_ids": np.ones((1, n), np.int64), "seqlens_k": np.array([n - 1], np.int32),
         "total_sequence_length": np.array(n, np.int32), "num_logits": np.array([1], np.int64)}
for i in range(layers):
    for k in ("key", "value"):
        feeds[f"past_{k}.{i}"] = np.zeros((1, kv, ctx, hd), dtype)
s.run(None, feeds)
print([int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])
"""


PROBE_TOKENS = 64   # the memory probe's prefill (fewer where the context is shorter)


def peak_rss_mb(path: Path, shape: DecoderShape) -> float:
    """Peak RSS of a new process that loads the graph and prefills PROBE_TOKENS tokens."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), str(shape.layers),
                          str(shape.kv_heads), str(shape.context), str(shape.head_dim),
                          str(min(PROBE_TOKENS, shape.context)),
                          str(Path(__file__).resolve().parent.parent)],
                         capture_output=True, text=True, check=True)
    return round(kib_to_mb(int(out.stdout.split()[-1])), 1)


def release_torch(job) -> None:
    """Free PyTorch's model, and the uncompressed original compression kept, once their last
    reader is done (quantize_decoder reads the weights; torch_references are cached): the
    ONNX Runtime sessions validation opens next would otherwise hold the weights a second
    time. (A 906M-parameter Llama peaked at 2.7 times its float32 size, the model and a float
    session together.) Collected at once: freed memory goes back before the sessions open."""
    job.torch_model = job.reference_model = None
    gc.collect()


def validate_decoder(job) -> None:
    """Stage: perplexity float vs bundle, greedy agreement with PyTorch, speed, size, memory."""
    references = torch_references(job)   # PyTorch's last use: then it is freed
    release_torch(job)
    threads = host_threads(job.target)
    windows = eval_windows(job)
    float_decoder = OnnxDecoder(job.float_onnx, job.decoder_shape, threads)
    float_ppl = perplexity(float_decoder, windows)
    float_speed = decode_speed(float_decoder, encode(job, PROMPTS[0]))
    del float_decoder
    ours = OnnxDecoder(job.quantized_onnx, job.decoder_shape, threads)
    ppl = perplexity(ours, windows)
    tokens = CHECK_TOKENS
    greedy = [agreement(ours.greedy(encode(job, p), tokens), r)
              for p, r in zip(PROMPTS, references, strict=True)]
    speed = decode_speed(ours, encode(job, PROMPTS[0]))
    size = sizes(job)
    measured = {"perplexity": ppl, "float-perplexity": float_ppl,
                "perplexity-increase": 100 * (ppl / float_ppl - 1),
                "greedy-agreement": float(np.mean(greedy))}
    metrics = rounded(measured, 4, job.budget)   # checked unrounded, below
    record = {
        "metrics": metrics, "budget": str(job.budget),
        "perplexity_data": job.records["perplexity_data"],
        "greedy": {"prompts": len(PROMPTS), "tokens": tokens,
                   "per_prompt": [round(g, 3) for g in greedy]},
        "speed": {"float_onnx": float_speed, "bundle": speed, "timed_on": timed_on(job.target)},
        "size_bytes": size,
        "peak_rss_mb": {"float_onnx": peak_rss_mb(job.float_onnx, job.decoder_shape),
                        "bundle": peak_rss_mb(job.quantized_onnx, job.decoder_shape),
                        "what": "new process: load the graph as the runtime does (with its "
                                "kernels where built) and its KV cache buffers, prefill "
                                f"{min(PROBE_TOKENS, job.decoder_shape.context)} tokens",
                        "exporter": round(kib_to_mb(
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1)},
    }
    broken = job.budget.check(measured)
    record["budget_holds"] = not broken
    job.records["validation"] = record
    job.log(f"  perplexity {ppl:.3f} vs float {float_ppl:.3f} "
            f"({metrics['perplexity-increase']:+.2f}%); greedy agreement "
            f"{100 * metrics['greedy-agreement']:.1f}% over {len(PROMPTS)} prompts; decode "
            f"{speed['decode_tokens_per_s']} tok/s vs float {float_speed['decode_tokens_per_s']}"
            f" ({'this host' if cpu_target(job.target) else 'host CPU, not the target device'}); "
            f"{size_text(size)}")
    if broken:
        rejected = job.output.with_name(job.output.name + ".rejected")
        write_report(job, rejected)
        quantization = job.records.get("quantization", {})
        hint = ""
        if quantization.get("weights") == "int4" and \
                quantization.get("source") == "round-to-nearest from float":
            hint = (" The int4 blocks were rounded from float weights (compressed weights no "
                    "longer match a GGUF's blocks); --precision int8 rounds far less (SmolLM2 "
                    "with --sparsity 0.1: +0.16% instead of +21.9%).")
        if job.target.generation.activations == "float16" and not all(
                math.isfinite(v) for v in measured.values()):
            # past 65504 a float16 activation is inf: --precision int8 changes the weights,
            # not that, and failed the same way (the int4 hint misled there)
            hint = (" This profile runs the decoder's activations in float16 "
                    "(generation.activations), whose largest value is 65504, and the model's "
                    "outputs are not finite numbers: its activations likely pass that range. "
                    "ONNX Runtime's CUDA attention kernel takes float16 or bfloat16 only, so "
                    "this model runs on a GPU profile only once fine-tuned to smaller "
                    "activations; a CPU profile (arm-cpu, x86-server: float32 activations) "
                    "runs it as it is.")
        raise BudgetError(f"Accuracy budget {job.budget} broken: {'; '.join(broken)}.{hint} "
                          f"No bundle written; the report is in {rejected}/.")
