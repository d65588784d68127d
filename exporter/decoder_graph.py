"""Llama- and GPT-2-family decoders -> one ONNX graph built directly on ONNX Runtime's fused
decoder ops.

Why not trace PyTorch: a traced decoder concatenates its KV cache every step (the cache grows,
copied, token by token) and spells attention, rotary embedding and RMSNorm out as dozens of
small ops. This graph is written the way ONNX Runtime runs decoders fastest on CPU:

    input_ids -> embedding -> 30 x [ RMSNorm -> QKV MatMul -> GroupQueryAttention (rotary inside,
    KV written in place into a preallocated buffer) -> O MatMul -> Skip+RMSNorm -> gate|up MatMul
    -> SiLU * up -> down MatMul -> Skip+RMSNorm ] -> LM head -> logits

GPT-2-family models take the same path with their own parts: learned position embeddings
added to the token embeddings (positions counted from `total_sequence_length`), LayerNorm with
a bias (SkipLayerNormalization, which also adds the projection's bias), attention without
rotation (GroupQueryAttention with as many KV heads as query heads) and a tanh-GELU MLP
(FastGelu, with the first projection's bias inside).

One graph serves prefill (S prompt tokens) and decode (S = 1). The KV cache is a fixed-capacity
buffer per layer, shape (batch, kv_heads, context, head_dim): `past_key.i` and `present_key.i`
are the same memory when the runtime binds them so (IO binding), so a long generation never
grows or copies it. `seqlens_k` (tokens already in the cache + new - 1) and
`total_sequence_length` tell GroupQueryAttention where to write and which positions to rotate.
`num_logits` picks how many trailing positions get logits: 1 when generating, all when
measuring perplexity (the LM head is the largest matrix; prefill should not pay for it S times).

`float_type` float16 builds the graph for GPUs (the jetson target): activations, KV cache and
float weights in float16; logits are cast back to float32 for the runtime's sampling.

Weights arrive as `Linear` values: float, or blocks for `MatMulNBits` (int4/int8 codes with
per-block scales and zero points), optionally with a per-block float offset (`offsets`): the
GGUF Q4_1 form w = d*q + m, computed exactly as MatMulNBits(x, q, d) + blocksum(x) @ m.

Such a product is one node, `edge_exporter.MatMul4BitOffsets`, wherever its tables allow:
a model-local ONNX function whose body is those standard ops, so any onnxruntime runs the
bundle, and which the runtime's custom-op library (runtime/_kernels.c) runs as one kernel
(float activations, float16 tables read as stored, prefetched: SmolLM2 decodes 1.6x
faster, 87.6 against 55.1 tokens/s, benchmarks/bench_decoder.py).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph_file import save_graph

MS = "com.microsoft"
EDGE = "edge_exporter"   # our ops: model-local functions (see q4_offsets_function)
# float_type -> (numpy dtype, ONNX element type)
FLOAT_TYPES = {"float32": (np.float32, TensorProto.FLOAT),
               "float16": (np.float16, TensorProto.FLOAT16)}


@dataclass(frozen=True)
class DecoderShape:
    """The architecture numbers the graph needs (from a transformers Llama or GPT-2 config)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rms_eps: float
    rope_theta: float
    context: int          # KV buffer capacity in tokens
    family: str = "llama"  # "llama": RMSNorm, rotary, SwiGLU; "gpt2": LayerNorm, learned
    activation: str = "silu"  # positions, biases, GELU ("gelu_new" tanh form or exact "gelu")
    attention_scales: tuple[float, ...] = ()  # per layer (GPT-2 may scale by 1/(layer+1))
    rope_type: str = "default"   # config.rope_scaling's type, one of ROPE_TYPES
    rope_scaling: tuple[tuple[str, float], ...] = ()  # and its numbers, sorted by name

    ROPE_TYPES = ("default", "linear", "llama3")   # frequencies fixed whatever the length

    @classmethod
    def from_config(cls, config, context: int) -> DecoderShape:
        if config.model_type == "gpt2":
            return cls.from_gpt2_config(config, context)
        activation = getattr(config, "hidden_act", "silu")
        if activation not in ("silu", "swish"):   # the graph's MLP is SwiGLU
            raise ValueError(f"Llama hidden_act {activation!r} is not supported (silu): the "
                             f"graph's MLP is SiLU(gate) x up.")
        rope = dict(getattr(config, "rope_scaling", None) or {})
        kind = rope.pop("rope_type", rope.pop("type", "default"))
        if kind not in cls.ROPE_TYPES:
            raise ValueError(f"rope_scaling type {kind!r} is not supported yet (supported: "
                             f"{', '.join(cls.ROPE_TYPES)}; Llama 3.1 and 3.2 use llama3).")
        numbers = tuple(sorted((k, float(v)) for k, v in rope.items()
                               if isinstance(v, int | float) and not isinstance(v, bool)))
        head_dim = (getattr(config, "head_dim", None)
                    or config.hidden_size // config.num_attention_heads)
        return cls(vocab=config.vocab_size, hidden=config.hidden_size,
                   layers=config.num_hidden_layers, heads=config.num_attention_heads,
                   kv_heads=config.num_key_value_heads, head_dim=head_dim,
                   intermediate=config.intermediate_size, rms_eps=float(config.rms_norm_eps),
                   rope_theta=float(config.rope_theta),
                   context=min(context, config.max_position_embeddings),
                   attention_scales=(head_dim ** -0.5,) * config.num_hidden_layers,
                   rope_type=kind, rope_scaling=numbers)

    @classmethod
    def from_gpt2_config(cls, config, context: int) -> DecoderShape:
        activation = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                      "gelu_fast": "gelu_tanh", "gelu": "gelu"}.get(config.activation_function)
        if activation is None:
            raise ValueError(f"GPT-2 activation {config.activation_function!r} is not "
                             f"supported (gelu_new, gelu_pytorch_tanh, gelu).")
        head_dim = config.n_embd // config.n_head
        scales = tuple((head_dim ** -0.5 if config.scale_attn_weights else 1.0)
                       / ((i + 1) if config.scale_attn_by_inverse_layer_idx else 1)
                       for i in range(config.n_layer))
        return cls(vocab=config.vocab_size, hidden=config.n_embd, layers=config.n_layer,
                   heads=config.n_head, kv_heads=config.n_head, head_dim=head_dim,
                   intermediate=config.n_inner or 4 * config.n_embd,
                   rms_eps=float(config.layer_norm_epsilon), rope_theta=0.0,
                   context=min(context, config.n_positions), family="gpt2",
                   activation=activation, attention_scales=scales)


@dataclass
class Linear:
    """One weight matrix, logically [out, in], in the form the graph stores it."""

    weight: np.ndarray | None = None        # float [out, in]
    bits: int = 0                           # 4 or 8 for MatMulNBits
    block_size: int = 0
    codes: np.ndarray | None = None         # uint8 [out, in/block, block*bits/8]
    scales: np.ndarray | None = None        # float32 [out, in/block]
    zero_points: np.ndarray | None = None   # uint8, packed like the codes; None: none stored
    offsets: np.ndarray | None = None       # float32 [out, in/block]: w = scale*q + offset
    bias: np.ndarray | None = None          # float [out], added after the product

    @property
    def out_features(self) -> int:
        return (self.weight if self.weight is not None else self.codes).shape[0]

    @property
    def in_features(self) -> int:
        if self.weight is not None:
            return self.weight.shape[1]
        return self.codes.shape[1] * self.block_size

    def dequantize(self) -> np.ndarray:
        """The float matrix this Linear computes with, [out, in] (for checks and tests)."""
        if self.weight is not None:
            return self.weight
        q = unpack(self.codes, self.bits).astype(np.float32)            # [out, nb, block]
        if self.offsets is not None:
            w = q * self.scales[..., None] + self.offsets[..., None]
        else:
            nb = self.codes.shape[1]
            zp = (unpack(self.zero_points, self.bits)[:, :nb] if self.zero_points is not None
                  else np.full(self.scales.shape, 1 << (self.bits - 1)))
            w = (q - zp[..., None]) * self.scales[..., None]
        return w.reshape(w.shape[0], -1).astype(np.float32)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes -> codes along the last axis (4-bit: low nibble first, as MatMulNBits)."""
    if bits == 8:
        return packed
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes in [0, 2^bits) along the last axis -> uint8 bytes (inverse of `unpack`)."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def concat(parts: list[Linear]) -> Linear:
    """Stack Linears along the output dimension (fused QKV and gate|up projections)."""
    if all(p.weight is not None for p in parts):
        return Linear(weight=np.concatenate([p.weight for p in parts]),
                      bias=_cat(parts, "bias"))
    first = parts[0]
    if any(p.weight is not None or p.bits != first.bits or p.block_size != first.block_size
           or (p.offsets is None) != (first.offsets is None)
           or (p.zero_points is None) != (first.zero_points is None) for p in parts):
        raise ValueError("cannot fuse projections stored in different forms")

    return Linear(bits=first.bits, block_size=first.block_size, codes=_cat(parts, "codes"),
                  scales=_cat(parts, "scales"), zero_points=_cat(parts, "zero_points"),
                  offsets=_cat(parts, "offsets"), bias=_cat(parts, "bias"))


def _cat(parts: list[Linear], name: str) -> np.ndarray | None:
    values = [getattr(p, name) for p in parts]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ValueError(f"cannot fuse projections where only some have {name}")
    return np.concatenate(values)


@dataclass
class DecoderWeights:
    """Everything the graph stores, by role. Lists are per layer."""

    embedding: Linear            # [vocab, hidden]; also the LM head when `lm_head` is None
    lm_head: Linear | None
    input_norms: list[np.ndarray]
    post_attention_norms: list[np.ndarray]
    final_norm: np.ndarray
    qkv: list[Linear]
    o: list[Linear]
    gate_up: list[Linear]        # gpt2: the first MLP projection (c_fc)
    down: list[Linear]
    # gpt2 family only: learned positions and the LayerNorm biases
    position_embedding: np.ndarray | None = None   # [positions, hidden]
    input_norm_biases: list[np.ndarray] | None = None
    post_attention_norm_biases: list[np.ndarray] | None = None
    final_norm_bias: np.ndarray | None = None


class _Graph:
    def __init__(self, float_type: str = "float32"):
        self.np_float, self.onnx_float = FLOAT_TYPES[float_type]
        self.nodes, self.inits = [], []
        self._blocksums: dict[tuple[str, int], str] = {}
        self._stored: dict[str, str] = {}
        self._by_content: dict[tuple, str] = {}
        self._casts: set[str] = set()
        self._names: dict[str, str] = {}   # name asked for -> name stored
        self.functions: dict[str, onnx.FunctionProto] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        """Store `array` as initializer `name`; a large array identical to one already
        stored (layers that share weights) is stored once and its first name returned."""
        if name in self._names:   # a shared constant (e.g. "eight"), stored on first use
            return self._names[name]
        array = np.atleast_1d(array)   # a scalar is stored as shape [1] (a view, not a copy)
        key = None
        if array.size >= 4096:
            key = (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
            if key in self._by_content:
                self._names[name] = self._by_content[key]
                return self._by_content[key]
        self._names[name] = name
        self.inits.append((name, array))   # a view where it can be: copied once, when saved
        if key is not None:
            self._by_content[key] = name
        return name

    def level(self, bits: int) -> int:
        return self.accuracy_levels[0 if bits == 4 else 1]

    def small_floats(self, name: str, array: np.ndarray, *, shape: tuple | None = None,
                     stored_as: str | None = None) -> str:
        """A float32 tensor stored as float16 when that is exact (GGUF scales and minimums are
        float16 already), widened by a Cast that ONNX Runtime folds at load: half the bytes
        in the file, the same values in memory. A float16 graph stores and uses them as
        float16. `shape` reshapes after the cast; calls with the same `stored_as` share one
        stored array (one table, two layouts)."""
        key = stored_as or name
        if key not in self._stored and self.np_float == np.float16:
            self._stored[key] = (self.init(f"{key}.f16", np.asarray(array, np.float16)), False)
        if key not in self._stored:
            array = np.asarray(array, np.float32)
            half = array.astype(np.float16)
            exact = np.array_equal(half.astype(np.float32), array)
            self._stored[key] = (self.init(f"{key}.f16" if exact else f"{key}.f32",
                                           half if exact else array), exact)
        stored, exact = self._stored[key]
        if exact and f"{name}.cast" not in self._casts:
            self._casts.add(self.node("Cast", [stored], [f"{name}.cast"], name=f"{name}.cast",
                                      to=TensorProto.FLOAT)[0])
        if exact:
            stored = f"{name}.cast"
        if shape is None:
            return stored
        target = self.init(f"{name}.shape", np.array(shape, np.int64))
        return self.node("Reshape", [stored, target], [name], name=f"{name}.reshape")[0]

    def node(self, op: str, inputs: list[str], outputs: list[str], *, name: str,
             domain: str = "", **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain,
                                           **attrs))
        return outputs

    def linear(self, x: str, w: Linear, name: str, k: int, *, add_bias: bool = True) -> str:
        """x [..., k] @ w.T (+ w.bias unless the caller fuses it elsewhere) -> [..., out]."""
        y = self._product(x, w, name, k)
        if w.bias is None or not add_bias:
            return y
        bias = self.init(f"{name}.bias", w.bias.astype(self.np_float))
        return self.node("Add", [y, bias], [f"{name}.biased"], name=f"{name}.add_bias")[0]

    def _product(self, x: str, w: Linear, name: str, k: int) -> str:
        if w.weight is not None:
            weight = self.init(f"{name}.weight", w.weight.T.astype(self.np_float, copy=False))
            return self.node("MatMul", [x, weight], [f"{name}.out"], name=name)[0]
        if self.nibble_split(w):
            return self._split_product(x, w, name, k)
        tables = (_offset_tables(w) if self.np_float == np.float32 and self.level(4) == 0
                  and self.opset >= 15 else None)
        if tables is not None:
            if "MatMul4BitOffsets" not in self.functions:
                self.functions["MatMul4BitOffsets"] = q4_offsets_function(self.opset)
            scales, offsets = tables
            return self.node("MatMul4BitOffsets", [
                x, self.init(f"{name}.codes", w.codes), self.init(f"{name}.scales.f16", scales),
                self.init(f"{name}.offsets_8.f16", offsets)], [f"{name}.out"], name=name,
                domain=EDGE, K=k, N=w.out_features)[0]
        shift = _zero_point_eight(w, self.np_float)
        inputs = [x, self.init(f"{name}.codes", w.codes),
                  self.small_floats(f"{name}.scales", w.scales, shape=(-1,))]
        if w.zero_points is not None and not shift:
            inputs.append(self.init(f"{name}.zero_points", w.zero_points.reshape(-1)))
        y = self.node("MatMulNBits", inputs, [f"{name}.nbits"], name=name, domain=MS,
                      K=k, N=w.out_features, bits=w.bits, block_size=w.block_size,
                      accuracy_level=self.level(w.bits))[0]
        if w.offsets is None:
            return y
        # exact per-block offsets: sum_b m[o, b] * (sum of x over block b)
        sums = self.blocksum(x, k, w.block_size)
        offsets = self.small_floats(f"{name}.offsets", w.offsets.T.copy())
        if shift:   # m + 8d, from the stored tables by constant nodes ONNX Runtime folds
            scales = self.node("Transpose", [self.small_floats(f"{name}.scales", w.scales)],
                               [f"{name}.scales_t"], name=f"{name}.scales_t")[0]
            eight = self.node("Mul", [scales, self.init("eight", np.array(8.0, self.np_float))],
                              [f"{name}.scales_8"], name=f"{name}.scales_8")[0]
            offsets = self.node("Add", [offsets, eight], [f"{name}.offsets_8"],
                                name=f"{name}.offsets_8")[0]
        offset = self.node("MatMul", [sums, offsets], [f"{name}.offset_out"],
                           name=f"{name}.offsets")[0]
        return self.node("Add", [y, offset], [f"{name}.out"], name=f"{name}.add_offsets")[0]

    def nibble_split(self, w: Linear) -> bool:
        """Whether 8-bit blocks run as two exact 4-bit halves: with float activations for
        8-bit blocks (int8_accuracy_level 0), which MLAS runs fast only on 4-bit blocks.

        A symmetric 8-bit code c (zero point 128) splits into nibbles c = 16 hi + lo, and
        d (c - 128) = 16d (hi - 8) + d (lo - 0): two 4-bit MatMulNBits (scales 16d and d,
        zero points 8 and 0) that sum to the 8-bit product to the last bit of the weights,
        in the same bytes."""
        return (w.bits == 8 and self.level(8) == 0 and w.zero_points is None
                and w.offsets is None)

    def nibble_scales(self, name: str, w: Linear, shape: tuple) -> tuple[str, str]:
        """The block scales d and 16d in `shape` (one stored table; ONNX Runtime folds the
        product at load)."""
        d = self.small_floats(f"{name}.scales", w.scales, shape=shape)
        factor = self.init(f"{name}.sixteen", np.array(16.0, self.np_float))
        return d, self.node("Mul", [d, factor], [f"{name}.scales16"], name=f"{name}.scale16")[0]

    def _split_product(self, x: str, w: Linear, name: str, k: int, level: int = 0) -> str:
        d, d16 = self.nibble_scales(name, w, (-1,))
        out, blocks = w.codes.shape[:2]
        zero = self.init(f"{name}.low.zero_points",
                         np.zeros(out * ((blocks + 1) // 2), np.uint8))
        halves = [self.node("MatMulNBits", [x, self.init(f"{name}.{half}.codes", codes),
                                            *scales], [f"{name}.{half}"], name=f"{name}.{half}",
                            domain=MS, K=k, N=out, bits=4, block_size=w.block_size,
                            accuracy_level=level)[0]
                  for half, codes, scales in (("high", pack(w.codes >> 4, 4), [d16]),
                                              ("low", pack(w.codes & 0x0F, 4), [d, zero]))]
        return self.node("Add", halves, [f"{name}.out"], name=f"{name}.add_halves")[0]

    def blocksum(self, x: str, k: int, block: int) -> str:
        """x [..., k] -> its sums over consecutive blocks [..., k / block] (Reshape +
        ReduceSum: measured faster than one MatMul with a 0/1 block indicator)."""
        key = (x, block)
        if key not in self._blocksums:
            shape = self.init(f"{x}.block_shape", np.array([0, 0, k // block, block], np.int64))
            blocks = self.node("Reshape", [x, shape], [f"{x}.blocks"], name=f"{x}.to_blocks")[0]
            axes = self.init(f"{x}.block_axes", np.array([-1], np.int64))
            self._blocksums[key] = self.node("ReduceSum", [blocks, axes], [f"{x}.blocksums"],
                                             name=f"{x}.blocksum", keepdims=0)[0]
        return self._blocksums[key]


def _offset_tables(w: Linear) -> tuple[np.ndarray, np.ndarray] | None:
    """The float16 tables of MatMul4BitOffsets for 4-bit blocks of 32 with float offsets and
    zero points 0 (GGUF Q4_1: w = d*q + m): d [out, blocks] and o = m + 8d [blocks, out],
    so that w = d*(q - 8) + o. None unless both are exact in float16 (GGUF's d and m are
    float16; m + 8d is exact for all but 2 of SmolLM2's 3.3 million blocks, whose matrices
    keep the unfused form)."""
    if (w.bits != 4 or w.block_size != 32 or w.offsets is None or w.zero_points is None
            or w.zero_points.any() or w.bias is not None):
        return None
    d = w.scales.astype(np.float64)
    o = w.offsets.astype(np.float64) + 8.0 * d
    d16, o16 = d.astype(np.float16), o.astype(np.float16)
    if not (np.array_equal(d16.astype(np.float64), d)
            and np.array_equal(o16.astype(np.float64), o)):
        return None
    return d16, np.ascontiguousarray(o16.T)


def q4_offsets_function(opset: int = 21) -> onnx.FunctionProto:
    """edge_exporter.MatMul4BitOffsets(x [..., K], codes uint8 [N, K/32, 16], d float16
    [N, K/32], o float16 [K/32, N]; K, N) -> y [..., N] with w = d*(q - 8) + o: the body is
    the standard-op form (MatMulNBits with its default zero point 8, plus the block sums of
    x times o), constant-folded at load like the unfused graph, so without our kernels a
    session computes exactly what it did before the node existed."""
    def const(name, values, dtype=TensorProto.INT64):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name, dtype, [len(values)], values))

    product = helper.make_node("MatMulNBits", ["x", "codes", "d_flat"], ["product"], domain=MS,
                               bits=4, block_size=32, accuracy_level=0)
    product.attribute.extend([helper.make_attribute_ref("K", onnx.AttributeProto.INT),
                              helper.make_attribute_ref("N", onnx.AttributeProto.INT)])
    def attribute(name):   # a scalar int64 Constant holding the node's attribute `name`
        node = helper.make_node("Constant", [], [name.lower()])
        node.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name=name,
                                                  type=onnx.AttributeProto.INT))
        return node

    body = [
        helper.make_node("Cast", ["scales"], ["d_any"], to=TensorProto.FLOAT),
        # d as [N, K/32]: Expand refuses a table of the right size and another shape (a
        # transposed one flattened to the same length and gave garbage; the kernel refuses it)
        attribute("N"), attribute("K"),
        const("one", [1]),
        helper.make_node("Reshape", ["n", "one"], ["n_row"]),
        helper.make_node("Reshape", ["k", "one"], ["k_row"]),
        const("per_block", [32]),
        helper.make_node("Div", ["k_row", "per_block"], ["k_blocks"]),
        helper.make_node("Concat", ["n_row", "k_blocks"], ["d_shape"], axis=0),
        helper.make_node("Expand", ["d_any", "d_shape"], ["d"]),
        const("flat", [-1]),
        helper.make_node("Reshape", ["d", "flat"], ["d_flat"]),
        product,
        helper.make_node("Cast", ["offsets"], ["o"], to=TensorProto.FLOAT),
        # [..., K/32, 32] from x's own K: a -1 there cannot be resolved for 0 rows
        helper.make_node("Shape", ["x"], ["leading"], end=-1),
        helper.make_node("Shape", ["x"], ["width"], start=-1),
        const("block", [32]),
        helper.make_node("Div", ["width", "block"], ["count"]),
        helper.make_node("Concat", ["leading", "count", "block"], ["block_shape"], axis=0),
        helper.make_node("Reshape", ["x", "block_shape"], ["blocks"]),
        const("last", [-1]),
        helper.make_node("ReduceSum", ["blocks", "last"], ["sums"], keepdims=0),
        helper.make_node("MatMul", ["sums", "o"], ["offset"]),
        helper.make_node("Add", ["product", "offset"], ["y"]),
    ]
    return helper.make_function(EDGE, "MatMul4BitOffsets", ["x", "codes", "scales", "offsets"],
                                ["y"], body, [helper.make_opsetid("", opset),
                                              helper.make_opsetid(MS, 1)],
                                attributes=["K", "N"])


def _zero_point_eight(w: Linear, dtype=np.float32) -> bool:
    """Whether 4-bit blocks with zero points 0 and float offsets (GGUF Q4_1: d*q + m) run as
    d*(q - 8) + (m + 8d): MatMulNBits' default zero point 8 needs no zero-point input,
    which its kernels run faster (measured: +2-3% decode tokens/s on SmolLM2). Only where
    every m + 8d is exact in the graph's float type, so the product stays what the blocks
    hold."""
    if w.bits != 4 or w.offsets is None or w.zero_points is None or w.zero_points.any():
        return False
    shifted = w.offsets.astype(np.float64) + 8.0 * w.scales.astype(np.float64)
    return bool(np.array_equal(shifted.astype(dtype).astype(np.float64), shifted))


def rotary_caches(shape: DecoderShape) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (context, head_dim/2) as transformers' Llama computes them, its
    "linear" and "llama3" frequency scaling included (modeling_rope_utils.py)."""
    inv_freq = 1.0 / (shape.rope_theta ** (np.arange(0, shape.head_dim, 2, dtype=np.int64)
                                           .astype(np.float32) / shape.head_dim))
    inv_freq = scaled_frequencies(inv_freq.astype(np.float32), shape.rope_type,
                                  dict(shape.rope_scaling))
    angles = np.outer(np.arange(shape.context, dtype=np.float32), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def scaled_frequencies(inv_freq: np.ndarray, kind: str, rope: dict[str, float]) -> np.ndarray:
    """Rotary frequencies (float32) after rope_scaling of type `kind`. linear: all slowed
    down by `factor`; llama3 (Llama 3.1+): wavelengths past original / low_freq_factor
    slowed down by `factor`, those under original / high_freq_factor kept, those between
    blended."""
    if kind == "default":
        return inv_freq
    factor = np.float32(rope["factor"])
    if kind == "linear":
        return inv_freq / factor
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    wavelen = np.float32(2 * math.pi) / inv_freq
    slowed = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = ((original / wavelen - low) / (high - low)).astype(np.float32)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return np.where(medium, blended, slowed).astype(np.float32)


def build(shape: DecoderShape, weights: DecoderWeights, **options) -> onnx.ModelProto:
    """The decoder graph (see the module docstring for its inputs and outputs; `options`
    are `graph_and_initializers`')."""
    model, initializers = graph_and_initializers(shape, weights, **options)
    model.graph.initializer.extend(numpy_helper.from_array(array, name)
                                   for name, array in initializers)
    return model


def build_file(path: Path, shape: DecoderShape, weights: DecoderWeights, **options) -> bool:
    """`build(shape, weights, **options)` saved at `path` by graph_file.save_graph, which over
    its limit writes the weights to the data file from the arrays, one by one: never the
    whole graph in memory as a protobuf. Returns whether it did that."""
    model, initializers = graph_and_initializers(shape, weights, **options)
    return save_graph(model, path, initializers)


def graph_and_initializers(
        shape: DecoderShape, weights: DecoderWeights, *, accuracy_level: int = 0,
        int8_accuracy_level: int = 4, float_type: str = "float32", exact_top_logits: int = 0,
        opset: int = 21) -> tuple[onnx.ModelProto, list[tuple[str, np.ndarray]]]:
    """The decoder graph without its initializers, and them as (name, array) in graph order
    (arrays may be views of `weights`).

    `accuracy_level` is MatMulNBits' compute mode for 4-bit matrices, `int8_accuracy_level`
    for 8-bit ones (0: float activations, as stored; 4: activations quantized to int8 per
    block, integer dot products). `float_type` is the type of activations, KV cache and float
    weights: "float32" or "float16". `exact_top_logits` K > 0, with a symmetric 8-bit LM
    head: the head runs with int8 activations and its K largest logits per position are then
    recomputed from float activations (`_refined_head`), whatever `int8_accuracy_level`."""
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {sorted(FLOAT_TYPES)}, got {float_type!r}")
    g = _Graph(float_type)
    g.accuracy_levels = (accuracy_level, int8_accuracy_level)
    g.opset = opset   # the function body needs >= 15 (Shape's `end`)
    g.exact_top_logits = exact_top_logits
    gpt2 = shape.family == "gpt2"

    x = _embedding(g, shape, weights)
    if gpt2:
        x = _add_positions(g, shape, weights, x)
    else:
        cos, sin = rotary_caches(shape)
        g.init("cos_cache", cos.astype(g.np_float))
        g.init("sin_cache", sin.astype(g.np_float))
    residual = x
    normed = _norm(g, shape, weights, x, 0)
    for i in range(shape.layers):
        normed, residual = _layer(g, shape, weights, i, normed, residual)

    # logits for the last `num_logits` positions only
    start = g.node("Neg", ["num_logits"], ["num_logits_start"], name="num_logits_start")[0]
    last = g.node("Slice", [normed, start, g.init("slice_end", np.array(
        [np.iinfo(np.int64).max], np.int64)), g.init("slice_axes", np.array([1], np.int64))],
        ["last_hidden"], name="select_positions")[0]
    logits = _lm_head(g, shape, weights, last)
    if g.onnx_float != TensorProto.FLOAT:   # sampling and perplexity want float32 logits
        logits = g.node("Cast", [logits], ["logits.f32"], name="logits.cast",
                        to=TensorProto.FLOAT)[0]
    g.node("Identity", [logits], ["logits"], name="logits")

    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    cache = ["batch", shape.kv_heads, "capacity", shape.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "positions", shape.vocab])]
    for i in range(shape.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", g.onnx_float, cache))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", g.onnx_float,
                                                         cache))
    inputs += [helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
               helper.make_tensor_value_info("total_sequence_length", i32, []),
               helper.make_tensor_value_info("num_logits", i64, [1])]
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    if g.functions:
        opsets.append(helper.make_opsetid(EDGE, 1))
    model = helper.make_model(graph, opset_imports=opsets, functions=list(g.functions.values()))
    model.ir_version = 10
    return model, g.inits


def _embedding(g: _Graph, shape: DecoderShape, weights: DecoderWeights) -> str:
    """Token embedding lookup: a float table, or int8 blocks (GatherBlockQuantized)."""
    emb = weights.embedding
    if emb.weight is not None:
        table = g.init("embedding.weight", emb.weight.astype(g.np_float, copy=False))
        return g.node("Gather", [table, "input_ids"], ["embedded"], name="embedding")[0]
    if emb.offsets is not None or emb.bits != 8:
        raise ValueError("a quantized embedding table must be 8-bit blocks without offsets")
    vocab, blocks = emb.scales.shape
    if g.nibble_split(emb) and not g.exact_top_logits:
        return _split_embedding(g, shape, emb)   # the tied head reads the same halves
    inputs = [g.init("embedding.codes", emb.codes), "input_ids",
              g.small_floats("embedding.gather_scales", emb.scales,
                             shape=(vocab, blocks, 1), stored_as="embedding.scales")]
    if emb.zero_points is not None:
        inputs.append(g.init("embedding.gather_zero_points",
                             emb.zero_points.reshape(vocab, blocks, 1)))
    x = g.node("GatherBlockQuantized", inputs, ["embedded_blocks"], name="embedding",
               domain=MS, bits=8, block_size=emb.block_size, gather_axis=0,
               quantize_axis=2)[0]
    return g.node("Reshape", [x, g.init("embedding.shape",
                                        np.array([0, 0, shape.hidden], np.int64))],
                  ["embedded"], name="embedding.flatten")[0]


def _split_embedding(g: _Graph, shape: DecoderShape, emb: Linear) -> str:
    """Embedding rows from the two nibble tables (see `_Graph.nibble_split`): high + low.
    The tied LM head stores the same halves, so they are kept once."""
    vocab, blocks = emb.scales.shape
    d, d16 = g.nibble_scales("embedding", emb, (vocab, blocks, 1))
    zero = g.init("embedding.low.zero_points", np.zeros((vocab, blocks, 1), np.uint8))
    parts = [g.node("GatherBlockQuantized", [g.init(f"embedding.{half}.codes", codes),
                                             "input_ids", *scales], [f"embedded.{half}"],
                    name=f"embedding.{half}", domain=MS, bits=4, block_size=emb.block_size,
                    gather_axis=0, quantize_axis=2)[0]
             for half, codes, scales in (("high", pack(emb.codes >> 4, 4), [d16]),
                                         ("low", pack(emb.codes & 0x0F, 4), [d, zero]))]
    x = g.node("Add", parts, ["embedded_blocks"], name="embedding.add_halves")[0]
    return g.node("Reshape", [x, g.init("embedding.shape",
                                        np.array([0, 0, shape.hidden], np.int64))],
                  ["embedded"], name="embedding.flatten")[0]


def _add_positions(g: _Graph, shape: DecoderShape, weights: DecoderWeights, x: str) -> str:
    """GPT-2: + learned position embeddings of positions [total - sequence, total)."""
    table = g.init("position_embedding", weights.position_embedding[:shape.context]
                   .astype(g.np_float))
    sequence = g.node("Shape", ["input_ids"], ["positions.count"], name="positions.count",
                      start=1, end=2)[0]
    total = g.node("Cast", ["total_sequence_length"], ["positions.total_scalar"],
                   name="positions.total_scalar", to=TensorProto.INT64)[0]
    total = g.node("Reshape", [total, g.init("positions.one", np.array([1], np.int64))],
                   ["positions.total"], name="positions.total")[0]
    first = g.node("Sub", [total, sequence], ["positions.first"], name="positions.first")[0]
    # rows [first, total) of the table: a Slice, not Range + Gather (ONNX Runtime 1.32 rewrites
    # that pair into a Slice whose step input it then mis-shapes)
    embedded = g.node("Slice", [table, first, total, g.init("positions.axis",
                                                            np.array([0], np.int64))],
                      ["positions.embedded"], name="position_lookup")[0]
    return g.node("Add", [x, embedded], ["embedded_with_positions"], name="add_positions")[0]


def _norm(g: _Graph, shape: DecoderShape, weights: DecoderWeights, x: str, i: int) -> str:
    """The first layer's input norm (the others are fused with the residual add)."""
    gamma = g.init("layers.0.input_norm", weights.input_norms[0].astype(g.np_float))
    if shape.family == "gpt2":
        beta = g.init("layers.0.input_norm.bias",
                      weights.input_norm_biases[0].astype(g.np_float))
        return g.node("LayerNormalization", [x, gamma, beta], ["layers.0.normed"],
                      name="layers.0.input_norm", axis=-1, epsilon=shape.rms_eps)[0]
    return g.node("SimplifiedLayerNormalization", [x, gamma], ["layers.0.normed"],
                  name="layers.0.input_norm", axis=-1, epsilon=shape.rms_eps)[0]


def _skip_norm(g: _Graph, shape: DecoderShape, x: str, residual: str, name: str,
               gamma: np.ndarray, beta: np.ndarray | None, bias: np.ndarray | None,
               outputs: tuple[str, str]) -> tuple[str, str]:
    """norm(x + residual [+ bias]) and the new residual (x + residual [+ bias])."""
    inputs = [x, residual, g.init(name, gamma.astype(g.np_float))]
    if shape.family == "gpt2":
        inputs.append(g.init(f"{name}.bias", beta.astype(g.np_float)))
        if bias is not None:
            inputs.append(g.init(f"{name}.skip_bias", bias.astype(g.np_float)))
        op = "SkipLayerNormalization"
    else:   # inputs: x, skip, gamma[, bias]
        if bias is not None:
            inputs.append(g.init(f"{name}.skip_bias", bias.astype(g.np_float)))
        op = "SkipSimplifiedLayerNormalization"
    normed, _, _, summed = g.node(op, inputs, [outputs[0], "", "", outputs[1]], name=name,
                                  domain=MS, epsilon=shape.rms_eps)
    return normed, summed


def _layer(g: _Graph, shape: DecoderShape, weights: DecoderWeights, i: int, normed: str,
           residual: str) -> tuple[str, str]:
    """One transformer block: attention and MLP, each closed by a fused skip + norm."""
    p = f"layers.{i}"
    gpt2 = shape.family == "gpt2"
    h = shape.hidden
    # per layer: structured pruning (exporter/compress.py) may leave fewer query heads
    # (the same number in every KV group) and fewer FFN neurons than the config says
    heads = weights.o[i].in_features // shape.head_dim
    intermediate = weights.down[i].in_features
    qkv = g.linear(normed, weights.qkv[i], f"{p}.qkv", h)
    attention_inputs = [qkv, "", "", f"past_key.{i}", f"past_value.{i}", "seqlens_k",
                        "total_sequence_length"]
    if not gpt2:
        attention_inputs += ["cos_cache", "sin_cache"]
    attn = g.node("GroupQueryAttention", attention_inputs,
                  [f"{p}.attention", f"present_key.{i}", f"present_value.{i}"],
                  name=f"{p}.attention", domain=MS, num_heads=heads,
                  kv_num_heads=shape.kv_heads, do_rotary=0 if gpt2 else 1,
                  rotary_interleaved=0, scale=float(shape.attention_scales[i]))[0]
    o = g.linear(attn, weights.o[i], f"{p}.o", heads * shape.head_dim, add_bias=False)
    normed, residual = _skip_norm(
        g, shape, o, residual, f"{p}.post_attention_norm", weights.post_attention_norms[i],
        _nth(weights.post_attention_norm_biases, i), weights.o[i].bias,
        (f"{p}.mlp_in", f"{p}.attention_residual"))
    if gpt2:
        fc = g.linear(normed, weights.gate_up[i], f"{p}.fc", h, add_bias=False)
        bias = weights.gate_up[i].bias
        if shape.activation == "gelu_tanh":   # FastGelu adds the bias itself
            act = g.node("FastGelu", [fc] + ([] if bias is None else [
                g.init(f"{p}.fc.bias", bias.astype(g.np_float))]), [f"{p}.act"],
                name=f"{p}.gelu", domain=MS)[0]
        else:
            if bias is not None:
                fc = g.node("Add", [fc, g.init(f"{p}.fc.bias", bias.astype(g.np_float))],
                            [f"{p}.fc.biased"], name=f"{p}.fc.add_bias")[0]
            act = g.node("Gelu", [fc], [f"{p}.act"], name=f"{p}.gelu", domain=MS)[0]
    else:
        gate_up = g.linear(normed, weights.gate_up[i], f"{p}.gate_up", h)
        split = g.init(f"{p}.split", np.array([intermediate] * 2, np.int64))
        gate, up = g.node("Split", [gate_up, split], [f"{p}.gate", f"{p}.up"],
                          name=f"{p}.split", axis=-1)
        sig = g.node("Sigmoid", [gate], [f"{p}.sigmoid"], name=f"{p}.sigmoid")[0]
        silu = g.node("Mul", [gate, sig], [f"{p}.silu"], name=f"{p}.silu")[0]
        act = g.node("Mul", [silu, up], [f"{p}.act"], name=f"{p}.act")[0]
    down = g.linear(act, weights.down[i], f"{p}.down", intermediate, add_bias=False)
    last = i == shape.layers - 1
    if last:
        gamma, beta, norm_name = weights.final_norm, weights.final_norm_bias, "final_norm"
    else:
        gamma, norm_name = weights.input_norms[i + 1], f"layers.{i + 1}.input_norm"
        beta = _nth(weights.input_norm_biases, i + 1)
    return _skip_norm(g, shape, down, residual, norm_name, gamma, beta, weights.down[i].bias,
                      (f"{norm_name}.out", f"{p}.residual"))


def _nth(values: list | None, i: int):
    return None if values is None else values[i]


def _lm_head(g: _Graph, shape: DecoderShape, weights: DecoderWeights, last: str) -> str:
    """Logits from the final hidden states: tied to the embedding table (float or its int8
    blocks), or a separate matrix."""
    head, emb, h = weights.lm_head, weights.embedding, shape.hidden
    if head is None and emb.weight is not None:  # tied float: one table, used transposed
        flat = g.node("Reshape", [last, g.init("head.flat", np.array([-1, h], np.int64))],
                      ["head.in"], name="head.flatten")[0]
        logits2d = g.node("Gemm", [flat, "embedding.weight"], ["head.logits"], name="lm_head",
                          transB=1)[0]
        g.node("Shape", [last], ["head.shape"], name="head.shape", end=2)
        g.node("Concat", ["head.shape", g.init("head.vocab", np.array([shape.vocab], np.int64))],
               ["logits_shape"], name="head.logits_shape", axis=0)
        return g.node("Reshape", [logits2d, "logits_shape"], ["head.out"],
                      name="head.unflatten")[0]
    if head is None:  # tied quantized: the embedding's blocks, stored once (see _Graph.init)
        head = emb
    if g.exact_top_logits and head.bits == 8 and head.bias is None \
            and head.zero_points is None and head.offsets is None:
        return _refined_head(g, shape, head, last)
    return g.linear(last, head, "lm_head", h)


def _refined_head(g: _Graph, shape: DecoderShape, head: Linear, last: str) -> str:
    """Logits whose K largest per position are exact: the 8-bit head runs with int8
    activations (integer dot products: fast), then its K largest rows, gathered from the same
    8-bit blocks (GatherBlockQuantized dequantizes them exactly), are multiplied with the
    float hidden state and written over their approximations. Greedy decoding, top-k and
    nucleus sampling read exact logits (the true maximum is far inside the approximate top
    K: int8 activations move a logit by ~1e-2); the rest keep that small error. Costs K rows
    of float work instead of the whole vocabulary's (SmolLM2: the head is a fifth of the
    weights), and stores the table once, as 8-bit blocks, for embedding and head."""
    vocab, blocks = head.scales.shape
    codes = g.init("lm_head.codes", head.codes)
    approx = g.node("MatMulNBits", [last, codes, g.small_floats(
        "lm_head.scales", head.scales, shape=(-1,))], ["lm_head.approx"], name="lm_head",
        domain=MS, K=shape.hidden, N=vocab, bits=8, block_size=head.block_size,
        accuracy_level=4)[0]
    top = g.node("TopK", [approx, g.init("lm_head.k", np.array([min(g.exact_top_logits,
                                                                       vocab)], np.int64))],
                 ["lm_head.top_values", "lm_head.top_ids"], name="lm_head.top", axis=-1)[1]
    rows = g.node("GatherBlockQuantized", [codes, top, g.small_floats(
        "lm_head.row_scales", head.scales, shape=(vocab, blocks, 1),
        stored_as="lm_head.scales")], ["lm_head.rows"], name="lm_head.rows", domain=MS,
        bits=8, block_size=head.block_size, gather_axis=0, quantize_axis=2)[0]
    rows = g.node("Reshape", [rows, g.init("lm_head.rows.shape", np.array(
        [0, 0, 0, shape.hidden], np.int64))], ["lm_head.rows_flat"], name="lm_head.rows_flat")[0]
    column = g.node("Unsqueeze", [last, g.init("lm_head.column_axis", np.array([-1], np.int64))],
                    ["lm_head.column"], name="lm_head.column")[0]
    exact = g.node("MatMul", [rows, column], ["lm_head.exact_column"], name="lm_head.exact")[0]
    exact = g.node("Squeeze", [exact, "lm_head.column_axis"], ["lm_head.exact"],
                   name="lm_head.exact_values")[0]
    return g.node("ScatterElements", [approx, top, exact], ["lm_head.refined"],
                  name="lm_head.refine", axis=-1)[0]


def float_weights(model) -> DecoderWeights:
    """DecoderWeights in float32 from a transformers Llama- or GPT-2-family causal LM."""
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.model_type == "gpt2":
        return _gpt2_weights(model.config, state)
    layers = model.config.num_hidden_layers
    prefix = "model."

    def lin(name):   # (attention_bias / mlp_bias configs have biases)
        return Linear(weight=state[f"{prefix}{name}.weight"],
                      bias=state.get(f"{prefix}{name}.bias"))

    def layer(i, name):
        return lin(f"layers.{i}.{name}")

    tied = getattr(model.config, "tie_word_embeddings", False) or "lm_head.weight" not in state
    return DecoderWeights(
        embedding=Linear(weight=state[f"{prefix}embed_tokens.weight"]),
        lm_head=None if tied else Linear(weight=state["lm_head.weight"]),
        input_norms=[state[f"{prefix}layers.{i}.input_layernorm.weight"] for i in range(layers)],
        post_attention_norms=[state[f"{prefix}layers.{i}.post_attention_layernorm.weight"]
                              for i in range(layers)],
        final_norm=state[f"{prefix}norm.weight"],
        qkv=[concat([layer(i, f"self_attn.{n}_proj") for n in "qkv"]) for i in range(layers)],
        o=[layer(i, "self_attn.o_proj") for i in range(layers)],
        gate_up=[concat([layer(i, f"mlp.{n}_proj") for n in ("gate", "up")])
                 for i in range(layers)],
        down=[layer(i, "mlp.down_proj") for i in range(layers)],
    )


def _gpt2_weights(config, state: dict[str, np.ndarray]) -> DecoderWeights:
    """GPT-2's Conv1D matrices are stored [in, out]: transposed here to Linear's [out, in].
    c_attn is already the fused q|k|v projection; the LM head is tied to wte unless the
    config unties it (tie_word_embeddings false: lm_head.weight, which was ignored, and the
    logits were wte's)."""
    def lin(name):
        return Linear(weight=state[f"transformer.{name}.weight"].T.copy(),
                      bias=state[f"transformer.{name}.bias"])

    def norm(name, part):
        return state[f"transformer.{name}.{part}"]

    layers = range(config.n_layer)
    tied = getattr(config, "tie_word_embeddings", True) or "lm_head.weight" not in state
    return DecoderWeights(
        embedding=Linear(weight=state["transformer.wte.weight"]),
        lm_head=None if tied else Linear(weight=state["lm_head.weight"]),
        input_norms=[norm(f"h.{i}.ln_1", "weight") for i in layers],
        post_attention_norms=[norm(f"h.{i}.ln_2", "weight") for i in layers],
        final_norm=norm("ln_f", "weight"),
        qkv=[lin(f"h.{i}.attn.c_attn") for i in layers],
        o=[lin(f"h.{i}.attn.c_proj") for i in layers],
        gate_up=[lin(f"h.{i}.mlp.c_fc") for i in layers],
        down=[lin(f"h.{i}.mlp.c_proj") for i in layers],
        position_embedding=state["transformer.wpe.weight"],
        input_norm_biases=[norm(f"h.{i}.ln_1", "bias") for i in layers],
        post_attention_norm_biases=[norm(f"h.{i}.ln_2", "bias") for i in layers],
        final_norm_bias=norm("ln_f", "bias"))
