"""Min–max group weights: exponentiated-gradient ascent on the group simplex.

One small class shared by the Group DRO baseline (classifiers, per-group task loss)
and the EGT min–max fine-tuning of generators (per-group denoising loss or NLL).
The model minimises ``sum_g q_g * L_g``; after every step the adversary moves the
weights toward the worst groups, ``q_g <- q_g * exp(eta * L_g)``, then renormalises
(Sagawa et al., Group DRO, Algorithm 1). Only the groups present in the batch take part
in a step (see :meth:`GroupWeights.update`). With ``eta = 0`` the weights stay uniform.
With ``ema > 0`` the ascent uses exponentially smoothed group losses instead of the
noisy per-batch ones (a group absent from a batch keeps its smoothed loss). The ``worst``
rule (EGT's "worst group at each noise level") replaces the ascent step: all weight goes to
the group with the highest (smoothed) loss, the limit of the step as ``eta`` grows.

For diffusion (EGT), :class:`NoiseLevelWeights` keeps one set of weights per bucket of
timesteps, so the min–max acts at each noise level. :class:`Objective` names the
training objectives that EGT compares: ERM, group-balanced reweighting, min–max, and
group-conditional fine-tuning (ERM on group-conditioned inputs).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

UPDATE_RULES = ("soft", "worst")  # exponentiated-gradient step, or all weight on the worst group


class GroupWeights:
    """Group weights ``q`` (a probability vector) updated by exponentiated gradient.

    ``reduce`` (optional) sums tensors across data-parallel workers, so that every
    worker sees the global per-group losses and keeps the same ``q``.
    """

    def __init__(self, n_groups: int, eta: float, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 ema: float = 0.0, rule: str = "soft"):
        if rule not in UPDATE_RULES:
            raise ValueError(f"unknown update rule {rule!r}; choose one of {', '.join(UPDATE_RULES)}")
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        if eta < 0:
            raise ValueError(f"the step size eta must be >= 0, got {eta}")
        if not 0 <= ema < 1:
            raise ValueError(f"the EMA decay must be in [0, 1), got {ema}")
        self.n_groups, self.eta, self.reduce, self.ema, self.rule = n_groups, float(eta), reduce, float(ema), rule
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
    def update(self, group_loss: torch.Tensor, active: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One ascent step that moves weight only among the ``active`` groups (default: all):
        ``q_g * exp(eta * L_g)`` for them, rescaled to their previous total mass. With every group
        active this is the usual step; a group without a loss (absent from the batch) keeps its
        weight, and a batch with one group moves nothing. Counting an absent group as a zero
        loss instead would drift the weights toward the majority group when batches are small.
        The ``worst`` rule puts all weight on the active group with the highest loss."""
        gl = group_loss.detach().double().cpu()
        active = torch.ones_like(gl, dtype=torch.bool) if active is None else active.detach().cpu().bool()
        if self.rule == "worst":
            if active.sum() > 1:  # one group alone says nothing about which is worst
                self.q = torch.zeros_like(self.q)
                self.q[int(torch.where(active, gl, -torch.inf).argmax())] = 1.0
        elif active.any():
            stepped = self.q[active] * torch.exp(self.eta * (gl[active] - gl[active].max()))  # shifted: no overflow
            q = self.q.clone()
            q[active] = stepped * (self.q[active].sum() / stepped.sum())
            self.q = q / q.sum()
        return self.q

    @torch.no_grad()
    def smooth(self, group_loss: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The losses the ascent uses and the groups they exist for: the batch's present groups
        (ema = 0), or the EMA over the batches where a group appeared, for every group seen so far."""
        present = counts.detach().cpu() > 0
        if self.ema == 0:
            return group_loss.detach(), present
        gl = group_loss.detach().double().cpu()
        first = present & ~self.seen
        self.avg = torch.where(first, gl, torch.where(present, self.ema * self.avg + (1 - self.ema) * gl, self.avg))
        self.seen |= present
        return self.avg, self.seen.clone()

    def step(self, losses: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Update ``q`` from this batch (as Group DRO, before the model step); return the
        robust loss ``sum_g q_g L_g`` over the groups present (``q`` renormalised over them),
        the group losses and the group counts. (With ``worst`` and the worst group absent from
        the batch, the loss is 0: nothing of the worst group to minimise in it.)"""
        gl, counts = self.group_losses(losses, groups)
        self.update(*self.smooth(gl, counts))
        q = self.q.to(gl.device, gl.dtype) * (counts > 0)  # groups absent from the batch don't dilute the loss
        return (q * gl).sum() / q.sum().clamp(min=1e-12), gl, counts

    def __call__(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Robust loss for per-sample ``losses`` of samples in ``groups``; updates ``q`` first (as Group DRO)."""
        return self.step(losses, groups)[0]

    def state_dict(self) -> dict:
        return {"q": self.q.tolist(), "eta": self.eta, "ema": self.ema, "rule": self.rule, "avg": self.avg.tolist(),
                "seen": self.seen.tolist()}

    def load_state_dict(self, state: dict) -> None:
        q = torch.tensor(state["q"], dtype=torch.float64)
        if q.numel() != self.n_groups:
            raise ValueError(f"saved group weights have {q.numel()} groups, expected {self.n_groups}")
        self.q = q
        if "avg" in state:
            self.avg = torch.tensor(state["avg"], dtype=torch.float64)
            self.seen = torch.tensor(state["seen"], dtype=torch.bool)


class NoiseBuckets:
    """Equal-width buckets of diffusion timesteps ``[0, T)``: ``bucket(t) = t * B // T``."""

    def __init__(self, n_buckets: int, num_timesteps: int):
        if not 1 <= n_buckets <= num_timesteps:
            raise ValueError(f"n_buckets must be in [1, {num_timesteps}] (the number of timesteps), got {n_buckets}")
        self.n_buckets, self.num_timesteps = n_buckets, num_timesteps

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.long()
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must be in [0, {self.num_timesteps}), got {int(t.min())}..{int(t.max())}")
        return t * self.n_buckets // self.num_timesteps

    def edges(self) -> list[tuple[int, int]]:
        """[first, last] timestep of each bucket."""
        b = self(torch.arange(self.num_timesteps))
        return [(int(torch.nonzero(b == k).min()), int(torch.nonzero(b == k).max())) for k in range(self.n_buckets)]


class NoiseLevelWeights:
    """Min–max at each noise level: one :class:`GroupWeights` per timestep bucket. The loss is
    ``sum_b (n_b / n) sum_g q_bg L_bg``: every bucket's worst groups are up-weighted."""

    def __init__(self, n_groups: int, eta: float, n_buckets: int, num_timesteps: int,
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, ema: float = 0.0, rule: str = "soft"):
        self.buckets = NoiseBuckets(n_buckets, num_timesteps)
        self.levels = [GroupWeights(n_groups, eta, reduce, ema, rule) for _ in range(n_buckets)]

    @property
    def q(self) -> torch.Tensor:
        return torch.stack([w.q for w in self.levels])

    def __call__(self, losses: torch.Tensor, groups: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        b = self.buckets(timesteps).to(losses.device)
        total, n = losses.new_zeros(()), losses.new_zeros(())
        for k, w in enumerate(self.levels):  # every bucket, also empty ones: reduce is a collective
            robust, _, counts = w.step(losses[b == k], groups[b == k])
            total, n = total + counts.sum() * robust, n + counts.sum()
        return total / n.clamp(min=1)

    def state_dict(self) -> dict:
        return {"levels": [w.state_dict() for w in self.levels]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["levels"]) != len(self.levels):
            raise ValueError(f"saved weights have {len(state['levels'])} noise buckets, expected {len(self.levels)}")
        for w, s in zip(self.levels, state["levels"]):
            w.load_state_dict(s)


OBJECTIVES = ("erm", "reweight", "minmax", "conditional")


class Objective:
    """Per-sample losses -> the training loss, for each objective EGT compares:

    - ``erm``: the mean loss (the majority group dominates);
    - ``reweight``: importance reweighting to balanced groups, ``mean_g L_g`` (uniform ``q``);
    - ``minmax``: min–max group weights (per noise bucket when ``n_buckets`` > 1), by the
      exponentiated-gradient step (``rule="soft"``) or on the worst group (``rule="worst"``);
    - ``conditional``: ERM; the trainer conditions the model on the group instead.
    """

    def __init__(self, objective: str, n_groups: int, eta: float = 0.0, ema: float = 0.0, n_buckets: int = 1,
                 num_timesteps: Optional[int] = None, reduce=None, rule: str = "soft"):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        self.objective, self.n_groups = objective, n_groups
        self.weights: Optional[GroupWeights | NoiseLevelWeights] = None
        if objective in ("reweight", "minmax"):
            step, rule = (eta, rule) if objective == "minmax" else (0.0, "soft")
            if num_timesteps is not None and n_buckets > 1:
                self.weights = NoiseLevelWeights(n_groups, step, n_buckets, num_timesteps, reduce, ema, rule)
            else:
                self.weights = GroupWeights(n_groups, step, reduce, ema, rule)

    def __call__(self, losses: torch.Tensor, groups: torch.Tensor, timesteps: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.weights is None:
            return losses.mean()
        if isinstance(self.weights, NoiseLevelWeights):
            return self.weights(losses, groups, timesteps)
        return self.weights(losses, groups)

    def state_dict(self) -> dict:
        return {"objective": self.objective, "weights": self.weights.state_dict() if self.weights is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("weights") is not None and self.weights is not None:
            self.weights.load_state_dict(state["weights"])
