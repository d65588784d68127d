"""Integer products as the device makes them, measured on a host that makes them otherwise.

ONNX Runtime's CPU kernels (MLAS) multiply uint8 activations by int8 weights exactly on
aarch64 (UDOT/SDOT) and on x86 with VNNI (VPDPBUSD), and TensorRT's int8 is exact too; but
MLAS's x86 kernels without VNNI (AVX2, AVX-512 without VNNI) add each pair of u8 x s8
products into int16 with saturation (VPMADDUBSW; ONNX Runtime docs, "Quantize ONNX models",
which suggest U8U8 where it hurts). Measured on MiniLM arm-cpu on a Zen 3 (AVX2, no VNNI):
mean cosine to float 0.9957 as that host computes it, 0.9981 on a VNNI host and on aarch64.

`exact_products(model)` stores every int8 weight (and its zero point) as uint8 + 128: the
same numbers, which MLAS multiplies as U8U8 exactly on every CPU. Where `host_saturates()`
and the target's device multiplies exactly (`exact_integer_products` in the profile), the
exporter scores and validates that twin, so the numbers it reports and the choices it makes
are the device's, not an artefact of the build machine; the bundle keeps its int8 weights.

    >>> scored = exact_products(onnx.load("model.onnx")) if host_saturates() else model
"""

from __future__ import annotations

import functools
import platform
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .graph_file import FreshNames, copy_model

# op type -> (input index of its int8 weight, of that weight's zero point): the integer ops
# whose weight MLAS multiplies with uint8 activations, and DequantizeLinear, which ONNX
# Runtime fuses with the MatMul after it into one of them.
WEIGHT_INPUTS = {
    "MatMulIntegerToFloat": (1, 5),
    "MatMulInteger": (1, 3),
    "QAttention": (1, 7),
    "QLinearMatMul": (3, 5),
    "DequantizeLinear": (0, 2),
}

_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}


def scores_exactly(target) -> bool:
    """Whether exports for `target` are scored on exact_products twins on this host."""
    return target.quantization.exact_integer_products and host_saturates()


@functools.cache
def host_saturates(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether ONNX Runtime's u8 x s8 products saturate on this CPU: x86 without VNNI.
    Where the flags cannot be read (not Linux), an x86 host is taken to saturate."""
    if platform.machine().lower() not in _X86:
        return False
    try:
        flags = set(re.findall(r"\w+", cpuinfo.read_text(encoding="utf-8", errors="replace")))
    except OSError:
        return True
    return not flags & {"avx512_vnni", "avx_vnni"}


def exact_products(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every int8 weight of WEIGHT_INPUTS, and its zero point, stored
    as uint8 + 128 (a missing zero point, 0, becomes an explicit 128); `model` itself where
    it has no such weight (a float graph with fake-quantized activations, which the
    sensitivity search scores by the dozen: for MiniLM on one core, copying its 90 MB float
    graph 26 times for nothing made this function take 2.2 s of the search, 0.9 s now)."""
    if not _int8_weights(model):
        return model
    model = copy_model(model)
    initializers = {i.name: i for i in model.graph.initializer}
    shifted: set[str] = set()
    fresh = FreshNames(model.graph)
    zeros: dict[tuple, str] = {}   # (weight, shape) -> the explicit zero point written for it

    def shift(tensor: onnx.TensorProto) -> None:
        if tensor.name not in shifted and tensor.data_type == onnx.TensorProto.INT8:
            values = numpy_helper.to_array(tensor).astype(np.int16) + 128
            tensor.CopyFrom(numpy_helper.from_array(values.astype(np.uint8), tensor.name))
            shifted.add(tensor.name)

    for node in model.graph.node:
        if node.op_type not in WEIGHT_INPUTS or node.domain not in ("", "ai.onnx",
                                                                     "com.microsoft"):
            continue
        weight, zero_point = WEIGHT_INPUTS[node.op_type]
        tensor = initializers.get(node.input[weight]) if weight < len(node.input) else None
        if tensor is None or (tensor.data_type != onnx.TensorProto.INT8
                              and tensor.name not in shifted):
            continue
        if len(node.input) <= zero_point or not node.input[zero_point]:
            # DequantizeLinear's zero point has its scale's shape; the others take a scalar.
            scale = initializers.get(node.input[1])
            shape = (numpy_helper.to_array(scale).shape
                     if node.op_type == "DequantizeLinear" and scale is not None else ())
            if (tensor.name, shape) not in zeros:
                zeros[tensor.name, shape] = fresh(f"{tensor.name}_zero_u8")
                model.graph.initializer.append(numpy_helper.from_array(
                    np.zeros(shape, np.int8), zeros[tensor.name, shape]))
                initializers[zeros[tensor.name, shape]] = model.graph.initializer[-1]
            node.input.extend([""] * (zero_point + 1 - len(node.input)))
            node.input[zero_point] = zeros[tensor.name, shape]
        zero = initializers.get(node.input[zero_point])
        if zero is None:  # a computed zero point: leave this node as it is
            continue
        shift(tensor)
        shift(zero)
    return model


def _int8_weights(model: onnx.ModelProto) -> bool:
    """Whether a node of WEIGHT_INPUTS reads an int8 initializer as its weight."""
    int8 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    return any(node.op_type in WEIGHT_INPUTS and node.domain in ("", "ai.onnx", "com.microsoft")
               and WEIGHT_INPUTS[node.op_type][0] < len(node.input)
               and node.input[WEIGHT_INPUTS[node.op_type][0]] in int8
               for node in model.graph.node)
