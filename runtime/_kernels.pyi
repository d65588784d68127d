"""Our onnxruntime custom-op library (runtime/_kernels.c), importable to find and query it.

onnxruntime loads the same file with `SessionOptions.register_custom_ops_library`
(`runtime.model.ort_session` does); it then runs `edge_exporter.MatMul4BitOffsets`
nodes with the kernel instead of their function body.
"""

def isa() -> str:
    """The path the kernel runs on here: "avx512", "avx2", "scalar" (EDGE_Q4_ISA=scalar,
    for tests) or "off" (nothing registered: the bundle's function body runs).

    Raises ValueError when EDGE_Q4_ISA is set to anything else than those four."""
