"""Generation quality per group: the Fréchet distance between real and generated images in
a pretrained feature space (EfficientNet-Lite0 with its bundled ImageNet weights by
default), and the EGT gap (max minus min over groups). Plain PyTorch and NumPy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets [N, D]."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: offset the diagonals (as pytorch-fid does)
        off = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + off) @ (s_b + off))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


class Features:
    """Pooled features of uint8 RGB images [N, H, W, 3], resized to ``size``.

    ``name``: ``efficientnet_lite0`` (the bundled ImageNet weights, 1,280-d), or a folder
    or hub id of any transformers vision backbone (its pooled output)."""

    def __init__(self, name: str = "efficientnet_lite0", size: int = 96, device: str = "cpu"):
        self.size, self.device = size, device
        if name == "efficientnet_lite0":
            from aimfair_ray.models import efficientnet_lite0

            net = efficientnet_lite0(2, size, pretrained=True)
            self.fn = lambda x: net.extract_features(x).mean((2, 3))
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


def gap(per_group: dict) -> float:
    """The EGT gap of one quality metric: max minus min over the groups."""
    v = list(per_group.values())
    return float(max(v) - min(v))
