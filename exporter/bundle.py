"""Stage `bundle`: the directory the device gets, with a manifest that proves its contents.

Everything is assembled in the job's temporary directory and moved into place with renames
(`report.replace_dir`), so a reader never sees a half-written bundle. The manifest lists every
other file with its size and sha256; the runtime refuses a bundle that does not match it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from importlib import metadata

import onnx

from runtime._files import write_archive
from runtime._signature import SIGNATURE_FILE
from runtime.bundle import FORMAT_VERSION, sha256_of

from .compress import compression_entries
from .graph_file import external_files
from .report import (
    check_archive_replaceable,
    remove_stale_archive,
    replace_dir,
    report_data,
    write_report_files,
    written_here,
)

TOOLS = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime")


def tool_versions(names: tuple[str, ...] = TOOLS) -> dict[str, str]:
    """The installed version of each distribution in `names`, or "not installed"."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def describe_io(values) -> list[dict]:
    """Name, dtype and shape (symbolic dims by name) of graph inputs or outputs."""
    out = []
    for v in values:
        tensor = v.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        out.append({"name": v.name, "dtype": dtype, "shape": shape})
    return out


def bundle(job) -> None:
    """Stage: write the bundle to job.output (replacing an older one only on success)."""
    staging = job.workdir / "bundle"
    staging.mkdir()
    external: list[str] = []   # the single graph's external data files (a graph over 2 GB)
    if job.stages:   # stage0.onnx ... stageN.onnx instead of model.onnx
        for stage in job.stages:   # and the external data of a stage over 2 GB
            for name in (stage["file"], *stage.get("external_data", ())):
                shutil.move(job.workdir / "stages" / name, staging / name)
        model = onnx.load(job.quantized_onnx, load_external_data=False)
    else:   # its external data keeps the names the graph gives it, beside it
        external = sorted(external_files(job.quantized_onnx))
        for name in external:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(job.quantized_onnx.parent / name, staging / name)
        shutil.move(job.quantized_onnx, staging / "model.onnx")
        model = onnx.load(staging / "model.onnx", load_external_data=False)
    shutil.copyfile(job.workdir / "tokenizer.json", staging / "tokenizer.json")
    write_report_files(report_data(job), staging)

    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": job.output.name,
        "task": job.task,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": job.target.to_dict(),
        "model": job.records["model"],
        **({} if job.stages else {"model_file": "model.onnx"}),
        **({"external_data": external} if external else {}),
        "inputs": describe_io(graph.input),
        "outputs": describe_io(graph.output),
        "max_length": job.max_length,
        **({"pooling": job.pooling} if job.pooling else {}),
        **({"labels": job.labels} if job.labels else {}),
        **({"generation": job.generation} if job.generation else {}),
        "files": [{"path": p.relative_to(staging).as_posix(), "sha256": sha256_of(p),
                   "bytes": p.stat().st_size} for p in files],
        "compression": compression_entries(job.records.get("compression")),
        **({"strength_search": job.records["strength"]} if "strength" in job.records else {}),
        "quantization": {k: v for k, v in job.records["quantization"].items()
                         if k != "activation_ranges"},
        # the user's calibration text, and how much of it calibration read (the default
        # smart-home utterances leave it out)
        **({"calibration_source": job.records["calibration_source"]}
           if "calibration_source" in job.records else {}),
        "stages": job.stages,
        "float_check": job.records["float_check"],
        "validation": job.records["validation"],
        "tools": tool_versions(),
        "opset": opset,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if job.signing_key is not None:   # (in the archive too)
        (staging / SIGNATURE_FILE).write_bytes(
            job.signing_key.signature_file((staging / "manifest.json").read_bytes()))
    if job.archive:   # built before anything is replaced; renamed into place after the bundle
        packed = job.workdir / "bundle.tar"
        write_archive(staging, packed, name=job.output.name, created=manifest["created"])
        check_archive_replaceable(job.archive, job.output.name)
    replace_dir(staging, job.output)
    if job.archive:
        os.replace(packed, job.archive)
    rejected = job.output.with_name(job.output.name + ".rejected")
    if rejected.is_dir() and not rejected.is_symlink() and written_here(rejected):
        shutil.rmtree(rejected)  # an earlier failed attempt's report no longer applies
    signed = f", {SIGNATURE_FILE}: signed by key {job.signing_key.id}" \
        if job.signing_key is not None else ""
    job.log(f"  wrote {job.output}/ ({', '.join(p.name for p in files)}, manifest.json"
            f"{signed})")
    if not job.archive and (stale := remove_stale_archive(job.output)):
        job.log(f"  removed {stale}: an earlier --tar export's archive of the bundle this "
                f"one replaced")
    if job.archive:
        job.log(f"  wrote {job.archive} ({job.archive.stat().st_size / 1e6:.1f} MB; "
                f"runtime.unpack(path, directory) installs it, verified)")

