"""Accuracy budgets: what the quantized model must keep relative to the float model.

A budget is one or more comma-separated clauses `metric>=value` or `metric<=value`:

    >>> Budget.parse("cosine>=0.97, min-cosine>=0.9").check({"cosine": 0.96, "min-cosine": 0.93})
    ['cosine is 0.96, below the budget cosine>=0.97 by 0.01']
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


class BudgetError(RuntimeError):
    """The quantized model broke its accuracy budget."""


# metric name -> what it measures (the validate stage computes these).
METRICS: dict[str, str] = {
    "cosine": "mean cosine similarity of the outputs (pooled embeddings or logits), bundle vs "
              "PyTorch float",
    "min-cosine": "minimum of that cosine over the evaluation texts",
    "agreement": "share of texts where the bundle's top-1 label equals float's",
    "accuracy": "bundle accuracy on labelled evaluation texts",
    "accuracy-drop": "float accuracy minus bundle accuracy, in points (percent)",
    "perplexity-increase": "bundle perplexity over float's on held-out text, in percent",
    "greedy-agreement": "share of greedy tokens equal to PyTorch float's, prompt by prompt, "
                        "up to the first difference",
}

# metric -> the values it can take: a clause no value can meet is refused when parsed,
# before an export spends minutes to break it.
RANGES: dict[str, tuple[float, float]] = {
    "cosine": (-1.0, 1.0), "min-cosine": (-1.0, 1.0), "agreement": (0.0, 1.0),
    "accuracy": (0.0, 1.0), "accuracy-drop": (-100.0, 100.0),
    "perplexity-increase": (-100.0, float("inf")), "greedy-agreement": (0.0, 1.0),
}
# metrics whose lower end is never reached: a perplexity is at least 1, so its increase is
# above -100% (that would be a perplexity of 0); "perplexity-increase<=-100" can never hold
OPEN_BELOW = ("perplexity-increase",)

# task -> the metrics its validation measures; the accuracy ones need every evaluation text
# labelled (a .jsonl "label" field, or the default smart-home utterances).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "feature-extraction": ("cosine", "min-cosine"),
    "text-classification": ("cosine", "min-cosine", "agreement", "accuracy", "accuracy-drop"),
    "text-generation": ("perplexity-increase", "greedy-agreement"),
}
LABELLED_METRICS = ("accuracy", "accuracy-drop")
# metrics of the bundle alone, not relative to the float model: the float model's own value
# on a set of texts bounds what any bundle reaches there
ABSOLUTE_METRICS = ("accuracy",)
# metrics where smaller is better (a budget caps them with <=); the others take >=
LOWER_IS_BETTER = ("accuracy-drop", "perplexity-increase")
# metrics measured in percent (points); the others are shares or cosines
PERCENT_METRICS = ("accuracy-drop", "perplexity-increase")

_CLAUSE = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*(>=|<=)\s*"
                     r"([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*$")


@dataclass(frozen=True)
class Clause:
    metric: str
    op: str       # ">=" or "<="
    value: float

    def __str__(self) -> str:   # the bound as given: 6 digits made 0.9999995 read ">=1"
        return f"{self.metric}{self.op}{self.value:.15g}"


@dataclass(frozen=True)
class Budget:
    clauses: tuple[Clause, ...]

    @classmethod
    def parse(cls, text: str) -> Budget:
        if not isinstance(text, str):
            raise TypeError(f"An accuracy budget is a string such as 'cosine>=0.97', got "
                            f"{type(text).__name__} {text!r}.")
        if not text.strip():
            raise ValueError("The accuracy budget is empty: give at least one clause, e.g. "
                             "'cosine>=0.97', or leave it out for the profile's.")
        clauses = []
        for part in text.split(","):
            match = _CLAUSE.match(part)
            percent = _CLAUSE.match(part.strip().removesuffix("%"))
            if not match and percent and percent.group(1) in METRICS \
                    and part.strip().endswith("%"):
                metric, op, value = percent.groups()
                low, high = RANGES[metric]
                unit = (f"{metric} is in percent already: write '{metric}{op}{value}'"
                        if metric in PERCENT_METRICS else
                        f"{metric} lies in [{low:g}, {high:g}]: write "
                        f"'{metric}{op}{float(value) / 100:g}' for {value}%")
                raise ValueError(f"Bad accuracy budget clause {part.strip()!r} in {text!r}: "
                                 f"no percent sign; {unit}.")
            if not match:
                raise ValueError(f"Bad accuracy budget clause {part.strip()!r} in {text!r}: "
                                 f"expected METRIC>=VALUE or METRIC<=VALUE, e.g. 'cosine>=0.97'.")
            metric, op, value = match.groups()
            if metric not in METRICS:
                spelled = metric.lower().replace("_", "-")
                hint = (f"metric names are lower case with hyphens: write "
                        f"'{spelled}{op}{value}'" if spelled in METRICS else
                        f"Available: {', '.join(METRICS)}")
                raise ValueError(f"Unknown accuracy metric {metric!r} in budget {text!r}. "
                                 f"{hint}.")
            if (op == "<=") != (metric in LOWER_IS_BETTER):
                better = "<=" if metric in LOWER_IS_BETTER else ">="
                raise ValueError(f"Accuracy budget clause {part.strip()!r} bounds the wrong "
                                 f"side: a budget says how far {metric} may get worse, "
                                 f"e.g. '{metric}{better}{value}'.")
            if not math.isfinite(float(value)):   # 1e999 reads as inf: no record reads back
                raise ValueError(f"Accuracy budget clause {part.strip()!r}: {value} is beyond "
                                 f"a float's range; give a bound within {metric}'s range, "
                                 f"{RANGES[metric][0]:g} to {RANGES[metric][1]:g}.")
            low, high = RANGES[metric]
            below = float(value) <= low if metric in OPEN_BELOW else float(value) < low
            if (op == ">=" and float(value) > high) or (op == "<=" and below):
                lower = "(" if metric in OPEN_BELOW else "["
                raise ValueError(f"Accuracy budget clause {part.strip()!r} can never hold: "
                                 f"{metric} lies in {lower}{low:g}, {high:g}] "
                                 f"({METRICS[metric]}).")
            twice = next((c for c in clauses if c.metric == metric), None)
            if twice is not None:
                raise ValueError(f"Accuracy budget {text!r} bounds {metric} twice ('{twice}' "
                                 f"and {part.strip()!r}); give one bound per metric.")
            clauses.append(Clause(metric, op, float(value)))
        return cls(tuple(clauses))

    def check_measurable(self, task: str, *, labelled: bool, unlabelled: str = "") -> None:
        """ValueError, before any export work, for a clause this export will not measure
        (`unlabelled`: which evaluation texts lack a label, in words)."""
        for c in self.clauses:
            if c.metric not in TASK_METRICS[task]:
                raise ValueError(f"Accuracy budget clause '{c}' cannot be checked: a {task} "
                                 f"export measures {', '.join(TASK_METRICS[task])}.")
            if c.metric in LABELLED_METRICS and not labelled:
                raise ValueError(f"Accuracy budget clause '{c}' needs labelled evaluation "
                                 f"text{f', and {unlabelled}' if unlabelled else ''}. Give "
                                 f"--eval a .jsonl whose every line has a \"label\", or "
                                 f"budget on agreement instead.")

    def check(self, metrics: dict[str, float]) -> list[str]:
        """One line per broken clause, saying by how much; empty when the budget holds."""
        broken = []
        for c in self.clauses:
            if c.metric not in metrics:
                need = "labelled evaluation text" if "accuracy" in c.metric else "another task"
                broken.append(f"{c.metric} was not measured (it needs {need})")
                continue
            got = metrics[c.metric]
            if not math.isfinite(got):   # NaN compares false with everything: never a pass
                broken.append(f"{c.metric} is {got} (the model's outputs are not finite "
                              f"numbers), so the budget {c} is broken")
                continue
            miss = c.value - got if c.op == ">=" else got - c.value
            if miss > 0:
                side = "below" if c.op == ">=" else "above"
                broken.append(f"{c.metric} is {_unlike(got, c.value)}, {side} the budget {c} "
                              f"by {miss:.2g}")
        return broken

    def shortfall(self, metrics: dict[str, float]) -> float:
        """How far `metrics` are from holding the budget: the sum of each broken clause's
        miss, relative to its bound's size; 0 when it holds, inf for a metric not measured
        or not a number."""
        total = 0.0
        for c in self.clauses:
            got = metrics.get(c.metric, math.nan)
            if not math.isfinite(got):
                return math.inf
            miss = c.value - got if c.op == ">=" else got - c.value
            total += max(miss, 0.0) / max(abs(c.value), 1e-3)
        return total

    def bounds(self, metric: str) -> list[float]:
        """The bounds the budget puts on `metric` (none: an empty list)."""
        return [c.value for c in self.clauses if c.metric == metric]

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.clauses)


def _unlike(value: float, bound: float) -> str:
    """`value` to 6 significant digits, or as many more as keep it on its side of `bound`
    (a min-cosine of 0.9799996 is not "0.98, below the budget min-cosine>=0.98")."""
    return significant(value, [bound])


def significant(value: float, bounds: list[float]) -> str:
    """`value` to 6 significant digits, or as many more as keep it on its side of each of
    `bounds`."""
    def side(x: float, bound: float) -> int:
        return (x > bound) - (x < bound)

    digits = 6
    while digits < 17 and any(side(float(f"{value:.{digits}g}"), b) != side(value, b)
                              for b in bounds):
        digits += 1
    return f"{value:.{digits}g}"


def rounded(metrics: dict[str, float], digits: int = 5,
            budget: Budget | None = None) -> dict[str, float]:
    """`metrics` for a record or report. Budgets are checked on the unrounded values: a
    min-cosine of 0.979996 rounds to 0.98 and would pass min-cosine>=0.98. With `budget`, a
    value keeps as many more digits as hold it on its side of the budget's bounds (the record
    said min-cosine 0.98 next to a broken min-cosine>=0.98)."""
    return {name: round(value, decimals(value, budget.bounds(name) if budget else [], digits))
            for name, value in metrics.items()}


def decimals(value: float, bounds: list[float], places: int) -> int:
    """`places`, or as many more decimals as keep `value`, rounded, on its side of each of
    `bounds`."""
    def side(x: float, bound: float) -> int:
        return (x > bound) - (x < bound)

    while places < 17 and any(side(round(value, places), b) != side(value, b) for b in bounds):
        places += 1
    return places
