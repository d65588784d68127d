"""Stage `optimize`: offline graph optimization that every device's onnxruntime can use.

"basic" runs ONNX Runtime's level-1 passes (constant folding, redundant node elimination,
common subexpression elimination) once at export time and saves the result. These passes use
only standard ONNX ops, so the graph stays portable; the hardware-specific fusions (attention,
GELU, integer MatMul kernels) are left to ONNX Runtime at load time on the device, where it
knows the CPU. Saving a level-2+ graph would bake this machine's kernels into the bundle.
"""

from __future__ import annotations

import onnx


def optimize(job) -> None:
    """Stage: job.optimized_onnx from job.float_onnx at the target's offline level."""
    level = job.target.graph_optimization
    before = len(onnx.load(job.float_onnx, load_external_data=False).graph.node)
    if level == "none":
        job.optimized_onnx = job.float_onnx
        job.records["optimize"] = {"level": level, "nodes_before": before, "nodes_after": before}
        return

    import onnxruntime as ort

    out = job.workdir / "optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(job.float_onnx), options, providers=["CPUExecutionProvider"])
    after = len(onnx.load(out, load_external_data=False).graph.node)
    job.optimized_onnx = out
    job.records["optimize"] = {"level": level, "nodes_before": before, "nodes_after": after}
    job.log(f"  {level}: {before} -> {after} nodes")
