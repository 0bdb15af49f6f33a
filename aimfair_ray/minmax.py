"""Min–max group weights: exponentiated-gradient ascent on the group simplex.

One small class shared by the Group DRO baseline (classifiers, per-group task loss)
and the EGT min–max fine-tuning of generators (per-group denoising loss or NLL).
The model minimises ``sum_g q_g * L_g``; after every step the adversary moves the
weights toward the worst groups, ``q_g <- q_g * exp(eta * L_g)``, then renormalises
(Sagawa et al., Group DRO, Algorithm 1). With ``eta = 0`` the weights stay uniform.
With ``ema > 0`` the ascent uses exponentially smoothed group losses instead of the
noisy per-batch ones (a group absent from a batch keeps its smoothed loss).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class GroupWeights:
    """Group weights ``q`` (a probability vector) updated by exponentiated gradient.

    ``reduce`` (optional) sums tensors across data-parallel workers, so that every
    worker sees the global per-group losses and keeps the same ``q``.
    """

    def __init__(self, n_groups: int, eta: float, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 ema: float = 0.0):
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        if eta < 0:
            raise ValueError(f"the step size eta must be >= 0, got {eta}")
        if not 0 <= ema < 1:
            raise ValueError(f"the EMA decay must be in [0, 1), got {ema}")
        self.n_groups, self.eta, self.reduce, self.ema = n_groups, float(eta), reduce, float(ema)
        self.q = torch.full((n_groups,), 1.0 / n_groups, dtype=torch.float64)
        self.avg = torch.zeros(n_groups, dtype=torch.float64)   # smoothed group losses (ema > 0)
        self.seen = torch.zeros(n_groups, dtype=torch.bool)

    def group_losses(self, losses: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss per group (0 where a group has no samples) and the per-group counts."""
        groups = groups.long().to(losses.device)
        sums = torch.zeros(self.n_groups, dtype=losses.dtype, device=losses.device).index_add(0, groups, losses)
        counts = torch.bincount(groups, minlength=self.n_groups).to(losses.dtype)
        if self.reduce is not None:
            # Global means, but gradients flow through the local sums only (as in DDP's averaging).
            tot = self.reduce(torch.stack([sums.detach(), counts]))
            counts = tot[1]
            sums = sums + (tot[0] - sums.detach())
        return sums / counts.clamp(min=1), counts

    @torch.no_grad()
    def update(self, group_loss: torch.Tensor) -> torch.Tensor:
        """One ascent step on the weights; groups with zero loss (or absent) keep their mass ratio."""
        self.q = self.q * torch.exp(self.eta * group_loss.detach().double().cpu())
        self.q = self.q / self.q.sum()
        return self.q

    @torch.no_grad()
    def smooth(self, group_loss: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The losses the ascent uses: raw (ema = 0) or the EMA over the batches where a group appeared."""
        if self.ema == 0:
            return group_loss.detach()
        gl, present = group_loss.detach().double().cpu(), counts.detach().cpu() > 0
        first = present & ~self.seen
        self.avg = torch.where(first, gl, torch.where(present, self.ema * self.avg + (1 - self.ema) * gl, self.avg))
        self.seen |= present
        return self.avg

    def __call__(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Robust loss for per-sample ``losses`` of samples in ``groups``; updates ``q`` first (as Group DRO)."""
        gl, counts = self.group_losses(losses, groups)
        self.update(self.smooth(gl, counts))
        return (self.q.to(gl.device, gl.dtype) * gl).sum()

    def state_dict(self) -> dict:
        return {"q": self.q.tolist(), "eta": self.eta, "ema": self.ema, "avg": self.avg.tolist(),
                "seen": self.seen.tolist()}

    def load_state_dict(self, state: dict) -> None:
        q = torch.tensor(state["q"], dtype=torch.float64)
        if q.numel() != self.n_groups:
            raise ValueError(f"saved group weights have {q.numel()} groups, expected {self.n_groups}")
        self.q = q
        if "avg" in state:
            self.avg = torch.tensor(state["avg"], dtype=torch.float64)
            self.seen = torch.tensor(state["seen"], dtype=torch.bool)
