"""Intent classification end to end: train (briefly) -> export -> classify on the runtime."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from exporter import export
from exporter.__main__ import main
from runtime import BundleError

REPO = Path(__file__).resolve().parent.parent


def training_script():
    """samples/train_intents.py as a module."""
    sys.path.insert(0, str(REPO / "samples"))
    try:
        import train_intents
    finally:
        sys.path.pop(0)
    return train_intents


@pytest.fixture(scope="session")
def intent_model(tmp_path_factory):
    """A real MiniLM intent classifier, trained briefly by the sample training script (its
    bottom two layers frozen, which halves the time: ~55 s on 2 cores)."""
    out = tmp_path_factory.mktemp("intent") / "model"
    assert training_script().main(["--output", str(out), "--train-size", "2000", "--test-size",
                                   "300", "--epochs", "4", "--freeze-layers", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def intent_bundle(intent_model, tmp_path_factory):
    return export(str(intent_model), target="arm-cpu", evaluation=intent_model / "test.jsonl",
                  output=tmp_path_factory.mktemp("bundles") / "intent-arm-cpu",
                  log=lambda line: None)


def test_training_writes_a_plain_hf_directory(intent_model):
    config = json.loads((intent_model / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert len(config["id2label"]) >= 40
    report = json.loads((intent_model / "training.json").read_text())
    assert report["results"]["test"]["accuracy"] > 0.9
    train = {json.loads(line)["text"] for line in open(intent_model / "train.jsonl")}
    test = {json.loads(line)["text"] for line in open(intent_model / "test.jsonl")}
    assert not train & test
    # Written whole into a temp dir beside it, then renamed: nothing else is left there,
    # and training.json lists every file, so that training again may replace them.
    assert [p.name for p in intent_model.parent.iterdir()] == ["model"]
    assert set(report["files"]) == {p.name for p in intent_model.iterdir()} - {"training.json"}
    assert training_script().written_by_training(intent_model)


def test_frozen_layers_keep_the_checkpoints_weights(intent_model):
    """--freeze-layers 2: the embeddings and layers 0-1 are MiniLM's own, bit for bit; the
    layers above them were trained."""
    from safetensors.numpy import load_file

    from exporter.load import resolve_model_dir

    source = resolve_model_dir("minilm")
    original = load_file(next(source.glob("*.safetensors")))
    trained = load_file(intent_model / "model.safetensors")
    original = {k.removeprefix("bert."): v for k, v in original.items()}
    trained = {k.removeprefix("bert."): v for k, v in trained.items()}
    kept = [k for k in trained if k.startswith(("embeddings.", "encoder.layer.0.",
                                                "encoder.layer.1."))]
    changed = [k for k in trained if k.startswith(("encoder.layer.2.", "encoder.layer.5."))]
    assert len(kept) > 30 and len(changed) == 32
    for k in kept:
        np.testing.assert_array_equal(trained[k], original[k], err_msg=k)
    assert all(not np.array_equal(trained[k], original[k]) for k in changed)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "argument --epochs: must be a finite number above 0, got 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number above 0, got nan"),
    (["--test-size", "1"], "argument --test-size: must be at least 2, got 1"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--freeze-layers", "-1"], "argument --freeze-layers: must be at least 0, got -1"),
    (["--train-size", "10", "--epochs", "1"], "is not one training step"),
    ([], "'{out}' exists and holds files that this script did not write"),
])
def test_training_refuses_before_it_starts(tmp_path, capsys, args, message):
    """Bad numbers failed after loading the model (--epochs 0 in torch's scheduler) or
    never (--lr -1 trained); an --output holding the user's files had them overwritten."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("my own\n")
    with pytest.raises(SystemExit) as stop:
        training_script().main(["--output", str(out), *args])
    assert stop.value.code == 2
    assert message.format(out=out) in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert (out / "config.json").read_text() == "my own\n"


def test_training_refuses_more_frozen_layers_than_the_model_has(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        training_script().main(["--output", str(tmp_path / "model"), "--freeze-layers", "7"])
    assert stop.value.code == 2
    assert "argument --freeze-layers: the model has 6 encoder layers, got 7" in \
        capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_training_refuses_an_output_it_cannot_write_before_it_starts(tmp_path, capsys):
    """An --output under a file (or where it may not write) trained for minutes, then
    failed with a traceback when it saved."""
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit) as stop:
        training_script().main(["--output", str(tmp_path / "a-file" / "model")])
    assert stop.value.code == 2 and "a-file" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_training_refuses_an_empty_validation_set_before_it_starts(tmp_path, capsys):
    """Seed 9's one validation utterance is of an intent that 32 training utterances never
    show: validation was empty, and training.json recorded its accuracy as NaN."""
    with pytest.raises(SystemExit) as stop:
        training_script().main(["--output", str(tmp_path / "model"), "--train-size", "32",
                                "--test-size", "2", "--epochs", "1", "--seed", "9"])
    assert stop.value.code == 2
    assert "--test-size 2 gives 0 validation utterances" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_training_refuses_an_output_inside_a_bundle_before_it_starts(tmp_path, capsys):
    """An --output inside an exported bundle trained there: the bundle then held a model
    its manifest does not list, and no export would replace that bundle any more."""
    bundle = tmp_path / "minilm-arm-cpu"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(b"onnx")
    (bundle / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "files": [
            {"path": "model.onnx", "sha256": hashlib.sha256(b"onnx").hexdigest(), "bytes": 4}]}))
    # One utterance: had the output passed, this would stop (exit 2) at "1 intent(s)".
    cheap = ["--train-size", "1", "--batch-size", "1"]
    for output in (bundle / "intents", bundle / "new" / "intents"):
        with pytest.raises(SystemExit) as stop:
            training_script().main(["--output", str(output), *cheap])
        assert stop.value.code == 2
        assert f"lies inside the bundle {str(bundle)!r}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:   # the bundle itself is not this script's output
        training_script().main(["--output", str(bundle), *cheap])
    assert stop.value.code == 2 and "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["minilm-arm-cpu"]


def test_training_refuses_an_output_inside_an_earlier_output_before_it_starts(tmp_path,
                                                                               capsys):
    """An --output inside an earlier output of this script trained there: the earlier output
    then held files its training.json does not list, and training it again was refused as
    not this script's ("remove the directory if it is an old output" removed the new one)."""
    earlier = tmp_path / "intents"
    earlier.mkdir()
    (earlier / "config.json").write_text("{}")
    (earlier / "training.json").write_text(json.dumps({"files": ["config.json"]}))
    # One utterance: had the output passed, this would stop (exit 2) at "1 intent(s)".
    cheap = ["--train-size", "1", "--batch-size", "1"]
    for output in (earlier / "v2", earlier / "new" / "v2"):
        with pytest.raises(SystemExit) as stop:
            training_script().main(["--output", str(output), *cheap])
        assert stop.value.code == 2
        assert (f"lies inside {str(earlier)!r}, an earlier output of this script"
                in capsys.readouterr().err)
    assert sorted(p.name for p in earlier.iterdir()) == ["config.json", "training.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["intents"]
    with pytest.raises(SystemExit) as stop:   # beside it is fine (stops at "1 intent(s)")
        training_script().main(["--output", str(tmp_path / "v2"), *cheap])
    assert stop.value.code == 2 and "1 intent(s)" in capsys.readouterr().err


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_training_stopped_leaves_nothing_and_no_traceback(tmp_path, stop):
    """Ctrl-C while training printed a KeyboardInterrupt traceback; SIGTERM (a CI timeout)
    ended the process on the spot, where a save under way leaves its staging directory."""
    # As from a terminal: a run started in the background (`cmd &` in a script) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt for it.
    app = subprocess.Popen(
        [sys.executable, str(REPO / "samples" / "train_intents.py"), "--output",
         str(tmp_path / "model"), "--train-size", "200", "--epochs", "1000"],
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "train /" in app.stderr.readline()   # data drawn: the model loads next
        app.send_signal(stop)
        assert app.wait(timeout=120) == 128 + stop
    finally:
        app.kill()
    err = app.stderr.read()
    assert "Traceback" not in err
    if stop == signal.SIGINT:
        assert err.strip().splitlines()[-1] == "interrupted: nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_labels_round_trip_through_the_bundle(intent_model, intent_bundle):
    config = json.loads((intent_model / "config.json").read_text())
    manifest = json.loads((intent_bundle / "manifest.json").read_text())
    expected = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    assert manifest["task"] == "text-classification" and manifest["labels"] == expected
    model = runtime.load(intent_bundle)
    assert model.labels == expected
    ranked = model.classify(["set a timer for ten minutes"], top_k=5)[0]
    assert [label for label, _ in ranked][0] in expected
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6


def test_bundle_agrees_with_float(intent_model, intent_bundle):
    """The runtime's answers against PyTorch float on the held-out test file."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in open(intent_model / "test.jsonl")]
    texts = [r["text"] for r in rows]
    reference = AutoModelForSequenceClassification.from_pretrained(intent_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(intent_model)
    with torch.no_grad():
        logits = reference(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    float_labels = [reference.config.id2label[i] for i in logits.argmax(-1).tolist()]
    ours = [label for label, _ in runtime.load(intent_bundle).classify(texts)]
    agreement = np.mean([a == b for a, b in zip(ours, float_labels, strict=True)])
    truth = [r["label"] for r in rows]
    drop = np.mean([a == t for a, t in zip(float_labels, truth, strict=True)]) - \
        np.mean([a == t for a, t in zip(ours, truth, strict=True)])
    assert agreement >= 0.98 and drop <= 0.01, (agreement, drop)
    metrics = json.loads((intent_bundle / "manifest.json").read_text())["validation"]["metrics"]
    assert {"agreement", "accuracy", "float-accuracy", "accuracy-drop", "macro-f1"} <= set(metrics)



def test_jetson_quantizes_the_pooler_and_head_gemms(intent_model, tmp_path):
    """onnxruntime's basic level (jetson) turns the pooler's and the classifier's 2-D MatMul
    + Add into Gemm: those are int8 too (they stayed float), within TensorRT's rules."""
    import onnx

    from exporter.tensorrt import check

    bundle = export(str(intent_model), target="jetson", evaluation=intent_model / "test.jsonl",
                    output=tmp_path / "intent-jetson", log=lambda line: None)
    model = onnx.load(bundle / "model.onnx")
    assert check(model) == []
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2 and all(producer.get(n.input[0]) == producer.get(n.input[1])
                                   == "DequantizeLinear" for n in gemms)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {n.name for n in gemms} <= set(manifest["quantization"]["quantized_nodes"])
    assert manifest["validation"]["budget_holds"]

def test_the_staged_check_compares_graphs_on_equal_threads(intent_bundle, tmp_path):
    """The classifier's graph rounds by its thread count (1 thread against 2: 4.3e-6), and
    the export's staged check ran the single graph on all cores, each stage on its share:
    the README's x86-server export of this classifier failed, "a partitioning bug"."""
    import types

    import onnx

    from exporter.data import smart_home_utterances
    from exporter.partition import max_staged_diff, write_stages

    records = write_stages(onnx.load(intent_bundle / "model.onnx"), 2, tmp_path,
                           ["CPUExecutionProvider"])
    job = types.SimpleNamespace(workdir=intent_bundle, max_length=128)
    texts = [u.text for u in smart_home_utterances(32, split="eval")]
    assert max_staged_diff(job, intent_bundle / "model.onnx", tmp_path, records, texts) == 0


def test_classify_refuses_a_bundle_without_labels(intent_bundle, tmp_path):
    copy = Path(shutil.copytree(intent_bundle, tmp_path / "b"))
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["labels"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match='no usable "labels" list'):
        runtime.load(copy)   # at load, not at the first classify()


def test_classify_on_an_embedding_bundle_and_bad_top_k(minilm_bundle, intent_bundle):
    with pytest.raises(ValueError, match="classify\\(\\) needs a text-classification bundle"):
        runtime.load(minilm_bundle).classify(["turn on the lights"])
    model = runtime.load(intent_bundle)
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        model.classify(["turn on the lights"], top_k=0)
    with pytest.raises(ValueError, match=f"top_k must be from 1 to {len(model.labels)}, got 999"):
        model.classify(["turn on the lights"], top_k=999)
    with pytest.raises(TypeError, match="top_k must be an int, got True"):
        model.classify(["turn on the lights"], top_k=True)
    assert len(model.classify(["turn on the lights"], top_k=np.int64(3))[0]) == 3


@pytest.mark.parametrize("lines, message", [
    (['{"text": "turn on the lights", "label": "HassTurnOn"}',
      '{"text": "fly me to the moon", "label": "HassFlyToMoon"}'],
     r"test.jsonl:2: label 'HassFlyToMoon' is not one of the model's"),
    (['{"text": "turn on the lights", "label": "HassTurnOn"}', '', '{"text": oops}'],
     r"test.jsonl:3: not valid JSON"),
])
def test_bad_eval_file_is_rejected_with_its_line(intent_model, tmp_path, capsys, lines, message):
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    code = main(["--model", str(intent_model), "--target", "arm-cpu", "--eval",
                 str(tmp_path / "test.jsonl"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_model_with_two_classes_of_one_name_is_refused(intent_model, tmp_path, capsys):
    """Class 15 renamed as class 5: the export passed, reporting accuracy 95.25% for a bundle
    at 99.00% (texts labelled 15 mapped back to 5), and classify() gave one name to two
    classes."""
    model = tmp_path / "model"
    shutil.copytree(intent_model, model)
    config = json.loads((model / "config.json").read_text())
    config["id2label"]["15"] = config["id2label"]["5"]
    (model / "config.json").write_text(json.dumps(config))
    code = main(["--model", str(model), "--target", "arm-cpu", "--eval",
                 str(intent_model / "test.jsonl"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert f"classes 5 and 15 are both named {config['id2label']['5']!r}" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_intent_device_application(intent_bundle):
    out = subprocess.run([sys.executable, "samples/intent.py", str(intent_bundle),
                          "set a timer for ten minutes", "--threshold", "0.0"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.startswith("'set a timer for ten minutes' -> Hass")
    for threshold in ("1.5", "nan", "-0.1"):
        bad = subprocess.run([sys.executable, "samples/intent.py", str(intent_bundle), "hi",
                              "--threshold", threshold], capture_output=True, text=True, cwd=REPO)
        assert bad.returncode == 2
        assert f"--threshold must be from 0 to 1, got {float(threshold)}" in bad.stderr


def test_class_index_labels_take_the_models_names(tmp_path):
    """Hugging Face datasets write a ClassLabel as its index: `"label": 1` is class 1."""
    from exporter.data import read_texts
    from exporter.load import check_labels, named_labels

    lines = ['{"text": "great stuff", "label": 1}', '{"text": "meh", "label": "neg"}',
             '{"text": "no label"}', '{"text": "yes", "label": true}']
    (tmp_path / "eval.jsonl").write_text("\n".join(lines) + "\n")
    texts = named_labels(read_texts(tmp_path / "eval.jsonl"), ["neg", "pos"])
    assert [u.intent for u in texts] == ["pos", "neg", None, "True"]
    with pytest.raises(ValueError, match=r"eval.jsonl:4: label 'True' is not one of"):
        check_labels(texts, ["neg", "pos"])
    (tmp_path / "eval.jsonl").write_text('{"text": "great stuff", "label": 2}\n')
    with pytest.raises(ValueError, match=r"eval.jsonl:1: label 2 is a class index, and the "
                                         r"model's 2 labels are 0 to 1"):
        named_labels(read_texts(tmp_path / "eval.jsonl"), ["neg", "pos"])


def test_unknown_labels_in_a_calibration_file_are_refused_with_their_line(tmp_path, capsys):
    """A labelled budget is searched on the calibration file's labels; one it did not know
    sent the search to the evaluation texts (then no longer held out), saying the
    calibration texts "lack" labels."""
    import transformers

    from exporter.load import resolve_model_dir

    model = tmp_path / "classifier"   # tiny and random: refused before anything runs it
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, id2label={0: "neg", 1: "pos"},
                                     architectures=["BertForSequenceClassification"])
    transformers.BertForSequenceClassification(config).save_pretrained(model)
    shutil.copy(resolve_model_dir("minilm") / "tokenizer.json", model)
    lines = ['{"text": "great stuff", "label": 1}', '{"text": "awful", "label": "bad"}']
    (tmp_path / "cal.jsonl").write_text("\n".join(lines) + "\n")   # 1: "pos", the index
    (tmp_path / "eval.jsonl").write_text('{"text": "fine work", "label": 1}\n')
    code = main(["--model", str(model), "--target", "arm-cpu", "--calibration",
                 str(tmp_path / "cal.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
                 "--output", str(tmp_path / "out")])
    assert code == 2
    assert re.search(r"cal.jsonl:2: label 'bad' is not one of the model's 2 labels",
                     capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
