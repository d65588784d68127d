"""On-device runtime for bundles written by the exporter: numpy + onnxruntime only.

    >>> import runtime
    >>> model = runtime.load("build/minilm-arm-cpu")
    >>> model.embed(["turn on the kitchen lights"]).shape
    (1, 384)
"""

from __future__ import annotations

import os
from pathlib import Path

# onnxruntime (1.32 on Linux) keeps a device id and an event store under ~/.cache/Microsoft
# and looks up its upload host: nothing a car or a speaker should do unasked. Off unless
# the application set ORT_DISABLE_TELEMETRY itself; onnxruntime reads it when first imported.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from .bundle import Bundle, BundleError, unpack
from .generate import ContextError
from .model import Model
from .tokenizer import Tokenizer

__all__ = ["Bundle", "BundleError", "ContextError", "Model", "Tokenizer", "load", "unpack"]
__version__ = "0.1.0"


def load(path: str | Path, *, threads: int | None = None, spinning: bool = True,
         providers: list[str] | None = None, verify: bool = True,
         pipeline: str = "threads") -> Model:
    """Verify the bundle at `path` and load it for inference.

    `threads` overrides the profile's intra-op thread count; `spinning=False` keeps ONNX
    Runtime's idle worker threads from busy-waiting (use it when the device runs other work);
    `providers` overrides the execution providers the target lists; `verify=False` skips the
    size and sha256 check of every file (it reads the whole bundle once); a missing file is
    still refused. A bundle cut into pipeline
    stages runs them in threads in this process (`pipeline="threads"`), or as Ray actors, one
    per stage, across the nodes of a Ray cluster (`pipeline="ray"`, needs the `ray` extra).

        >>> runtime.load("build/minilm-arm-cpu", spinning=False)
        <runtime.Model 'minilm-arm-cpu' task='feature-extraction'>
    """
    bundle = Bundle.open(path, verify=verify)
    return Model(bundle, threads=threads, spinning=spinning, providers=providers,
                 pipeline=pipeline)
