"""Size / latency budget: the exporter picks the compression strength, measured on real
MiniLM exports, and refuses what it cannot meet."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from exporter import BudgetError, Compression, export
from exporter.__main__ import main
from exporter.data import smart_home_utterances
from exporter.strength import describe, ladder, limit_failures
from targets import load_target


@pytest.fixture(scope="module")
def texts():
    """Small calibration / evaluation sets: each candidate is a real export."""
    return ([u.text for u in smart_home_utterances(100, split="calibration")],
            [u.text for u in smart_home_utterances(60, split="eval")])


# --- refusals before any work ---

@pytest.mark.parametrize("line, message", [
    ("max_model_mb = -1", "'validation.max_model_mb' must be a finite number above 0, got -1"),
    ("max_model_mb = 0", "must be a finite number above 0, got 0"),
    ('max_latency_ms = "5"',
     "'validation.max_latency_ms' must be a finite number above 0, got '5'"),
    ("max_latency_ms = true", "must be a finite number above 0, got True"),
    ("max_latency_ms = inf", "must be a finite number above 0, got inf"),
])
def test_profile_refuses_bad_budgets(tmp_path, line, message):
    path = tmp_path / "board.toml"
    path.write_text(f'extends = "arm-cpu"\n[validation]\n{line}\n')
    with pytest.raises(ValueError, match=message):
        load_target(path)


def test_profile_budget_is_read_and_unset_by_default(tmp_path):
    assert load_target("arm-cpu").validation.max_model_mb is None
    assert load_target("arm-cpu").validation.max_latency_ms is None
    path = tmp_path / "board.toml"
    path.write_text('extends = "arm-cpu"\n[validation]\nmax_model_mb = 15\n'
                    'max_latency_ms = 2.5\n')
    v = load_target(path).validation
    assert (v.max_model_mb, v.max_latency_ms) == (15.0, 2.5)


def test_cli_refuses_bad_budgets(capsys):
    assert main(["--target", "arm-cpu", "--max-model-mb", "-3"]) == 2
    assert "--max-model-mb must be a finite number above 0, got -3.0" in capsys.readouterr().err
    assert main(["--target", "arm-cpu", "--max-latency-ms", "0"]) == 2
    assert "--max-latency-ms must be a finite number above 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--target", "arm-cpu", "--max-model-mb", "small"])
    assert e.value.code == 2
    assert "--max-model-mb: invalid float value: 'small'" in capsys.readouterr().err
    assert main(["--target", "arm-cpu", "--max-model-mb", "15", "--drop-layers", "1"]) == 2
    assert "picks the compression strength itself" in capsys.readouterr().err


def test_decoders_refuse_a_budget():
    with pytest.raises(ValueError, match="compression of encoders only"):
        export("smollm2", target="arm-cpu", max_model_mb=50)


def test_ladder_is_cumulative_weakest_first():
    rungs = ladder(6, heal_steps=50)
    assert describe(rungs[0]) == "none" and rungs[0].heal_steps == 0
    assert all(r.heal_steps == 50 for r in rungs[1:])
    for weaker, stronger in zip(rungs, rungs[1:], strict=False):
        fields = ("drop_layers", "prune_ffn", "prune_heads")
        assert all(getattr(stronger, f) >= getattr(weaker, f) for f in fields)
        assert any(getattr(stronger, f) > getattr(weaker, f) for f in fields)
    assert max(r.drop_layers for r in rungs) == 3   # at most half the layers
    # a 4-stage pipeline keeps a layer per stage; 6 stages: only FFN and head pruning
    assert max(r.drop_layers for r in ladder(6, keep=4)) == 2
    assert {r.drop_layers for r in ladder(6, keep=6)} == {0}


def test_limit_failures():
    v = dataclasses.replace(load_target("arm-cpu").validation, max_model_mb=15.0,
                            max_latency_ms=1.0)
    assert limit_failures(v, model_bytes=15_000_000, latency_ms=1.0) == []
    broken = limit_failures(v, model_bytes=15_000_001, latency_ms=1.2)
    assert broken == ["model 15.000001 MB, above the budget of 15 MB",   # not "15.00 MB"
                      "latency p50 1.200 ms, above the budget of 1 ms"]
    broken = limit_failures(v, model_bytes=15_200_000, latency_ms=1.0004)
    assert broken == ["model 15.20 MB, above the budget of 15 MB",
                      "latency p50 1.0004 ms, above the budget of 1 ms"]


def test_the_strength_table_shows_a_size_over_its_limit_as_over():
    """A rung 1 byte over max_model_mb = 15 read "15.00 | ... | too large" in report.md."""
    from exporter.strength import strength_lines

    row = {"strength": "drop 1 layer", "layers": 5, "parameters": 19e6,
           "model_bytes": 15_000_001, "latency_ms_p50": 2.0004, "metrics": {"cosine": 0.99},
           "quantized": "full int8", "verdict": "too large; too slow"}
    record = {"budget": "model <= 15 MB, latency <= 2 ms", "accuracy_budget": "cosine>=0.9",
              "accuracy_metrics": ["cosine"], "ladder": ["drop 1 layer"], "how": "measured",
              "chosen": None, "candidates": [row],
              "limits": {"max_model_mb": 15.0, "max_latency_ms": 2.0}}
    assert "| 5 | 19.00 | 15.000001 | 2.0004 | cosine 0.99 |" in "\n".join(
        strength_lines(record))
    del record["limits"]   # a report written before the record kept its limits
    assert "| 5 | 19.00 | 15.00 | 2.000 | cosine 0.99 |" in "\n".join(strength_lines(record))


# --- real searches on MiniLM ---

def test_size_budget_met_by_the_weakest_strength(tmp_path, texts):
    """int8 MiniLM is ~23.6 MB, dropping one layer ~21.8 MB: a 22 MB budget takes one layer."""
    calibration, evaluation = texts
    lines: list[str] = []
    out = export("minilm", target="arm-cpu", output=tmp_path / "fit", calibration=calibration,
                 evaluation=evaluation, accuracy_budget="cosine>=0.8", max_model_mb=22,
                 max_latency_ms=1000, log=lines.append)
    manifest = json.loads((out / "manifest.json").read_text())
    search = manifest["strength_search"]
    rows = search["candidates"]
    assert search["chosen"] == "drop 1" and [r["strength"] for r in rows] == ["none", "drop 1"]
    assert rows[0]["verdict"] == "too large" and rows[0]["model_bytes"] > 22e6
    assert rows[1]["verdict"] == "fits" and rows[1]["model_bytes"] <= 22e6
    assert rows[1]["metrics"]["cosine"] >= 0.8 and rows[1]["latency_ms_p50"] > 0
    assert sum(line.startswith("  [") for line in lines) == 2   # a progress line per candidate
    # the bundle itself went through the normal path, and its own figures meet the budget
    assert manifest["model"]["layers_after_compression"] == 5
    assert [c["method"] for c in manifest["compression"]] == ["drop-layers"]
    assert (out / "model.onnx").stat().st_size <= 22e6
    fitted = manifest["validation"]["size_latency_budget"]
    assert fitted["holds"] and fitted["model_mb"] <= 22 and fitted["latency_ms_p50"] <= 1000
    sensitivity = json.loads((out / "report.json").read_text())["sensitivity"]
    assert sensitivity["search"]["max_bytes"] <= 22e6    # capped by the size budget
    report = (out / "report.md").read_text()
    assert "## Size / latency budget: model <= 22 MB, latency <= 1000 ms" in report
    assert "| drop 1 | 5 |" in report


def test_impossible_size_budget_is_refused_with_the_best_reached(tmp_path, texts):
    calibration, evaluation = texts
    with pytest.raises(BudgetError) as e:
        export("minilm", target="arm-cpu", output=tmp_path / "tiny", calibration=calibration,
               evaluation=evaluation, max_model_mb=12, log=lambda line: None)
    message = str(e.value)
    assert "Size / latency budget model <= 12 MB cannot be met within the accuracy budget " \
           "cosine>=0.995,min-cosine>=0.98" in message
    # MiniLM's default budget allows no layer dropped: the search stops at drop 1
    assert "smallest reached drop 1: 21." in message and "compression alone breaks" in message
    assert "No bundle written" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision, limit, floor", [("int8", 5, "11.8 MB the word embeddings "
                                                     "alone take (30522 x 384, int8 rows)"),
                                                    ("fp16", 20, "23.4 MB the word embeddings "
                                                     "alone take (30522 x 384, float16 at "
                                                     "least)")])
def test_a_size_budget_below_the_word_embeddings_is_refused_before_any_rung(
        tmp_path, texts, precision, limit, floor):
    """No rung removes a row of the word embeddings (MiniLM: 30522 x 384, 11.8 MB as int8
    rows): max_model_mb 5 built all the rungs it could, minutes, to say "too large". With
    --precision fp16 the table ships float16 (23.4 MB), but the floor took it as int8 rows:
    max_model_mb 20 built all 9 rungs, each "too large", and exited 3."""
    calibration, evaluation = texts
    lines: list[str] = []
    with pytest.raises(ValueError, match=re.escape(f"max_model_mb {limit} is below the {floor}")):
        export("minilm", target="arm-cpu", output=tmp_path / "tiny", calibration=calibration,
               evaluation=evaluation, precision=precision, max_model_mb=limit,
               log=lines.append)
    assert not any(line.startswith("  [") for line in lines)   # no rung was built
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_budget_from_the_profile_is_named_where_it_is_refused(tmp_path):
    """A board profile with [validation] max_model_mb refused --drop-layers and every decoder
    with "leave the budget unset", which no flag had set."""
    (tmp_path / "board.toml").write_text('extends = "arm-cpu"\n[validation]\nmax_model_mb = 22\n')
    for kwargs in ({"model": "smollm2"}, {"compression": Compression(drop_layers=1)}):
        with pytest.raises(ValueError, match=r"leave out the size / latency budget "
                                             r"\(max_model_mb 22, from the profile 'board''s "
                                             r"\[validation\]; use a profile without it\)"):
            export(**{"model": "minilm", **kwargs}, target=str(tmp_path / "board.toml"),
                   output=tmp_path / "out", log=lambda line: None)


def test_a_latency_budget_below_onnxruntimes_own_overhead_is_refused_before_any_rung(
        tmp_path, texts):
    """1e-6 ms climbed the whole ladder to say "too slow" on every rung."""
    calibration, evaluation = texts
    lines: list[str] = []
    with pytest.raises(ValueError, match=r"max_latency_ms 1e-06 is below the \d\.\d{4} ms "
                                         r"onnxruntime takes on this host to run a graph of "
                                         r"one Identity node"):
        export("minilm", target="arm-cpu", output=tmp_path / "fast", calibration=calibration,
               evaluation=evaluation, max_latency_ms=1e-6, log=lines.append)
    assert not any(line.startswith("  [") for line in lines)   # no rung was built
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_budget_keeps_heal_steps_only():
    with pytest.raises(ValueError, match="picks the compression strength itself"):
        export("minilm", target="arm-cpu", max_model_mb=20,
               compression=Compression(prune_ffn=0.5))


# --- the search itself, on stand-in candidates (seconds) ---

class _Layers:
    """Stands in for a BERT model: what the search reads of it (layer list, parameters)."""

    def __init__(self, layers: int):
        self.config = type("Config", (), {"model_type": "bert", "num_hidden_layers": layers})()
        self.encoder = type("Encoder", (), {"layer": list(range(layers))})()

    def parameters(self):
        return []

    def get_input_embeddings(self):   # a word-embedding table far below any size budget
        return type("Embedding", (), {"weight": type("Weight", (), {"shape": (10, 4)})()})()


def _stand_in_search(tmp_path, monkeypatch, *, model_bytes: int, scores, budget: str,
                     classifier: bool = False):
    """`choose_strength` on MiniLM's layer count with stand-ins for what it runs: each
    candidate a float and an int8 "graph" of `model_bytes` of zeros, `scores(path)` for its
    accuracy, a latency of 1 ms, max_model_mb = 15. Returns (job, the BudgetError)."""
    import onnx

    import exporter.feeds
    import exporter.score
    import exporter.validate
    from exporter import graph_file, pipeline, strength
    from exporter.budget import Budget
    from exporter.data import Utterance

    def build(candidate):
        candidate.float_onnx = candidate.workdir / "float.onnx"
        candidate.quantized_onnx = candidate.workdir / "model.onnx"
        for path in (candidate.float_onnx, candidate.quantized_onnx):
            path.write_bytes(b"\0" * model_bytes)

    class Scorer:
        def __init__(self, job, *args, **kwargs):
            self.job = job

        def search_budget(self):   # no absolute clause here: the budget as it is
            return self.job.budget, []

        def score(self, path):
            return scores(path)

    monkeypatch.setattr(strength, "_build", build)
    monkeypatch.setattr(strength, "_recover", lambda candidate: "sensitivity search could "
                        "not recover it within the size limit")
    monkeypatch.setattr(exporter.score, "Scorer", Scorer)
    monkeypatch.setattr(exporter.score, "selection_texts", lambda job: (job.evaluation, "2 texts"))
    monkeypatch.setattr(exporter.feeds, "ort_session", lambda path, threads: None)
    monkeypatch.setattr(exporter.validate, "latency_ms",
                        lambda *args: {"c": {"p50": 1.0, "p95": 1.0}})
    monkeypatch.setattr(onnx, "load", str)
    monkeypatch.setattr(graph_file, "graph_bytes", lambda path: path.stat().st_size)
    target = load_target("arm-cpu")
    target = dataclasses.replace(target, validation=dataclasses.replace(
        target.validation, max_model_mb=15.0))
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "tokenizer.json").write_text("{}")
    evaluation = ([Utterance("a", intent="x"), Utterance("b", intent="y")] if classifier
                  else [Utterance("a"), Utterance("b")])
    job = pipeline.Job(model="m", target=target,
                       task="text-classification" if classifier else "feature-extraction",
                       output=tmp_path / "out", calibration=[Utterance("turn it on")],
                       evaluation=evaluation, budget=Budget.parse(budget), workdir=workdir,
                       log=lambda line: None, torch_model=_Layers(6), records={"model": {}})
    with pytest.raises(BudgetError) as e:
        strength.choose_strength(job)
    return job, e.value


def test_a_float_model_that_breaks_the_budget_is_not_blamed_on_compression(tmp_path,
                                                                           monkeypatch):
    """An absolute budget (accuracy>=0.95) the uncompressed float model itself misses: the
    search stopped at 'none' saying its "compression alone breaks the accuracy budget" and
    advised healing the candidates, though nothing was compressed."""
    def scores(path):   # float accuracy 0.9 on the search's texts, int8 0.89; 23 MB each
        return {"cosine": 1.0 if path.endswith("float.onnx") else 0.999,
                "accuracy": 0.9 if path.endswith("float.onnx") else 0.89}

    job, error = _stand_in_search(tmp_path, monkeypatch, model_bytes=23_000_000,
                                  scores=scores, budget="accuracy>=0.95", classifier=True)
    message = str(error)
    assert "compression alone" not in message and "--heal-steps" not in message
    assert "accuracy budget accuracy>=0.95: the float model itself breaks the accuracy " \
           "budget, before any compression or int8 (float accuracy 0.9; full int8 accuracy " \
           "0.89), so no strength can meet it. Loosen the accuracy budget." in message
    (row,) = job.records["strength"]["candidates"]
    assert row["strength"] == "none"
    assert row["verdict"] == "the float model itself breaks the accuracy budget; too large"


def test_rungs_that_hold_the_accuracy_budget_are_not_told_to_loosen_it(tmp_path, monkeypatch):
    """Every rung held the accuracy budget and was too large, and the advice was still
    "loosen the accuracy budget, or heal the candidates", which cannot help."""
    job, error = _stand_in_search(tmp_path, monkeypatch, model_bytes=23_000_000,
                                  scores=lambda path: {"cosine": 0.999}, budget="cosine>=0.5")
    message = str(error)
    assert {r["verdict"] for r in job.records["strength"]["candidates"]} == {"too large"}
    assert "Every strength tried held the accuracy budget, so loosening it or healing cannot " \
           "help: raise max_model_mb / max_latency_ms. No bundle written." in message
    assert "--heal-steps" not in message


def test_a_broken_metric_next_to_its_bound_keeps_the_digits_that_say_so(tmp_path, monkeypatch):
    """A rung whose int8 min-cosine is 0.9799996 under min-cosine>=0.98: the strength table,
    the record and the refusal said "min-cosine 0.98" next to "accuracy budget broken"
    (6 significant digits, where the budget's own message keeps as many as say the side)."""
    from exporter.strength import strength_lines

    def scores(path):   # the float graph holds the budget, full int8 misses it by 4e-7
        return {"cosine": 0.999, "min-cosine": 1.0 if path.endswith("float.onnx")
                else 0.9799996}

    job, error = _stand_in_search(tmp_path, monkeypatch, model_bytes=1_000_000,
                                  scores=scores, budget="cosine>=0.99,min-cosine>=0.98")
    assert "cosine 0.999, min-cosine 0.9799996 (accuracy budget broken)" in str(error)
    record = job.records["strength"]
    row = record["candidates"][0]
    assert row["verdict"] == "accuracy budget broken"
    assert row["metrics"]["min-cosine"] < 0.98 and row["float_metrics"]["min-cosine"] == 1.0
    table = "\n".join(strength_lines(record))
    assert "| 1.00 | 1.000 | cosine 0.999, min-cosine 0.9799996 | sensitivity search" in table


def test_a_candidate_is_built_by_the_exports_own_stages_up_to_its_graph_rules(monkeypatch):
    """A rung is measured on the graph the export would ship: the pipeline's stages from
    compress to check_rules, less the float check and the sensitivity search (full int8).
    Without check_rules a jetson rung was measured before TensorRT's DQ copies (a few KB)
    and could be chosen just under max_model_mb, then ship over it."""
    import importlib

    from exporter import strength
    from exporter.pipeline import STAGES

    names = [stage.__name__ for stage in STAGES]
    built = STAGES[names.index("compress"):names.index("check_rules") + 1]
    ran = []
    for stage in built:
        monkeypatch.setattr(importlib.import_module(stage.__module__), stage.__name__,
                            lambda job, name=stage.__name__: ran.append(name))
    strength._build(object())
    assert ran == [stage.__name__ for stage in built
                   if stage.__name__ not in ("check_float", "sensitivity")]
