"""The arm-cpu bundle on aarch64: the runtime and the bundle run under qemu-aarch64 user
emulation with aarch64 wheels of numpy and onnxruntime, and give x86's embeddings.

The aarch64 root (Debian's arm64 Python 3.11 + the wheels) comes from
`scripts/aarch64_sysroot.sh`; point AARCH64_SYSROOT at it (default
~/.cache/edge-exporter/aarch64). Skipped, with the reason, where qemu-aarch64 or the root is
missing.
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
        return "qemu-aarch64 is not installed (apt-get install qemu-user)"
    if not PYTHON.is_file() or not (SITE / "onnxruntime").is_dir() or not (SITE / "numpy").is_dir():
        return f"no aarch64 root with numpy and onnxruntime at {SYSROOT} " \
               f"(run scripts/aarch64_sysroot.sh {SYSROOT})"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_arm_cpu_bundle_under_aarch64_emulation_matches_x86(minilm_bundle, eval_texts,
                                                            tmp_path):
    texts = eval_texts[:40]
    x86 = runtime.load(minilm_bundle, threads=1).embed(texts)
    # the runtime package alone: its C tokenizer is built for x86, so the emulated Python
    # takes the pure-Python twin, exactly as on a board without the compiled extension
    shutil.copytree(ROOT / "runtime", tmp_path / "pkg" / "runtime",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(SITE), "PYTHONNOUSERSITE": "1"}
    result = subprocess.run(
        ["qemu-aarch64", "-L", str(SYSROOT), str(PYTHON), "-c", PROBE, str(tmp_path / "pkg"),
         str(minilm_bundle), str(tmp_path / "texts.json"), str(tmp_path / "arm.npy")],
        capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts == {"machine": "aarch64", "tokenizer": "python", "heavy": []}
    arm = np.load(tmp_path / "arm.npy")
    cosine = (arm * x86).sum(axis=1) / (np.linalg.norm(arm, axis=1) * np.linalg.norm(x86, axis=1))
    # Measured here (qemu 7.2, onnxruntime 1.32, 40 texts): mean 0.99999, min 0.99971. Integer
    # GEMMs are exact on both, but float rounding in LayerNorm / Softmax / the fp32 parts of
    # the GEMMs differs between NEON and AVX kernels and can move an activation across a
    # quantization step, so single texts sit a little lower than the mean.
    print(f"aarch64 vs x86 cosine: mean {cosine.mean():.6f}, min {cosine.min():.6f}")
    assert cosine.mean() >= 0.9999 and cosine.min() >= 0.999, (cosine.mean(), cosine.min())
