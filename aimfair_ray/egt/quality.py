"""Generation quality per group, as the EGT paper measures it, in plain PyTorch and NumPy.

- Features of real and generated images from a pretrained network (:class:`Features`):
  EfficientNet-Lite0 with its bundled ImageNet weights, pooled after its last block (320-d,
  so that 500 images per group give a full-rank covariance), or any transformers vision model.
- :func:`frechet_distance`: FID in that feature space, computed by torchmetrics.
- :func:`prdc`: improved precision and recall (Kynkäänniemi et al. 2019, k-NN manifolds) and
  density and coverage (Naeem et al. 2020), by the ``prdc`` package of the latter's authors.
- :func:`per_group`: each metric per group, its gap (max − min over groups) and its overall value.
- :func:`rejection_sample`: the unconditional setting's sampler: draw, let an oracle name each
  sample's group, keep drawing until every group has its count (or the draw budget is spent).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HIGHER_IS_BETTER = frozenset({"precision", "recall", "density", "coverage"})


class _Given(nn.Module):
    """torchmetrics' FID with features computed elsewhere: the 'network' passes them through."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets [N, D] (torchmetrics' ``FrechetInceptionDistance``, float64).
    The covariance estimate is full rank only with more than D samples per set; where a singular
    product defeats its eigenvalue solver, both covariances get 1e-6 on the diagonal (as
    pytorch-fid does) and torchmetrics' formula runs on them."""
    from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid

    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    a, b = torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64))
    fid = FrechetInceptionDistance(feature=_Given(a.shape[1]), reset_real_features=True).double()
    fid.update(a, real=True)
    fid.update(b, real=False)
    try:
        return float(fid.compute())
    except torch.linalg.LinAlgError:
        off = 1e-6 * torch.eye(a.shape[1], dtype=torch.float64)
        return float(_compute_fid(a.mean(0), torch.cov(a.T) + off, b.mean(0), torch.cov(b.T) + off))


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision (share of generated samples inside the real k-NN manifold), recall (share of real
    samples inside the generated one), density and coverage; each set needs more than k samples."""
    import contextlib
    import io

    from prdc import compute_prdc

    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision and recall with k={k} need more than {k} samples per set, got {len(real)} and "
                         f"{len(fake)}")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the set sizes
        out = compute_prdc(np.asarray(real, np.float64), np.asarray(fake, np.float64), k)
    return {m: float(v) for m, v in out.items()}


def gap(per_group: dict) -> float:
    """The EGT gap of one quality metric: max minus min over the groups."""
    v = list(per_group.values())
    return float(max(v) - min(v))


def per_group(real: np.ndarray, real_groups: np.ndarray, fake: np.ndarray, fake_groups: np.ndarray,
              names: list[str], k: int = 5) -> dict:
    """``{metric: {group: value}}`` for fid, precision, recall, density and coverage, each group's
    generated samples against its real ones; ``gap`` and ``overall`` (all samples) per metric."""
    def measure(r, f):
        return {"fid": frechet_distance(r, f), **prdc(r, f, k)}

    out: dict = {}
    for g, name in enumerate(names):
        for m, v in measure(real[real_groups == g], fake[fake_groups == g]).items():
            out.setdefault(m, {})[name] = v
    out["gap"] = {m: gap(out[m]) for m in list(out)}
    out["overall"] = measure(real, fake)
    out["full_rank"] = bool(min(np.bincount(real_groups, minlength=len(names)).min(),
                                np.bincount(fake_groups, minlength=len(names)).min()) > real.shape[1])
    return out


def rejection_sample(draw: Callable[[int, int], np.ndarray], oracle: Callable[[np.ndarray], np.ndarray], n_groups: int,
                     n_per_group: int, batch_size: int, max_draws: int) -> tuple[list[np.ndarray], dict]:
    """Samples sorted into groups by ``oracle`` until each group has ``n_per_group``.

    ``draw(start, k)`` returns samples ``start .. start + k - 1`` of a fixed stream (so the result
    depends on the seed only); ``oracle(samples)`` their group ids. Samples of a group that is full
    are rejected. Stops after ``max_draws`` samples: a group the model seldom makes may stay short.
    Returns the kept samples per group and ``{"drawn", "share", "short"}``: how many were drawn, each
    group's share of all draws (how often the model makes it), the groups left short (name: count)."""
    if max_draws < 1 or n_per_group < 1:
        raise ValueError(f"max_draws and n_per_group must be >= 1, got {max_draws} and {n_per_group}")
    kept: list[list[np.ndarray]] = [[] for _ in range(n_groups)]
    counts = np.zeros(n_groups, dtype=int)
    seen = np.zeros(n_groups, dtype=int)
    drawn = 0
    while counts.min() < n_per_group and drawn < max_draws:
        x = draw(drawn, min(batch_size, max_draws - drawn))
        g = np.asarray(oracle(x))
        drawn += len(x)
        for grp in range(n_groups):
            idx = np.flatnonzero(g == grp)
            seen[grp] += len(idx)
            take = idx[:max(0, n_per_group - counts[grp])]
            if len(take):
                kept[grp].append(x[take])
                counts[grp] += len(take)
    groups = [np.concatenate(k) if k else x[:0] for k in kept]
    return groups, {"drawn": int(drawn), "share": (seen / max(drawn, 1)).tolist(),
                    "short": {int(i): int(c) for i, c in enumerate(counts) if c < n_per_group}}


class Features:
    """Pooled features of uint8 RGB images [N, H, W, 3], resized to ``size``.

    ``name``: ``efficientnet_lite0`` (the bundled ImageNet weights; the 320-d output of its last
    block, before the 1,280-d head that 500 samples cannot estimate a covariance of), or a folder
    or hub id of any transformers vision backbone (its pooled output)."""

    def __init__(self, name: str = "efficientnet_lite0", size: int = 96, device: str = "cpu"):
        self.size, self.device = size, device
        if name == "efficientnet_lite0":
            from aimfair_ray.models import efficientnet_lite0

            net = efficientnet_lite0(2, size, pretrained=True)

            def fn(x):
                h = net._swish(net._bn0(net._conv_stem(x)))
                for block in net._blocks:
                    h = block(h)
                return h.mean((2, 3))
            self.fn = fn
        else:
            from transformers import AutoModel

            net = AutoModel.from_pretrained(name)
            self.fn = lambda x: net(pixel_values=x).pooler_output.flatten(1)
        self.net = net.eval().to(device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
        out = []
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 255.0
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
            out.append(self.fn((x - mean) / std).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)
