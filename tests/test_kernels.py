"""Our onnxruntime kernels (runtime/_kernels.c) against the standard-op function body they
replace, on SmolLM2's real GGUF Q4_1 blocks.

A bundle holds `edge_exporter.MatMul4BitOffsets` as a model-local function: without our
library onnxruntime inlines its body (MatMulNBits + block sums @ offsets); with it, the node
runs our kernel. Both must compute w = d*(q - 8) + o, and the library must actually take the
node (else the speed is silently lost). Every vector path is checked: EDGE_Q4_ISA picks one
when a session is made. Skipped where the extension is not built (pip install -e . builds it).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import runtime
from exporter import gguf
from exporter.decoder_graph import EDGE, MS, _offset_tables, q4_offsets_function
from runtime.model import kernel_library, ort_session

_kernels = pytest.importorskip("runtime._kernels",
                               reason="kernels not built (pip install -e . builds them)")
BEST = _kernels.isa()
# every path this CPU runs, the scalar reference included
PATHS = {"avx512": ["avx512", "avx2", "scalar"], "avx2": ["avx2", "scalar"]}.get(BEST, ["scalar"])


@pytest.fixture(scope="module")
def q4_1():
    """Layer 0's qkv, gate_up and down of the packaged SmolLM2 GGUF (Q4_1, carried exactly)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gguf.checkpoint(gguf.packaged_gguf("smollm2"),
                                                        log=lambda line: None))
    w = gguf.carried_weights(gguf.packaged_gguf("smollm2"), config)
    return {"qkv": w.qkv[0], "gate_up": w.gate_up[0], "down": w.down[0]}


def _model(linear, k: int | None = None) -> bytes:
    """One MatMul4BitOffsets node over `linear`'s tables; `k` declares another K (broken)."""
    d, o = _offset_tables(linear)
    return _tables_model(linear.codes, d, o, k or linear.in_features)


def _tables_model(codes, d, o, k: int, n: int | None = None) -> bytes:
    """One MatMul4BitOffsets node over the tables codes [N, K/32, 16], d [N, K/32] and
    o [K/32, N] (float16), declaring `k` and `n` (by default d's rows)."""
    n = d.shape[0] if n is None else n
    node = helper.make_node("MatMul4BitOffsets", ["x", "codes", "d", "o"], ["y"], domain=EDGE,
                            K=k, N=n)
    graph = helper.make_graph(
        [node], "q4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "rows", "k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "rows", n])],
        [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(d, "d"),
         numpy_helper.from_array(o, "o")])
    model = helper.make_model(graph, functions=[q4_offsets_function()], opset_imports=[
        helper.make_opsetid("", 21), helper.make_opsetid(MS, 1), helper.make_opsetid(EDGE, 1)])
    model.ir_version = 10
    return model.SerializeToString()


def _session(model: bytes, monkeypatch, isa: str | None, **kwargs):
    monkeypatch.setenv("EDGE_Q4_ISA", isa or "off")
    return ort_session(model, threads=2, kernels=isa is not None, **kwargs)


def test_real_q4_1_tables_fit_the_kernel(q4_1):
    """GGUF's d and m + 8d are exact in float16 for these matrices, and the tables rebuild
    the carried weights exactly."""
    for linear in q4_1.values():
        d, o = _offset_tables(linear)
        q = np.stack([linear.codes & 15, linear.codes >> 4], -1).reshape(
            linear.out_features, -1, 32).astype(np.float64)
        w = d.astype(np.float64)[..., None] * (q - 8) + o.T.astype(np.float64)[..., None]
        assert np.array_equal(w.reshape(linear.out_features, -1), linear.dequantize())


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("rows", [1, 3, 5, 16, 37])
def test_kernel_equals_the_function_body(q4_1, monkeypatch, isa, rows):
    """Every path, for decode (1 row), a few rows and prefill (16+, the GEMM path, with a
    partial group of rows), on real activations' scale: within float rounding of a float64
    product, as close as onnxruntime's own MatMulNBits."""
    rng = np.random.default_rng(rows)
    for name, linear in q4_1.items():
        model = _model(linear)
        x = rng.standard_normal((1, rows, linear.in_features)).astype(np.float32)
        exact = x.astype(np.float64) @ linear.dequantize().astype(np.float64).T
        scale = np.abs(exact).max()
        body = _session(model, monkeypatch, None).run(None, {"x": x})[0]
        ours = _session(model, monkeypatch, isa).run(None, {"x": x})[0]
        assert np.abs(body - exact).max() <= 2e-6 * scale, name
        assert np.abs(ours - exact).max() <= 2e-6 * scale, (name, isa, rows)


@pytest.mark.parametrize("isa", PATHS)
def test_column_and_row_tails(monkeypatch, isa):
    """Shapes SmolLM2 does not have: N not a multiple of the 16-column chunk (the scalar
    tail, also after the GEMM path) and K of 1 or 3 blocks, for decode and prefill rows."""
    from types import SimpleNamespace

    rng = np.random.default_rng(7)
    for k, n in ((32, 20), (96, 40), (64, 3)):
        blocks = k // 32
        codes = rng.integers(0, 256, (n, blocks, 16), dtype=np.uint8)
        d = (rng.random((n, blocks)) * 0.05).astype(np.float16)
        o = (rng.standard_normal((blocks, n)) * 0.1).astype(np.float16)
        q = np.stack([codes & 15, codes >> 4], -1).reshape(n, blocks, 32).astype(np.float64)
        w = (d.astype(np.float64)[..., None] * (q - 8)
             + o.T.astype(np.float64)[..., None]).reshape(n, k)
        # a Linear whose tables are exactly d and o: m = o - 8d
        linear = SimpleNamespace(bits=4, block_size=32, codes=codes, bias=None,
                                 scales=d.astype(np.float32), zero_points=np.zeros(1, np.uint8),
                                 offsets=(o.T.astype(np.float64) - 8 * d.astype(np.float64)),
                                 out_features=n, in_features=k)
        model = _model(linear)
        for rows in (1, 5, 17, 33):
            x = rng.standard_normal((1, rows, k)).astype(np.float32)
            exact = x.astype(np.float64) @ w.T
            ours = _session(model, monkeypatch, isa).run(None, {"x": x})[0]
            assert np.abs(ours - exact).max() <= 1e-5 * np.abs(exact).max(), (k, n, rows)


def _node_ops(session) -> set[str]:
    path = session.end_profiling()
    events = json.loads(open(path).read())
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node"}


def test_the_library_takes_the_node_and_the_body_runs_without_it(q4_1, monkeypatch, tmp_path):
    """Profiled: with the library the node runs as one MatMul4BitOffsets kernel; without it
    (not registered, or EDGE_Q4_ISA=off on a CPU without a path) its body's MatMulNBits."""
    import onnxruntime as ort

    model = _model(q4_1["qkv"])
    x = np.ones((1, 1, 576), np.float32)
    for isa, expect in ((BEST if BEST != "off" else "scalar", "MatMul4BitOffsets"),
                        (None, "MatMulNBits")):
        monkeypatch.setenv("EDGE_Q4_ISA", isa or "off")
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp_path / "profile")
        if isa is not None:
            options.register_custom_ops_library(_kernels.__file__)
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        session.run(None, {"x": x})
        ops = _node_ops(session)
        assert expect in ops and ({"MatMul4BitOffsets", "MatMulNBits"} - {expect}).isdisjoint(
            ops), (isa, ops)
    monkeypatch.setenv("EDGE_Q4_ISA", "off")
    assert _kernels.isa() == "off" and kernel_library() is None


def test_bad_shapes_are_refused_with_the_op_name(q4_1, monkeypatch):
    """A node whose K does not match its tables, or an x whose last dimension is not K,
    fails with a message naming the op, not a crash or a wrong answer; no rows is fine."""
    linear = q4_1["qkv"]
    broken = _model(linear, k=608)   # the tables hold K = 576
    with pytest.raises(Exception, match="MatMul4BitOffsets: codes are not"):
        _session(broken, monkeypatch, PATHS[0]).run(None, {"x": np.ones((1, 1, 608), np.float32)})
    session = _session(_model(linear), monkeypatch, PATHS[0])
    with pytest.raises(Exception, match="MatMul4BitOffsets: x's last dimension is not K"):
        session.run(None, {"x": np.ones((1, 1, 575), np.float32)})
    assert session.run(None, {"x": np.ones((1, 0, 576), np.float32)})[0].shape == (1, 0, 960)
    assert session.run(None, {"x": np.ones((1, 1, 576), np.float32)})[0].shape == (1, 1, 960)


def test_bundle_with_and_without_kernels(smollm2_bundle, monkeypatch):
    """The default SmolLM2 bundle: its Q4_1 products are MatMul4BitOffsets nodes (all but the
    two matrices whose m + 8d is not exact in float16), and the runtime's session with our
    kernels and one without agree on the logits to float rounding and on every greedy
    token."""
    import onnx

    from runtime.generate import Decoder, generate_tokens

    graph = onnx.load(smollm2_bundle / "model.onnx", load_external_data=False).graph
    fused = [n for n in graph.node if n.op_type == "MatMul4BitOffsets"]
    unfused = [n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("layers.")]
    assert len(fused) + len(unfused) == 4 * 30 and len(unfused) <= 2
    ids = list(range(1000, 1040))
    runs = {}
    for isa in (PATHS[0], None):
        monkeypatch.setenv("EDGE_Q4_ISA", isa or "off")
        decoder = Decoder(ort_session(smollm2_bundle / "model.onnx", threads=2,
                                      kernels=isa is not None), context=256)
        logits = decoder.forward(ids)
        tokens = list(generate_tokens(decoder, ids, max_new_tokens=24, eos=set(),
                                      temperature=0, top_k=0, top_p=1.0, seed=None))
        runs[isa] = logits, tokens
    (ours, ours_tokens), (body, body_tokens) = runs[PATHS[0]], runs[None]
    assert np.abs(ours - body).max() <= 1e-3 * np.abs(body).max()
    assert ours_tokens == body_tokens


def test_stub_lists_the_module_surface():
    """runtime/_kernels.pyi declares exactly what the module exports."""
    import ast
    from pathlib import Path

    stub = Path(__file__).resolve().parents[1] / "runtime" / "_kernels.pyi"
    declared = {node.name for node in ast.parse(stub.read_text()).body
                if isinstance(node, ast.FunctionDef)}
    assert declared == {name for name in dir(_kernels) if not name.startswith("_")}
    assert BEST in {"avx512", "avx2", "off"}


@pytest.mark.parametrize("isa", PATHS)
def test_an_infinite_scale_gives_nan_on_every_path(monkeypatch, isa):
    """w = d*(q - 8) + o with d = inf and q = 8 is NaN (inf * 0), as the function body has
    it; the scalar path (and the column tail of the vector ones) factored d out of the block
    and gave -inf."""
    rng = np.random.default_rng(3)
    n, blocks = 17, 1   # column 16: the tail after a 16-column chunk
    codes = rng.integers(0, 256, (n, blocks, 16), dtype=np.uint8)
    d = (rng.random((n, blocks)) * 0.05).astype(np.float16)
    o = (rng.standard_normal((blocks, n)) * 0.1).astype(np.float16)
    for column in (0, 16):
        codes[column, 0, 0] = 0x88
        d[column, 0] = np.inf
    model = _tables_model(codes, d, o, 32)
    x = rng.standard_normal((1, 3, 32)).astype(np.float32)
    body = _session(model, monkeypatch, None).run(None, {"x": x})[0]
    ours = _session(model, monkeypatch, isa).run(None, {"x": x})[0]
    assert np.isnan(body[..., [0, 16]]).all() and np.isnan(ours[..., [0, 16]]).all()
    np.testing.assert_allclose(ours, body, rtol=1e-5, atol=1e-5)


def test_transposed_tables_and_no_rows(monkeypatch):
    """Tables of the right size and the wrong shape are refused (they ran, giving garbage);
    no rows give an empty y with the kernel and, now, with the function body too."""
    rng = np.random.default_rng(4)
    n, blocks = 24, 2
    codes = rng.integers(0, 256, (n, blocks, 16), dtype=np.uint8)
    d = (rng.random((n, blocks)) * 0.05).astype(np.float16)
    o = (rng.standard_normal((blocks, n)) * 0.1).astype(np.float16)
    model = _tables_model(codes, d, o, 64)
    empty = np.ones((1, 0, 64), np.float32)
    for isa in (None, PATHS[0]):
        assert _session(model, monkeypatch, isa).run(None, {"x": empty})[0].shape == (1, 0, n)
    for tables, message in (((d, o.T.copy()), "offsets are not K/32 x N"),
                            ((d.T.copy(), o), "scales are not N x K/32")):
        transposed = _tables_model(codes, *tables, 64, n)
        with pytest.raises(Exception, match=f"MatMul4BitOffsets: {message}"):
            _session(transposed, monkeypatch, PATHS[0]).run(
                None, {"x": np.ones((1, 1, 64), np.float32)})
        # the function body (no kernels) refuses it too: the scales flattened to the right
        # length and gave garbage
        with pytest.raises(Exception, match="MatMul|Expand|broadcast"):
            _session(transposed, monkeypatch, None).run(
                None, {"x": np.ones((1, 1, 64), np.float32)})


def test_each_session_runs_the_path_its_own_registration_chose(tmp_path):
    """The path was one global, set at every registration: registering again with
    EDGE_Q4_ISA=off left an earlier session's kernels a NULL path (segfault). In a
    subprocess, as a crash would end this one."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import os, sys
import numpy as np, onnxruntime as ort
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from test_kernels import _tables_model
rng = np.random.default_rng(5)
codes = rng.integers(0, 256, (16, 1, 16), dtype=np.uint8)
d = (rng.random((16, 1)) * 0.05).astype(np.float16)
o = (rng.standard_normal((1, 16)) * 0.1).astype(np.float16)
model = _tables_model(codes, d, o, 32)
def options(isa):
    os.environ["EDGE_Q4_ISA"] = isa
    chosen = ort.SessionOptions()
    chosen.register_custom_ops_library({_kernels.__file__!r})
    return chosen
first = options({PATHS[0]!r})
options("off")   # another part of the program turns them off, for its own sessions
session = ort.InferenceSession(model, first, providers=["CPUExecutionProvider"])
x = rng.standard_normal((1, 2, 32)).astype(np.float32)
print(session.run(None, {{"x": x}})[0].shape)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "(1, 2, 16)", done.stderr[-2000:]


@pytest.mark.parametrize("value", ["OFF", "none", "avx-512", "neon"])
def test_an_unknown_isa_is_refused(monkeypatch, value, minilm_bundle):
    """EDGE_Q4_ISA names one of four paths; any other value (a typo, "OFF") was ignored and
    the best path ran, so asking to turn the kernel off silently left it on."""
    import onnxruntime as ort

    monkeypatch.setenv("EDGE_Q4_ISA", value)
    with pytest.raises(ValueError, match=f"EDGE_Q4_ISA='{value}' names no path.*avx512, avx2, "
                                         "scalar or off"):
        _kernels.isa()
    with pytest.raises(ValueError, match="EDGE_Q4_ISA"):
        kernel_library()
    with pytest.raises(Exception, match="EDGE_Q4_ISA names no path"):
        ort.SessionOptions().register_custom_ops_library(_kernels.__file__)
    # runtime.load said the bundle was bad (BundleError; `runtime verify` and an updater's
    # unpack rejected a good bundle): the process's setting is named as such
    with pytest.raises(ValueError, match=f"EDGE_Q4_ISA='{value}' names no path") as refused:
        runtime.load(minilm_bundle)
    assert not isinstance(refused.value, runtime.BundleError)
    monkeypatch.setenv("EDGE_Q4_ISA", "scalar")
    assert _kernels.isa() == "scalar"


def test_a_bad_isa_setting_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """EDGE_Q4_ISA=AVX512 (upper case): the exporter failed 30 s into a SmolLM2 export with a
    traceback calling it our bug (exit 1), and `python -m runtime verify` with a traceback."""
    from exporter.__main__ import main as export_main
    from runtime.__main__ import main as runtime_main

    pytest.importorskip("runtime._kernels")
    monkeypatch.setenv("EDGE_Q4_ISA", "AVX512")
    assert export_main(["--model", "smollm2", "--target", "arm-cpu",
                        "--output", str(tmp_path / "out")]) == 2
    assert runtime_main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("EDGE_Q4_ISA='AVX512' names no path") == 2 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
