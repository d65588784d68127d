"""Stage `partition`: the graph cut into N contiguous pipeline stages, one per device.

Where to cut. The nodes are in topological order; a cut between node p-1 and node p hands on
every tensor made before p and read at p or later (graph inputs are fed to every stage that
reads them, constants are copied into every stage that reads them, and what is computed from
those alone and small constants, such as the attention mask's additive form, is computed
again in every stage that reads it: handed on, it split ONNX Runtime's fusion of each layer's
attention with its mask, and no layer boundary was a clean cut). In a transformer the
cuts with the fewest such tensors are the layer boundaries and the point between attention
and FFN (hidden state + attention mask). Among the cuts that hand on the fewest tensors,
dynamic programming picks those that minimise the sum of squared stage costs, a stage's
cost being the mean of its share of the weight bytes read per call (a Gather reads a row of
its table per token, not the table) and its share of the FLOPs (per token,
of the MatMuls/Gemms with a weight: attention's sequence-length-dependent part is under 1%
at spoken-command lengths). Cuts that
hand on more tensors are allowed only when the cheapest ones cannot come within
BALANCE_SLACK of the balance that allowing every cut achieves.

Each stage is a complete ONNX model: its nodes, the constants they read, inputs (graph inputs
or tensors from earlier stages) and outputs (what later stages or the caller read), with
dtypes and symbolic shapes taken from running the whole graph on two probe batches. The stage
proves itself: the staged model's outputs must equal the single graph's bit for bit on CPU.

    >>> stages = split(onnx.load("model.onnx"), 2)
    >>> [s.inputs for s in stages]
    [['input_ids', 'attention_mask', 'token_type_ids'], ['/encoder/layer.2/...', ...]]
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph_file import copy_fields, copy_model, external_files, save_graph, too_big

BALANCE_SLACK = 1.1         # fewer tensors handed on may cost up to 10% of balance
PROBE_SHAPES = ((2, 5), (3, 7))   # (batch, sequence) of the two probe runs
# Graph input types those probes can feed.
PROBE_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32,
               "tensor(float)": np.float32, "tensor(float16)": np.float16}
# Ops that multiply by a weight matrix, their input 1 (com.microsoft's fused Attention and
# QAttention take the (hidden, 3 x hidden) query/key/value weight there).
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulIntegerToFloat", "Attention",
              "QAttention")
# Ops whose float output is a clean place to cut. ONNX Runtime fuses a residual Add into the
# LayerNorm after it (SkipLayerNormalization) and a bias Add into the MatMul before it, so a
# cut after such an Add changes the rounding; nothing fuses across a normalization's output.
CLEAN_CUT_OPS = ("LayerNormalization", "SkipLayerNormalization",
                 "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                 "RMSNormalization")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
               onnx.TensorProto.DOUBLE)
# A constant at most this big may be copied into every stage that computes from it again.
RECOMPUTE_MAX_BYTES = 4096
# Ops whose output differs between two runs: never computed twice.
RANDOM_OPS = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
              "Multinomial", "Bernoulli", "Dropout")


@dataclass
class Stage:
    nodes: list[onnx.NodeProto]
    inputs: list[str]
    outputs: list[str]
    weight_bytes: int = 0
    flops_per_token: int = 0
    model: onnx.ModelProto | None = None
    io: dict = field(default_factory=dict)   # tensor name -> {"dtype", "shape"}

    def describe(self, name: str) -> dict:
        return {"name": name, **self.io[name]}


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Constant nodes become initializers, so that a stage copies them instead of
    receiving them from an earlier stage."""
    kept = []
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def node_costs(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    """(weight bytes read per call, FLOPs per token) per node; a constant counts at its first
    reader. A table a Gather indexes (token and position embeddings) counts 0 bytes: a call
    reads one row of it per token, not the whole table (MiniLM's int8 token table, half of
    its weight bytes, put 2 of 6 layers in the first of 2 stages and 4 in the second, which
    then took twice as long: 17.6 against 8.5 ms per batch of 8 on CPU)."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    # tables read only as a Gather's data (directly, or through a DequantizeLinear or Cast)
    gathered, read_whole = set(), set()
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if node.op_type == "Gather" and k == 0:
                while name not in inits and name in producer and \
                        producer[name].op_type in ("DequantizeLinear", "Cast"):
                    name = producer[name].input[0]
                gathered.add(name)
            elif not (node.op_type in ("DequantizeLinear", "Cast") and k == 0):
                read_whole.add(name)
    seen: set[str] = gathered - read_whole   # never counted
    nbytes = np.zeros(len(model.graph.node))
    flops = np.zeros(len(model.graph.node))
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            if name in inits and name not in seen:
                seen.add(name)
                nbytes[i] += numpy_helper.to_array(inits[name]).nbytes
        if node.op_type in WEIGHT_OPS and len(node.input) > 1:
            weight = node.input[1]
            while weight not in inits and weight in producer and \
                    producer[weight].op_type in ("DequantizeLinear", "Cast", "Transpose"):
                weight = producer[weight].input[0]
            if weight in inits:
                flops[i] = 2 * int(np.prod(inits[weight].dims))
    return nbytes, flops


def recomputed(model: onnx.ModelProto) -> set[int]:
    """The nodes that every stage computes again where it reads their outputs, instead of
    receiving them: those computing from graph inputs and constants of at most
    RECOMPUTE_MAX_BYTES alone, directly or through each other (BERT's attention mask, turned
    into what is added to the scores; the input's shape), with no weight and no randomness.
    A Gather from an embedding table reads a big constant, so it is not among them."""
    small = {i.name for i in model.graph.initializer   # sized by dims: no copy of a weight
             if int(np.prod(i.dims)) * helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
             <= RECOMPUTE_MAX_BYTES}
    available = small | {i.name for i in model.graph.input} | {""}
    chosen = set()
    for i, node in enumerate(model.graph.node):
        if node.op_type not in WEIGHT_OPS and node.op_type not in RANDOM_OPS \
                and all(name in available for name in node.input):
            chosen.add(i)
            available.update(node.output)
    return chosen


def crossings(model: onnx.ModelProto, again: set[int] = frozenset()) -> list[list[str]]:
    """For each cut p (between node p-1 and node p, p = 1 .. n-1): the tensors handed on
    (not those of the nodes in `again`, which a stage computes again)."""
    nodes = model.graph.node
    consts = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
    consts |= {o for i in again for o in nodes[i].output}
    made_at, last_read = {}, {}
    for i, node in enumerate(nodes):
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            raise ValueError(f"Node {node.name!r} ({node.op_type}) has a subgraph; "
                             f"partitioning graphs with control flow is not supported.")
        for name in node.input:
            if name and name not in consts:
                last_read[name] = i
        for name in node.output:
            made_at[name] = i
    for out in model.graph.output:
        last_read[out.name] = len(nodes)
    cuts = []
    for p in range(1, len(nodes)):
        cuts.append(sorted((t for t, i in made_at.items() if i < p <= last_read.get(t, -1)),
                           key=made_at.get))
    return cuts


def clean_cuts(model: onnx.ModelProto, handed: list[list[str]]) -> set[int]:
    """Cuts whose handed-on float tensors all come out of a normalization (CLEAN_CUT_OPS),
    or of a Cast of one (portable rounding's float64 LayerNorm, cast back to float32); a
    tensor of unknown type counts as float."""
    inferred = infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.output)}
    producer = {o: n for n in model.graph.node for o in n.output}

    def normalized(tensor: str) -> bool:
        node = producer[tensor]
        if node.op_type == "Cast" and node.input[0] in producer:
            node = producer[node.input[0]]
        return node.op_type in CLEAN_CUT_OPS

    return {p for p, tensors in enumerate(handed, start=1)
            if all(normalized(t) or types.get(t, onnx.TensorProto.FLOAT) not in FLOAT_TYPES
                   for t in tensors)}


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference on `model` (without its weights when over
    graph_file.INLINE_LIMIT, by path: in memory onnx refuses a graph over 2 GB)."""
    if not too_big(model):
        return onnx.shape_inference.infer_shapes(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        save_graph(copy_model(model), path)
        onnx.shape_inference.infer_shapes_path(str(path))
        return onnx.load(path, load_external_data=False)


def balanced_cuts(cost: np.ndarray, candidates: list[int], stages: int) -> tuple[list[int], float]:
    """Cut positions (from `candidates`) minimising the sum of squared stage costs, the
    usual balanced-partition objective: unlike the largest stage cost alone, it also
    balances the stages that are not the largest. Returns the cuts and that sum."""
    prefix = np.concatenate([[0.0], np.cumsum(cost)])
    points = [0, *candidates, len(cost)]
    m = len(points)
    best = np.full((stages + 1, m), np.inf)
    back = np.zeros((stages + 1, m), dtype=int)
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(1, m):
            for i in range(j):
                value = best[k - 1][i] + (prefix[points[j]] - prefix[points[i]]) ** 2
                if value < best[k][j]:
                    best[k][j], back[k][j] = value, i
    cuts, j = [], m - 1
    for k in range(stages, 0, -1):
        j = back[k][j]
        cuts.append(points[j])
    return sorted(cuts)[1:], float(best[stages][m - 1])


def split(model: onnx.ModelProto, stages: int) -> list[Stage]:
    """`model` cut into `stages` contiguous stages (see the module docstring)."""
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"The number of stages must be an int >= 1, got {stages!r}.")
    model = copy_model(model)
    constants_to_initializers(model)
    nodes = list(model.graph.node)
    nbytes, flops = node_costs(model)
    cost = 0.5 * nbytes / max(nbytes.sum(), 1) + 0.5 * flops / max(flops.sum(), 1)
    again = recomputed(model)
    cut_points = [] if stages == 1 else _cut_points(model, cost, crossings(model, again),
                                                    stages)
    bounds = [0, *cut_points, len(nodes)]
    return [_stage(model, nodes, a, b, flops, again if stages > 1 else set())
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _cut_points(model: onnx.ModelProto, cost: np.ndarray, handed: list[list[str]],
                stages: int) -> list[int]:
    """The stages - 1 cuts: among the clean ones (all cuts, where too few are clean), those
    handing on the fewest tensors that keep within BALANCE_SLACK of the best balance; a cut
    whose tensors, made graph outputs, change what ONNX Runtime computes is left out and the
    choice made again (a float16 graph on the CPU: ORT drops a float16 round trip of the
    residual inside the graph, and keeps it at an output; 0.24 on MiniLM for jetson)."""
    # a cut with no tensor handed on would leave a stage with nothing to compute from
    usable = [p for p, c in enumerate(handed, start=1) if c]
    if len(usable) < stages - 1:
        raise ValueError(f"Cannot split the graph into {stages} stages: it has "
                         f"{len(usable) + 1} nodes in sequence; use fewer stages.")
    clean = clean_cuts(model, handed)
    probe = _ExposureProbe(model)
    banned: set[int] = set()
    while True:
        allowed = [[] if p in banned else c for p, c in enumerate(handed, start=1)]
        if len([p for p in clean if allowed[p - 1]]) >= stages - 1:
            allowed = [c if p in clean else [] for p, c in enumerate(allowed, start=1)]
        if len([c for c in allowed if c]) < stages - 1:
            raise ValueError(f"Cannot split the graph into {stages} stages that compute what "
                             f"it computes: {len(banned)} of its cuts change ONNX Runtime's "
                             f"result; use fewer stages.")
        sizes = sorted({len(c) for c in allowed if c})
        results = []   # (cuts, sum of squared stage costs) per allowed crossing size
        for size in sizes:
            candidates = [p for p, c in enumerate(allowed, start=1) if c and len(c) <= size]
            if len(candidates) >= stages - 1:
                results.append(balanced_cuts(cost, candidates, stages))
        best = results[-1][1]   # every cut allowed: the best balance
        cuts = next(cuts for cuts, squares in results if squares <= BALANCE_SLACK * best)
        changed = probe.changed({p: handed[p - 1] for p in cuts})
        if not changed:
            return cuts
        banned |= changed


class _ExposureProbe:
    """Whether making some tensors graph outputs changes the graph's outputs under ONNX
    Runtime (on a probe batch, bit for bit): a stage boundary makes its tensors outputs."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        session = _session(copy_model(model))
        self.feeds = _probe_feeds(session, *PROBE_SHAPES[1], varied=True)
        try:   # not probed where the probe cannot run (the staged check still runs)
            self.reference = session.run(None, self.feeds) if self.feeds is not None else None
        except Exception:   # onnxruntime's errors have no common base class
            self.reference = None

    def changed(self, cuts: dict[int, list[str]]) -> set[int]:
        """The cuts (of `cuts`: position -> its tensors) that change the outputs; all of them
        where only their tensors together do."""
        if self.reference is None or self._same([t for c in cuts.values() for t in c]):
            return set()
        return {p for p, tensors in cuts.items() if not self._same(tensors)} or set(cuts)

    def _same(self, tensors: list[str]) -> bool:
        probe = copy_model(self.model)
        known = {o.name for o in probe.graph.output}
        for name in dict.fromkeys(tensors):
            if name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
        got = _session(probe).run([o.name for o in self.model.graph.output], self.feeds)
        return all(a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
                   for a, b in zip(self.reference, got, strict=True))


def _session(model: onnx.ModelProto):
    """An ONNX Runtime CPU session of `model` (through a temporary file where it is over
    graph_file.INLINE_LIMIT, which moves its weights to external data: pass a copy)."""
    from runtime.model import ort_session

    if not too_big(model):
        return ort_session(model.SerializeToString())
    with tempfile.TemporaryDirectory() as tmp:   # onnxruntime has read it all after this
        save_graph(model, Path(tmp) / "probe.onnx")
        return ort_session(Path(tmp) / "probe.onnx")


def _probe_feeds(session, batch: int, seq: int, *, varied: bool = False) -> dict | None:
    """Feeds of shape (batch, seq) for the session's (batch, sequence) inputs: ones, or with
    `varied`, token ids 1-97 in a fixed pattern (a mask ones, token types zeros), so that
    what is probed is not a constant row; None for a graph with other inputs."""
    feeds = {}
    for i in session.get_inputs():
        if i.type not in PROBE_TYPES or len(i.shape) != 2:
            return None
        value = np.ones((batch, seq), PROBE_TYPES[i.type])
        if varied and i.type in ("tensor(int64)", "tensor(int32)"):
            name = i.name.lower()
            if "type" in name:
                value[:] = 0
            elif "mask" not in name:
                value[:] = 1 + (np.arange(batch * seq).reshape(batch, seq) * 37) % 97
        feeds[i.name] = value
    return feeds


def _stage(model, nodes, a: int, b: int, flops, again: set[int]) -> Stage:
    """Nodes [a, b) as a model of their own, with the nodes of `again` that they read from
    (computed again, first: they read only graph inputs and constants)."""
    inits = {i.name: i for i in model.graph.initializer}
    final = [o.name for o in model.graph.output]
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    own = [i for i in range(a, b) if i not in again
           or any(o in final for o in nodes[i].output)]
    wanted, pending = set(), [name for i in own for name in nodes[i].input]
    while pending:
        i = producer.get(pending.pop())
        if i is not None and i in again and i not in wanted and i not in own:
            wanted.add(i)
            pending.extend(nodes[i].input)
    members = [nodes[i] for i in sorted(wanted)] + [nodes[i] for i in own]
    made = {o for n in members for o in n.output}
    again_made = {o for i in again for o in nodes[i].output}
    read_later = {name for n in nodes[b:] for name in n.input} - again_made
    inputs, used_inits = [], []
    for node in members:
        for name in node.input:
            if not name or name in made:
                continue
            if name in inits:
                if name not in used_inits:
                    used_inits.append(name)
            elif name not in inputs:
                inputs.append(name)
    graph_inputs = [i.name for i in model.graph.input]
    inputs = [n for n in graph_inputs if n in inputs] + [n for n in inputs
                                                         if n not in graph_inputs]
    outputs = [o for i in own for o in nodes[i].output
               if o and (o in read_later or o in final)]
    # the bytes the stage holds: a constant read in several stages is copied into each
    # (nbytes[a:b] counts it at its first reader only)
    held = sum(numpy_helper.to_array(inits[n]).nbytes for n in used_inits)
    stage = Stage(members, inputs, outputs,
                  weight_bytes=int(held), flops_per_token=int(flops[a:b].sum()))
    stage.model = helper.make_model(
        helper.make_graph(stage.nodes, f"stage_{a}_{b}", [], []),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    # added after make_model, which copies the graph whole (refused over 2 GB)
    for name in used_inits:
        copy_fields(inits[name], stage.model.graph.initializer.add())
    return stage


def annotate_io(model: onnx.ModelProto, stages: list[Stage]) -> None:
    """Give every stage typed inputs and outputs: dtypes and shapes from two probe runs of
    the whole graph, a dimension that follows the probe batch (sequence) named like the
    graph input's batch (sequence) dimension."""
    names = sorted({n for s in stages for n in (*s.inputs, *s.outputs)})
    probe = copy_model(model)
    known = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = _session(probe)
    first = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    batch_name = first[0] if first and first[0] else "batch"
    seq_name = first[1] if len(first) > 1 and first[1] else "sequence"
    runs = []
    for batch, seq in PROBE_SHAPES:
        feeds = _probe_feeds(session, batch, seq)
        if feeds is None:
            i = next(i for i in session.get_inputs()
                     if i.type not in PROBE_TYPES or len(i.shape) != 2)
            raise ValueError(f"Cannot cut this graph into stages: its input {i.name!r} "
                             f"is {i.type} of rank {len(i.shape)}; stages take (batch, "
                             f"sequence) inputs of {', '.join(PROBE_TYPES)}.")
        values = dict(zip([o.name for o in session.get_outputs()],
                          session.run(None, feeds), strict=True))
        values.update(feeds)
        runs.append(values)
    (b1, s1), (b2, s2) = PROBE_SHAPES
    info = {}
    for name in names:
        x, y = runs[0][name], runs[1][name]
        shape = []
        for i, (d1, d2) in enumerate(zip(x.shape, y.shape, strict=True)):
            if d1 == d2:
                shape.append(d1)
            elif (d1, d2) == (b1, b2):
                shape.append(batch_name)
            elif (d1, d2) == (s1, s2):
                shape.append(seq_name)
            else:
                shape.append(f"{name}_dim{i}")
        info[name] = {"dtype": x.dtype.name, "shape": shape}
    # A stage declares each tensor it hands on as the whole graph knows it: ONNX Runtime
    # fuses by what shape inference knows (residual Add + LayerNorm into
    # SkipLayerNormalization once the hidden size is known, measured), so a static dim the
    # whole graph lacks, or one it has and the stage lacks, makes the stage round differently.
    # Graph inputs and outputs as declared; others as ONNX shape inference has them, where it
    # does; else dtype and rank only.
    declared = {v.name: v for v in (*model.graph.input, *model.graph.output)}
    inferred = _inferred_values(model)
    for stage in stages:
        stage.io = {n: info[n] for n in (*stage.inputs, *stage.outputs)}
        graph = stage.model.graph
        for target, group in ((graph.input, stage.inputs), (graph.output, stage.outputs)):
            for name in group:
                dtype = helper.np_dtype_to_tensor_dtype(np.dtype(info[name]["dtype"]))
                rank = len(info[name]["shape"])
                known = inferred.get(name)
                if known is not None and (known.type.tensor_type.elem_type != dtype
                                          or len(known.type.tensor_type.shape.dim) != rank):
                    known = None
                target.append(declared.get(name) or known or
                              helper.make_tensor_value_info(name, dtype, [None] * rank))
        if not too_big(stage.model):   # else checked by path once saved (write_stages)
            onnx.checker.check_model(stage.model)


def _inferred_values(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """The intermediate tensors' types and shapes as ONNX shape inference infers them ({} for
    a graph it cannot infer, say one over 2 GB)."""
    try:
        values = infer_shapes(model).graph.value_info
    except (onnx.shape_inference.InferenceError, ValueError):
        return {}
    return {v.name: v for v in values
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def stage_device(index: int, providers) -> str:
    """Where stage `index` runs: CUDA device `index` for GPU targets, else the CPU."""
    gpu = any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in providers)
    return f"cuda:{index}" if gpu else "cpu"


def max_staged_diff(job, single, bundle_dir, manifest_stages, texts: list[str]) -> float:
    """Max |staged - single| over every output on `texts` (pipelined, batches of 8), every
    graph on one thread: some kernels round by their thread count (the intent classifier's
    single graph on 1 thread against 2: 4.3e-6), and the stages on the CPU run on fewer
    threads each than the single graph (stages.stage_threads), which is no cutting error."""
    from runtime.model import ort_session
    from runtime.stages import StagedSession

    from .feeds import encoder_feeds

    whole = ort_session(single, threads=1)
    staged = StagedSession(bundle_dir, manifest_stages, threads=1,
                           outputs=[o.name for o in whole.get_outputs()])
    feeds = list(encoder_feeds(job.workdir / "tokenizer.json", texts, whole,
                               max_length=job.max_length, batch_size=8))
    worst = 0.0
    for f, got in zip(feeds, staged.run_stream(feeds), strict=True):
        for a, b in zip(whole.run(None, f), got, strict=True):
            if a.shape != b.shape:
                return float("inf")
            diff = float(np.abs(a.astype(np.float64) - b).max(initial=0.0))
            worst = max(worst, diff if diff == diff else float("inf"))   # NaN: not a match
    return worst


def write_stages(model: onnx.ModelProto, count: int, out_dir: Path, providers) -> list[dict]:
    """Cut `model` into `count` stages, save stage0.onnx ... in `out_dir` (a stage over
    graph_file.INLINE_LIMIT with its weights in stageN.onnx.data beside it); returns the
    manifest's "stages" list."""
    stages = split(model, count)
    annotate_io(model, stages)
    total_bytes = sum(s.weight_bytes for s in stages) or 1
    total_flops = sum(s.flops_per_token for s in stages) or 1
    records = []
    for i, stage in enumerate(stages):
        path = out_dir / f"stage{i}.onnx"
        big = save_graph(stage.model, path)
        if big:   # checked here, by path (annotate_io checks the others in memory)
            onnx.checker.check_model(str(path))
        records.append({
            "file": path.name,
            **({"external_data": sorted(external_files(path))} if big else {}),
            "device": stage_device(i, providers),
            "inputs": [stage.describe(n) for n in stage.inputs],
            "outputs": [stage.describe(n) for n in stage.outputs],
            "nodes": len(stage.nodes),
            "weight_bytes": stage.weight_bytes,
            "flops_per_token": stage.flops_per_token,
            "share": {"weights": round(stage.weight_bytes / total_bytes, 4),
                      "flops": round(stage.flops_per_token / total_flops, 4)},
        })
    return records


def partition(job) -> None:
    """Stage: with pipeline_stages > 1, job.stages: stage files in job.workdir/stages/."""
    count = job.target.runtime.pipeline_stages
    if count == 1:
        return
    out_dir = job.workdir / "stages"
    out_dir.mkdir()
    job.stages = write_stages(onnx.load(job.quantized_onnx), count, out_dir,
                              job.target.runtime.execution_providers)
    texts = [u.text for u in job.evaluation[:32]]
    diff = max_staged_diff(job, job.quantized_onnx, out_dir, job.stages, texts)
    job.records["partition"] = {
        "stages": count, "max_abs_diff_vs_single_graph": diff, "checked_texts": len(texts),
        "per_stage": [{k: s[k] for k in ("file", "device", "nodes", "weight_bytes",
                                         "flops_per_token", "share")} for s in job.stages]}
    if diff != 0.0:
        raise RuntimeError(f"The {count} stages differ from the single graph by {diff:.3e} "
                           f"on CPU; they must be equal. This is a partitioning bug.")
    shares = ", ".join(f"{100 * s['share']['weights']:.0f}%/{100 * s['share']['flops']:.0f}%"
                       for s in job.stages)
    job.log(f"  {count} stages (weights/FLOPs share: {shares}); equal to the single graph "
            f"on {len(texts)} texts")


def partition_lines(record: dict | None) -> list[str]:
    """The report's section on pipeline stages (markdown lines): what each stage holds, and
    that the speed, size and memory figures are the single graph's."""
    if not record:
        return []
    lines = [f"## Pipeline stages: {record['stages']}", "",
             f"Outputs equal to the single graph's on {record['checked_texts']} texts (max abs "
             f"diff {record['max_abs_diff_vs_single_graph']:g}). The latency, model size and "
             f"peak RSS above are the single graph's, before cutting; the stages were not "
             f"timed.", ""]
    if record.get("per_stage"):
        lines += ["| stage | device | nodes | weights (MB) | weights share | FLOPs share |",
                  "|---|---|---|---|---|---|",
                  *(f"| {s['file']} | {s['device']} | {s['nodes']} | "
                    f"{s['weight_bytes'] / 1e6:.2f} | {100 * s['share']['weights']:.0f}% | "
                    f"{100 * s['share']['flops']:.0f}% |" for s in record["per_stage"]), ""]
    return lines


def check_stage_count(stages: int, model: dict, source: Path) -> None:
    """`stages` checked against the layers of the bundle's model (its manifest's "model"
    record, after compression), as the export checks --stages: a stage needs at least one
    layer (split alone cut MiniLM's 6 layers into 7 stages)."""
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"The number of stages must be an int >= 1, got {stages!r}.")
    layers = model.get("layers_after_compression", model.get("layers"))
    if isinstance(layers, int) and layers >= 1 and stages > layers:
        before = model.get("layers")
        left = (f" (compression left {layers} of its {before})"
                if isinstance(before, int) and before != layers else "")
        raise ValueError(f"Cannot split the {layers}-layer model in {source} into {stages} "
                         f"pipeline stages: a stage needs at least one layer{left}; use at "
                         f"most {layers} stages.")


def restage(bundle_dir: str | Path, stages: int, output: str | Path) -> Path:
    """A copy of a single-graph bundle at `output` with its graph cut into `stages` stages
    (the same graph, so the same outputs); written beside `output`, then renamed into place.

        >>> restage("build/minilm-x86-server-1", 4, "build/minilm-x86-server-4")
        PosixPath('build/minilm-x86-server-4')
    """
    from runtime.bundle import Bundle, sha256_of

    from .report import check_replaceable, replace_dir, temp_dir_beside

    source, output = Path(bundle_dir), Path(output)
    if output.resolve() == source.resolve():
        raise ValueError(f"restage writes a new bundle beside {source}; give an output "
                         f"other than the source bundle itself.")
    check_replaceable(output)
    # every file checked against its sha256, as runtime.load checks it: the copy gets new
    # hashes, so a damaged source would otherwise come out as a bundle that verifies
    manifest = Bundle.open(source).manifest
    if manifest.get("stages"):
        raise ValueError(f"{source} is already cut into {len(manifest['stages'])} stages; "
                         f"restage a single-graph bundle.")
    if manifest.get("task") == "text-generation":
        raise ValueError(f"{source} is a decoder bundle; pipeline stages are for encoders "
                         f"(a decoder's KV cache is not cut across stages yet).")
    check_stage_count(stages, manifest.get("model", {}), source)
    model_file = manifest.get("model_file", "model.onnx")
    staging = temp_dir_beside(output)
    try:
        manifest["stages"] = write_stages(onnx.load(source / model_file), stages, staging,
                                          manifest["target"]["runtime"]["execution_providers"])
        # the stages hold their weights inline: the single graph's external data, a second
        # copy of every weight, is read by no graph of the new bundle
        # (external_files names them relative to the graph's directory, the manifest
        # relative to the bundle's)
        graph_dir = PurePosixPath(model_file).parent
        graph_files = {model_file} | {(graph_dir / name).as_posix()
                                      for name in external_files(source / model_file)}
        for entry in manifest["files"]:   # in their folders, as the manifest lists them
            if entry["path"] not in graph_files:
                (staging / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / entry["path"], staging / entry["path"])
        manifest.pop("model_file", None)
        manifest["name"] = output.name
        manifest["target"]["runtime"]["pipeline_stages"] = stages
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest["files"] = [{"path": p.relative_to(staging).as_posix(), "sha256": sha256_of(p),
                              "bytes": p.stat().st_size} for p in files]
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
