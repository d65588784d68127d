"""The arm-cpu bundle on aarch64: the runtime and the bundle run under qemu-aarch64 user
emulation with aarch64 wheels of numpy and onnxruntime, and give x86's embeddings (with
x86's integer products made exact where its CPU would saturate them: embed_exactly_on_x86);
the C extensions, compiled for aarch64, give x86's token ids.

The aarch64 root (Debian's arm64 Python 3.11 and its headers + the wheels) comes from
`scripts/aarch64_sysroot.sh`; point AARCH64_SYSROOT at it (default
~/.cache/edge-exporter/aarch64). The C extensions are built with AARCH64_CC (default
aarch64-linux-gnu-gcc, Debian's gcc-aarch64-linux-gnu). Skipped, with the reason, where
qemu-aarch64, the root or the compiler is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import runtime

ROOT = Path(__file__).resolve().parent.parent
SYSROOT = Path(os.environ.get("AARCH64_SYSROOT",
                              Path.home() / ".cache" / "edge-exporter" / "aarch64"))
PYTHON = SYSROOT / "usr" / "bin" / "python3.11"
SITE = SYSROOT / "usr" / "lib" / "python3.11" / "site-packages"
INCLUDE = SYSROOT / "usr" / "include"
CC = os.environ.get("AARCH64_CC", "aarch64-linux-gnu-gcc")

# Runs inside the emulated aarch64 Python: only the runtime package, numpy and onnxruntime.
PROBE = """
import json, platform, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import runtime
texts = json.load(open(sys.argv[3]))
model = runtime.load(sys.argv[2], threads=1)
np.save(sys.argv[4], model.embed(texts))
print(json.dumps({"machine": platform.machine(), "tokenizer": runtime.Tokenizer.backend,
                  "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


def _skip_reason() -> str | None:
    if shutil.which("qemu-aarch64") is None:
        return "this machine has no qemu-aarch64 (apt-get install qemu-user)"
    if not PYTHON.is_file() or not (SITE / "onnxruntime").is_dir() or not (SITE / "numpy").is_dir():
        return f"no aarch64 root with numpy and onnxruntime at {SYSROOT} " \
               f"(run scripts/aarch64_sysroot.sh {SYSROOT})"
    return None


def _compiler_skip_reason() -> str | None:
    if (reason := _skip_reason()) is not None:
        return reason
    if shutil.which(CC.split()[0]) is None:
        return f"no aarch64 C compiler {CC!r} (apt-get install gcc-aarch64-linux-gnu, " \
               "or set AARCH64_CC)"
    if not (INCLUDE / "python3.11" / "Python.h").is_file():
        return f"no aarch64 Python headers under {INCLUDE} " \
               f"(rerun scripts/aarch64_sysroot.sh {SYSROOT})"
    return None


def start_under_qemu(*args: str) -> subprocess.Popen:
    """The emulated aarch64 Python started with `args` (finish it with `finish`). qemu-user
    runs one emulated thread on one host core: two of these at once use a 2-core host's
    second core, which the test process leaves idle while it waits."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(SITE), "PYTHONNOUSERSITE": "1"}
    return subprocess.Popen(["qemu-aarch64", "-L", str(SYSROOT), str(PYTHON), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen, timeout: int = 900) -> str:
    """stdout of a `start_under_qemu` process; asserts it succeeded."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        process.kill()   # a no-op once it has ended
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def finish_all(processes: list[subprocess.Popen]) -> list[str]:
    """`finish` each; where one fails, the others are killed, not left running."""
    try:
        return [finish(process) for process in processes]
    finally:
        for process in processes:
            process.kill()


def run_under_qemu(*args: str, timeout: int = 900) -> str:
    """stdout of the emulated aarch64 Python run with `args`; asserts it succeeded."""
    return finish(start_under_qemu(*args), timeout)


def embed_under_qemu(bundle: Path, texts: list[str], tmp_path: Path,
                     x86=lambda: None) -> tuple[np.ndarray, object]:
    """The runtime package alone embeds `texts` with `bundle` in the emulated aarch64 Python
    (two processes, half of the texts each), while this process computes `x86()`; both
    results. Its C tokenizer is built for x86, so the emulated Python takes the pure-Python
    twin, exactly as on a board without the compiled extension."""
    shutil.copytree(ROOT / "runtime", tmp_path / "pkg" / "runtime",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"), dirs_exist_ok=True)
    half = (len(texts) + 1) // 2
    processes = []
    for i, part in enumerate((texts[:half], texts[half:])):
        (tmp_path / f"texts{i}.json").write_text(json.dumps(part))
        processes.append(start_under_qemu("-c", PROBE, str(tmp_path / "pkg"), str(bundle),
                                          str(tmp_path / f"texts{i}.json"),
                                          str(tmp_path / f"arm{i}.npy")))
    try:
        ours = x86()
    finally:
        stdouts = finish_all(processes)
    for stdout in stdouts:
        facts = json.loads(stdout.strip().splitlines()[-1])
        assert facts == {"machine": "aarch64", "tokenizer": "python", "heavy": []}
    arm = np.concatenate([np.load(tmp_path / f"arm{i}.npy") for i in range(2)])
    assert arm.shape[0] == len(texts)
    return arm, ours


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def embed_exactly_on_x86(bundle: Path, texts: list[str], tmp_path: Path) -> np.ndarray:
    """The bundle's embeddings on x86 with exact integer products, as aarch64 makes them:
    from its exact_products twin (exporter/exact.py; the same numbers, stored as uint8),
    which x86 without VNNI multiplies exactly too (measured on a Zen 3: the bundle itself
    there gives cosine 0.9958 to aarch64 on these texts, against 0.99993 on a VNNI CPU)."""
    import onnx

    from exporter.exact import exact_products

    exact = tmp_path / "exact-bundle"
    shutil.copytree(bundle, exact)
    model_file = exact / json.loads((exact / "manifest.json").read_text())["model_file"]
    onnx.save(exact_products(onnx.load(model_file)), model_file)
    return runtime.load(exact, threads=1, verify=False).embed(texts)  # its sha256 changed


@pytest.mark.slow
@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_arm_cpu_bundle_under_aarch64_emulation_matches_x86(minilm_bundle, eval_texts,
                                                            tmp_path):
    texts = eval_texts[:40]
    arm, x86 = embed_under_qemu(minilm_bundle, texts, tmp_path,
                                lambda: embed_exactly_on_x86(minilm_bundle, texts, tmp_path))
    cosine = cosines(arm, x86)
    # Measured here (qemu 7.2, onnxruntime 1.32, today's default bundle): these 40 texts
    # mean 0.99993, min 0.99843 (text 17); all 200: mean
    # 0.99996, min 0.99843, 14 texts under 0.9999. The cause: ONNX Runtime's float32
    # LayerNorm (and MatMulIntegerToFloat with a fused bias) differ in the last bits between
    # its x86 and aarch64 builds; in about 1 text in 14 a value on a quantization step
    # boundary rounds to a different uint8 code, and the int8 layers after it amplify that
    # one step (text 17: one code in layer 0 -> 6% relative difference in the last hidden
    # state). The other texts agree to ~3e-7. portable_rounding removes the cause at a
    # latency cost (targets/arm-cpu.toml; next test). The default bundle is held to what one
    # flipped code costs at worst, not to the 0.9999 that only the portable bundle reaches.
    print(f"aarch64 vs x86 cosine: mean {cosine.mean():.6f}, min {cosine.min():.6f}")
    assert cosine.mean() >= 0.9999 and cosine.min() >= 0.998, (cosine.mean(), cosine.min())


@pytest.fixture(scope="module")
def portable_bundle(tmp_path_factory):
    """arm-cpu with portable_rounding and the attention unfused (so that its softmax runs in
    float64 too), as a board profile; the other calibration methods are not scored, to save
    a minute."""
    from exporter import export

    work = tmp_path_factory.mktemp("portable")
    (work / "portable.toml").write_text(
        'extends = "arm-cpu"\ndescription = "arm-cpu, rounding that x86 and aarch64 share"\n'
        'graph_optimization = "basic"\n'
        "[quantization]\nportable_rounding = true\ncompare_calibration = false\n")
    return export("minilm", target=work / "portable.toml", output=work / "bundle",
                  log=lambda line: None)


@pytest.mark.slow
@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_portable_rounding_gives_x86_embeddings_on_aarch64(portable_bundle, eval_texts,
                                                          tmp_path):
    """Every uint8 code the same on both CPUs: only the last LayerNorm (no quantizer reads
    it) differs, by float32 rounding (measured: cosine 1.000000, 1 - cosine <= 2e-7, on
    1000 held-out texts)."""
    arm, x86 = embed_under_qemu(portable_bundle, eval_texts, tmp_path,
                                lambda: embed_exactly_on_x86(portable_bundle, eval_texts,
                                                             tmp_path))
    cosine = cosines(arm, x86)
    print(f"portable rounding, aarch64 vs x86 cosine on {len(cosine)} texts: "
          f"mean {cosine.mean():.7f}, min {cosine.min():.7f}")
    assert cosine.min() >= 0.9999, (cosine.mean(), cosine.min())
    # no text with a different code: those differ by 1e-4 or more, float32 rounding by ~1e-7
    assert (1 - cosine).max() <= 1e-6, (1 - cosine).max()


# Runs inside the emulated aarch64 Python: the runtime with its C extensions built for
# aarch64 tokenizes every case, one call per text and in batches.
TOKENIZE = """
import json, platform, sys
sys.path.insert(0, sys.argv[1])
import runtime
from runtime import _kernels
cases = json.loads(open(sys.argv[2], encoding="utf-8", errors="surrogatepass").read())
ids = {}
for name, case in cases.items():
    tok = runtime.Tokenizer.from_file(case["path"])
    ids[name] = {"batch": tok.encode_batch(case["batch"]),
                 "one": [tok.encode(text) for text in case["one"]]}
json.dump({"machine": platform.machine(), "tokenizer": runtime.Tokenizer.backend,
           "kernels": _kernels.isa(), "ids": ids}, open(sys.argv[3], "w"))
"""


@pytest.fixture(scope="module")
def aarch64_runtime(tmp_path_factory) -> Path:
    """A copy of the runtime package with its two C extensions built for aarch64, the way
    setup.py builds them on a board: the Unicode tables generated by the board's Python,
    then the C compiled with setup.py's flags."""
    pkg = tmp_path_factory.mktemp("aarch64") / "pkg"
    shutil.copytree(ROOT / "runtime", pkg / "runtime",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    generated = pkg.parent / "generated"
    generated.mkdir()
    tables = start_under_qemu(str(ROOT / "runtime" / "_gen_tables.py"),
                              str(generated / "_tokenizer_tables.h"))
    suffix = ".cpython-311-aarch64-linux-gnu.so"

    def compile_(name: str, *flags: str) -> None:
        command = [*CC.split(), "-shared", "-fPIC", "-O2", *flags,
                   f"-I{INCLUDE}", f"-I{INCLUDE / 'python3.11'}", f"-I{generated}",
                   str(ROOT / "runtime" / f"{name}.c"),
                   "-o", str(pkg / "runtime" / (name + suffix))]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]

    try:
        compile_("_kernels")   # needs no generated table: built while they are
    finally:
        finish(tables)
    compile_("_tokenizer_c", "-pthread")
    return pkg


def every_code_point_in_a_word() -> list[str]:
    """Each code point (surrogates aside) as "a{c}b", 2,048 words a text."""
    words = [f"a{chr(c)}b" for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    return [" ".join(words[i : i + 2048]) for i in range(0, len(words), 2048)]


@pytest.mark.slow
@pytest.mark.skipif(_compiler_skip_reason() is not None, reason=str(_compiler_skip_reason()))
def test_c_tokenizer_built_for_aarch64_gives_x86_ids(aarch64_runtime, real_texts,
                                                     smollm2_tokenizer_json, tmp_path):
    """Both models, compiled for aarch64 (where `char` is unsigned and the caches and
    threads run on another memory model), give the x86 C path's ids: on every real text,
    every code point and the edge and crash cases, which test_tokenizer*.py prove are
    Hugging Face's ids on x86."""
    from test_tokenizer import EDGE_CASES, REFERENCE
    from test_tokenizer_bpe import EDGE_CASES as BPE_EDGE_CASES
    from test_tokenizer_c import BPE_HARD_TEXTS, HARD_TEXTS

    code_points = every_code_point_in_a_word()
    cases = {
        "minilm": {"path": str(REFERENCE), "one": EDGE_CASES + HARD_TEXTS,
                   "batch": real_texts + code_points + HARD_TEXTS},
        "smollm2": {"path": str(smollm2_tokenizer_json), "one": BPE_EDGE_CASES + BPE_HARD_TEXTS,
                    "batch": real_texts + code_points + BPE_HARD_TEXTS},
    }
    # One emulated process per model, at once. Lone surrogates travel raw: json would read
    # an escaped pair back as one character.
    processes = []
    for name, case in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({name: case}, ensure_ascii=False),
                                               encoding="utf-8", errors="surrogatepass")
        processes.append(start_under_qemu("-c", TOKENIZE, str(aarch64_runtime),
                                          str(tmp_path / f"{name}.json"),
                                          str(tmp_path / f"{name}-ids.json")))
    finish_all(processes)
    assert runtime.Tokenizer.backend == "c", "the x86 side needs the C extension built"
    for name, case in cases.items():
        arm = json.loads((tmp_path / f"{name}-ids.json").read_text())
        # No vector path for aarch64 yet: the kernel library loads and registers nothing.
        assert (arm["machine"], arm["tokenizer"], arm["kernels"]) == ("aarch64", "c", "off")
        x86 = runtime.Tokenizer.from_file(case["path"])
        for mode, texts in [("batch", case["batch"]), ("one", case["one"])]:
            expected = x86.encode_batch(texts)
            got = arm["ids"][name][mode]
            differ = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
            assert not differ, f"{name} {mode}: {len(differ)} texts differ, e.g. " \
                               f"{texts[differ[0]][:80]!r}"
