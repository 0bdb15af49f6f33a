"""AIM-Fair's biased-subset protocol.

Each target class gets an equal share of the N samples. Inside class y one group is the
majority, ``(y + 1) % G``, with weight 1; every other group has weight b (the bias
degree). For two classes, two groups and b = 1/9 the cells (y, s) are
5% / 45% / 45% / 5%. The draw is deterministic by seed.
"""

from __future__ import annotations

import numpy as np

from aimfair_ray import AimfairError


def cell_shares(n_classes: int, n_groups: int, b: float) -> np.ndarray:
    """Share of each (target, group) cell; sums to 1."""
    if not 0 < b <= 1:
        raise AimfairError(f"bias degree b must be in (0, 1], got {b}")
    w = np.full((n_classes, n_groups), b, dtype=float)
    for y in range(n_classes):
        w[y, (y + 1) % n_groups] = 1.0
    return w / w.sum(axis=1, keepdims=True) / n_classes


def cell_counts(n: int, n_classes: int, n_groups: int, b: float) -> np.ndarray:
    """Integer cell counts summing to n (largest-remainder rounding)."""
    exact = cell_shares(n_classes, n_groups, b) * n
    counts = np.floor(exact).astype(int)
    rest = n - counts.sum()
    # largest remainder first; ties go to the smaller cell, so minority cells are not rounded away
    order = np.lexsort((counts.ravel(), -np.round(exact - counts, 9).ravel()))[:rest]
    counts.flat[order] += 1
    return counts


def max_size(available: np.ndarray, b: float) -> int:
    """The largest n whose cell counts fit the available counts per cell."""
    shares = cell_shares(*available.shape, b)
    n = int(np.floor(np.min(np.where(shares > 0, available / shares, np.inf))))
    while n > 0 and (cell_counts(n, *available.shape, b) > available).any():
        n -= 1
    return n


def count_cells(targets, groups, n_classes: int, n_groups: int) -> np.ndarray:
    """Samples per (target, group) cell, as a [C, G] array."""
    counts = np.zeros((n_classes, n_groups), dtype=int)
    np.add.at(counts, (np.asarray(targets, dtype=int), np.asarray(groups, dtype=int)), 1)
    return counts


def draw_biased_subset(
    targets, groups, n: int | None, b: float, seed: int, n_classes: int | None = None, n_groups: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a biased draw of size n from a labeled pool, and its cell counts [C, G]."""
    t, g = np.asarray(targets, dtype=int), np.asarray(groups, dtype=int)
    C = int(n_classes or t.max() + 1)
    G = int(n_groups or g.max() + 1)
    available = count_cells(t, g, C, G)
    if n is None:
        n = max_size(available, b)
    counts = cell_counts(n, C, G, b)
    short = [(y, s, counts[y, s], available[y, s]) for y in range(C) for s in range(G) if counts[y, s] > available[y, s]]
    if short:
        detail = ", ".join(f"cell (y={y}, s={s}) needs {need} but the pool has {have}" for y, s, need, have in short)
        raise AimfairError(
            f"cannot draw {n} samples with bias {b:.4g}: {detail}; "
            f"lower data.n_train (at most {max_size(available, b)} fit) or set it to null"
        )
    rng = np.random.default_rng(seed)
    picked = []
    for y in range(C):
        for s in range(G):
            idx = np.flatnonzero((t == y) & (g == s))
            picked.append(rng.choice(idx, size=counts[y, s], replace=False))
    out = np.concatenate(picked)
    rng.shuffle(out)
    return out, counts


def counts_dict(counts: np.ndarray) -> dict:
    return {f"y{y}_s{s}": int(counts[y, s]) for y in range(counts.shape[0]) for s in range(counts.shape[1])}
