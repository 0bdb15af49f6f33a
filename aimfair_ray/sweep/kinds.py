"""Sweep kinds: what a sweep's trials train. A kind is one ``@register``ed :class:`SweepKind`; the CLI's
help, the spec's validation and the sweep loop read the registry, so a new kind is one entry here plus its
YAML in ``presets/sweeps/`` (and no ``if kind == ...`` anywhere)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from aimfair_ray import AimfairError
from aimfair_ray.registry import Registry


@dataclass(frozen=True)
class SweepKind:
    """One kind of sweep.

    - ``train(cfg, stage, sweep_stage, baseline_dir, callbacks, score)``: one trial's Ray Train run; returns its
      result (``history``, ``reused``, ...) and reports every epoch (or EGT checkpoint) through ``callbacks``.
    - ``length(cfg)``: how many epochs (or EGT steps) a trial runs: what ASHA counts up to.
    - ``check(cfg)``: what must exist before the sweep starts Ray (a clear error if it does not).
    - ``prepare(cfg, trial_cfg, sweep_stage, log)``: what every trial needs, made once before any runs (the
      selection scores); returns the baseline's folder, or None.
    - ``egt``: the EGT task its trials fine-tune (``image``, ``text``), None for a classifier sweep.
    """

    name: str
    help: str
    train: Callable[..., dict]
    length: Callable[..., int]
    check: Optional[Callable[..., None]] = None
    prepare: Optional[Callable[..., Optional[str]]] = None
    egt: Optional[str] = None

    @property
    def time_attr(self) -> str:
        """What ASHA counts: Train epochs, or EGT steps (reported every egt.checkpoint_every)."""
        return "step" if self.egt else "epoch"


KINDS: Registry[SweepKind] = Registry("unknown sweep {name}; choose {names}")


def register(kind: SweepKind) -> SweepKind:
    return KINDS.add(kind.name, kind)


def get(name: str) -> SweepKind:
    return KINDS.pick(name)


# ---- the shipped kinds ---------------------------------------------------------------------
def _selective_check(cfg) -> None:
    from aimfair_ray.storage import exists
    from aimfair_ray.train.finetune import synthetic_dir

    if not exists(f"{cfg.paths.baseline_model}/model.json"):
        raise AimfairError(f"no baseline at {cfg.paths.baseline_model}: run `aimfair demo` (or `aimfair train baseline`) "
                           "first")
    synthetic_dir(cfg, "balanced")  # a clear error if `aimfair generate all` has not run


def _selective_prepare(cfg, trial_cfg, sweep_stage: str, log) -> str:
    from aimfair_ray.train.finetune import compute_scores

    compute_scores(trial_cfg, cfg.paths.baseline_model, log=log, stage=f"{sweep_stage}/scores")
    return cfg.paths.baseline_model


def _selective_train(cfg, stage, sweep_stage, baseline_dir, callbacks, score) -> dict:
    from aimfair_ray.train.finetune import finetune

    return finetune(cfg, cfg.finetune.method, stage=stage, baseline_dir=baseline_dir,
                    scores_stage=f"{sweep_stage}/scores", callbacks=callbacks, score=score)


def _group_dro_train(cfg, stage, sweep_stage, baseline_dir, callbacks, score) -> dict:
    from aimfair_ray.train.baseline import train_group_dro

    return train_group_dro(cfg, stage=stage, callbacks=callbacks, score=score)


def _egt_train(task: str):
    def train(cfg, stage, sweep_stage, baseline_dir, callbacks, score) -> dict:
        from aimfair_ray.egt.run import train_generator

        return train_generator(cfg, task, stage=stage, callbacks=callbacks, score=score, quality=False)
    return train


register(SweepKind("selective", "AIM-Fair fine-tuning of the run's baseline: finetune.k, lr", _selective_train,
                   lambda c: c.finetune.epochs, check=_selective_check, prepare=_selective_prepare))
register(SweepKind("group_dro", "the Group DRO baseline's group weights: group_dro.eta, EMA decay", _group_dro_train,
                   lambda c: c.group_dro.epochs or c.train.epochs))
for _task in ("image", "text"):
    register(SweepKind(f"egt-{_task}", f"EGT min–max fine-tuning of the {_task} generator: update rule, eta, EMA decay"
                       + (", noise buckets" if _task == "image" else ""), _egt_train(_task), lambda c: c.egt.steps,
                       egt=_task))
