"""AIM-Fair parameter selection, in plain PyTorch (no Ray).

At the pre-trained weights, take the mean task-loss gradient of every parameter
tensor over three sets: real biased (Rb), synthetic imbalanced (Sb) and synthetic
balanced (Su). Then, per tensor ℓ,

    domain[ℓ] = mean |Ḡ_Rb − Ḡ_Sb|    (sensitivity to the real/synthetic shift)
    bias[ℓ]   = mean |Ḡ_Sb − Ḡ_Su|    (sensitivity to the bias)

and train the intersection of the k lowest-domain and the k highest-bias tensors.
Gradients come from the model in eval mode (per-sample, independent of batching) or, as
the official code does, in train mode (BatchNorm batch statistics, batch-mean loss,
averaged over augmented batches). Beyond the paper: per-element masks (the same rule on
single weights) and freezing the BatchNorm running statistics of frozen layers.
"""

from __future__ import annotations

import random
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

SCORE_SETS = ("rb", "sb", "su")  # real biased, synthetic imbalanced, synthetic balanced


def grad_sums(model: nn.Module, batches: Iterable[dict], mean, std, device, mode: str = "eval",
              augment=None) -> tuple[dict[str, torch.Tensor], int]:
    """Summed gradients of every trainable tensor over ``batches``, and what they are summed over.

    ``eval``: the model in eval mode (BatchNorm uses its running statistics), per-sample summed
    cross-entropy; the count is the samples, so the mean is that of the pre-trained model whatever
    the batching. ``train`` (the official code): the model in train mode (BatchNorm uses each
    batch's statistics), the gradient of each batch's mean loss, on images passed through
    ``augment``; the count is the batches, so the mean is the average over batches.
    """
    from aimfair_ray.train.loop import to_input

    if mode not in ("eval", "train"):
        raise ValueError(f"score mode must be eval or train, got {mode!r}")
    model.train(mode == "train")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p, device="cpu", dtype=torch.float64) for n, p in params.items()}
    n = 0
    for b in batches:
        images = b["image"] if augment is None or mode == "eval" else augment(b["image"])
        x = to_input(images, mean, std, device)
        y = b["target"].to(device).long()
        loss = F.cross_entropy(model(x), y, reduction="sum" if mode == "eval" else "mean")
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads):
            if g is not None:
                sums[name] += g.detach().double().cpu()
        n += len(y) if mode == "eval" else 1
    return sums, n


def set_batches(batches: Iterable[dict], n_sets: int, batch_size: int) -> Iterable[tuple[int, dict]]:
    """Re-batch a stream whose ``set`` column mixes the sets into ``(set, batch)`` of exactly
    ``batch_size`` rows of one set each, in arrival order; each set's last partial batch is dropped
    (the official code's ``drop_last``)."""
    buf: list[list[dict]] = [[] for _ in range(n_sets)]
    have = [0] * n_sets
    for b in batches:
        for s in range(n_sets):
            m = b["set"] == s
            if bool(m.any()):
                buf[s].append({k: v[m] for k, v in b.items()})
                have[s] += int(m.sum())
            while have[s] >= batch_size:
                cat = {k: torch.cat([p[k] for p in buf[s]]) for k in buf[s][0]}
                yield s, {k: v[:batch_size] for k, v in cat.items()}
                rest = {k: v[batch_size:] for k, v in cat.items()}
                buf[s], have[s] = ([rest] if len(rest["target"]) else []), len(rest["target"])


def mean_grads(sums: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    if n == 0:
        raise ValueError("no samples to average gradients over")
    return {k: v / n for k, v in sums.items()}


def reduce_mean_grads(sums: dict[str, torch.Tensor], n: int, reduce=None) -> tuple[dict[str, torch.Tensor], int]:
    """Mean gradients over every worker's samples, and their count: one worker's summed gradients
    and count go through ``reduce`` (a sum over the workers, e.g. an all-reduce; None on one
    process) as one flat tensor, as :class:`minmax.GroupWeights` sums its losses. The means are
    zero when no worker saw a sample."""
    names = list(sums)
    flat = torch.cat([sums[k].flatten().double() for k in names] + [torch.tensor([float(n)], dtype=torch.float64)])
    flat = reduce(flat) if reduce is not None else flat
    total = int(flat[-1])
    out, i = {}, 0
    for k in names:
        m = sums[k].numel()
        out[k] = (flat[i:i + m] / max(total, 1)).view_as(sums[k]).float().contiguous()
        i += m
    return out, total


def scores(g: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, float], dict[str, float]]:
    """(domain, bias) per tensor from mean gradients ``g[set][name]``, set in rb/sb/su."""
    names = list(g["rb"])
    domain = {n: float((g["rb"][n] - g["sb"][n]).abs().mean()) for n in names}
    bias = {n: float((g["sb"][n] - g["su"][n]).abs().mean()) for n in names}
    return domain, bias


def resolve_k(k: float, n: int) -> int:
    """k as a count (k >= 1) or as a fraction of the ``n`` tensors (0 < k < 1); at least 1, at most n."""
    if k <= 0:
        raise ValueError(f"k must be > 0 (a count, or a fraction in (0, 1)), got {k}")
    count = round(k * n) if k < 1 else int(k)
    return max(1, min(n, count))


def select(domain: dict[str, float], bias: dict[str, float], k: int) -> list[str]:
    """The intersection of the k lowest-domain and the k highest-bias tensors (in model order).

    Ties are broken by model order, so the result is a pure function of the scores.
    """
    names = list(domain)
    order = {n: i for i, n in enumerate(names)}
    low_domain = set(sorted(names, key=lambda n: (domain[n], order[n]))[:k])
    high_bias = set(sorted(names, key=lambda n: (-bias[n], order[n]))[:k])
    return [n for n in names if n in low_domain and n in high_bias]


def select_at_least(domain: dict[str, float], bias: dict[str, float], k: int, at_least: int = 1) -> tuple[list[str], int]:
    """:func:`select`, with k grown one at a time until the intersection holds ``at_least`` tensors.

    Returns the selection and the k that gave it (k itself when the intersection was big enough).
    """
    n = len(domain)
    for kk in range(k, n + 1):
        chosen = select(domain, bias, kk)
        if len(chosen) >= min(at_least, n):
            return chosen, kk
    return select(domain, bias, n), n


def element_masks(g: dict[str, dict[str, torch.Tensor]], ratio: float) -> dict[str, torch.Tensor]:
    """Per-element masks: the same rule on single weights, k = ``ratio`` of all elements."""
    names = list(g["rb"])
    dom = torch.cat([(g["rb"][n] - g["sb"][n]).abs().flatten() for n in names]).float()
    bia = torch.cat([(g["sb"][n] - g["su"][n]).abs().flatten() for n in names]).float()
    k = resolve_k(ratio, dom.numel())
    keep = torch.zeros(dom.numel(), dtype=torch.bool)
    low = torch.zeros_like(keep)
    low[torch.argsort(dom, stable=True)[:k]] = True
    keep[torch.argsort(-bia, stable=True)[:k]] = True
    keep &= low
    out, i = {}, 0
    for n in names:
        m = g["rb"][n].numel()
        out[n] = keep[i:i + m].view_as(g["rb"][n])
        i += m
    return out


def random_tensors(names: list[str], count: int, seed: int) -> list[str]:
    """``count`` tensors drawn at random (by seed), in model order: the `random` control."""
    pick = set(random.Random(seed).sample(names, min(count, len(names))))
    return [n for n in names if n in pick]


def head_tensors(model: nn.Module) -> list[str]:
    """The parameters of the last ``nn.Linear`` in module order: the `linear` (probe) method."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    if last is None:
        raise ValueError("the model has no nn.Linear head for the linear method")
    prefix = f"{last}." if last else ""
    return [n for n, _ in model.named_parameters() if n.startswith(prefix) and "." not in n[len(prefix):]]


def freeze(model: nn.Module, trainable: Iterable[str], bn_stats: str = "frozen_layers") -> list[nn.Module]:
    """Set ``requires_grad`` from the trainable names; return the BatchNorm layers to keep in eval mode.

    Frozen tensors get no gradient at all (autograd skips their weight-gradient work)
    and must not be given to the optimizer. ``bn_stats``: ``keep`` keeps every BatchNorm
    layer's running statistics (those of the real data the model was trained on),
    ``frozen_layers`` those of layers with no trainable parameter, ``update`` none.
    """
    if bn_stats not in ("keep", "frozen_layers", "update"):
        raise ValueError(f"bn_stats must be keep, frozen_layers or update, got {bn_stats!r}")
    trainable = set(trainable)
    known = {n for n, _ in model.named_parameters()}
    if trainable - known:
        raise ValueError(f"unknown parameter names: {sorted(trainable - known)[:5]}")
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn_stats == "update":
        return []
    if bn_stats == "keep":
        return bns
    return [m for m in bns if not any(p.requires_grad for p in m.parameters(recurse=False))]


class ElementMask:
    """Keeps the masked-out elements of partly trained tensors at their initial values.

    Gradients are zeroed by hooks (so optimizer moments stay zero there) and the
    values are restored after each step (AdamW's decoupled weight decay would move them).
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        self.items = []
        for n, p in model.named_parameters():
            m = masks.get(n)
            if m is None or not p.requires_grad or bool(m.all()):
                continue
            m = m.to(p.device)
            p.register_hook(lambda grad, m=m: grad * m)
            self.items.append((p, m, p.detach().clone()))

    @torch.no_grad()
    def __call__(self) -> None:
        for p, m, init in self.items:
            p.copy_(torch.where(m, p, init))


def plot(domain: dict[str, float], bias: dict[str, float], chosen: list[str], title: str) -> bytes:
    """A PNG: both scores per tensor (log scale), the chosen tensors marked."""
    from aimfair_ray.tables import figure_png, pyplot

    names = list(domain)
    x = range(len(names))
    fig, ax = pyplot().subplots(figsize=(max(6, 0.35 * len(names)), 4), dpi=100)
    floor = 1e-12
    ax.plot(x, [max(domain[n], floor) for n in names], "o-", ms=3, lw=1, label="domain |Ḡ_Rb − Ḡ_Sb|")
    ax.plot(x, [max(bias[n], floor) for n in names], "s-", ms=3, lw=1, label="bias |Ḡ_Sb − Ḡ_Su|")
    for i, n in enumerate(names):
        if n in chosen:
            ax.axvspan(i - 0.4, i + 0.4, color="#f5b041", alpha=0.35, lw=0)
    ax.set_yscale("log")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("mean |gradient difference|")
    ax.set_title(f"{title}: {len(chosen)} of {len(names)} tensors selected (shaded)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)
