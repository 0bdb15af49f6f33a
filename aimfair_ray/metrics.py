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


# Confidence intervals: the headline metrics from a (true class, group, predicted class) count table, and a
# bootstrap that resamples the rows within each (true class, group) cell.
INTERVAL_METRICS = ("acc", "wst", "std", "eo", "dp")
INTERVAL_LEVEL = 0.95


def count_table(y_true, y_pred, groups, n_classes: int, n_groups: int) -> np.ndarray:
    """``k[y, s, p]``: how many rows of true class y and group s were predicted p."""
    k = np.zeros((n_classes, n_groups, n_classes), dtype=np.int64)
    np.add.at(k, (_arr(y_true).astype(int), _arr(groups).astype(int), _arr(y_pred).astype(int)), 1)
    return k


def _gap(rates: np.ndarray) -> np.ndarray:
    """max - min over the last axis, NaNs (no rows) left out; 0 where fewer than two rates exist."""
    ok = ~np.isnan(rates)
    hi = np.where(ok, rates, -np.inf).max(-1)
    lo = np.where(ok, rates, np.inf).min(-1)
    return np.where(ok.sum(-1) >= 2, hi - lo, 0.0)


def metrics_from_counts(k: np.ndarray) -> dict[str, np.ndarray]:
    """ACC, WST, STD, EO and DP of count tables ``k`` (shape ``(..., C, G, C)``), as :func:`fairness_report`
    defines them (a binary target's one-vs-rest mean equals its positive-class figures)."""
    n_cls = k.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        cell_n = k.sum(-1)                                          # (..., C, G)
        correct = np.stack([k[..., c, :, c] for c in range(n_cls)], -2)  # (..., C, G)
        present = cell_n.reshape(-1, *cell_n.shape[-2:]).max(0) > 0  # cells with rows
        cell_acc = (correct / cell_n)[..., present]                  # (..., P)
        group_n = cell_n.sum(-2)                                     # (..., G)
        live = group_n.reshape(-1, group_n.shape[-1]).max(0) > 0     # groups with rows (fairness_report: np.unique(s))
        tpr, fpr, sel = [], [], []
        for c in range(n_cls):
            pos_n, tp = cell_n[..., c, :], k[..., c, :, c]
            neg_n = group_n - pos_n
            fp = k[..., :, :, c].sum(-2) - tp
            tpr.append(_gap(np.where(pos_n > 0, tp / pos_n, np.nan)[..., live]))
            fpr.append(_gap(np.where(neg_n > 0, fp / neg_n, np.nan)[..., live]))
            sel.append(_gap((k[..., :, :, c].sum(-2) / group_n)[..., live]))
        dtpr, dfpr, dsel = (np.mean(v, axis=0) for v in (tpr, fpr, sel))
    return {"acc": correct.sum((-2, -1)) / cell_n.sum((-2, -1)), "wst": cell_acc.min(-1), "std": cell_acc.std(-1),
            "eo": (dtpr + dfpr) / 2, "dp": dsel}


def bootstrap_intervals(y_true, y_pred, groups, n_classes: int, n_groups: int, n_boot: int = 1000, seed: int = 0,
                        level: float = INTERVAL_LEVEL) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of ACC, WST, STD, EO and DP: each replicate redraws every (true class,
    group) cell's rows with replacement, keeping its size (the test set's design), so a replicate's predictions
    in a cell are a multinomial draw from that cell's observed predictions. Seeded: the same inputs and seed
    give the same intervals."""
    boot = _replicates(count_table(y_true, y_pred, groups, n_classes, n_groups), n_boot, seed)
    reps = metrics_from_counts(boot)
    q = (1 - level) / 2
    return {m: [float(np.quantile(reps[m], q)), float(np.quantile(reps[m], 1 - q))] for m in INTERVAL_METRICS}


def _replicates(k: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` bootstrap count tables of ``k``: each (true class, group) cell redrawn at its size."""
    rng = np.random.default_rng(seed)
    boot = np.zeros((n_boot, *k.shape), dtype=np.int64)
    for c in range(k.shape[0]):
        for g in range(k.shape[1]):
            n = int(k[c, g].sum())
            if n:
                boot[:, c, g] = rng.multinomial(n, k[c, g] / n, size=n_boot)
    return boot


def cell_intervals(y_true, y_pred, groups, n_classes: int, n_groups: int, n_boot: int = 1000, seed: int = 0,
                   level: float = INTERVAL_LEVEL) -> dict[str, list[float]]:
    """The percentile bootstrap interval of each (target, group) cell's accuracy (``y<c>_s<g>``), from the same
    replicates as :func:`bootstrap_intervals` with the same seed."""
    k = count_table(y_true, y_pred, groups, n_classes, n_groups)
    boot = _replicates(k, n_boot, seed)
    q = (1 - level) / 2
    out = {}
    for c in range(n_classes):
        for g in range(n_groups):
            if k[c, g].sum():
                acc = boot[:, c, g, c] / k[c, g].sum()
                out[f"y{c}_s{g}"] = [float(np.quantile(acc, q)), float(np.quantile(acc, 1 - q))]
    return out
