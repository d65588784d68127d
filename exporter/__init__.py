"""Exporter: Hugging Face model -> static-quantized ONNX bundle for a hardware target.

    >>> from exporter import export
    >>> export("minilm", target="arm-cpu")
    PosixPath('build/minilm-arm-cpu')
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from targets import Target, load_target

from .budget import Budget
from .data import Utterance, read_texts, smart_home_utterances
from .validate import BudgetError

__all__ = ["BudgetError", "export"]


def _texts(source, *, default_split: str, count: int, what: str) -> list[Utterance]:
    if source is None:
        return smart_home_utterances(count, split=default_split)
    if isinstance(source, (str, Path)):
        return read_texts(source)
    items = [u if isinstance(u, Utterance) else Utterance(u) for u in source]
    if not items or not all(isinstance(u.text, str) for u in items):
        raise ValueError(f"{what} must be a non-empty list of strings.")
    return items


def export(model: str = "minilm", *, target: str | Path | Target, task: str | None = None,
           output: str | Path | None = None,
           calibration: str | Path | Iterable[str] | None = None,
           evaluation: str | Path | Iterable[str] | None = None,
           accuracy_budget: str | None = None, precision: str | None = None,
           log=None) -> Path:
    """Export `model` (a checkpoint directory or a packaged name) for `target`.

    `calibration`/`evaluation` are .txt/.jsonl paths or lists of texts; by default, disjoint
    sets of smart-home utterances (decoders: held-out English prose). `accuracy_budget`
    (e.g. "cosine>=0.97", "perplexity-increase<=3") overrides the profile's; `precision`
    ("int4", "int8", "float") overrides a decoder's weight format. Returns the bundle
    directory; raises BudgetError when the budget is broken.

        >>> export("minilm", target="x86-server", accuracy_budget="cosine>=0.98")
        PosixPath('build/minilm-x86-server')
    """
    from . import pipeline
    from .gguf import PACKAGED_GGUF
    from .load import infer_task, resolve_model_dir

    profile = target if isinstance(target, Target) else load_target(target)
    task = task or infer_task(model if model in PACKAGED_GGUF or str(model).endswith(".gguf")
                              else resolve_model_dir(model))
    if task == "text-generation":
        default_budget = profile.generation.budget
        if precision not in (None, "int4", "int8", "float"):
            raise ValueError(f"Precision {precision!r} is not available for decoders: "
                             f"int4, int8 or float.")
    else:
        default_budget = profile.validation.budget_for(task)
        if precision is not None:
            raise ValueError("--precision applies to text-generation models only.")
    budget = Budget.parse(accuracy_budget or default_budget)
    model_name = (Path(model).name if Path(model).is_dir() else
                  Path(model).stem if str(model).endswith(".gguf") else model)
    output = Path(output) if output else Path("build") / f"{model_name}-{profile.name}"
    calibration_set = _texts(calibration, default_split="calibration", what="calibration",
                             count=profile.quantization.calibration_samples)
    evaluation_set = _texts(evaluation, default_split="eval", what="evaluation",
                            count=profile.validation.eval_samples)
    job = pipeline.new_job(model, target=profile, task=task, output=output,
                           calibration=calibration_set, evaluation=evaluation_set,
                           budget=budget, log=log)
    job.precision = precision
    if isinstance(evaluation, (str, Path)):
        job.records["eval_source"] = str(evaluation)
    overlap = {u.text for u in calibration_set} & {u.text for u in evaluation_set}
    if overlap:
        job.log(f"warning: {len(overlap)} evaluation texts are also calibration texts; "
                f"the accuracy figures are optimistic for those.")
    try:
        return pipeline.run(job)
    finally:
        shutil.rmtree(job.workdir, ignore_errors=True)
