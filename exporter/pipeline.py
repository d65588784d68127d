"""The exporter, stage by stage. Reading STAGES is reading the architecture.

Each stage is a function `stage(job) -> None` that reads what earlier stages put on the `Job`
and adds its own results. Stages write only inside `job.workdir`, a temporary directory; the
bundle stage moves the finished bundle into place with one rename, so an interrupted or failed
export never leaves a half-written bundle behind.

    >>> from exporter import export
    >>> export("minilm", target="arm-cpu", output="build/minilm-arm-cpu")
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from targets import Target

from .budget import Budget
from .bundle import bundle
from .compress import Compression, compress
from .data import Utterance
from .decoder import build_float, check_decoder, load_decoder, quantize_decoder, validate_decoder
from .float16 import to_float16
from .load import load
from .optimize import optimize
from .partition import partition
from .quantize import quantize
from .report import temp_dir_beside
from .sensitivity import sensitivity
from .smooth import smooth
from .strength import choose_strength
from .tensorrt import check_rules
from .to_onnx import check_float, export_onnx
from .validate import validate


@dataclass
class Job:
    """Everything one export knows; stages fill it in order."""

    model: str                        # model directory or packaged name ("minilm")
    target: Target
    task: str | None
    output: Path
    calibration: list[Utterance]
    evaluation: list[Utterance]
    budget: Budget
    workdir: Path
    log: Any = None                   # callable(str) for progress lines
    compression: Compression | None = None  # what the compress stage removes
    # filled by the stages
    model_dir: Path | None = None     # Hugging Face checkpoint directory
    torch_model: Any = None
    reference_model: Any = None       # the original before compression (validation's float)
    labels: list[str] = field(default_factory=list)   # text-classification, by class id
    pooling: dict = field(default_factory=dict)
    max_length: int = 0
    model_max_length: int = 0         # the model's own limit (max_length also the profile's)
    float_onnx: Path | None = None
    optimized_onnx: Path | None = None
    smoothed_onnx: Path | None = None
    quantized_onnx: Path | None = None
    precision: str | None = None      # decoders: override of the profile's generation.weights
    gguf: Path | None = None          # decoders: the GGUF file the model came from
    requantize: bool = False          # decoders from GGUF: round instead of carrying blocks
    archive: Path | None = None       # also write the bundle as this .tar (--tar)
    signing_key: Any = None           # sign the bundle with this exporter.sign.SigningKey
    gguf_ties: list = field(default_factory=list)  # (source, dest, part): carried blocks shared
    gguf_layers: list | None = None   # the GGUF's layers kept by --drop-layers (None: all)
    generation: dict = field(default_factory=dict)  # decoders: eos ids, context, chat format
    decoder_shape: Any = None
    stages: list = field(default_factory=list)    # pipeline stages (manifest "stages")
    records: dict = field(default_factory=dict)   # per-stage facts for manifest and report
    timings: dict = field(default_factory=dict)   # seconds per stage
    started: float = field(default_factory=time.perf_counter)   # export() sets its own
    stage: tuple[str, float] | None = None   # the stage under way, and when it began


# The pipeline.
STAGES = (
    load,          # model directory or packaged name -> PyTorch model + tokenizer.json
    choose_strength,  # size / latency budget: the weakest compression that meets it, measured
    compress,      # drop layers, prune heads / FFN, share, sparsify; heal by distillation
    export_onnx,   # PyTorch -> float ONNX at the target's opset (optimum-onnx)
    check_float,   # float ONNX vs PyTorch on evaluation text (max abs diff)
    optimize,      # offline graph optimization the target can use
    smooth,        # SmoothQuant: activation outliers moved into per-channel weight scales
    quantize,      # static int8 QDQ calibrated on real text (minmax/percentile/entropy)
    sensitivity,   # harm per node group; harmful groups back to float until the budget holds
    to_float16,    # what stays in float -> float16, for GPU targets
    check_rules,   # the graph rules of the target's runtime (TensorRT: explicit quantization)
    partition,     # contiguous pipeline stages, one per device, checked equal to one graph
    validate,      # bundle vs PyTorch float: accuracy, latency, size, memory; budget check
    bundle,        # manifest + sha256 + report, atomically renamed into place
)


# Decoder LLMs (text-generation): the graph is written directly on ONNX Runtime's fused
# decoder ops with a preallocated KV cache, and weights are quantized weight-only.
DECODER_STAGES = (
    load_decoder,      # packaged name / GGUF / HF directory -> PyTorch model, tokenizer, chat
    compress,          # drop layers, prune query heads per KV group / FFN, ...; heal
    build_float,       # float decoder graph (GroupQueryAttention, in-place KV cache)
    check_decoder,     # float ONNX vs PyTorch: logits and greedy tokens
    quantize_decoder,  # int4/int8 MatMulNBits blocks; GGUF blocks carried exactly
    validate_decoder,  # perplexity, greedy agreement, decode speed, size, memory; budget
    bundle,
)


def stages_for(task: str | None) -> tuple:
    return DECODER_STAGES if task == "text-generation" else STAGES


def run(job: Job) -> Path:
    """Run every stage on `job`; returns the bundle directory."""
    for stage in stages_for(job.task):
        job.stage = (stage.__name__, time.perf_counter())
        job.log(f"[{stage.__name__}]")
        stage(job)
        job.timings[stage.__name__] = round(time.perf_counter() - job.stage[1], 2)
        job.stage = None
    longest = sorted(job.timings.items(), key=lambda item: -item[1])[:3]
    job.log(f"  {time.perf_counter() - job.started:.0f} s in all; longest: "
            + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in longest)
            + " (every stage's time: report.json, stage_seconds)")
    return job.output


def new_job(model: str, *, target: Target, task: str | None, output: Path,
            calibration: list[Utterance], evaluation: list[Utterance], budget: Budget,
            compression: Compression | None = None, log=None) -> Job:
    """A job with its own temporary work directory next to the output (same filesystem,
    so the final rename is atomic)."""
    workdir = temp_dir_beside(output)
    return Job(model=model, target=target, task=task, output=output, calibration=calibration,
               evaluation=evaluation, budget=budget, workdir=workdir, compression=compression,
               log=log or (lambda line: print(line, file=sys.stderr, flush=True)))
