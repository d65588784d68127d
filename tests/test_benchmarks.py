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
    ("bench_partition.py", ["--batch-size", "0"], "argument --batch-size: must be at least 1"),
    ("bench_compression.py", ["--heal-steps", "-1"], "argument --heal-steps: must be at least 0"),
    ("bench_compression.py", ["--model", "tests"], "argument --model: Model directory 'tests' "
                                                   "has no config.json"),
    ("bench_encoder.py", ["--model", "smollm2"], "argument --model: 'smollm2' is a decoder; "
                                                 "this benchmark measures encoders"),
])
def test_bad_arguments_are_refused_before_any_work(script, args, message):
    """Each was accepted before, then failed after minutes of exporting, or timed nothing
    (`--rounds 0` ended in a KeyError)."""
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr
    assert "Traceback" not in run.stderr


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
