"""Candidate graphs scored against the float graph on fixed texts, fast enough to call dozens
of times in one export (calibration comparison, sensitivity analysis, the budget search).

The float graph's outputs are computed once; a candidate is built in memory, run on the same
feeds, and reduced the way validation reduces (pooled sentence embeddings, or logits), so its
metrics are the ones the accuracy budget names. Validation later measures the chosen graph
against PyTorch itself; the float ONNX graph matches PyTorch to ~1e-5 (check_float).

    >>> Scorer(job, job.evaluation).score(onnx.load("model.onnx"))
    {'cosine': 0.998, 'min-cosine': 0.990}
"""

from __future__ import annotations

import numpy as np
import onnx

from .budget import ABSOLUTE_METRICS, LABELLED_METRICS, Budget
from .exact import exact_products, scores_exactly
from .feeds import encoder_batches, ort_session, pool
from .graph_file import graph_session
from .validate import classification_metrics, cosine_rows

BATCH = 16


def selection_texts(job) -> tuple[list, str]:
    """The texts an export's choices are scored on (the budget search's float groups, the
    strength search's rung), and how the report says so: the calibration texts (as many as
    calibration uses). The evaluation texts are left to validation, which then measures the
    chosen graph on texts no choice has seen; a budget held on the search's texts can still
    break there (min-cosine is a tail), and then fails as any broken budget does. A budget
    that needs labels the calibration texts lack is the exception: it is searched on the
    evaluation texts, and says so."""
    chosen = list(job.calibration[:job.target.quantization.calibration_samples])
    labelled = any(c.metric in LABELLED_METRICS for c in job.budget.clauses)
    if labelled and not all(u.intent in (job.labels or ()) for u in chosen):
        return list(job.evaluation), (f"{len(job.evaluation)} evaluation texts (the budget "
                                      f"needs labels, which the calibration texts lack)")
    return chosen, f"{len(chosen)} calibration texts (evaluation texts are left to validation)"


class Scorer:
    """Metrics of candidate graphs against job.float_onnx on `utterances` (against the
    original PyTorch model where the job compressed it, unless `original` is False: what
    int8 alone changes, the sensitivity stage's harm)."""

    def __init__(self, job, utterances, *, threads: int = 0, original: bool = True):
        self.job, self.threads = job, threads
        self.exact = scores_exactly(job.target)  # the device's integer products (exact.py)
        utterances = list(utterances)
        session = ort_session(job.float_onnx, threads=threads)
        batched = list(encoder_batches(job.workdir / "tokenizer.json",
                                       [u.text for u in utterances], session,
                                       max_length=job.max_length, batch_size=BATCH))
        self.feeds = [feeds for _, feeds in batched]
        # in the batches' order (shortest first), which every metric here is free of
        self.utterances = [utterances[i] for indices, _ in batched for i in indices]
        self.texts = [u.text for u in self.utterances]
        original = getattr(job, "reference_model", None) if original else None
        # A compressed model's budget holds against the original, as validation checks it:
        # scored against the compressed float graph, the search stopped where validation
        # then failed.
        self.against = "the original model (PyTorch, before compression)" \
            if original is not None else "the float graph"
        self.reference = self.outputs(session) if original is None else \
            self.torch_outputs(original)
        self.labelled = job.task == "text-classification" and all(
            u.intent in job.labels for u in self.utterances)

    def search_budget(self) -> tuple[Budget, list[str]]:
        """The job's budget as a search on these texts can judge it, and what it leaves to
        validation: an absolute clause (accuracy>=X) that the reference (the float graph, or
        the original model) itself breaks on these texts, which no choice could meet there.
        The intent classifier scores 0.963 on 300 calibration texts and 0.990 on its test
        set: "accuracy>=0.98" sent every group back to float and then exited 3, blaming
        the int8, for a bundle that holds it on the evaluation texts."""
        budget = self.job.budget
        if not self.labelled or not any(c.metric in ABSOLUTE_METRICS for c in budget.clauses):
            return budget, []
        own = classification_metrics(self.job, self.reference, self.reference,
                                     utterances=self.utterances)
        left = [c for c in budget.clauses
                if c.metric in ABSOLUTE_METRICS and Budget((c,)).check(own)]
        notes = [f"{c}: {self.against} itself scores {c.metric} {own[c.metric]:.4f} on "
                 f"these {len(self.texts)} texts, so no choice can meet it here; validation "
                 f"checks it on the evaluation texts" for c in left]
        return Budget(tuple(c for c in budget.clauses if c not in left)), notes

    def outputs(self, session) -> np.ndarray:
        """(texts, dim): pooled embeddings for feature-extraction, logits otherwise."""
        return self._reduced(lambda feeds: session.run(None, feeds)[0])

    def torch_outputs(self, model) -> np.ndarray:
        """The same reduction of a PyTorch model's outputs on the same feeds."""
        from .to_onnx import torch_output

        return self._reduced(lambda feeds: torch_output(model, feeds))

    def _reduced(self, run) -> np.ndarray:
        rows = []
        for feeds in self.feeds:
            out = run(feeds)
            if self.job.pooling:
                out = pool(out, feeds["attention_mask"], mode=self.job.pooling["mode"],
                           normalize=False)
            rows.append(out)
        return np.concatenate(rows)

    def score(self, model: onnx.ModelProto) -> dict[str, float]:
        """cosine / min-cosine (and, for labelled classification, agreement, accuracy and
        accuracy-drop) of `model` against the float graph, unrounded."""
        if self.exact:
            model = exact_products(model)
        session = graph_session(model, threads=self.threads)
        ours = self.outputs(session)
        cos = cosine_rows(ours, self.reference)
        metrics = {"cosine": float(cos.mean()), "min-cosine": float(cos.min())}
        if self.job.task == "text-classification":
            metrics.update(classification_metrics(
                self.job, ours, self.reference,
                utterances=self.utterances if self.labelled else None))
        return metrics
