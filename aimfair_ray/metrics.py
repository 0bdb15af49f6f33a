"""Fairness metrics, plain numpy (no Ray, no torch).

Cells are (target y, group s) pairs. With a binary target (positive class 1):
- ``acc``: overall accuracy;
- ``group_acc``: accuracy inside each cell, keyed ``"y{y}_s{s}"``;
- ``wst``: worst cell accuracy; ``std``: population std of the cell accuracies;
- ``eo``: AIM-Fair's equalized odds, (|dTPR| + |dFPR|) / 2, each difference taken
  as max - min over the groups (so it handles more than two groups);
- ``eod_worst``: fairlearn's equalized-odds difference, max(|dTPR|, |dFPR|);
- ``dp``: demographic-parity difference, max - min over groups of P(pred = 1).
A multi-class target gets ``eo``, ``eod_worst`` and ``dp`` as the mean over
one-vs-rest binary problems. Empty cells are skipped, never counted as 0.
"""

from __future__ import annotations

import numpy as np


def _arr(x) -> np.ndarray:
    return np.asarray(x).reshape(-1)


def _rate_range(values: list[float]) -> float:
    vals = [v for v in values if not np.isnan(v)]
    return float(max(vals) - min(vals)) if len(vals) >= 2 else 0.0


def _binary_gaps(y: np.ndarray, p: np.ndarray, s: np.ndarray, groups: np.ndarray) -> tuple[float, float, float]:
    """(dTPR, dFPR, dSelectionRate) for binary y/p in {0, 1} over the given groups."""
    tpr, fpr, sel = [], [], []
    for g in groups:
        m = s == g
        pos, neg = m & (y == 1), m & (y == 0)
        tpr.append(p[pos].mean() if pos.any() else np.nan)
        fpr.append(p[neg].mean() if neg.any() else np.nan)
        sel.append(p[m].mean() if m.any() else np.nan)
    return _rate_range(tpr), _rate_range(fpr), _rate_range(sel)


def fairness_report(y_true, y_pred, groups, n_classes: int | None = None, n_groups: int | None = None) -> dict:
    """All audit metrics for predictions ``y_pred`` of targets ``y_true`` with sensitive ``groups``."""
    y, p, s = _arr(y_true).astype(int), _arr(y_pred).astype(int), _arr(groups).astype(int)
    if not (len(y) == len(p) == len(s)):
        raise ValueError(f"length mismatch: y_true {len(y)}, y_pred {len(p)}, groups {len(s)}")
    if len(y) == 0:
        raise ValueError("no samples to evaluate")
    n_classes = int(n_classes or max(y.max(), p.max()) + 1)
    n_groups = int(n_groups or s.max() + 1)
    correct = y == p

    group_acc, cell_counts = {}, {}
    for c in range(n_classes):
        for g in range(n_groups):
            m = (y == c) & (s == g)
            key = f"y{c}_s{g}"
            cell_counts[key] = int(m.sum())
            if m.any():
                group_acc[key] = float(correct[m].mean())
    cell_vals = np.array(list(group_acc.values()))

    present = np.unique(s)
    if n_classes == 2:
        dtpr, dfpr, ddp = _binary_gaps(y, p, s, present)
    else:
        gaps = np.array([_binary_gaps((y == c).astype(int), (p == c).astype(int), s, present) for c in range(n_classes)])
        dtpr, dfpr, ddp = gaps.mean(axis=0)

    confusion = {}
    for g in range(n_groups):
        m = s == g
        cm = np.zeros((n_classes, n_classes), dtype=int)
        np.add.at(cm, (y[m], p[m]), 1)
        confusion[f"s{g}"] = cm.tolist()  # rows: true class, columns: predicted class

    return {
        "acc": float(correct.mean()),
        "wst": float(cell_vals.min()),
        "std": float(cell_vals.std()),
        "eo": float((dtpr + dfpr) / 2),
        "eod_worst": float(max(dtpr, dfpr)),
        "dp": float(ddp),
        "group_acc": group_acc,
        "n": int(len(y)),
        "cell_counts": cell_counts,
        "confusion": confusion,
        "tpr_gap": float(dtpr),
        "fpr_gap": float(dfpr),
    }


HEADLINE = ("acc", "wst", "std", "eo")  # the audit's headline metrics (tables, the audit page)
