"""EGT tasks behind one small interface, so that the Ray Train loop (``egt.run``) never asks
which generator it trains.

A task says, for its config: its groups and its data (a group-imbalanced fine-tuning set and
a balanced evaluation set), and, once built on a worker: per-sample losses with their noise
level (None when the task has none), its quality per group, and how its trained model is
saved. A new task is a subclass decorated with :func:`register` in a module listed in
``BUILTIN`` (or imported before use).
"""

from __future__ import annotations

import importlib
from typing import ClassVar, Optional

import torch

from aimfair_ray import AimfairError

BUILTIN = ("aimfair_ray.egt.image", "aimfair_ray.egt.text")
TASKS: dict[str, type["EGTTask"]] = {}


def register(cls: type["EGTTask"]) -> type["EGTTask"]:
    TASKS[cls.name] = cls
    return cls


def tasks() -> dict[str, type["EGTTask"]]:
    """Every registered task by name, in name order."""
    for mod in BUILTIN:
        importlib.import_module(mod)
    return dict(sorted(TASKS.items()))


def get(task: str) -> type["EGTTask"]:
    check_task(task)
    return TASKS[task]


def check_task(task: str) -> None:
    if task not in tasks():
        raise AimfairError(f"unknown EGT task {task!r}; choose {' or '.join(tasks())}")


class EGTTask:
    """One generator to fine-tune with EGT (built on a worker with :meth:`__init__`)."""

    name: ClassVar[str]                       # what `aimfair egt NAME` and egt.<name> call it
    objectives: ClassVar[tuple[str, ...]]     # the objectives that make sense for it
    metrics: ClassVar[tuple[str, ...]]        # per-group quality metrics, lower is better
    extra_metrics: ClassVar[dict[str, str]] = {}  # other per-group figures, with a title for the results
    noise_levels: ClassVar[bool] = False      # min–max weights per noise bucket (diffusion)
    val_metric: ClassVar[str]                 # the per-group loss reported at checkpoints (lower is better)

    # ---- on the driver: config and data ----------------------------------------------------
    @staticmethod
    def group_names(cfg) -> list[str]:
        raise NotImplementedError

    @staticmethod
    def datasets(cfg, seed: int):
        """(fine-tuning set, evaluation set); the evaluation set does not depend on ``seed``.
        Every set has ``groups`` (an int array, one per sample)."""
        raise NotImplementedError

    @staticmethod
    def settings(cfg):
        """The task's own config section (``egt.image``, ``egt.text``)."""
        raise NotImplementedError

    @staticmethod
    def data_key(cfg) -> dict:
        """What of the data config decides a run's outcome."""
        raise NotImplementedError

    @staticmethod
    def model_name(cfg) -> str:
        raise NotImplementedError

    @staticmethod
    def conditional_eval(cfg) -> bool:
        """Whether the evaluation set depends on the objective (group-tagged text)."""
        return False

    # ---- on a worker ------------------------------------------------------------------------
    model: torch.nn.Module                    # the module whose trainable tensors the optimizer steps
    T: Optional[int] = None                   # noise levels of a diffusion task

    def __init__(self, cfg, device: str):
        raise NotImplementedError

    def deepspeed_stage(self) -> Optional[int]:
        """The ZeRO stage when this task runs through DeepSpeed, else None (DDP)."""
        return None

    def bind(self, train_set, shard) -> None:
        """Keep this worker's shard of the fine-tuning set (and any frozen encodings of it)."""
        raise NotImplementedError

    def losses(self, model, batch: torch.Tensor, generator: torch.Generator):
        """(per-sample losses, their timesteps or None) of the bound shard's rows ``batch``."""
        raise NotImplementedError

    def trained_state(self) -> dict:
        raise NotImplementedError

    def load_trained(self, state: dict) -> None:
        raise NotImplementedError

    def validate(self, cfg, eval_set) -> dict:
        """``{group: val_metric}`` on (a part of) the evaluation set: cheap enough for every checkpoint."""
        raise NotImplementedError

    def quality(self, cfg, eval_set) -> dict:
        """Per-group quality: ``{metric: {group: value}}``, ``gap`` and ``overall`` per metric."""
        raise NotImplementedError

    def save(self, cfg, directory: str) -> None:
        """Write the fine-tuned model into ``directory``."""
        raise NotImplementedError
