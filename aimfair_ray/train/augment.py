"""Training-time augmentation in plain PyTorch (no torchvision): RandomResizedCrop back to the
image's own size and a horizontal flip, as the official AIM-Fair code trains. Evaluation and
prediction never augment (they see the whole image, resized when the data was prepared)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RATIO = (3 / 4, 4 / 3)


def crop_box(h: int, w: int, scale: tuple[float, float], gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop draws it: an area share in
    ``scale`` and a log-uniform aspect ratio in 3/4..4/3, ten tries, else the centre crop."""
    area = h * w
    for _ in range(10):
        u = torch.rand(3, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        ratio = math.exp(math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * u[1])
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            return top, left, ch, cw
    ratio = w / h  # fallback: the largest centre crop within the ratio range
    if ratio < RATIO[0]:
        cw, ch = w, round(w / RATIO[0])
    elif ratio > RATIO[1]:
        ch, cw = h, round(h * RATIO[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def crop_flip(images: torch.Tensor, gen: torch.Generator, scale=(0.08, 1.0)) -> torch.Tensor:
    """Each uint8 image [N, C, H, W]: a random resized crop (bilinear, back to H x W), flipped left-right
    with probability 1/2. Same shape and dtype; labels are untouched (they are not passed in)."""
    n, _, h, w = images.shape
    out = torch.empty_like(images)
    for i in range(n):
        top, left, ch, cw = crop_box(h, w, scale, gen)
        patch = images[i:i + 1, :, top:top + ch, left:left + cw].float()
        if (ch, cw) != (h, w):
            patch = F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False, antialias=ch > h or cw > w)
        if bool(torch.rand(1, generator=gen) < 0.5):
            patch = patch.flip(-1)
        out[i] = patch.round_().clamp_(0, 255).to(images.dtype)[0]
    return out


def augmenter(name: str, scale, seed: int, epoch: int = 0, rank: int = 0):
    """``images -> images`` for ``train.augment`` (None for ``none``), seeded by (seed, epoch, rank)."""
    if name == "none":
        return None
    if name != "crop_flip":
        raise ValueError(f"unknown augmentation {name!r}")
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_009 + rank)
    return lambda images: crop_flip(images, gen, tuple(scale))
