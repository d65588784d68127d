"""Stages `export_onnx` and `check_float`: PyTorch -> float ONNX, and proof that it matches.

The export goes through optimum-onnx (its BERT/Llama/... export configs name the inputs and
dynamic axes the way the rest of the ecosystem expects). The check runs the float graph in
ONNX Runtime next to the PyTorch model on evaluation text: anything above the profile's
tolerance means the export changed the computation, and the export stops there.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from .feeds import encoder_batches, host_threads, ort_session
from .graph_file import graph_bytes


def export_onnx(job) -> None:
    """Stage: write job.workdir/float/model.onnx at the target's opset."""
    import torch
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers.utils import logging as hf_logging

    out_dir = job.workdir / "float"
    hf_logging.set_verbosity_error()
    logging.getLogger("optimum").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about constant masks are expected
        onnx_export_from_model(job.torch_model, out_dir, task=job.task,
                               opset=job.target.opset, do_validation=False)
    job.float_onnx = out_dir / "model.onnx"
    check_stages_can_cut(job)
    job.records["export"] = {"exporter": "optimum-onnx", "opset": job.target.opset,
                             "float_bytes": graph_bytes(job.float_onnx)}
    job.log(f"  float ONNX {graph_bytes(job.float_onnx) / 1e6:.1f} MB, "
            f"opset {job.target.opset}")


def check_stages_can_cut(job) -> None:
    """Pipeline stages cut the graph's top-level node list, which an If or Loop (DeBERTa's
    relative positions export as If nodes) does not allow: refused here, before the
    quantization work, rather than by the partition stage at the end of the export."""
    import onnx

    stages = job.target.runtime.pipeline_stages
    if stages == 1:
        return
    graph = onnx.load(job.float_onnx, load_external_data=False).graph
    flow = [n for n in graph.node if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)]
    if flow:
        raise ValueError(f"This model's ONNX graph has control flow ({len(flow)} "
                         f"{', '.join(sorted({n.op_type for n in flow}))} nodes), which "
                         f"pipeline stages cannot cut, and the profile asks for {stages} "
                         f"stages: export it as one graph with --stages 1.")


def torch_output(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """PyTorch float output for ONNX-style int64 feeds, the same tensor as the graph's first
    output: last_hidden_state (batch, seq, hidden) or logits (batch, labels)."""
    import torch

    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def masked_max_abs(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Max |a - b|, over real tokens only when the outputs are per token (batch, seq, dim);
    inf where either holds a NaN, so that a check accumulating with max() cannot lose it
    (max(0.0, nan) is 0.0)."""
    diff = np.abs(a - b)
    if diff.ndim == 3:
        diff = np.where(mask[..., None].astype(bool), diff, 0)
    worst = float(diff.max(initial=0.0))
    return worst if worst == worst else float("inf")


def check_float(job) -> None:
    """Stage: max |ONNX float - PyTorch| on evaluation texts must stay within tolerance."""
    session = ort_session(job.float_onnx, threads=host_threads(job.target))
    texts = [u.text for u in job.evaluation[:64]]
    worst = 0.0
    for _, feeds in encoder_batches(job.workdir / "tokenizer.json", texts, session,
                                    max_length=job.max_length, batch_size=8):
        ours = session.run(None, feeds)[0]
        reference = torch_output(job.torch_model, feeds)
        worst = max(worst, masked_max_abs(ours, reference, feeds["attention_mask"]))
    tolerance = job.target.validation.float_check_tolerance
    job.records["float_check"] = {"texts": len(texts), "max_abs_diff": worst,
                                  "tolerance": tolerance}
    job.log(f"  float ONNX vs PyTorch on {len(texts)} texts: max abs diff {worst:.2e} "
            f"(tolerance {tolerance:g})")
    if not worst <= tolerance:
        raise RuntimeError(f"The float ONNX graph differs from PyTorch by {worst:.3e} "
                           f"(tolerance {tolerance:g}): the export changed the computation.")
