"""The biased baseline (ERM) and the Group DRO baseline, on the shared Ray Train loop.

ERM sees no group labels. Group DRO uses the (target, group) cells of the real train set as
groups, with exponentiated-gradient weights (:mod:`aimfair_ray.minmax`). Both, like every
fine-tuning method, export the epoch that ``train.select_metric`` picks on val (by default the
best val accuracy, which needs no group labels).
"""

from __future__ import annotations

from aimfair_ray.config import Config
from aimfair_ray.data.io import image_dataset
from aimfair_ray.data.prepare import load_meta
from aimfair_ray.models import model_meta
from aimfair_ray.train.raytrain import RunSpec, fit


def real_datasets(cfg: Config) -> dict:
    from aimfair_ray.runtime import ensure_ray

    ensure_ray(cfg.ray, cfg.output_dir)  # before any Ray Data call, which would otherwise start a default local cluster
    size, cache = cfg.data.image_size, cfg.train.cache_mb
    return {"train": image_dataset([cfg.paths.split("train")], size, cache, shuffle_seed=cfg.train.seed),
            "val": image_dataset([cfg.paths.split("val")], size, cache)}


def real_only(method: str) -> dict:
    """Provenance of a model trained on real data alone."""
    return {"real_share": 1.0, "synthetic_share": 0.0, "generator": None, "method": method}


def train_baseline(cfg: Config, force: bool = False, log=print, stage: str = "baseline") -> dict:
    """Train the ERM baseline; returns ``{"model_dir", "history", "best", ...}``."""
    meta = model_meta(cfg, load_meta(cfg.data_dir))
    spec = RunSpec(stage=stage, train=cfg.train, info={"method": "baseline"}, provenance=real_only("baseline"))
    return fit(cfg, spec, lambda: real_datasets(cfg), meta, force=force, log=log)


def train_group_dro(cfg: Config, force: bool = False, log=print, stage: str = "group_dro", callbacks=None,
                    score: dict | None = None) -> dict:
    """Group DRO on the real train set (uses group labels); ``callbacks``/``score`` as in :func:`raytrain.fit`."""
    meta = model_meta(cfg, load_meta(cfg.data_dir))
    tc = cfg.train.model_copy(update={"epochs": cfg.group_dro.epochs or cfg.train.epochs})
    spec = RunSpec(stage=stage, train=tc, objective="group_dro", eta=cfg.group_dro.eta, ema=cfg.group_dro.ema,
                   score=score, info={"method": "group_dro", "eta": cfg.group_dro.eta, "ema": cfg.group_dro.ema},
                   provenance=real_only("group_dro"))
    return fit(cfg, spec, lambda: real_datasets(cfg), meta, force=force, log=log, callbacks=callbacks)
