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

from .bundle import Bundle, BundleError, signing_keys, unpack
from .generate import ContextError
from .model import Model
from .tokenizer import Tokenizer

__all__ = ["Bundle", "BundleError", "ContextError", "Model", "Tokenizer", "load", "unpack"]
__version__ = "0.1.0"


def load(path: str | Path, *, threads: int | None = None, spinning: bool = True,
         providers: list[str] | None = None, verify: bool = True,
         pipeline: str = "threads", signed_by=None) -> Model:
    """Verify the bundle at `path` and load it for inference.

    `threads` overrides the profile's intra-op thread count; `spinning=False` keeps ONNX
    Runtime's idle worker threads from busy-waiting (use it when the device runs other work);
    `providers` overrides the execution providers the target lists; `verify=False` skips the
    size and sha256 check of every file (it reads the whole bundle once); a missing file is
    still refused. `signed_by` names the public keys the application trusts (a PEM file's
    path or bytes, or a list of them): the bundle must then carry one of those keys'
    signature of its manifest (manifest.sig; `python -m exporter --sign-key`), or it is
    refused; `model.bundle.signer` is the id of the key that signed. Without `signed_by`,
    the keys listed in EDGE_TRUSTED_KEYS (.pub paths separated by os.pathsep), where it is
    set, are required: a device-wide policy. A bundle cut into pipeline
    stages runs them in threads in this process (`pipeline="threads"`), or as Ray actors, one
    per stage, across the nodes of a Ray cluster (`pipeline="ray"`, needs the `ray` extra).

        >>> runtime.load("build/minilm-arm-cpu", spinning=False)
        <runtime.Model 'minilm-arm-cpu' task='feature-extraction'>
    """
    keys = signing_keys(signed_by, verify, policy=True)   # bad keys: before any file is read
    # runtime.unpack replaces a bundle by swapping directories: one swapped in while this
    # loads would pair the manifest verified here with files read after it (never verified
    # against it), so the load starts again on the new directory.
    for _ in range(3):
        before = _identity(path)
        try:
            model = Model(Bundle.open(path, verify=verify, signed_by=keys), threads=threads,
                          spinning=spinning, providers=providers, pipeline=pipeline)
        except (BundleError, FileNotFoundError):
            if before is not None and _identity(path) != before:
                continue   # replaced meanwhile: half old, half new
            raise
        if _identity(path) == before:
            return model
        model.close()   # half old, half new: its sessions (a Ray pipeline's GPUs) go back
    raise BundleError(f"{path} was replaced 3 times while it loaded; load it again once the "
                      f"update is done.")


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of directory `path`: what a rename into its place changes."""
    try:
        info = os.stat(path)
    except (OSError, ValueError, TypeError):
        return None
    return info.st_dev, info.st_ino
