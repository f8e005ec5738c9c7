"""Task metrics (docs/method.md, "Tasks, splits and metrics"), computed with scikit-learn and scipy.

All scores are on a 0-100 scale (accuracy 87.5, not 0.875; correlations times 100), as benchmark
tables print them.

Invalid predictions count as wrong (T5's convention): a generated string that is not one of the
task's label words, or a class id outside [0, num_labels), becomes
* for binary tasks, the class opposite to the reference (so it is a false negative or a false positive);
* for multi-class tasks, no class at all (a miss for the true class, a false positive for none);
* for regression, whichever end of the references' range [min, max] is farther from the reference
  (an unparsable or non-finite score is as wrong as a score in range can be).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from .tasks.registry import TaskSpec, get_task

METRIC_NAMES = ("accuracy", "f1", "macro_f1", "matthews_correlation", "pearson", "spearman", "f1a", "em")


def _to_ids(spec: TaskSpec, predictions) -> list:
    """Predictions as class ids / floats, None where invalid. Accepts ids, floats, strings or logits."""
    arr = predictions
    if hasattr(arr, "detach"):  # torch tensor
        arr = arr.detach().cpu().numpy()
    if isinstance(arr, np.ndarray) and arr.ndim == 2:  # logits [n, num_labels] (or [n, 1] for regression)
        arr = arr[:, 0] if spec.is_regression else arr.argmax(axis=1)
    out = []
    for p in (arr.tolist() if isinstance(arr, np.ndarray) else list(arr)):
        if isinstance(p, np.generic) or hasattr(p, "item"):  # numpy / torch scalars
            p = p.item()
        if isinstance(p, str):
            p = spec.parse_label(p)
        elif spec.is_regression:
            p = float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) else None
        elif isinstance(p, float) and p.is_integer():
            p = int(p)
        if not spec.is_regression and not (isinstance(p, int) and not isinstance(p, bool) and 0 <= p < spec.num_labels):
            p = None
        out.append(p)
    return out


def _correlation(fn, x, y) -> float:
    # A constant prediction has no correlation (scipy returns NaN); 0 keeps checkpoint selection sane.
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(fn(x, y)[0])


def compute_metrics(task: str | TaskSpec, predictions: Sequence, references: Sequence,
                    groups: Sequence[Hashable] | None = None) -> dict[str, float]:
    """Scores of `predictions` against `references` for a task (name or TaskSpec), 0-100 scale.

    predictions: class ids, label-word strings (generated text; surrounding whitespace ignored),
        floats (regression), None (no valid output), or a 2-D array of logits. Invalid ones count
        as wrong (module docstring).
    references: class ids (floats for regression), e.g. the dataset's `label` column.
    groups: per-row group ids, required for MultiRC's exact match (the `question_id` column).

    Returns the task's `metrics` plus "average" (their mean; the `main_metric` of two-metric tasks).
    """
    spec = get_task(task)
    preds = _to_ids(spec, predictions)
    refs = references.tolist() if hasattr(references, "tolist") else list(references)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not refs:
        raise ValueError("no predictions to score")
    if spec.is_regression:
        y = np.asarray(refs, dtype=float)
        lo, hi = y.min(), y.max()
        p = np.array([v if v is not None else (lo if t - lo > hi - t else hi) for v, t in zip(preds, refs)])
    else:
        y = np.asarray(refs, dtype=int)
        if spec.num_labels == 2:
            p = np.array([v if v is not None else 1 - t for v, t in zip(preds, y)])
        else:
            p = np.array([v if v is not None else -1 for v in preds])

    scores: dict[str, float] = {}
    for name in spec.metrics:
        if name == "accuracy":
            scores[name] = skm.accuracy_score(y, p)
        elif name in ("f1", "f1a"):  # F1 of the positive class (1); f1a: over all MultiRC answer options
            scores[name] = skm.f1_score(y, p, pos_label=1, average="binary", zero_division=0)
        elif name == "macro_f1":
            scores[name] = skm.f1_score(y, p, labels=list(range(spec.num_labels)), average="macro", zero_division=0)
        elif name == "matthews_correlation":
            scores[name] = skm.matthews_corrcoef(y, p)
        elif name == "pearson":
            scores[name] = _correlation(stats.pearsonr, p, y)
        elif name == "spearman":
            scores[name] = _correlation(stats.spearmanr, p, y)
        elif name == "em":  # a question counts only if every one of its answer options is right
            if groups is None or len(groups) != len(y):
                raise ValueError(f"task {spec.name!r}: exact match needs one group id per prediction")
            right: dict = {}
            for g, ok in zip(groups.tolist() if hasattr(groups, "tolist") else groups, p == y):
                right[g] = right.get(g, True) and bool(ok)
            scores[name] = sum(right.values()) / len(right)
        else:
            raise ValueError(f"unknown metric {name!r}; known: {METRIC_NAMES}")
    scores = {k: 100.0 * float(v) for k, v in scores.items()}
    scores["average"] = sum(scores.values()) / len(scores)
    return scores
