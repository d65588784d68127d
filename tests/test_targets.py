"""Target profiles: built-ins, user files, and errors that name file, key and expectation."""

from __future__ import annotations

import dataclasses
import re

import pytest

from targets import PROFILE_DIR, Target, available_targets, load_target


def test_builtin_targets_load_into_frozen_dataclasses():
    assert {"arm-cpu", "x86-server"} <= set(available_targets())
    for name in available_targets():
        target = load_target(name)
        assert isinstance(target, Target) and target.name == name
        assert target.runtime.execution_providers[-1] == "CPUExecutionProvider"
        with pytest.raises(dataclasses.FrozenInstanceError):
            target.opset = 1


def test_every_number_in_a_builtin_profile_is_commented():
    for path in PROFILE_DIR.glob("*.toml"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^\w+\s*=\s*[-0-9.]", line):  # a numeric setting
                assert lines[i - 1].startswith("#"), f"{path.name}:{i + 1} has no comment"


def test_user_profile_path(tmp_path):
    text = (PROFILE_DIR / "arm-cpu.toml").read_text().replace("threads = 0", "threads = 4")
    (tmp_path / "my-board.toml").write_text(text)
    target = load_target(tmp_path / "my-board.toml")
    assert target.name == "my-board" and target.runtime.threads == 4
    assert target.source == str(tmp_path / "my-board.toml")


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(ValueError,
                       match=r"Unknown target 'jetsn'. Available: arm-cpu, .*x86-server"):
        load_target("jetsn")


def test_missing_profile_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"'nope.toml' does not exist\.$"):
        load_target("nope.toml")
    monkeypatch.chdir(tmp_path)   # a built-in's file name, where no such file is
    with pytest.raises(FileNotFoundError, match="'arm-cpu.toml' does not exist; the built-in "
                                                "profile is named 'arm-cpu', without .toml"):
        load_target("arm-cpu.toml")
    # no .toml given: the hint said to leave out the .toml
    for given in ("./arm-cpu", "boards/arm-cpu", "boards/arm-cpu.toml"):
        with pytest.raises(FileNotFoundError, match=rf"does not exist; built-in profiles are "
                                                    rf"named by bare name: 'arm-cpu', not "
                                                    rf"'{given}'\.$"):
            load_target(given)
    (tmp_path / "boards").mkdir()   # a directory given by mistake "does not exist"ed
    with pytest.raises(FileNotFoundError, match=r"/boards' is not a file\."):
        load_target(f"{tmp_path}/boards/")


@pytest.mark.parametrize("edit, message", [
    (("threads = 0", "threads = 0\nthreds = 2"), r"unknown key 'runtime.threds'"),
    (("threads = 0", 'threads = "two"'), r"'runtime.threads' must be int, got str 'two'"),
    (("opset = 18", "opset = true"), r"'opset' must be int, got bool"),
    (('calibration = "minmax"', 'calibration = "kl"'),
     r"'quantization.calibration' is 'kl'; expected one of minmax, percentile"),
    (('execution_providers = ["CPUExecutionProvider"]', "execution_providers = [1]"),
     r"'runtime.execution_providers' must be a list of str"),
    (("opset = 18", ""), r"missing key 'opset'"),
    (("opset = 18", "opset = 18 = 3"), r"not valid TOML"),
    # what tomllib raises besides TOMLDecodeError: RecursionError (uncaught, exit 1), and
    # Python's integer-digits limit (no file)
    (("opset = 18", "opset = 18\ndeep = " + "[" * 5000 + "]" * 5000),
     r"is not valid TOML: arrays or inline tables nested too deeply to read"),
    (("opset = 18", "opset = " + "9" * 5000),
     r"is not valid TOML: a number too long to read \(Exceeds the limit \(4300 digits\)"),
    # numbers out of range are refused when the profile is read, before any export work
    (("threads = 0", "threads = -1"), r"'runtime.threads' is -1; expected from 0 to 1024"),
    # 2**31 passed here, then failed mid-export with a traceback where onnxruntime took it
    (("threads = 0", "threads = 2147483648"),
     r"'runtime.threads' is 2147483648; expected from 0 to 1024"),
    (("batch_size = 32", "batch_size = 0"), r"'runtime.batch_size' is 0; expected 1 or more"),
    (("opset = 18", "opset = 9"), r"'opset' is 9; expected 13 or more"),
    (("smoothing_alpha = 0.7", "smoothing_alpha = nan"),
     r"'quantization.smoothing_alpha' is nan; expected from 0.0 to 1.0"),
    (("percentile = 99.999", "percentile = 1e3"),
     r"'quantization.percentile' is 1000.0; expected from 50.0 to 100.0"),
    (("latency_runs = 200", "latency_runs = 0"), r"'validation.latency_runs' is 0"),
    (("block_size = 32", "block_size = 48"), r"'generation.block_size' is 48; expected a power"),
    (("accuracy_level = 0", "accuracy_level = 7"), r"'generation.accuracy_level' is 7"),
    (('execution_providers = ["CPUExecutionProvider"]', "execution_providers = []"),
     r"'runtime.execution_providers' is empty"),
    (('execution_providers = ["CPUExecutionProvider"]',
      'execution_providers = ["CudaExecutionProvider", "CPUExecutionProvider"]'),
     r"lists 'CudaExecutionProvider', which onnxruntime does not know; its providers: .*"
     r"CUDAExecutionProvider"),
    # what only an export of that task would have tripped on, minutes in
    (("opset = 18", "opset = 99"), r"'opset' is 99; onnxruntime .* runs opsets up to \d+"),
    (('accuracy_budget = "cosine>=0.995,min-cosine>=0.98"', 'accuracy_budget = ""'),
     r"'validation.accuracy_budget' is '': The accuracy budget is empty"),
    (('accuracy_budget = "cosine>=0.995,min-cosine>=0.98"', 'accuracy_budget = "cosin>=0.9"'),
     r"'validation.accuracy_budget' is 'cosin>=0.9': Unknown accuracy metric 'cosin'"),
    (('classification_budget = "accuracy-drop<=0.3,agreement>=0.995"',
      'classification_budget = "perplexity-increase<=3"'),
     r"'validation.classification_budget' .* cannot be checked: a text-classification"),
    (('budget = "perplexity-increase<=10"', 'budget = "cosine>=0.9"'),
     r"'generation.budget' is 'cosine>=0.9': .* a text-generation export measures"),
    (('description = "', 'name = "../../etc"\ndescription = "'),
     r"'name' is '../../etc'; it names the output directory"),
    # a newline made a build/ directory with one in its name; NUL failed as "embedded null
    # byte", naming nothing
    (('description = "', 'name = "a\\nb"\ndescription = "'),
     r"'name' is 'a\\nb'; it names the output directory .*: printable characters only"),
    (('description = "', 'name = "a\\u0000b"\ndescription = "'), r"'name' is 'a\\x00b'"),
])
def test_bad_profile_names_file_key_and_expectation(tmp_path, edit, message):
    text = (PROFILE_DIR / "arm-cpu.toml").read_text()
    assert edit[0] in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ValueError, match=message) as info:
        load_target(path)
    assert str(path) in str(info.value)


def test_board_profile_extends_arm_cpu():
    board, base = load_target("rpi5"), load_target("arm-cpu")
    assert board.extends == "arm-cpu" and board.name == "rpi5"
    assert board.runtime.threads == 4 and board.runtime.batch_size == 8
    assert board.quantization == base.quantization and board.opset == base.opset
    assert board.runtime.max_sequence_length == base.runtime.max_sequence_length


def test_extends_relative_path_and_override(tmp_path):
    (tmp_path / "base.toml").write_text((PROFILE_DIR / "jetson.toml").read_text())
    (tmp_path / "orin-nano.toml").write_text(
        'extends = "base.toml"\ndescription = "Orin Nano"\n[runtime]\n# 8 GB board\n'
        'batch_size = 8\n')
    target = load_target(tmp_path / "orin-nano.toml")
    assert target.graph_rules == "tensorrt" and target.runtime.batch_size == 8
    assert target.description == "Orin Nano" and target.name == "orin-nano"


@pytest.mark.parametrize("files, message", [
    ({"a.toml": 'extends = "jetsn"\n'}, r"a.toml: 'extends' names a profile that cannot be "
                                        r"found: Unknown target 'jetsn'"),
    ({"a.toml": 'extends = "b.toml"\n', "b.toml": 'extends = "a.toml"\n'},
     r"'extends' forms a cycle \(a -> b -> a\)"),
    ({"a.toml": 'extends = "a.toml"\n'}, r"'extends' forms a cycle \(a -> a\)"),
    ({"a.toml": "extends = 3\n"}, r"'extends' must be a target name or .toml path, got 3"),
    ({"a.toml": 'extends = "arm-cpu"\n[runtime]\npipeline_stages = 0\n'},
     r"'runtime.pipeline_stages' is 0; expected 1 or more"),
])
def test_bad_extends_is_a_clear_error(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        load_target(tmp_path / "a.toml")


@pytest.mark.parametrize("body, message", [
    ("opset = 18", r"float_type \"float16\" with int8 needs opset 19 or later"),
    ("[quantization]\nactivations = \"uint8\"\nsymmetric_activations = false",
     r"graph_rules \"tensorrt\" takes symmetric int8 activations only"),
    ("[quantization]\nembeddings = \"int8-rows\"",
     r"graph_rules \"tensorrt\" needs quantization.embeddings = \"float\""),
    ("graph_optimization = \"transformer\"",
     r"graph_rules \"tensorrt\" takes standard ONNX ops only"),
])
def test_contradicting_jetson_settings_are_refused_before_any_work(tmp_path, body, message):
    # Each loaded, then failed minutes into the export (float16, or the TensorRT rules).
    from exporter import export

    profile = tmp_path / "jetson-edit.toml"
    profile.write_text(f'extends = "jetson"\n{body}\n')
    with pytest.raises(ValueError, match=message):
        export("minilm", target=profile, output=tmp_path / "out", log=lambda line: None)
    assert not (tmp_path / "out").exists()
    if body == "opset = 18":   # no int8 with --precision fp16: nothing contradicts
        from exporter import _check_encoder_profile

        _check_encoder_profile(dataclasses.replace(load_target(profile), precision="fp16"))
    if body.startswith("graph_optimization"):   # com.microsoft fusions: fp16 breaks it too
        with pytest.raises(ValueError, match=message):
            export("minilm", target=profile, precision="fp16", output=tmp_path / "out",
                   log=lambda line: None)


@pytest.mark.parametrize("body, message", [
    ("opset = 13", r"'opset' is 13; the PyTorch exporter writes an encoder's attention "
                   r"\(scaled_dot_product_attention\) from opset 14"),
    ("opset = 16", r"'opset' is 16; graph_optimization \"transformer\" writes "
                   r"LayerNormalization, an opset 17 op"),
])
def test_an_opset_the_encoder_export_cannot_write_is_refused_before_any_work(
        tmp_path, body, message, capsys):
    """Opsets 13-16 passed the profile check (13: per-channel QuantizeLinear), then failed
    with a traceback: 13 in the PyTorch exporter, 14-16 with the transformer fusions at
    quantize, 40 s in ("No Op registered for LayerNormalization with domain_version")."""
    from exporter.__main__ import main

    profile = tmp_path / "old.toml"
    profile.write_text(f'extends = "arm-cpu"\n{body}\n')
    assert main(["--target", str(profile), "--output", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert re.search(message, err) and "[load]" not in out + err, err   # before any stage
    assert not (tmp_path / "out").exists()


def test_an_empty_extends_means_none(tmp_path):
    # "" is what a manifest records for a profile that extends nothing; it was refused.
    text = (PROFILE_DIR / "arm-cpu.toml").read_text()
    assert "extends" not in text
    profile = tmp_path / "mine.toml"
    profile.write_text('extends = ""\n' + text)
    assert load_target(profile).quantization == load_target("arm-cpu").quantization


def test_a_profile_saved_with_a_bom_is_read(tmp_path):
    # Windows editors save UTF-8 with a BOM; tomllib refused it as "Invalid statement (at
    # line 1, column 1)", while --calibration / --eval files drop it.
    profile = tmp_path / "board.toml"
    profile.write_bytes(b'\xef\xbb\xbfextends = "arm-cpu"\ndescription = "mine"\n')
    assert load_target(profile).description == "mine"


@pytest.mark.parametrize("base, message", [
    ("[quantization]\ncalibration_sampels = 10\n",
     r"base.toml: unknown key 'quantization.calibration_sampels'"),
    ("[runtime]\nthreads = \"4\"\n", r"base.toml: 'runtime.threads' must be int"),
    ("[generation]\nblock_size = 48\n", r"base.toml: 'generation.block_size' is 48"),
])
def test_an_error_in_an_extended_profile_names_that_file(tmp_path, base, message):
    # They named the board profile that extends it, which holds no such key.
    (tmp_path / "base.toml").write_text(f'extends = "arm-cpu"\n{base}')
    (tmp_path / "board.toml").write_text('extends = "base.toml"\ndescription = "board"\n')
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + "/" + message):
        load_target(tmp_path / "board.toml")


def test_a_profiles_thread_limit_is_the_runtimes():
    """A profile that passes its check must load: both refuse above the same count."""
    from runtime.model import MAX_THREADS
    from targets import RANGES

    assert RANGES["runtime.threads"] == (0, MAX_THREADS)
