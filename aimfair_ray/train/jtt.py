"""Just Train Twice (Liu et al., ICML 2021): a baseline that, like AIM-Fair, trains without group labels.

1. ERM for T epochs (``jtt.epochs``; the last one): the identification model.
2. Its errors on the train set, E = {i : argmax f(x_i) != y_i}.
3. ERM again from a fresh start, on the shared Ray Train loop, with the rows of E weighted
   λ (``jtt.upweight``) and the rest 1. The paper upsamples E λ times; a per-row loss weight,
   normalised to mean 1 over the train set, is the same objective without repeated rows.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from aimfair_ray.config import Config
from aimfair_ray.data.io import decode_batch, image_dataset, read_table
from aimfair_ray.data.prepare import load_meta
from aimfair_ray.models import load_classifier, model_meta
from aimfair_ray.train import loop
from aimfair_ray.train.raytrain import RunSpec, fit


def error_weights(pred: np.ndarray, target: np.ndarray, upweight: float) -> np.ndarray:
    """λ for each misclassified row, 1 for the rest, scaled to mean 1."""
    w = np.where(np.asarray(pred) != np.asarray(target), float(upweight), 1.0)
    return w / w.mean()


@torch.no_grad()
def predict_split(model_dir: str, split_dir: str, batch_size: int = 512) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, targets, predictions) of a model on a split, in this process, in id order."""
    model, meta = load_classifier(model_dir)
    t = read_table(split_dir, ["id", "image", "target", "group"]).sort_by("id")
    preds = []
    for i in range(0, t.num_rows, batch_size):
        part = t.slice(i, batch_size)
        b = decode_batch({c: part[c].to_numpy(zero_copy_only=False) for c in ("image", "target", "group")})
        out = loop.predict(model, [{k: torch.from_numpy(v) for k, v in b.items()}], meta["mean"], meta["std"], "cpu")
        preds.append(out["pred"])
    return t["id"].to_pylist(), t["target"].to_numpy(), np.concatenate(preds)


def train_jtt(cfg: Config, force: bool = False, log=print, stage: str = "jtt") -> dict:
    """Both JTT runs; returns the second's result (``model_dir``, ``history``, ``n_errors``, ...)."""
    from aimfair_ray.runtime import ensure_ray
    from aimfair_ray.train.baseline import real_datasets, real_only

    meta = model_meta(cfg, load_meta(cfg.data_dir))
    j = cfg.jtt
    first = cfg.train.model_copy(update={"epochs": j.epochs, "select_metric": "last", "lr_steps": []})
    ident = fit(cfg, RunSpec(stage=f"{stage}/identify", train=first, info={"method": "jtt_identify"},
                             provenance=real_only("jtt_identify")), lambda: real_datasets(cfg), meta, force=force, log=log)
    train_dir = cfg.paths.split("train")
    ids, target, pred = predict_split(ident["model_dir"], train_dir)
    w = error_weights(pred, target, j.upweight)
    wrong = pred != target
    errors = {i: float(x) for i, x, e in zip(ids, w, wrong) if e}
    ok = float(w[~wrong][0]) if (~wrong).any() else 1.0
    log(f"jtt: the {j.epochs}-epoch ERM model misclassifies {len(errors)} of {len(ids)} train rows; "
        f"upweighting them x{j.upweight}")
    info = {"method": "jtt", "upweight": j.upweight, "identify_epochs": j.epochs, "n_errors": len(errors),
            "n_train": len(ids), "errors_sha": hashlib.sha1(",".join(sorted(errors)).encode()).hexdigest()[:16]}

    def datasets() -> dict:
        ensure_ray(cfg.ray, cfg.output_dir)
        size, cache = cfg.data.image_size, cfg.train.cache_mb
        return {"train": image_dataset([train_dir], size, cache, shuffle_seed=cfg.train.seed, weights=errors,
                                       default_weight=ok),
                "val": image_dataset([cfg.paths.split("val")], size, cache)}

    spec = RunSpec(stage=stage, train=cfg.train, objective="weighted", info=info, provenance=real_only("jtt"))
    return fit(cfg, spec, datasets, meta, force=force, log=log)
