"""Stage `compress`: make the PyTorch model smaller before it is exported, measured and healed.

Runs right after `load` (encoders) or `load_decoder` (decoders) and edits `job.torch_model`
in place; every later stage then exports the smaller model unchanged. In order:

1. layer dropping: each layer's importance is how much it changes its input on calibration
   text, mean over real tokens of 1 - cos(h_in, h_out); the least important layers go
   (or the indices asked for), and the config's layer count follows.
2. structured pruning: attention heads and FFN neurons ranked by their measured contribution
   to the residual stream, |x_head @ W_o[:, head]| and mean |a_j| * |W_down[:, j]| over real
   calibration tokens (activation-based), and cut out of the matrices (smaller MatMuls).
3. parameter sharing: an adjacent layer takes the attention block, the FFN block or all the
   weights of the one before it where the measured harm is small (1 - cosine of the output
   to the untied model's; for decoders the relative perplexity increase, since a decoder's
   logits can keep their direction and still lose the right token); the tied parameters
   are one tensor, which the exported graph stores once.
4. magnitude sparsity: the smallest weights of every layer's matrices set to zero,
   unstructured (per matrix) or N:M (N kept in every M consecutive inputs).
5. healing: distillation from a frozen copy of the original (`exporter.heal`).

Architectures: BERT (encoders, classifiers) and Llama (decoders; GQA-aware: a layer keeps the
same number of query heads in every KV group, and the KV heads themselves are never pruned,
so every layer's KV cache keeps one shape, which the runtime's preallocated cache needs).

    >>> export("minilm", target="arm-cpu", compression=Compression(drop_layers=2, heal_steps=200))
"""

from __future__ import annotations

import copy
import math
import operator
import re
from dataclasses import asdict, dataclass

import numpy as np

from .heal import batches_data, calibration_batches, heal, perplexity, quality

# FFN pruning never leaves a layer fewer than this share of its neurons.
FFN_FLOOR = 0.05

# Sparsity patterns: name -> (kept, group), None for unstructured.
PATTERNS: dict[str, tuple[int, int] | None] = {"unstructured": None, "2:4": (2, 4),
                                               "4:8": (4, 8), "1:4": (1, 4)}


def _index(value) -> int:
    """`value` as an int (numpy's ints too); TypeError for a bool or a float."""
    if isinstance(value, bool):
        raise TypeError(value)
    return operator.index(value)


@dataclass(frozen=True)
class Compression:
    """What to remove before export. Every field defaults to "leave it".

    drop_layers: how many layers to drop (chosen by measured importance) or their indices.
    prune_heads / prune_ffn: fraction of attention heads / FFN neurons to remove, in [0, 1).
    sparsity: fraction of each layer matrix's weights set to zero, in [0, 1), with
    `sparsity_pattern` "unstructured" or N:M ("2:4": 2 of every 4 kept, fixing the fraction
    at 0.5). share_layers: tie adjacent layers' attention, FFN or whole layer where the harm
    is small: at most `share_max_harm` for all ties together (1 - cosine of the output to
    the untied model's; for decoders the relative perplexity increase, 0.02 = +2%).
    heal_steps: distillation steps from the original afterwards (0: none).
    """

    drop_layers: int | tuple[int, ...] = 0
    prune_heads: float = 0.0
    prune_ffn: float = 0.0
    sparsity: float = 0.0
    sparsity_pattern: str = "unstructured"
    share_layers: bool = False
    share_max_harm: float = 0.02
    heal_steps: int = 0

    def __post_init__(self):
        for name in ("prune_heads", "prune_ffn", "sparsity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0.0 <= value < 1.0:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {value!r} is outside [0, 1): it is the fraction "
                                 f"removed (0.25 removes a quarter; 1 would remove everything).")
        if isinstance(self.share_max_harm, bool) \
                or not isinstance(self.share_max_harm, (int, float)) \
                or not 0.0 <= self.share_max_harm <= 2.0:
            raise ValueError(f"--share-max-harm {self.share_max_harm!r} is outside [0, 2]: it "
                             f"is 1 - cosine of the output, or a decoder's relative perplexity "
                             f"increase (0.02 allows a 2% drift).")
        if self.sparsity_pattern not in PATTERNS:
            raise ValueError(f"Unknown sparsity pattern {self.sparsity_pattern!r}; expected "
                             f"one of {', '.join(PATTERNS)}.")
        pattern = PATTERNS[self.sparsity_pattern]
        if pattern and self.sparsity not in (0.0, 1 - pattern[0] / pattern[1]):
            raise ValueError(f"--sparsity {self.sparsity} contradicts the {self.sparsity_pattern} "
                             f"pattern, which zeroes {1 - pattern[0] / pattern[1]:g} of the "
                             f"weights; leave out --sparsity.")
        drop = self.drop_layers
        try:   # numpy's ints too; a bool, in a tuple too, is not a count or an index
            drop = _index(drop) if not isinstance(drop, (tuple, list)) else \
                tuple(_index(i) for i in drop)
        except TypeError:
            raise TypeError(f"drop_layers must be a count or a tuple of layer indices, "
                            f"got {self.drop_layers!r}.") from None
        object.__setattr__(self, "drop_layers", drop)
        if not isinstance(self.share_layers, bool):   # "no" was true: it tied layers
            raise TypeError(f"share_layers must be True or False, got {self.share_layers!r}.")
        if (isinstance(drop, int) and drop < 0) or (isinstance(drop, tuple) and (
                len(set(drop)) != len(drop) or any(i < 0 for i in drop))):
            raise ValueError(f"drop_layers {drop!r}: give a count >= 0 or distinct "
                             f"indices >= 0.")
        try:
            steps = _index(self.heal_steps)
        except TypeError:
            steps = -1
        if steps < 0:
            raise ValueError(f"--heal-steps {self.heal_steps!r} is not a count: give the "
                             f"number of distillation steps, an int >= 0 (0: no healing).")
        object.__setattr__(self, "heal_steps", steps)

    @property
    def active(self) -> bool:
        return bool(self.drop_layers or self.prune_heads or self.prune_ffn or self.sparsity
                    or self.share_layers or self.sparsity_pattern != "unstructured")

    @property
    def changes_weights(self) -> bool:
        """Whether it changes weights of the layers it keeps (pruning, sparsity, healing),
        beyond dropping or tying whole layers: a GGUF's blocks then no longer describe them."""
        return bool(self.prune_heads or self.prune_ffn or self.sparsity or self.heal_steps
                    or self.sparsity_pattern != "unstructured")

    @classmethod
    def parse_layers(cls, text: str) -> int | tuple[int, ...]:
        """CLI form of drop_layers: "2" (a count), "1,3" (indices) or "4," (index 4 alone)."""
        if re.fullmatch(r"\d+", text.strip()):
            return int(text)
        if re.fullmatch(r"\d+(,\d+)*,?", text.replace(" ", "")):
            return tuple(int(i) for i in text.replace(" ", "").strip(",").split(","))
        raise ValueError(f"--drop-layers {text!r}: give a count (2), comma-separated layer "
                         f"indices (1,3), or one index with a comma after it (4,).")


# --- the model's parts, per architecture ---

def kind_of(model) -> str:
    return checked_kind(model.config.model_type)


def checked_kind(kind: str | None) -> str:
    """`kind` (config.json's model_type), refused where compression does not take it."""
    if kind not in ("bert", "llama"):
        raise ValueError(f"Compression supports BERT and Llama models; this one is {kind!r}.")
    return kind


def layer_list(model):
    """The nn.ModuleList of transformer layers."""
    if model.config.model_type == "llama":
        return model.model.layers
    base = getattr(model, "bert", model)
    return base.encoder.layer


def _set_layers(model, layers) -> None:
    import torch

    modules = torch.nn.ModuleList(layers)
    if model.config.model_type == "llama":
        model.model.layers = modules
        for i, layer in enumerate(modules):   # the KV cache is indexed by layer_idx
            layer.self_attn.layer_idx = i
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:len(modules)]
    else:
        getattr(model, "bert", model).encoder.layer = modules
        for i, layer in enumerate(modules):
            if getattr(layer.attention.self, "layer_idx", None) is not None:
                layer.attention.self.layer_idx = i
    model.config.num_hidden_layers = len(modules)


def attention_parts(layer, kind: str):
    """(query-side Linears pruned by output rows, output projection pruned by input columns,
    head_dim, heads)."""
    if kind == "llama":
        a = layer.self_attn
        return [a.q_proj], a.o_proj, a.head_dim, a.q_proj.out_features // a.head_dim
    s = layer.attention.self
    return ([s.query, s.key, s.value], layer.attention.output.dense, s.attention_head_size,
            s.num_attention_heads)


def ffn_parts(layer, kind: str):
    """(Linears producing the FFN neurons, Linear consuming them)."""
    if kind == "llama":
        return [layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.down_proj
    return [layer.intermediate.dense], layer.output.dense


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())   # tied tensors count once


# --- measurements on calibration text ---

def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def layer_importance(model, batches) -> list[float]:
    """Per layer: mean over real tokens of 1 - cos(layer input, layer output)."""
    import torch

    totals = np.zeros(len(layer_list(model)))
    count = 0
    mask_now = {}

    def hook(index):
        def fn(module, args, kwargs, out):
            x, y = _hidden(args, kwargs), out[0] if isinstance(out, tuple) else out
            change = 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)   # (batch, seq)
            totals[index] += float((change * mask_now["m"]).sum())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(layer_list(model))]
    try:
        with torch.no_grad():
            for batch in batches:
                mask_now["m"] = batch["attention_mask"].float()
                count += int(batch["attention_mask"].sum())
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return [round(float(t / count), 5) for t in totals]


def contribution_scores(model, batches, kind: str) -> tuple[list, list]:
    """Per layer: each head's and each FFN neuron's mean contribution norm over real tokens.

    head h: |x_h @ W_o[:, h]^T| with x_h (tokens, head_dim) the head's attention output;
    neuron j: mean |a_j| * |W_down[:, j]| with a (tokens, intermediate) the FFN activation."""
    import torch

    layers = layer_list(model)
    heads = [torch.zeros(attention_parts(layer, kind)[3]) for layer in layers]
    neurons = [torch.zeros(ffn_parts(layer, kind)[1].in_features) for layer in layers]
    state = {}

    def on_o(i, o_proj, head_dim):
        def fn(module, args):
            x = args[0][state["m"]]                                   # (tokens, heads*hd)
            w = o_proj.weight.view(o_proj.out_features, -1, head_dim)  # (hidden, heads, hd)
            x = x.view(x.shape[0], -1, head_dim)                       # (tokens, heads, hd)
            contrib = torch.einsum("thd,ohd->tho", x, w)              # (tokens, heads, hidden)
            heads[i] += contrib.norm(dim=-1).sum(0)
        return fn

    def on_down(i, down):
        def fn(module, args):
            a = args[0][state["m"]]                                     # (tokens, intermediate)
            neurons[i] += a.abs().sum(0) * down.weight.norm(dim=0)
        return fn

    handles = []
    for i, layer in enumerate(layers):
        _, o_proj, head_dim, _ = attention_parts(layer, kind)
        handles.append(o_proj.register_forward_pre_hook(on_o(i, o_proj, head_dim)))
        down = ffn_parts(layer, kind)[1]
        handles.append(down.register_forward_pre_hook(on_down(i, down)))
    tokens = 0
    try:
        with torch.no_grad():
            for batch in batches:
                state["m"] = batch["attention_mask"].bool()
                tokens += int(batch["attention_mask"].sum())
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return [h / tokens for h in heads], [n / tokens for n in neurons]


# --- the edits ---

def choose_layers_to_drop(request, importance: list[float]) -> list[int]:
    n = len(importance)
    if isinstance(request, tuple):
        bad = [i for i in request if i >= n]
        if bad:
            raise ValueError(f"--drop-layers {','.join(map(str, request))}: the model has "
                             f"{n} layers (indices 0-{n - 1}); {bad} do not exist.")
        chosen = sorted(request)
    else:
        chosen = sorted(int(i) for i in np.argsort(importance)[:request])
    asked = len(chosen) if isinstance(request, tuple) else request
    if asked >= n:
        raise ValueError(f"Dropping {asked} of {n} layers would leave no layer; "
                         f"drop at most {n - 1}.")
    return chosen


def _slice(linear, keep, dim: int):
    from transformers.pytorch_utils import prune_linear_layer

    return prune_linear_layer(linear, keep, dim=dim)


def prune_heads(model, kind: str, scores, fraction: float) -> dict[int, list[int]]:
    """Remove the lowest-scoring heads; returns {layer: removed head indices}.

    BERT: global ranking by contribution (layers end with different head counts, at least 1
    each). Llama (GQA): in every layer the same number of query heads, the lowest-scoring, is
    removed from each KV group, so the group structure and the KV cache stay intact."""
    import torch

    layers = layer_list(model)
    removed: dict[int, list[int]] = {}
    if kind == "bert":
        target = heads_removed(kind, [len(s) for s in scores], fraction)
        ranked = sorted((float(s[h]), i, h) for i, s in enumerate(scores) for h in range(len(s)))
        left = [len(s) for s in scores]
        for _, i, h in ranked:
            if sum(len(v) for v in removed.values()) >= target:
                break
            if left[i] > 1:
                removed.setdefault(i, []).append(h)
                left[i] -= 1
        for i, heads in removed.items():
            # transformers numbers heads as the checkpoint had them before any pruning
            # (config.pruned_heads): map the current indices scored here onto those
            attention = layers[i].attention
            numbering = sorted(set(range(len(scores[i]) + len(attention.pruned_heads)))
                               - set(attention.pruned_heads))
            attention.prune_heads([numbering[h] for h in heads])
        return {i: sorted(v) for i, v in sorted(removed.items())}
    for i, layer in enumerate(layers):
        a = layer.self_attn
        groups = model.config.num_key_value_heads
        per_group = len(scores[i]) // groups
        cut = _group_cut(per_group, fraction)
        if cut == 0:
            continue
        keep_heads = []
        for g in range(groups):
            members = list(range(g * per_group, (g + 1) * per_group))
            order = sorted(members, key=lambda h: float(scores[i][h]), reverse=True)
            keep_heads += sorted(order[:per_group - cut])
        removed[i] = sorted(set(range(len(scores[i]))) - set(keep_heads))
        index = torch.tensor([h * a.head_dim + d for h in keep_heads for d in range(a.head_dim)])
        a.q_proj = _slice(a.q_proj, index, 0)
        a.o_proj = _slice(a.o_proj, index, 1)
        a.num_key_value_groups = len(keep_heads) // groups
    return removed


def _least_fraction(count: int, digits: int) -> str:
    """The smallest fraction with `digits` decimals of which round(fraction * count) >= 1
    (round() halves to even: 0.25 of 2 rounds to 0)."""
    scale = 10 ** digits
    fraction = math.ceil(0.5 / count * scale) / scale
    while round(fraction * count) < 1:
        fraction = round(fraction + 1 / scale, digits)
    return f"{fraction:.{digits}f}"


def _group_cut(per_group: int, fraction: float) -> int:
    """How many of a KV group's `per_group` query heads --prune-heads `fraction` removes: the
    group keeps one."""
    return min(round(fraction * per_group), per_group - 1)


def heads_removed(kind: str, heads: list[int], fraction: float, *, groups: int = 1) -> int:
    """How many attention heads --prune-heads `fraction` removes from layers of `heads` query
    heads each, whichever the scores rank lowest: BERT round(fraction * all of them), a layer
    keeping one; Llama, in each layer, the same number from each of its `groups` KV groups.
    prune_heads removes this many, and the check before any work reads it from config.json
    or a GGUF's metadata.

    >>> heads_removed("bert", [12] * 6, 0.001), heads_removed("llama", [9] * 30, 0.17, groups=3)
    (0, 90)
    """
    if kind == "llama":
        return sum(_group_cut(n // groups, fraction) * groups for n in heads)
    return min(round(fraction * sum(heads)), sum(max(n - 1, 0) for n in heads))


def _removes_no_head(kind: str, fraction: float, *, heads: list[int], per_group: int = 1) -> str:
    """Why --prune-heads `fraction` removes no head of a model of `heads` heads per layer
    (Llama: `per_group` query heads per KV group), and what would."""
    if kind == "llama":
        if per_group == 1:
            return ("--prune-heads: each of this model's key/value heads serves one query "
                    "head, which stays (removing it would change the KV cache); its heads "
                    "cannot be pruned. Leave out --prune-heads.")
        return (f"--prune-heads {fraction:g} removes no attention head of this model: each "
                f"of its KV groups has {per_group} query heads, and {fraction:g} of them "
                f"rounds to none; ask for at least {_least_fraction(per_group, 2)}.")
    if all(n <= 1 for n in heads):
        return ("--prune-heads: each layer of this model has one attention head, which stays "
                "(a layer keeps one); its heads cannot be pruned. Leave out --prune-heads.")
    return (f"--prune-heads {fraction:g} removes no attention head of this model: "
            f"{fraction:g} of its {sum(heads)} heads rounds to none; ask for at least "
            f"{_least_fraction(sum(heads), 3)}.")


def ffn_kept(width: int, fraction: float, multiple: int = 1) -> int:
    """How many of a layer's `width` FFN neurons --prune-ffn `fraction` keeps: at least
    FFN_FLOOR of them, rounded up to a multiple of `multiple`.

    >>> ffn_kept(1536, 0.01, 32), ffn_kept(1536, 0.1, 32)
    (1536, 1408)
    """
    keep_n = max(int(round(width * (1 - fraction))), int(np.ceil(FFN_FLOOR * width)), 1)
    return min(width, -(-keep_n // multiple) * multiple)


def ffn_multiple(kind: str, target, sparsity_pattern: str) -> int:
    """What a layer's FFN width is kept a multiple of: decoders the int4 block (`target`'s
    generation.block_size), which the down projection's input width must divide into; with
    an N:M sparsity pattern also M (every matrix's input width a multiple of M)."""
    block = target.generation.block_size if kind == "llama" else 1
    pattern = PATTERNS[sparsity_pattern]
    return math.lcm(block, pattern[1]) if pattern else block


def why_multiple(kind: str, request: Compression) -> str:
    """What makes ffn_multiple's multiple: the int4 block (decoders), an N:M pattern, both."""
    reasons = (["the int4 block"] if kind == "llama" else []) + (
        [f"the {request.sparsity_pattern} sparsity pattern"]
        if PATTERNS[request.sparsity_pattern] else [])
    return " and ".join(reasons)


def check_removes_something(request: Compression, kind: str, *, heads: list[int],
                            groups: int, widths: list[int], multiple: int) -> None:
    """Refuse --prune-heads / --prune-ffn that rounds to removing nothing from layers of
    `heads` query heads (`groups` KV groups each) and `widths` FFN neurons. The compress
    stage asks it of the loaded model, export() before any work of config.json or a GGUF's
    metadata."""
    if request.prune_heads and not heads_removed(kind, heads, request.prune_heads,
                                                 groups=groups):
        raise ValueError(_removes_no_head(kind, request.prune_heads, heads=heads,
                                          per_group=heads[0] // groups))
    if request.prune_ffn and all(ffn_kept(w, request.prune_ffn, multiple) == w
                                 for w in widths):
        raise ValueError(
            f"--prune-ffn {request.prune_ffn:g} removes no FFN neuron of this model: "
            f"{widths[0]} per layer"
            + (f", kept in multiples of {multiple} ({why_multiple(kind, request)})"
               if multiple > 1 else "")
            + ", rounds back to all of them. Ask for more.")


def prune_ffn(model, kind: str, scores, fraction: float, *, multiple: int = 1) -> dict[int, int]:
    """Remove the same fraction of each layer's FFN neurons, the lowest-scoring, keeping a
    multiple of `multiple` (decoders: the MatMulNBits block, which the down projection's
    input width must divide into); returns {layer: neurons kept}."""
    import torch

    kept = {}
    for i, layer in enumerate(layer_list(model)):
        keep_n = ffn_kept(len(scores[i]), fraction, multiple)
        keep = torch.sort(torch.argsort(scores[i], descending=True)[:keep_n]).values
        producers, consumer = ffn_parts(layer, kind)
        if kind == "llama":
            layer.mlp.gate_proj = _slice(producers[0], keep, 0)
            layer.mlp.up_proj = _slice(producers[1], keep, 0)
            layer.mlp.down_proj = _slice(consumer, keep, 1)
            layer.mlp.intermediate_size = keep_n
        else:
            layer.intermediate.dense = _slice(producers[0], keep, 0)
            layer.output.dense = _slice(consumer, keep, 1)
        kept[i] = keep_n
    return kept


def sparsity_masks(model, fraction: float, pattern: str) -> dict:
    """Zero the smallest-magnitude weights of every layer Linear; returns {param: keep mask}
    (healing re-applies the masks after each step)."""
    import torch

    masks = {}
    for layer in layer_list(model):
        for module in layer.modules():
            if not isinstance(module, torch.nn.Linear) or module.weight in masks:
                continue
            w = module.weight.data
            if PATTERNS[pattern] is None:
                k = int(round(fraction * w.numel()))
                if k == 0:
                    continue
                threshold = w.abs().flatten().kthvalue(k).values
                mask = w.abs() > threshold
            else:
                n, m = PATTERNS[pattern]
                if w.shape[1] % m:
                    raise ValueError(f"--sparsity-pattern {pattern}: a layer matrix of shape "
                                     f"{tuple(w.shape)} has {w.shape[1]} inputs, not a "
                                     f"multiple of {m}; use --sparsity-pattern unstructured.")
                groups = w.abs().view(w.shape[0], -1, m)
                top = groups.topk(n, dim=-1).indices
                mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
                mask = mask.view_as(w)
            w.mul_(mask)
            masks[module.weight] = mask
    return masks


# What sharing may tie between adjacent layers: a whole layer or one of its two blocks.
SHARE_PARTS = ("attention", "ffn", "layer")
# How sharing measures harm, for (encoders and classifiers, decoders).
SHARE_SCORES = ("1 - cos(output, untied output)",
                "perplexity / untied perplexity - 1 on calibration prose")


def share_modules(layer, kind: str, part: str) -> list:
    """The modules of `layer` that hold `part`'s parameters."""
    if part == "layer":
        return [layer]
    if kind == "llama":
        return [layer.self_attn if part == "attention" else layer.mlp]
    return [layer.attention] if part == "attention" else [layer.intermediate, layer.output]


def _part_parameters(layer, kind: str, part: str) -> dict:
    """(module path, parameter name) -> Parameter, for every parameter of `part`."""
    found = {}
    for m, module in enumerate(share_modules(layer, kind, part)):
        for name, sub in module.named_modules():
            for pname, p in sub._parameters.items():
                if p is not None:
                    found[(m, name, pname)] = p
    return found


def share_harm(job, outputs: list, reference: list, batches: list) -> float:
    """How much `outputs` moved from `reference`: for decoders the relative perplexity
    increase on the batches' next tokens (the decoder budget's metric), else
    1 - mean cosine of the outputs."""
    if getattr(job, "task", None) != "text-generation":
        return 1 - _mean_cosine(outputs, reference)
    return perplexity(outputs, batches) / perplexity(reference, batches) - 1


def share_candidates(job, model, reference, batches) -> list[tuple[int, str, float]]:
    """(i, part, harm) per adjacent pair and part: the harm when layer i+1 runs with layer
    i's attention, FFN, or whole layer. A whole layer is only measured when both of its
    blocks alone stay within job's limit (it costs at least as much as the worse one)."""
    kind, layers = kind_of(model), layer_list(model)
    limit = job.compression.share_max_harm
    found = []
    for i in range(len(layers) - 1):
        harms = {}
        for part in SHARE_PARTS:
            if part == "layer" and max(harms.values(), default=limit) > limit:
                continue
            source = _part_parameters(layers[i], kind, part)
            dest = _part_parameters(layers[i + 1], kind, part)
            if source.keys() != dest.keys() or any(source[n].shape != dest[n].shape
                                                   for n in source):
                continue   # pruned to different shapes: cannot share
            undo = tie(model, i, i + 1, part)
            harms[part] = round(share_harm(job, output_of(model, batches), reference,
                                           batches), 5)
            undo()
            found.append((i, part, harms[part]))
    return found


def gguf_carry(steps: list[dict], *, healed: bool, layers: int):
    """(the GGUF layers the compressed model keeps, in order; its ties) when compression
    changed no weight of them, so that each still reads the GGUF's own blocks, exact
    (exporter/decoder.py: quantized_weights); None where a weight changed. Dropping and
    tying change none; the steps number layers as the source checkpoint does, the ties
    returned as the compressed model does (after the drop).

    >>> gguf_carry([{"method": "drop-layers", "removed": [1]},
    ...             {"method": "share-layers", "removed": [[0, 2, "ffn"]]}],
    ...            healed=False, layers=3)
    ([0, 2], [(0, 1, 'ffn')])
    """
    if healed or not {s["method"] for s in steps} <= {"drop-layers", "share-layers"}:
        return None
    dropped = next((s["removed"] for s in steps if s["method"] == "drop-layers"), [])
    kept = [i for i in range(layers) if i not in dropped]
    at = {layer: position for position, layer in enumerate(kept)}
    return (kept, [(at[i], at[j], part) for s in steps if s["method"] == "share-layers"
                   for i, j, part in s["removed"]])


def share_layers(job, model, batches) -> tuple[list, list, float]:
    """Tie adjacent layers' attention blocks, FFN blocks or whole layers, least harmful first,
    while the harm of all ties together (`share_harm` against the untied model) stays at most
    job.compression.share_max_harm; a tie that would take it over is undone. A layer's block
    is tied at most once (no chains). Returns ([i, i+1, part] tied, (i, part, harm alone) per
    candidate, harm of all ties together)."""
    limit = job.compression.share_max_harm
    reference = output_of(model, batches)   # the harm of the ties alone, not of earlier cuts
    # decoders rank their ~90 candidates on the first batch (4 windows of 128 tokens: a few
    # minutes less on 2 cores); every tie is then checked on all batches
    few = 1 if getattr(job, "task", None) == "text-generation" else len(batches)
    candidates = share_candidates(job, model, reference[:few], batches[:few])
    def order(c):
        return c[2], c[1] != "layer"

    whole = {i for i, part, harm in candidates if part == "layer" and harm <= limit}
    queue = sorted((c for c in candidates if c[2] <= limit), key=order)
    tied, used, tried, total = [], set(), set(), 0.0

    def blocks_alone(i: int) -> None:
        """Layer i is not tied whole: its blocks, which waited for it, may go one by one."""
        nonlocal queue
        whole.discard(i)
        queue = sorted(queue + [c for c in candidates if c[0] == i and c[1] != "layer"
                                and c[2] <= limit], key=order)

    while queue:
        i, part, harm = queue.pop(0)
        blocks = ("attention", "ffn") if part == "layer" else (part,)
        if (i, part) in tried or (part != "layer" and i in whole):
            continue   # a block waits while its whole layer may still be tied
        if any((j, b) in used for j in (i, i + 1) for b in blocks):
            if part == "layer":   # a block of it is tied already: never whole
                blocks_alone(i)
            continue
        tried.add((i, part))
        undo = tie(model, i, i + 1, part)
        harm_now = round(share_harm(job, output_of(model, batches), reference, batches), 5)
        if harm_now > limit:   # ties measured alone can add up
            undo()
            if part == "layer":
                blocks_alone(i)
            continue
        tied.append([i, i + 1, part])
        used |= {(j, b) for j in (i, i + 1) for b in blocks}
        total = harm_now
    return sorted(tied), candidates, total


def tie(model, source: int, dest: int, part: str = "layer"):
    """Layer `dest` uses layer `source`'s parameter tensors for `part` (one storage, two
    modules). Returns a function that puts `dest`'s own tensors back."""
    kind, layers = kind_of(model), layer_list(model)
    theirs = _part_parameters(layers[source], kind, part)
    own = _part_parameters(layers[dest], kind, part)
    modules = {}
    for m, module in enumerate(share_modules(layers[dest], kind, part)):
        for name, sub in module.named_modules():
            modules[(m, name)] = sub
    for (m, name, pname), p in theirs.items():
        modules[(m, name)]._parameters[pname] = p

    def undo():
        for (m, name, pname), p in own.items():
            modules[(m, name)]._parameters[pname] = p
    return undo


def _mean_cosine(a: list, b: list) -> float:
    import torch

    cos = [torch.nn.functional.cosine_similarity(x.flatten(1), y.flatten(1), dim=-1)
           for x, y in zip(a, b, strict=True)]
    return float(torch.cat(cos).mean())


# --- the stage ---

def compress(job) -> None:
    """Stage: apply job.compression to job.torch_model; record what was removed and what it
    cost, before and after healing. Does nothing when no compression was asked for."""
    request: Compression | None = job.compression
    if request is None or not request.active:
        if request is not None and request.heal_steps:
            raise ValueError("--heal-steps needs a compression to heal (e.g. --drop-layers 1).")
        return
    import torch

    model = job.torch_model
    kind = kind_of(model)
    torch.manual_seed(0)
    original = copy.deepcopy(model).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    job.reference_model = original
    batches = calibration_batches(job, purpose="score")
    data = batches_data(job, batches, purpose="score")   # what the ranking read
    before = parameters(model)
    steps: list[dict] = []
    # the records number layers as the source checkpoint does: numbering[i] is the original
    # number of the compressed model's layer i (layers dropped are missing from it)
    numbering = list(range(len(layer_list(model))))

    if request.drop_layers:
        importance = layer_importance(model, batches)
        dropped = choose_layers_to_drop(request.drop_layers, importance)
        kept = [m for i, m in enumerate(layer_list(model)) if i not in dropped]
        _set_layers(model, kept)
        numbering = [i for i in numbering if i not in dropped]
        steps.append({"method": "drop-layers", "strength": len(dropped), "removed": dropped,
                      "importance": importance, "data": data,
                      "score": "mean 1 - cos(layer input, layer output) over real tokens"})
        job.log(f"  dropped layers {dropped} of {len(importance)} (importance "
                f"{', '.join(f'{s:.3f}' for s in importance)})")

    if request.prune_heads or request.prune_ffn:
        head_scores, ffn_scores = contribution_scores(model, batches, kind)
        block = ffn_multiple(kind, job.target, request.sparsity_pattern)
        check_removes_something(request, kind, heads=[len(x) for x in head_scores],
                                groups=model.config.num_key_value_heads if kind == "llama"
                                else 1, widths=[len(x) for x in ffn_scores], multiple=block)
        if request.prune_heads:
            total_heads = sum(len(x) for x in head_scores)
            removed = prune_heads(model, kind, head_scores, request.prune_heads)
            count = sum(len(v) for v in removed.values())
            left = [attention_parts(layer, kind)[3] for layer in layer_list(model)]
            # strength: the fraction removed, which a layer's last head (BERT) or a KV
            # group's last query head (Llama) and rounding per group can keep from the asked
            steps.append({"method": "prune-heads", "strength": round(count / total_heads, 4),
                          "requested": request.prune_heads,
                          "removed": {str(numbering[k]): v for k, v in removed.items()},
                          "heads_per_layer": left, "layers": numbering,
                          "importance": [[round(float(x), 4) for x in s] for s in head_scores],
                          "data": data,
                          "score": "mean |x_head @ W_o[:, head]| over real tokens"})
            job.log(f"  pruned {count} of {total_heads} attention heads "
                    f"({count / total_heads:.0%}; asked {request.prune_heads:g}); heads per "
                    f"layer now {left}")
        if request.prune_ffn:
            kept = prune_ffn(model, kind, ffn_scores, request.prune_ffn, multiple=block)
            width = sum(len(x) for x in ffn_scores)
            cut = width - sum(kept.values())
            steps.append({"method": "prune-ffn", "strength": round(cut / width, 4),
                          "requested": request.prune_ffn,
                          "removed": {str(numbering[i]): len(ffn_scores[i]) - k
                                      for i, k in kept.items()},
                          "neurons_per_layer": list(kept.values()), "layers": numbering,
                          "importance": [round(float(s.mean()), 4) for s in ffn_scores],
                          "data": data,
                          "score": "mean |a_j| * |W_down[:, j]| over real tokens (per layer "
                                   "mean shown)"})
            job.log(f"  pruned {cut} of {width} FFN neurons ({cut / width:.0%}; asked "
                    f"{request.prune_ffn:g}); per layer now {list(kept.values())}")

    if request.share_layers:
        tied, harms, total = share_layers(job, model, batches)
        tied = [[numbering[i], numbering[j], part] for i, j, part in tied]
        harms = [(numbering[i], numbering[i + 1], part, harm) for i, part, harm in harms]
        steps.append({"method": "share-layers", "strength": len(tied), "removed": tied,
                      "importance": [list(c) for c in harms],
                      "max_harm": request.share_max_harm, "harm_of_all_ties": total,
                      "data": data,
                      "score": SHARE_SCORES[job.task == "text-generation"]
                      + " with [i, j]: layer j's attention, FFN or whole layer := layer "
                        "i's, j the next layer kept"})
        best = ", ".join(f"{p} {i}-{j} {h:.3f}"
                         for i, j, p, h in sorted(harms, key=lambda c: c[3])[:4])
        job.log(f"  shared {', '.join(f'{p} {i}-{j}' for i, j, p in tied) or 'nothing'} "
                f"(least harmful alone: {best}; all ties together {total:.3f}, accepted <= "
                f"{request.share_max_harm})")

    masks = {}
    if request.sparsity or request.sparsity_pattern != "unstructured":
        masks = sparsity_masks(model, request.sparsity, request.sparsity_pattern)
        zeros = sum(int((~m).sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        if not zeros:
            largest = max(m.weight.numel() for layer in layer_list(model)
                          for m in layer.modules() if isinstance(m, torch.nn.Linear))
            raise ValueError(f"--sparsity {request.sparsity:g} zeroes no weight of this model: "
                             f"{request.sparsity:g} of its largest layer matrix's {largest} "
                             f"weights rounds to none; ask for at least "
                             f"{1 / largest:.2g} (one weight; more to matter).")
        steps.append({"method": "sparsity", "strength": round(zeros / max(total, 1), 4),
                      "pattern": request.sparsity_pattern, "removed": f"{zeros} weights zeroed",
                      "matrices": len(masks),
                      "note": "zeros are still stored and multiplied: they shrink the "
                              "compressed bundle, not the graph or its latency"})
        job.log(f"  sparsity {request.sparsity_pattern}: {zeros}/{total} layer weights zero "
                f"({100 * zeros / max(total, 1):.1f}%)")

    eval_batches = calibration_batches(job, purpose="measure")
    record = {"methods": steps, "parameters_before": before, "parameters_after": parameters(model),
              "request": asdict(request), "quality_before_healing": quality(job, model,
                                                                            original,
                                                                            eval_batches)}
    if request.heal_steps:
        record["healing"] = heal(job, model, original, steps=request.heal_steps, masks=masks)
        record["quality_after_healing"] = quality(job, model, original, eval_batches)
        worse = worse_after_healing(record["quality_before_healing"],
                                    record["quality_after_healing"])
        if worse:
            record["healing"]["worse"] = worse
            job.log(f"  warning: {request.heal_steps} healing steps made {', '.join(worse)} "
                    f"worse against the original; heal longer, or leave out --heal-steps")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if job.gguf is not None and not job.requantize:
        carry = gguf_carry(steps, healed=bool(request.heal_steps),
                           layers=original.config.num_hidden_layers)
        if carry is not None:
            job.gguf_layers, job.gguf_ties = carry
        else:
            job.requantize = True   # the GGUF's blocks hold the uncompressed weights
            record["requantized"] = "the GGUF's blocks describe the uncompressed model: " \
                                    "the compressed weights are rounded from float instead"
    job.records["compression"] = record
    if job.task == "text-generation":
        check_decoder_budget(job, record.get("quality_after_healing",
                                             record["quality_before_healing"]))
    job.records["model"]["parameters_after_compression"] = record["parameters_after"]
    job.records["model"]["layers_after_compression"] = model.config.num_hidden_layers
    q = record.get("quality_after_healing", record["quality_before_healing"])
    job.log(f"  parameters {before / 1e6:.2f}M -> {record['parameters_after'] / 1e6:.2f}M; "
            f"quality vs original: {_describe(record['quality_before_healing'])}"
            + (f"; after {request.heal_steps} healing steps: {_describe(q)}"
               if request.heal_steps else ""))


# Quality metrics where lower is better (higher for the rest); "original-" ones are the
# original model's own, which healing does not touch.
LOWER_IS_BETTER = ("perplexity",)


def worse_after_healing(before: dict, after: dict) -> list[str]:
    """The quality metrics healing made worse, as "min-cosine 0.97616 -> 0.96057".

    >>> worse_after_healing({"cosine": 0.9, "perplexity": 30.0},
    ...                     {"cosine": 0.95, "perplexity": 31.0})
    ['perplexity 30.0 -> 31.0']
    """
    return [f"{k} {b} -> {after[k]}" for k, b in before.items()
            if not k.startswith("original-")
            and ((after[k] > b) if k in LOWER_IS_BETTER else (after[k] < b))]


def check_decoder_budget(job, q: dict) -> None:
    """Decoders: the validate stage compares the bundle with the compressed float graph, so
    the perplexity lost to compression itself is checked here, against the original."""
    from .budget import Budget
    from .validate import BudgetError

    increase = round(100 * (q["perplexity"] / q["original-perplexity"] - 1), 3)
    job.records["compression"]["perplexity-increase"] = increase
    budget = Budget(tuple(c for c in job.budget.clauses if c.metric == "perplexity-increase"))
    broken = budget.check({"perplexity-increase": increase})
    if broken:
        raise BudgetError(f"Compression alone breaks the accuracy budget {job.budget}: "
                          f"{'; '.join(broken)} (PyTorch, {q['perplexity']} against "
                          f"{q['original-perplexity']} on "
                          f"{job.records.get('eval_source') or 'held-out prose'}). Compress "
                          f"less or heal longer (--heal-steps). No bundle written.")


def output_of(model, batches) -> list:
    """The model's output per batch: logits, or last hidden states (zeroed at padding)."""
    import torch

    outs = []
    with torch.no_grad():
        for batch in batches:
            out = model(**batch)
            x = out.logits if hasattr(out, "logits") else out.last_hidden_state
            if x.dim() == 3:
                x = x * batch["attention_mask"][..., None]
            outs.append(x)
    return outs


def _describe(q: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in q.items())


# --- manifest and report ---

def compression_entries(record: dict | None) -> list[dict]:
    """The manifest's "compression" list: one entry per method applied, then healing, each
    with what it removed; the last entry carries parameter counts and quality."""
    if not record:
        return []
    entries = [{k: v for k, v in step.items() if k != "importance"} for step in record["methods"]]
    if "healing" in record:
        entries.append({"method": "heal", **record["healing"]})
    entries[-1] = {**entries[-1], "parameters_before": record["parameters_before"],
                   "parameters_after": record["parameters_after"],
                   "quality_before_healing": record["quality_before_healing"],
                   **({"quality_after_healing": record["quality_after_healing"]}
                      if "quality_after_healing" in record else {})}
    return entries


def compression_lines(record: dict | None) -> list[str]:
    """The report's compression section (markdown lines)."""
    if not record:
        return []
    lines = ["## Compression (before export, measured against the original PyTorch model)", "",
             f"Parameters {record['parameters_before'] / 1e6:.2f}M -> "
             f"{record['parameters_after'] / 1e6:.2f}M "
             f"({100 * record['parameters_after'] / record['parameters_before']:.0f}%).", "",
             "| method | strength | removed | score |", "|---|---|---|---|"]
    for step in record["methods"]:   # (the scores' |x| would split a cell: escaped)
        cells = (step["method"], step["strength"], step["removed"],
                 step.get("score", step.get("note", "")))
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    ranked = next((step["data"] for step in record["methods"] if "data" in step), None)
    if ranked:
        lines += ["", f"Ranked on {ranked}."]
    if any(step["method"] == "drop-layers" for step in record["methods"]):
        lines += ["", "Layers are numbered as in the original model (before drop-layers)."]
    lines += ["", "| quality vs original | " + " | ".join(record["quality_before_healing"])
              + " |", "|---|" + "---|" * len(record["quality_before_healing"]),
              "| before healing | " + " | ".join(
                  str(v) for v in record["quality_before_healing"].values()) + " |"]
    if "quality_after_healing" in record:
        h = record["healing"]
        lines.append(f"| after {h['steps']} healing steps | " + " | ".join(
            str(v) for v in record["quality_after_healing"].values()) + " |")
        lines += ["", f"Healing: {h['steps']} steps in {h['seconds']} s on {h['data']}, "
                      f"loss {h['loss_first']} -> {h['loss_last']} ({h['loss']})."]
        if h.get("worse"):
            lines += ["", f"Warning: healing made {', '.join(h['worse'])} worse."]
    if record.get("requantized"):
        lines += ["", f"Note: {record['requantized']}."]
    return lines + [""]
