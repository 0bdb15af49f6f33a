"""AIM-Fair's biased-subset protocol.

Each target class gets an equal share of the N samples. Inside class y one group is the
majority, ``majority[y]``, with weight 1; every other group has weight b (the bias degree).
``data.majority: auto`` takes, in each class, the group most frequent in the source data
(:func:`majority_groups`); where the data does not decide (Colored MNIST, whose colours the
draw assigns, or a tie) the convention ``(y + 1) % G`` holds. For two classes, two groups, the
convention and b = 1/9 the cells (y, s) are 5% / 45% / 45% / 5%. The draw is deterministic by seed.
"""

from __future__ import annotations

import numpy as np

from aimfair_ray import AimfairError


def convention(n_classes: int, n_groups: int) -> list[int]:
    """The majority group of each class where the data does not decide: ``(y + 1) % G``."""
    return [(y + 1) % n_groups for y in range(n_classes)]


def majority_groups(targets, groups, n_classes: int, n_groups: int) -> list[int]:
    """In each class, the group most frequent in the data (a tie: the convention's group, if tied)."""
    counts = count_cells(targets, groups, n_classes, n_groups)
    out = []
    for y, default in enumerate(convention(n_classes, n_groups)):
        top = np.flatnonzero(counts[y] == counts[y].max())
        out.append(default if default in top else int(top[0]))
    return out


def resolve_majority(majority, targets, groups, n_classes: int, n_groups: int) -> list[int]:
    """``data.majority`` as one group per class: ``auto`` reads it from the data."""
    if majority in (None, "auto"):
        return majority_groups(targets, groups, n_classes, n_groups)
    if len(majority) != n_classes or any(not 0 <= g < n_groups for g in majority):
        raise AimfairError(f"data.majority {list(majority)}: give one group index (0..{n_groups - 1}) for each of "
                           f"the {n_classes} classes, or auto")
    return [int(g) for g in majority]


def cell_shares(n_classes: int, n_groups: int, b: float, majority: list[int] | None = None) -> np.ndarray:
    """Share of each (target, group) cell; sums to 1. ``majority``: one group per class (None: the convention)."""
    if not 0 < b <= 1:
        raise AimfairError(f"bias degree b must be in (0, 1], got {b}")
    majority = majority if majority is not None else convention(n_classes, n_groups)
    w = np.full((n_classes, n_groups), b, dtype=float)
    for y in range(n_classes):
        w[y, majority[y]] = 1.0
    return w / w.sum(axis=1, keepdims=True) / n_classes


def cell_counts(n: int, n_classes: int, n_groups: int, b: float, majority: list[int] | None = None) -> np.ndarray:
    """Integer cell counts summing to n (largest-remainder rounding)."""
    exact = cell_shares(n_classes, n_groups, b, majority) * n
    counts = np.floor(exact).astype(int)
    rest = n - counts.sum()
    # largest remainder first; ties go to the smaller cell, so minority cells are not rounded away
    order = np.lexsort((counts.ravel(), -np.round(exact - counts, 9).ravel()))[:rest]
    counts.flat[order] += 1
    return counts


def max_size(available: np.ndarray, b: float, majority: list[int] | None = None) -> int:
    """The largest n whose cell counts fit the available counts per cell."""
    shares = cell_shares(*available.shape, b, majority)
    n = int(np.floor(np.min(np.where(shares > 0, available / shares, np.inf))))
    while n > 0 and (cell_counts(n, *available.shape, b, majority) > available).any():
        n -= 1
    return n


def count_cells(targets, groups, n_classes: int, n_groups: int) -> np.ndarray:
    """Samples per (target, group) cell, as a [C, G] array."""
    counts = np.zeros((n_classes, n_groups), dtype=int)
    np.add.at(counts, (np.asarray(targets, dtype=int), np.asarray(groups, dtype=int)), 1)
    return counts


def draw_biased_subset(
    targets, groups, n: int | None, b: float, seed: int, n_classes: int | None = None, n_groups: int | None = None,
    majority: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a biased draw of size n from a labeled pool, and its cell counts [C, G]."""
    t, g = np.asarray(targets, dtype=int), np.asarray(groups, dtype=int)
    C = int(n_classes or t.max() + 1)
    G = int(n_groups or g.max() + 1)
    available = count_cells(t, g, C, G)
    if n is None:
        n = max_size(available, b, majority)
    counts = cell_counts(n, C, G, b, majority)
    short = [(y, s, counts[y, s], available[y, s]) for y in range(C) for s in range(G) if counts[y, s] > available[y, s]]
    if short:
        detail = ", ".join(f"cell (y={y}, s={s}) needs {need} but the pool has {have}" for y, s, need, have in short)
        raise AimfairError(
            f"cannot draw {n} samples with bias {b:.4g}: {detail}; "
            f"lower data.n_train (at most {max_size(available, b, majority)} fit) or set it to null"
            + (f"; the majority group of each class is {majority} (data.majority)" if majority is not None else "")
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
