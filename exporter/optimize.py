"""Stage `optimize`: offline graph optimization the target's runtime can use.

Levels (the profile's `graph_optimization`):

* "none": the float export as it is.
* "basic": ONNX Runtime's level-1 passes (constant folding, redundant node elimination),
  standard ONNX ops only, so the graph stays portable to any ONNX runtime.
* "transformer": onnxruntime's transformer fusions for encoders. Each layer's attention core
  (reshape, transpose, scores, mask, softmax, x V: about 40 small ops) becomes one
  MultiHeadAttention op that also absorbs the Q/K/V biases, and bias + GELU becomes BiasGelu.
  The Q, K, V, output and FFN MatMuls stay separate so the quantize stage can make them int8.
  These are `com.microsoft` ops that every onnxruntime build (x86, aarch64) has, but no
  other runtime. ONNX Runtime does not find the attention fusion by itself at load time on
  these exports. Measured on the int8 MiniLM bundle (2 threads): batch 1 1.09 -> 1.00 ms,
  batch 32 17.2 -> 16.6 ms, against 1.86 ms / 43.9 ms for ORT float.

A fused graph is checked against the float export on evaluation text before it is used.
Hardware-specific kernels (NCHWc layouts, prepacked weights) are never saved: ONNX Runtime
chooses those at load time on the device, where it knows the CPU.
"""

from __future__ import annotations

import logging

import onnx

from . import graph_file
from .feeds import encoder_batches, ort_session
from .to_onnx import masked_max_abs

# transformers model_type -> onnxruntime.transformers optimizer model type.
FUSION_MODEL_TYPES: dict[str, str] = {
    "bert": "bert",
}


def _ort_basic(source, out) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    if graph_file.graph_bytes(source) > graph_file.INLINE_LIMIT:   # weights beside it
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{out.name}.data")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes",
            str(graph_file.EXTERNAL_MIN))
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


class _PrunedHeadsNote(logging.Filter):
    """Drops onnxruntime's "Input hidden size (64) is not same as weight matrix dimension of
    q,k,v (384)" for a layer whose heads were pruned: the fusion then reads each layer's
    heads from its weights, which is right (and the fused graph is checked against the float
    export), but four such lines looked like errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Input hidden size (")


def _transformer_fusions(source, out, config) -> None:
    note = _PrunedHeadsNote()
    # onnxruntime.transformers puts its own directory on sys.path and imports its modules
    # by their bare names, so the logger is "fusion_attention"
    loggers = [logging.getLogger(name) for name in (
        "fusion_attention", "onnxruntime.transformers.fusion_attention")]
    for logger in loggers:
        logger.addFilter(note)
    try:
        _fuse(source, out, config)
    finally:
        for logger in loggers:
            logger.removeFilter(note)


def _fuse(source, out, config) -> None:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = FUSION_MODEL_TYPES[config.model_type]
    options = FusionOptions(model_type)
    options.use_multi_head_attention = True   # keeps Q/K/V MatMuls separate, for int8
    options.enable_embed_layer_norm = False   # keeps the embedding Gathers, for int8 rows
    # SkipLayerNormalization's CPU kernel is slower than the Add + LayerNormalization it
    # replaces (MiniLM, batch 32, 2 threads: 5.6 ms against 3.1 ms for the 12 of them).
    options.enable_skip_layer_norm = False
    if graph_file.graph_bytes(source) > graph_file.INLINE_LIMIT:
        fused = _fuse_over_the_limit(source, model_type, config, options)
    else:
        fused = optimize_model(str(source), model_type=model_type,
                               num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, optimization_options=options,
                               opt_level=0)
    # over the size limit with its weights in out.data beside it (onnxruntime's name too)
    fused.save_model_to_file(str(out), use_external_data_format=graph_file.too_big(fused.model))


def _fuse_over_the_limit(source, model_type: str, config, options):
    """optimize_model(source, opt_level=0) for a graph over graph_file.INLINE_LIMIT: the
    same fusions (onnxruntime's optimize_by_fusion, step by step), with the symbolic shape
    inference the attention fusion asks for run on the graph without its weights. On the
    whole graph it copies the model, which protobuf refuses over 2 GB, and the fusion then
    quietly leaves every attention unfused ("failed in shape inference")."""
    import onnxruntime
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    class Fusions(MODEL_TYPES[model_type][0]):
        def infer_runtime_shape(self, dynamic_axis_mapping=None, update=False):
            model, self.model = self.model, graph_file.without_weights(self.model)
            try:
                return super().infer_runtime_shape(dynamic_axis_mapping or {}, update)
            finally:
                self.model = model

    fused = Fusions(onnx.load(source), config.num_attention_heads, config.hidden_size)
    fused.optimize(options)
    fused.topological_sort()
    fused.model.producer_name = "onnxruntime.transformers"
    fused.model.producer_version = onnxruntime.__version__
    return fused


def max_output_diff(job, a, b, texts: list[str]) -> float:
    """Max |a - b| over the real (unpadded) token states of two graphs on `texts`."""
    first, second = ort_session(a), ort_session(b)
    worst = 0.0
    for _, feeds in encoder_batches(job.workdir / "tokenizer.json", texts, first,
                                    max_length=job.max_length, batch_size=8):
        worst = max(worst, masked_max_abs(first.run(None, feeds)[0], second.run(None, feeds)[0],
                                          feeds["attention_mask"]))
    return worst


def optimize(job) -> None:
    """Stage: job.optimized_onnx from job.float_onnx at the target's offline level."""
    level = job.target.graph_optimization
    before = len(onnx.load(job.float_onnx, load_external_data=False).graph.node)
    record = {"level": level, "nodes_before": before}
    job.records["optimize"] = record
    model_type = job.torch_model.config.model_type
    if level == "transformer" and model_type not in FUSION_MODEL_TYPES:
        job.log(f"  no transformer fusions for model type {model_type!r}; using basic")
        level = record["level"] = "basic"
    if level == "none":
        job.optimized_onnx = job.float_onnx
        record["nodes_after"] = before
        return

    out = job.workdir / "optimized.onnx"
    if level == "basic":
        _ort_basic(job.float_onnx, out)
    else:
        _transformer_fusions(job.float_onnx, out, job.torch_model.config)
        texts = [u.text for u in job.evaluation[:32]]
        diff = max_output_diff(job, job.float_onnx, out, texts)
        tolerance = job.target.validation.float_check_tolerance
        record["max_abs_diff_vs_float"] = diff
        if not diff <= tolerance:
            raise RuntimeError(f"Transformer fusions changed the float outputs by {diff:.3e} "
                               f"(tolerance {tolerance:g}); use graph_optimization = "
                               f"\"basic\" for this model.")
    after = onnx.load(out, load_external_data=False).graph
    record["nodes_after"] = len(after.node)
    record["fused_ops"] = sorted({n.op_type for n in after.node if n.domain == "com.microsoft"})
    job.optimized_onnx = out
    job.log(f"  {level}: {before} -> {len(after.node)} nodes"
            + (f" (fused: {', '.join(record['fused_ops'])})" if record["fused_ops"] else ""))
