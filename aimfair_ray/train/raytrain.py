"""One Ray Train loop for every classifier run: the ERM baseline, Group DRO and the
AIM-Fair fine-tuning methods (full, linear, random, selective), optionally through
DeepSpeed. The per-step work is :mod:`train.loop` (plain PyTorch).

A :class:`RunSpec` says what differs between runs: start weights, which tensors
train (and per-element masks), the objective and the train set. Every epoch rank 0
reports a checkpoint (safetensors weights + optimizer state + JSON); a rerun with
the same config resumes from the latest; the chosen epoch is exported to
``<stage>/model`` with ``result.json`` beside it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from aimfair_ray import workgroup
from aimfair_ray.config import Config, TrainConfig
from aimfair_ray.data.feed import check_rows, worker_batches
from aimfair_ray.distributed import (
    allreduce,
    deepspeed_engine,
    gather,
    report_checkpoint,
    restore_checkpoint,
    reuse_or_resume,
    worker_log,
)
from aimfair_ray.metrics import fairness_report
from aimfair_ray.models import META, WEIGHTS, build_model, load_weights, save_classifier, unwrap, write_classifier
from aimfair_ray.storage import on_store, write_json
from aimfair_ray.train import loop


@dataclass
class RunSpec:
    """What a training run does beyond ``TrainConfig``."""

    stage: str                                  # stage folder under the run dir, e.g. "baseline", "finetune/selective"
    train: TrainConfig                          # epochs, lr, batch size, workers, selection metric
    init: Optional[dict] = None                 # start weights {name: np.ndarray}; None: fresh init
    trainable: Optional[list[str]] = None       # None: every tensor
    masks: Optional[dict] = None                # per-element masks {name: bool np.ndarray}
    bn_stats: str = "update"                    # "keep" | "frozen_layers" | "update" (BatchNorm running stats)
    objective: str = "erm"                      # "erm", "group_dro" or "weighted" (per-row loss weights: JTT)
    eta: float = 0.0                            # Group DRO step size
    ema: float = 0.0                            # Group DRO: EMA decay of the group losses the ascent uses
    score: Optional[dict] = None                # {metric: weight}: also report "objective" = sum(weight * metric)
    deepspeed_stage: Optional[int] = None       # None: plain DDP
    info: dict = field(default_factory=dict)    # written into result.json (method, selection, ...)
    provenance: dict = field(default_factory=dict)  # the training data, written into model.json for model cards


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from aimfair_ray.minmax import GroupWeights
    from aimfair_ray.train.augment import augmenter
    from aimfair_ray.train.selective import ElementMask, freeze

    spec = RunSpec(**dict(config["spec"], train=TrainConfig.model_validate(config["spec"]["train"])))
    cfg_model = config["model"]
    mmeta = config["model_meta"]
    tc = spec.train
    if not tc.use_gpu:
        torch.set_num_threads(tc.torch_threads)
    torch.manual_seed(tc.seed)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()

    model = build_model(mmeta["backbone"], mmeta["num_classes"], mmeta["image_size"], cfg_model["use_pretrained"],
                        mmeta["width"])
    if spec.init is not None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in spec.init.items()})
    frozen_bn = freeze(model, spec.trainable if spec.trainable is not None else [n for n, _ in model.named_parameters()],
                       spec.bn_stats)
    G = len(mmeta["group_names"])
    dro = (GroupWeights(mmeta["num_classes"] * G, spec.eta, reduce=allreduce, ema=spec.ema)
           if spec.objective == "group_dro" else None)
    optimizer = loop.make_optimizer(model.parameters(), tc)  # trainable tensors only
    start, history = 0, []
    state = restore_checkpoint(model.load_state_dict, WEIGHTS, optimizer)
    if state:
        start, history = state["epoch"], state["history"]
        if dro is not None and state.get("group_weights"):
            dro.load_state_dict(state["group_weights"])
        if rank == 0:
            worker_log.info(f"[aimfair] resuming from checkpoint after epoch {start}")
    masker = ElementMask(model, {k: torch.from_numpy(np.array(v)) for k, v in spec.masks.items()}) if spec.masks else None

    device = ray.train.torch.get_device()
    if spec.deepspeed_stage is not None:
        # The engine owns the step; a resumed DeepSpeed run keeps its weights but restarts the optimizer moments.
        model = deepspeed_engine(model.to(device), optimizer, tc.batch_size, spec.deepspeed_stage)
        optimizer = None
    else:
        model = ray.train.torch.prepare_model(model)
    mean, std = mmeta["mean"], mmeta["std"]
    feed = config["feed"]
    objective = None
    if dro is not None:
        def objective(losses, b):
            return dro(losses, (b["target"].to(losses.device).long() * G + b["group"].to(losses.device).long()))
    elif spec.objective == "weighted":
        def objective(losses, b):  # the train set's weights have mean 1: the same scale as ERM's mean loss
            return (losses * b["weight"].to(losses.device, losses.dtype)).mean()

    for epoch in range(start, tc.epochs):
        loop.set_lr(optimizer if optimizer is not None else model.optimizer, loop.epoch_lr(tc, epoch))
        # A seeded shuffle of the whole split every epoch (data.feed), padded to equal steps per worker.
        batches = worker_batches(feed, "train", tc.batch_size, seed=tc.seed, epoch=epoch, pad=True)
        t0 = time.perf_counter()
        st = loop.train_epoch(model, batches, optimizer, mean, std, device, objective, masker, frozen_bn,
                              augmenter(tc.augment, tc.crop_scale, tc.seed, epoch, rank))
        epoch_time = time.perf_counter() - t0
        n, loss_sum, correct = allreduce(torch.tensor([st["n"], st["loss_sum"], st["correct"]], dtype=torch.float64)).tolist()
        val = gather(loop.predict(model, worker_batches(feed, "val", 256), mean, std, device))
        if rank == 0:
            check_rows(feed, "train", int(n), worker_log.info)
            check_rows(feed, "val", len(val["target"]), worker_log.info)
        rep = fairness_report(val["target"], val["pred"], val["group"], mmeta["num_classes"], G)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(n, 1),
            "train_acc": correct / max(n, 1),
            "val_loss": val["loss_sum"] / max(len(val["target"]), 1),
            "val_acc": rep["acc"],
            "val_wst": rep["wst"],
            "val_eo": rep["eo"],
            "val_std": rep["std"],
            "val_gap": max(rep["group_acc"].values()) - min(rep["group_acc"].values()),
            "epoch_time_s": epoch_time,
            "lr": loop.epoch_lr(tc, epoch),
            "world_size": ctx.get_world_size(),
        }
        if spec.score:
            metrics["objective"] = sum(w * metrics[k] for k, w in spec.score.items())
        history.append(metrics)
        if rank == 0:
            worker_log.info("[aimfair] {stage} epoch {epoch}/{total}  loss {train_loss:.4f}  val_acc {val_acc:.4f}  "
                     "val_wst {val_wst:.4f}  {epoch_time_s:.1f}s".format(stage=spec.stage, total=tc.epochs, **metrics))
        state = {"epoch": epoch + 1, "history": history, "group_weights": dro.state_dict() if dro is not None else None}
        meta = dict(mmeta, epoch=epoch + 1, metrics=metrics)
        report_checkpoint(metrics, state, lambda d, meta=meta: write_classifier(unwrap(model), meta, d), optimizer)


# The config sections a classifier run never reads: EGT's; and for a run from fresh weights on real data alone (the
# baseline, Group DRO, JTT) also the synthetic sets' and the fine-tuning's (a fine-tuning keeps both).
UNREAD = ("egt",)
UNREAD_FROM_SCRATCH = UNREAD + ("generate", "finetune")


def _fingerprint(cfg: Config, spec: RunSpec) -> dict:
    """What decides a run's outcome: the config (less its resources and the sections the run never reads) and
    the spec."""
    s = asdict(spec)
    s["train"] = spec.train.model_dump(mode="json", exclude=Config.RESOURCE_FIELDS["train"])
    s.pop("init")
    s.pop("provenance")
    s["masks"] = {k: int(np.asarray(v).sum()) for k, v in (spec.masks or {}).items()}
    scratch_on_real = spec.init is None and not spec.provenance.get("synthetic_share")
    return {"config": cfg.outcome(unread=UNREAD_FROM_SCRATCH if scratch_on_real else UNREAD), "spec": s}


def fit(cfg: Config, spec: RunSpec, datasets, model_meta: dict, force: bool = False, log=print,
        callbacks=None) -> dict:
    """Train (or resume, or reuse) one run; export its chosen epoch to ``<stage>/model``.

    ``datasets``: the Ray Datasets by name, or a function that builds them; it is called only when
    the run trains, so a reused run reads no data.
    ``callbacks``: Ray Train callbacks, e.g. the one a sweep trial passes to hand each report to Tune.
    A reused run (same config, finished) returns its ``result.json`` with ``reused: True``.
    """
    from aimfair_ray.runtime import ensure_ray

    stage = cfg.stage_dir(spec.stage)
    model_dir = f"{stage}/model"
    run_name = f"{cfg.name}-{spec.stage.replace('/', '-')}"
    run_path = f"{cfg.ray_storage}/{run_name}"
    built = {}

    def read_inputs():  # before a forced or changed run removes the old one: damaged inputs stop it first
        built["datasets"] = datasets() if callable(datasets) else datasets

    done = reuse_or_resume(stage, _fingerprint(cfg, spec), run_path, force, outputs=(f"model/{META}",), log=log,
                           before=read_inputs)
    if done is not None:
        return done
    ensure_ray(cfg.ray, cfg.output_dir)
    cfg.save(stage)
    spec_d = asdict(spec)
    spec_d["train"] = spec.train.model_dump(mode="json")
    loop_config = {"spec": spec_d, "model": dict(cfg.model.model_dump(mode="json"), use_pretrained=cfg.model.use_pretrained),
                   "model_meta": model_meta}
    datasets = built["datasets"]
    metric = "epoch" if spec.train.select_metric == "last" else spec.train.select_metric
    result = workgroup.run(train_loop_per_worker, loop_config, spec.train, cfg.ray_storage, run_name, datasets, callbacks,
                           select_metric=metric, what="training", shareable=spec.deepspeed_stage is None)
    best = result.get_best_checkpoint(metric=metric, mode="min" if metric == "val_loss" else "max") or result.checkpoint
    with best.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
        model = build_model(model_meta["backbone"], model_meta["num_classes"], model_meta["image_size"], False,
                            model_meta["width"])
        best_meta = json.loads((Path(d) / META).read_text())
        model.load_state_dict(load_weights(d, best_meta))
    save_classifier(model, dict(best_meta, stage=spec.stage, provenance=spec.provenance, **spec.info), model_dir)
    with result.checkpoint.as_directory() as d:
        last = json.loads((Path(d) / "state.json").read_text())
    out = {"model_dir": model_dir, "run_path": run_path, "checkpoint": on_store(result.checkpoint.path, cfg.ray_storage),
           "history": last["history"], "best": best_meta["metrics"],
           "best_epoch": state["epoch"], "select_metric": spec.train.select_metric,
           "group_weights": last.get("group_weights"), **spec.info}
    write_json(f"{stage}/result.json", out)
    log(f"train: {spec.stage}: epoch {state['epoch']} ({metric} {best_meta['metrics'][metric]:.4f}) -> {model_dir}")
    return out
