"""The benchmark scripts refuse bad arguments before any work, as scripts are run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, args, message", [
    ("bench_tokenizer.py", ["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    ("bench_encoder.py", ["--threads", "-1"], "argument --threads: must be at least 1, got -1"),
    ("bench_encoder.py", ["--rounds", "2.5"], "argument --rounds: expected an integer, got '2.5'"),
    ("bench_encoder.py", ["--target", "nosuch"], "argument --target: Unknown target 'nosuch'"),
    ("bench_encoder.py", ["--classifier", "."], "argument --classifier: '.' has no test.jsonl"),
    ("bench_decoder.py", ["--new-tokens", "0"], "argument --new-tokens: must be at least 1"),
    ("bench_decoder.py", ["--int4", "missing"], "argument --int4: Bundle directory 'missing' "
                                                "does not exist"),
    ("bench_partition.py", ["--bundle", "tests"], "argument --bundle: tests is not a bundle"),
    ("bench_gpu.py", ["--bundle", "tests"], "argument --bundle: tests is not a bundle"),
    ("bench_gpu.py", ["--stages", "0"], "argument --stages: must be at least 1, got 0"),
    ("bench_gpu.py", ["--json", "tests"], "argument --json: 'tests' is a directory"),
    ("bench_partition.py", ["--batch-size", "0"], "argument --batch-size: must be at least 1"),
    ("bench_compression.py", ["--heal-steps", "-1"], "argument --heal-steps: must be at least 0"),
    ("bench_compression.py", ["--model", "tests"], "argument --model: Model directory 'tests' "
                                                   "has no config.json"),
    ("bench_tokenizer.py", ["--json", "tests"], "argument --json: 'tests' is a directory"),
    ("bench_encoder.py", ["--output", "tests"], "argument --output: 'tests' is a directory"),
    ("bench_compression.py", ["--output", "tests"], "argument --output: 'tests' is a directory"),
    ("bench_tokenizer.py", ["--json", "README.md/out.json"],
     "argument --json: 'README.md/out.json': 'README.md' is a file, not a directory"),
    ("bench_encoder.py", ["--output", "/proc/out.json"],
     "argument --output: '/proc/out.json': cannot write in '/proc'"),
    ("bench_encoder.py", ["--model", "smollm2"], "argument --model: 'smollm2' is a decoder; "
                                                 "this benchmark measures encoders"),
    ("bench_partition.py", ["--json", "tests"], "argument --json: 'tests' is a directory"),
    ("bench_decoder.py", ["--json", "/proc/out.json"],
     "argument --json: '/proc/out.json': cannot write in '/proc'"),
])
def test_bad_arguments_are_refused_before_any_work(script, args, message):
    """Each was accepted before, then failed after minutes of exporting, or timed nothing
    (`--rounds 0` ended in a KeyError)."""
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_a_result_file_that_is_a_directory_is_refused_before_any_work(tmp_path):
    """bench_compression writes <output>.json, .md and .png: one of them a directory failed
    the run at its end; and a probe of where results go leaves nothing behind."""
    (tmp_path / "run.md").mkdir()
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_compression.py"),
                          "--output", str(tmp_path / "run")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"writes {str(tmp_path / 'run.md')!r}, which is a directory" in run.stderr
    sys.path.insert(0, str(REPO))
    from benchmarks._args import result_file

    assert result_file(str(tmp_path / "new" / "deeper" / "out.json")).name == "out.json"
    assert result_file(str(tmp_path / "out.json")).name == "out.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.md"]


def test_result_files_are_written_whole(tmp_path, monkeypatch):
    # A run stopped while writing leaves the earlier result, never a truncated file.
    sys.path.insert(0, str(REPO))
    from benchmarks._args import write_result

    result = tmp_path / "results" / "bench.json"
    write_result(result, '{"rows": 1}\n')
    assert result.read_text() == '{"rows": 1}\n'

    def stopped(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_result(result, '{"rows": 2}\n')
    assert result.read_text() == '{"rows": 1}\n'
    assert [p.name for p in result.parent.iterdir()] == ["bench.json"]


def test_compression_outputs_with_dots_do_not_collide():
    # `--output r/run.1` and `--output r/run.2` both wrote r/run.json (Path.with_suffix)
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_compression

    one = bench_compression.result_paths(Path("r/run.1"))
    two = bench_compression.result_paths(Path("r/run.2"))
    assert one[".json"] == Path("r/run.1.json") and two[".json"] == Path("r/run.2.json")
    assert bench_compression.result_paths(Path("r/x.json"))[".md"] == Path("r/x.md")


def test_llama_cpp_prefill_gets_the_same_threads(monkeypatch):
    # llama-cpp-python's n_threads_batch (prompt evaluation) defaults to every CPU
    import types

    seen = {}

    class Llama:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=Llama))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_decoder

    bench_decoder.llama_cpp_variant(types.SimpleNamespace(gguf=__file__, context=64, threads=1))
    assert seen["n_threads"] == 1 and seen.get("n_threads_batch") == 1


def test_partition_refuses_a_staged_bundle(tmp_path, monkeypatch):
    # it was accepted, then exporter.partition.restage ended the run in a ValueError traceback
    import argparse

    sys.path.insert(0, str(REPO))
    from benchmarks import _args

    monkeypatch.setattr(_args, "_bundle", lambda text: None)   # a manifest that reads
    (tmp_path / "manifest.json").write_text('{"task": "feature-extraction", "stages": '
                                            '[{"file": "stage0.onnx"}, {"file": "stage1.onnx"}]}')
    with pytest.raises(argparse.ArgumentTypeError, match="already cut into 2 stages"):
        _args.single_graph_bundle(str(tmp_path))


def test_decoder_fast_profile_extends_a_relative_toml(tmp_path, monkeypatch):
    # `--target mine.toml` wrote build/mine.toml-fast.toml with extends = "mine.toml", which
    # resolves against build/: the run died there, after exporting the int4 and int8 bundles
    # (an absolute path wrote the profile beside the user's file, bundles in build/smollm2-/...)
    import exporter

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_decoder

    from targets import load_target

    exported = {}

    def export(model, *, target, output, precision=None):
        exported[output] = load_target(target)   # what the exporter would read first

    monkeypatch.setattr(exporter, "export", export)
    monkeypatch.setattr(bench_decoder, "ROOT", tmp_path / "repo")
    (tmp_path / "mine.toml").write_text('extends = "arm-cpu"\n')
    monkeypatch.chdir(tmp_path)
    for target in ("mine.toml", str(tmp_path / "mine.toml")):
        out = bench_decoder.ensure_bundle(None, "fast", target)
        assert out == tmp_path / "repo" / "build" / "smollm2-mine-fast"
        assert exported[out].generation.accuracy_level == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.toml", "repo"]


def fake_decoder_run(tmp_path, monkeypatch, *, failing_round: tuple[str, int] | None = None,
                     float_graph: bool = True, argv: tuple = (), built: dict | None = None):
    """bench_decoder.main() with its exports and its variant processes replaced: each
    variant reports fixed figures, except `failing_round` (variant, round), which crashes.
    `float_graph`: the float ONNX graph is already built. `argv`: more arguments (the fake
    bundles, jetson exports, are tmp_path / "int4", "int8" and "fast"). `built`: the
    precision of the bundle that build/ holds for a flag, where it is another's. The result's
    "commands" are the variant processes' command lines."""
    import json
    import subprocess
    import types

    from tokenizers import Tokenizer, models

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_decoder

    from exporter import gguf

    for name in ("int4", "int8", "fast"):
        fake_decoder_bundle(tmp_path / name, (built or {}).get(name, name))
    Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(
        str(tmp_path / "int4" / "tokenizer.json"))
    sys.path.insert(0, str(REPO))
    from benchmarks import _args

    monkeypatch.setattr(_args, "_bundle", lambda text: None)   # a manifest that reads
    (tmp_path / "build").mkdir()
    if float_graph:
        (tmp_path / "build" / "smollm2-float.onnx").write_bytes(b"")
    monkeypatch.setattr(bench_decoder, "ROOT", tmp_path)
    monkeypatch.setattr(bench_decoder, "ensure_bundle",
                        lambda path, precision, target: Path(path or tmp_path / precision))
    monkeypatch.setattr(gguf, "packaged_gguf", lambda name: tmp_path / "smollm2.gguf")
    monkeypatch.setattr(gguf, "checkpoint", lambda path: tmp_path / "checkpoint")
    monkeypatch.setattr(bench_decoder.time, "sleep", lambda s: None)
    speed = {"transformers eager fp32": 20.0, "our int4 bundle": 80.0}
    seen: dict[str, int] = {}
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        mode, variant = command[2], command[3]
        seen[variant] = seen.get(variant, 0) + 1
        if variant not in speed or (variant, seen[variant]) == failing_round:
            return subprocess.CompletedProcess(command, 1, "", "MemoryError\n")
        figures = {"prefill_128_ms": 100.0, "decode_tokens_per_s": speed[variant],
                   "greedy_tokens": [1, 2, 3, 4]}
        if mode == "--one":
            figures |= {"peak_rss_mb": 300.0, "perplexity": 20.0 * speed[variant] / 20.0,
                        "size_mb": 500.0 * 20.0 / speed[variant]}
        return subprocess.CompletedProcess(command, 0, json.dumps(figures) + "\n", "")

    monkeypatch.setattr(bench_decoder, "subprocess", types.SimpleNamespace(run=run))
    monkeypatch.setattr(sys, "argv", ["bench_decoder.py", "--rounds", "3", "--new-tokens", "4",
                                      *argv])
    assert bench_decoder.main() == 0
    path = (Path(argv[list(argv).index("--json") + 1]) if "--json" in argv
            else tmp_path / "benchmarks" / "results" / "bench_decoder.json")
    return json.loads(path.read_text()) | {"commands": commands}


# bench_decoder's flag -> the quantization record its bundle's manifest holds
DECODER_QUANTIZATION = {
    "int4": {"weights": "int4", "accuracy_level": 0, "int8_accuracy_level": 4,
             "activations": "float32"},
    "int8": {"weights": "int8", "accuracy_level": 0, "int8_accuracy_level": 4,
             "activations": "float32"},
    "fast": {"weights": "int4", "accuracy_level": 4, "int8_accuracy_level": 4,
             "activations": "float32"},
}


def fake_decoder_bundle(path: Path, precision: str) -> Path:
    """A jetson decoder bundle's manifest, quantized as bench_decoder's --`precision` takes
    (its files are not there: patch _args._bundle)."""
    import json

    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({
        "task": "text-generation", "target": {"name": "jetson"},
        "quantization": {"mode": "weight-only", **DECODER_QUANTIZATION[precision]}}))
    return path


def test_decoder_keeps_a_variant_whose_later_round_failed(tmp_path, monkeypatch, capsys):
    # a crash in timing round 3 dropped the variant's perplexity, size, RSS and two good
    # rounds from the table and the JSON, and reported it as "not measured"
    result = fake_decoder_run(tmp_path, monkeypatch, failing_round=("our int4 bundle", 3))
    int4 = result["results"]["our int4 bundle"]
    assert int4["perplexity"] == 80.0 and len(int4["rounds"]) == 2
    assert "MemoryError" in int4["failed_rounds"][0]
    assert "our int4 bundle" not in result["skipped"]
    assert "| our int4 bundle |" in capsys.readouterr().out



def test_decoder_json_has_the_tables_figures(tmp_path, monkeypatch, capsys):
    # the ratios, the perplexity drift and the greedy agreement were printed, never saved
    result = fake_decoder_run(tmp_path, monkeypatch)
    assert result["new_tokens"] == 4 and result["rounds"] == 3
    int4 = result["results"]["our int4 bundle"]
    assert int4["vs_eager"]["decode_tokens_per_s"] == 4.0
    assert int4["perplexity_vs_float_percent"] == 300.0
    assert int4["greedy_equal_to_eager"] == 4
    assert "vs_llama_cpp" not in int4   # llama.cpp was not measured (not installed here)
    assert "| our int4 bundle | 125.0 | 100.0 | 80.0 | 4.00 |" in capsys.readouterr().out


def test_decoder_refuses_a_bundle_in_build_of_another_precision(tmp_path, monkeypatch,
                                                               capsys):
    # a build/smollm2-x86-server-int4 exported when x86-server's int4 ran at accuracy level 4
    # was reused as "our int4 bundle"
    with pytest.raises(SystemExit) as refused:
        fake_decoder_run(tmp_path, monkeypatch, built={"int4": "fast"})
    assert refused.value.code == 2
    assert "the int4 bundle" in capsys.readouterr().err


def test_decoder_variants_get_the_windows_and_the_json_names_the_cpu(tmp_path, monkeypatch):
    # --window/--windows were recorded in the JSON, but every variant's process measured
    # perplexity on 8 x 256 tokens; "cpu" was platform.processor(), empty on Linux
    out = tmp_path / "elsewhere" / "decoder.json"
    result = fake_decoder_run(tmp_path, monkeypatch, argv=["--window", "64", "--windows", "2",
                                                           "--json", str(out)])
    assert result["perplexity_windows"] == [2, 64] and result["cpu"]
    for command in result["commands"]:
        assert command[command.index("--window") + 1] == "64"
        assert command[command.index("--windows") + 1] == "2"


@pytest.mark.parametrize("script", ["bench_decoder", "bench_partition"])
def test_an_unwritable_default_result_file_is_refused_before_any_work(tmp_path, monkeypatch,
                                                                      capsys, script):
    # both wrote benchmarks/results/<script>.json only at the end of the run
    sys.path.insert(0, str(REPO / "benchmarks"))
    import importlib

    bench = importlib.import_module(script)
    (tmp_path / "benchmarks").write_text("a file where the results directory goes")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])
    with pytest.raises(SystemExit) as refused:
        bench.main()
    assert refused.value.code == 2
    assert "argument --json" in capsys.readouterr().err


def test_decoder_json_names_the_target_of_the_bundles_it_measured(tmp_path, monkeypatch):
    # with every bundle given, the JSON said "target": "arm-cpu" (the --target default, used
    # for nothing) for bundles exported for another profile
    given = fake_decoder_run(tmp_path / "given", monkeypatch, argv=[
        a for name in ("int4", "int8", "fast") for a in (f"--{name}",
                                                          str(tmp_path / "given" / name))])
    assert "target" not in given
    assert {b["target"] for b in given["bundles"].values()} == {"jetson"}
    assert {name: b["precision"] for name, b in given["bundles"].items()} == \
        DECODER_QUANTIZATION
    exported = fake_decoder_run(tmp_path / "exported", monkeypatch)   # --target arm-cpu
    assert exported["target"] == "arm-cpu" and exported["bundles"]["int4"]["target"] == "jetson"


@pytest.mark.parametrize("lines, message", [
    (['{"text": "turn on the lights", "label": "HassTurnOn"}'] * 20,
     "test.jsonl holds 20 texts; the benchmark times batches of 32"),
    (['{"text": "turn on the lights", "label": "HassTurnOn"}'] * 40 + ['{"text": "hi"}'],
     'test.jsonl:41 has no "label"'),
])
def test_encoder_refuses_a_classifier_test_set_it_cannot_score(tmp_path, lines, message):
    # 20 test texts (train_intents.py --test-size 20) ended in a ZeroDivisionError, an
    # unlabelled one in a ValueError: both after exporting the encoder and the classifier
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_encoder.py"),
                          "--classifier", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr


def test_compression_results_are_written_without_matplotlib(tmp_path, monkeypatch):
    # the plot came first and needs matplotlib, which the exporter treats as optional: an
    # ImportError at the very end lost the table and the JSON of the whole run
    import argparse
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_compression

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    row = {"variant": "int8", "healed": False, "parameters": 22_713_216, "layers": 6,
           "model_bytes": 23_582_518, "gzip_bytes": 20_944_556,
           "quality": {"cosine": 0.99781}, "latency_ms_p50": 2.4, "speedup_vs_int8": 1.0}
    args = argparse.Namespace(output=tmp_path / "run", target="arm-cpu", threads=1, rounds=1,
                              runs=300, heal_steps=0)
    bench_compression.write([row], {}, args, "minilm")
    assert json.loads((tmp_path / "run.json").read_text())["rows"][0]["variant"] == "int8"
    table = (tmp_path / "run.md").read_text()
    assert "| int8 | no | 6 |" in table and "run.png" not in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.md"]


def test_decoder_float_graph_is_written_whole(tmp_path, monkeypatch):
    # stopped while saving, it left a truncated smollm2-float.onnx that later runs reused
    import types

    import onnx
    import transformers

    from exporter import decoder_graph

    model = types.SimpleNamespace(config=None, eval=lambda: model)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: model)
    monkeypatch.setattr(decoder_graph.DecoderShape, "from_config", lambda *args: None)
    monkeypatch.setattr(decoder_graph, "build", lambda *args: None)
    monkeypatch.setattr(decoder_graph, "float_weights", lambda *args: None)

    def stopped(proto, path):
        Path(path).write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", stopped)
    with pytest.raises(KeyboardInterrupt):
        fake_decoder_run(tmp_path, monkeypatch, float_graph=False)
    assert list((tmp_path / "build").iterdir()) == []


def test_encoder_gives_our_ratios_to_each_peer():
    # the table's ratios were all to ORT fp32: ours against the best peer (dynamic int8) was
    # worked out by hand for the README
    import types

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_encoder as be

    def row(name, size, b1, b32, error=""):
        variant = None if error else be.Variant([], lambda feeds: None, note=name)
        rounds = [] if error else [{"b1_p50": b1 + 1, "b32_mean": b32}, {"b1_p50": b1,
                                                                         "b32_mean": b32 + 1}]
        return be.Row(name, variant, error=error, size_bytes=size, rounds=rounds)

    rows = [row("PyTorch eager fp32", 90, 8.0, 60.0), row("ORT fp32", 90, 2.5, 47.0),
            row("ORT dynamic int8", 23, 1.25, 20.0), row("Optimum static int8", 0, 0, 0,
                                                         error="ImportError: optimum"),
            row("ORT quantize_static", 23, 16.0, 80.0), row("our bundle", 23, 1.0, 16.0)]
    bench = types.SimpleNamespace(rows=rows, export_s=1.0, job=types.SimpleNamespace(timings={}),
                                  comparison=types.SimpleNamespace(reference="cosines"))
    versus = be.section(bench)["ours_vs_peers"]
    assert versus == {"ORT dynamic int8": {"size": 1.0, "b1_p50": 0.8, "b32_mean": 0.8},
                      "ORT quantize_static": {"size": 1.0, "b1_p50": 0.062, "b32_mean": 0.2}}
    assert "our bundle vs ORT dynamic int8: size 1.00x, b1 p50 0.80x, b32 0.80x" in \
        be.versus_lines(rows)


@pytest.mark.parametrize("script", ["bench_encoder.py", "bench_compression.py"])
@pytest.mark.parametrize("architecture, message", [
    ("BertForSequenceClassification", "is a text-classification checkpoint; --model takes a "
                                      "sentence encoder (feature-extraction): give it as "
                                      "--classifier DIR"),
    ("LlamaForCausalLM", "is a text-generation checkpoint"),
])
def test_model_must_be_an_encoder_checkpoint(tmp_path, script, architecture, message):
    # a classifier given as --model was exported in full, then the embedding comparison
    # ended in KeyError: 'mode' (its job has no pooling)
    (tmp_path / "config.json").write_text(f'{{"architectures": ["{architecture}"]}}')
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / script),
                          "--model", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr


def test_decoder_refuses_an_encoder_bundle(tmp_path, monkeypatch):
    # `--int4 build/minilm-arm-cpu` was taken: its WordPiece tokenizer then made the prompt
    # and the perplexity text of every variant, transformers and llama.cpp included
    import argparse

    sys.path.insert(0, str(REPO))
    from benchmarks import _args

    monkeypatch.setattr(_args, "_bundle", lambda text: None)   # a manifest that reads
    (tmp_path / "manifest.json").write_text('{"task": "feature-extraction"}')
    with pytest.raises(argparse.ArgumentTypeError, match="is a feature-extraction bundle"):
        _args.decoder_bundle("int4")(str(tmp_path))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_decoder

    monkeypatch.setattr(sys, "argv", ["bench_decoder.py", "--int8", str(tmp_path)])
    with pytest.raises(SystemExit) as refused:   # the script's --int4/--int8/--fast use it
        bench_decoder.main()
    assert refused.value.code == 2
    bundle = fake_decoder_bundle(tmp_path / "int4", "int4")
    assert _args.decoder_bundle("int4")(str(bundle)) == bundle


@pytest.mark.parametrize("flag, given, message", [
    ("int8", "int4", "holds int4 weights at accuracy_level 0; --int8 takes 8-bit weights "
                     "(--precision int8); give it as --int4"),
    ("int4", "fast", "holds int4 weights at accuracy_level 4; --int4 takes 4-bit weights with "
                     "exact activations"),
    ("fast", "int4", "--fast takes 4-bit weights with int8 activations (accuracy_level 4); "
                     "give it as --int4"),
    ("int4", "int8", "holds int8 weights at accuracy_level 0; --int4 takes"),
])
def test_decoder_refuses_a_bundle_of_another_precision(tmp_path, monkeypatch, capsys, flag,
                                                       given, message):
    # one int4 bundle given as --int4, --int8 and --fast was measured three times, its rows
    # labelled "our int8 bundle" and "our int4 fast"
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_decoder

    from benchmarks import _args

    monkeypatch.setattr(_args, "_bundle", lambda text: None)   # a manifest that reads
    bundle = fake_decoder_bundle(tmp_path / given, given)
    monkeypatch.setattr(sys, "argv", ["bench_decoder.py", f"--{flag}", str(bundle)])
    with pytest.raises(SystemExit) as refused:
        bench_decoder.main()
    assert refused.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("script, prefix", [("bench_partition.py", "bench_partition."),
                                            ("bench_encoder.py", "bench_encoder."),
                                            ("bench_compression.py", "bench_compression.")])
def test_a_run_stopped_by_sigterm_removes_its_work_directory(tmp_path, script, prefix):
    # a CI timeout or `kill` ended the run on the spot: its /tmp/bench_* work directory
    # (exported models, hundreds of MB) stayed behind, as Ctrl-C's did not
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / script)], cwd=REPO,
                            env={**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(prefix) for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        time.sleep(1.0)   # at work in it
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    # (a signal landing in Python code a C++ library called aborts the process: SIGABRT, the
    # work directory removed all the same, by the handler; see the test below)
    assert proc.returncode in (128 + signal.SIGTERM, -signal.SIGABRT), proc.stderr.read()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_the_signal_handler_removes_the_work_directory_before_anything_unwinds(tmp_path,
                                                                               monkeypatch):
    """SIGTERM inside Python code that torch's C++ called (its first import, in CI) raised
    SystemExit where it could not unwind: the process aborted ("terminate called after
    throwing an instance of 'pybind11::error_already_set'"), no `finally` ran, and the work
    directory stayed. The handler removes it before it raises."""
    import signal

    from benchmarks import _args

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(_args.tempfile, "tempdir", None)   # (read TMPDIR again)
    before = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGTERM", "SIGHUP")}
    try:
        _args.stop_on_signals()
        work = _args.work_directory("bench_x.")
        (work / "model.onnx").write_bytes(b"x" * 1000)
        assert work.parent == tmp_path
        with pytest.raises(SystemExit) as stop:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert stop.value.code == 128 + signal.SIGTERM and not work.exists()
    finally:
        for name, handler in before.items():
            signal.signal(getattr(signal, name), handler)


def test_gpu_benchmark_without_cuda_stops_at_once(minilm_bundle):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"),
                          "--bundle", str(minilm_bundle)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "has no CUDAExecutionProvider" in run.stderr and "onnxruntime-gpu" in run.stderr


def test_gpu_benchmark_compares_each_variant_with_the_cpu_and_float(minilm_bundle, tmp_path):
    """What it measures, run here where the GPU variants fall back to the CPU: every variant
    has the CPU's embeddings, PyTorch float's cosine is the validation's, and the fallback's
    warning is kept in the row."""
    import argparse
    import json

    sys.path.insert(0, str(REPO))
    from benchmarks import _args, bench_gpu

    out = tmp_path / "gpu.json"
    args = argparse.Namespace(bundle=[minilm_bundle], texts=16, batch_size=8, rounds=1,
                              stages=2, new_tokens=8, json=out)
    work = _args.work_directory("bench_gpu_test.")
    try:
        assert bench_gpu.measure(args, work) == 0
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["cpu", "gpu", "gpu, 2 stages"]
    assert [len(r["providers"]) for r in rows] == [1, 1, 2]
    for row in rows:
        assert row["cosine_to_cpu"][1] > 0.9999 and row["texts_per_s"] > 0
        assert 0.97 < row["cosine_to_float"][1] <= row["cosine_to_float"][0] <= 1.0
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert any("CUDAExecutionProvider not in this onnxruntime build" in w
                   for w in rows[1]["warnings"])


def test_gpu_benchmark_checks_a_decoders_cache_from_step_to_step(smollm2_bundle, monkeypatch):
    """Each device's incremental logits against a whole-sequence forward: they agree where the
    cache is carried, and not where each step forgets it (what CUDA did while the cache was
    bound as host memory)."""
    sys.path.insert(0, str(REPO))
    from benchmarks import bench_gpu
    from runtime import generate

    rows = bench_gpu.decoder_rows(smollm2_bundle, 12)
    assert [r["variant"] for r in rows] == ["cpu", "gpu"]
    for row in rows:
        assert row["incremental_argmax_agreement"] >= 0.9 and row["perplexity"] > 1
        assert row["decode_tokens_per_s"] > 0 and row["text"].strip()
    assert rows[0]["greedy_tokens_as_cpu"] == 12

    forward = generate.Decoder.forward

    def forgetting(self, ids, *, all_logits=False):
        if len(ids) == 1:
            self.reset()   # the step sees no earlier token
        return forward(self, ids, all_logits=all_logits)

    monkeypatch.setattr(generate.Decoder, "forward", forgetting)
    broken = bench_gpu.decoder_rows(smollm2_bundle, 12)
    assert broken[0]["incremental_argmax_agreement"] < 0.5


def two_layer_encoder(path: Path) -> Path:
    """A BERT config.json of 2 layers (no weights: what the checks before any work read)."""
    import json

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "model_type": "bert", "num_hidden_layers": 2,
        "num_attention_heads": 12, "hidden_size": 384, "intermediate_size": 1536}))
    return path


def test_compression_refuses_a_variant_the_model_cannot_take(tmp_path):
    # "drop 3" of a 2-layer model failed with a ValueError after building the variants
    # before it, and wrote nothing
    model = two_layer_encoder(tmp_path / "model")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_compression.py"),
                          "--model", str(model), "--only", "drop 1", "drop 3",
                          "--output", str(tmp_path / "run")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "'drop 3' (Dropping 3 of 2 layers would leave no layer; drop at most 1)" in run.stderr
    assert "--only 'int8' 'drop 1'" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_compression_takes_a_classifier_or_a_model_not_both(tmp_path):
    # --classifier DIR silently replaced --model
    (tmp_path / "test.jsonl").write_text("")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_compression.py"),
                          "--classifier", str(tmp_path), "--model", "minilm"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "argument --model: not allowed with argument --classifier" in run.stderr


def test_compression_keeps_the_rows_measured_when_a_variant_fails(tmp_path, monkeypatch):
    """A variant that fails while building is recorded with its reason and the rows measured
    are written (its own too, where its healing failed); each variant is built once however
    often --only names it; the JSON holds the run's settings and the table the real host."""
    import json
    import os

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_compression

    from exporter import validate

    built = []

    def build_variant(job, name, tmp, args):   # "drop 2" fails healing, "heads 0.5" at once
        built.append(name)
        if name != "heads 0.5":
            yield {"variant": name, "healed": False, "parameters": 1, "layers": 6,
                   "model_bytes": 1, "gzip_bytes": 1, "quality": {"cosine": 0.99},
                   "session": None}
        if name in ("drop 2", "heads 0.5"):
            raise RuntimeError("out of memory")

    monkeypatch.setattr(bench_compression, "build_variant", build_variant)
    monkeypatch.setattr(validate, "latency_ms", lambda job, sessions, *a, **k: {
        name: {"p50": 2.0 if name.startswith("int8") else 1.0} for name in sessions})
    out = tmp_path / "run"
    assert bench_compression.main(["--only", "drop 1", "drop 1", "drop 2", "heads 0.5",
                                   "--heal-steps", "0", "--rounds", "1",
                                   "--output", str(out)]) == 1
    assert built == ["int8", "drop 1", "drop 2", "heads 0.5"]
    result = json.loads((tmp_path / "run.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["int8", "drop 1", "drop 2"]
    assert result["rows"][1]["speedup_vs_int8"] == 2.0
    assert result["failed"] == {"drop 2, healed": "RuntimeError: out of memory",
                                "heads 0.5": "RuntimeError: out of memory"}
    assert result["model"] == "minilm" and result["threads"] == 1 and result["rounds"] == 1
    assert result["heal_steps"] == 0 and result["cpu"] and result["versions"]["onnxruntime"]
    table = (tmp_path / "run.md").read_text()
    assert f"{os.cpu_count()} CPUs visible" in table and "2-core" not in table
    assert "heads 0.5: failed: RuntimeError: out of memory" in table


def gpu_main(monkeypatch, bundle: Path, *argv: str):
    """bench_gpu.main() on `bundle`, as if this onnxruntime had CUDA and no GPU were
    visible."""
    import onnxruntime

    from benchmarks import _args, bench_gpu
    from runtime import stages

    monkeypatch.setattr(_args, "_bundle", lambda text: None)   # a manifest that reads
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(stages, "visible_gpus", lambda: 0)
    with pytest.raises(SystemExit) as stopped:
        bench_gpu.main(["--bundle", str(bundle), "--json", str(bundle / "out.json"), *argv])
    return stopped.value.code


def test_gpu_benchmark_without_a_visible_gpu_stops_at_once(tmp_path, monkeypatch):
    # with CUDAExecutionProvider in onnxruntime and no GPU visible, every "gpu" row ran on
    # the CPU and was written as a GPU's
    sys.path.insert(0, str(REPO))
    (tmp_path / "manifest.json").write_text('{"task": "feature-extraction"}')
    code = gpu_main(monkeypatch, tmp_path)
    assert "this process sees no GPU" in code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_gpu_benchmark_refuses_new_tokens_past_the_context(tmp_path, monkeypatch, capsys):
    # --new-tokens 2100 on a 2048-token bundle failed with ContextError after the CPU's run
    import json
    import shutil

    sys.path.insert(0, str(REPO))
    from exporter.load import resolve_model_dir

    shutil.copyfile(resolve_model_dir("minilm") / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "manifest.json").write_text(json.dumps({
        "task": "text-generation", "max_length": 2048,
        "generation": {"context_length": 2048}}))
    assert gpu_main(monkeypatch, tmp_path, "--new-tokens", "2100") == 2
    said = capsys.readouterr().err
    assert "--new-tokens 2100: " in said and "give --new-tokens 2040 at most" in said
    assert "sees no GPU" in gpu_main(monkeypatch, tmp_path, "--new-tokens", "2040")
