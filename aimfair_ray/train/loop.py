"""One train step, one epoch and prediction, in plain PyTorch (no Ray).

Batches are dicts with ``image`` (uint8 [N, 3, H, W]), ``target`` and ``group``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def to_input(images: torch.Tensor, mean, std, device) -> torch.Tensor:
    x = images.to(device, non_blocking=True).float().div_(255.0)
    m = torch.as_tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=device).view(1, -1, 1, 1)
    return (x - m) / s


def make_optimizer(params, tcfg) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]  # frozen tensors never enter the optimizer
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tcfg.lr, momentum=0.9, weight_decay=tcfg.weight_decay)
    return torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> tuple[float, int]:
    """One ERM step; returns (loss, number correct)."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), int((logits.argmax(1) == y).sum())


def train_epoch(model, batches: Iterable[dict], optimizer, mean, std, device) -> dict:
    model.train()
    total, loss_sum, correct = 0, 0.0, 0
    for b in batches:
        x = to_input(b["image"], mean, std, device)
        y = b["target"].to(device).long()
        loss, ok = train_step(model, x, y, optimizer)
        loss_sum += loss * len(y)
        correct += ok
        total += len(y)
    return {"n": total, "loss_sum": loss_sum, "correct": correct}


@torch.no_grad()
def predict(model, batches: Iterable[dict], mean, std, device) -> dict:
    """Targets, groups, predictions, positive-class probabilities and the summed loss."""
    model.eval()
    out = {"target": [], "group": [], "pred": [], "prob": []}
    loss_sum = 0.0
    for b in batches:
        logits = model(to_input(b["image"], mean, std, device))
        probs = logits.float().softmax(1)
        y = b["target"].to(device).long()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        out["target"].append(b["target"].cpu().numpy())
        out["group"].append(b["group"].cpu().numpy())
        out["pred"].append(logits.argmax(1).cpu().numpy())
        out["prob"].append(probs.max(1).values.cpu().numpy())
    res = {k: (np.concatenate(v) if v else np.zeros(0, dtype=int)) for k, v in out.items()}
    res["loss_sum"] = loss_sum
    return res
