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
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from aimfair_ray import AimfairError
from aimfair_ray.config import Config, TrainConfig
from aimfair_ray.metrics import fairness_report
from aimfair_ray.storage import exists, read_text, write_json
from aimfair_ray.train import loop
from aimfair_ray.models import (META, WEIGHTS, build_model, load_optimizer, save_classifier, save_optimizer,
                                      unwrap, write_classifier)

# A child of Ray Train's logger: shown once on the driver (plain print() is echoed twice by Train V2).
log = logging.getLogger("ray.train.aimfair")


@dataclass
class RunSpec:
    """What a training run does beyond ``TrainConfig``."""

    stage: str                                  # stage folder under the run dir, e.g. "baseline", "finetune/selective"
    train: TrainConfig                          # epochs, lr, batch size, workers, selection metric
    init: Optional[dict] = None                 # start weights {name: np.ndarray}; None: fresh init
    trainable: Optional[list[str]] = None       # None: every tensor
    masks: Optional[dict] = None                # per-element masks {name: bool np.ndarray}
    bn_stats: str = "update"                    # "keep" | "frozen_layers" | "update" (BatchNorm running stats)
    objective: str = "erm"                      # "erm" or "group_dro"
    eta: float = 0.0                            # Group DRO step size
    ema: float = 0.0                            # Group DRO: EMA decay of the group losses the ascent uses
    score: Optional[dict] = None                # {metric: weight}: also report "objective" = sum(weight * metric)
    deepspeed_stage: Optional[int] = None       # None: plain DDP
    info: dict = field(default_factory=dict)    # written into result.json (method, selection, ...)


def gather(arrays: dict) -> dict:
    """Concatenate per-worker prediction arrays across the process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arrays
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    out = {k: np.concatenate([p[k] for p in parts]) for k in arrays if k != "loss_sum"}
    out["loss_sum"] = sum(p["loss_sum"] for p in parts)
    return out


def allreduce(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the workers (identity outside a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def restore_checkpoint(load_weights, weights_file: str, optimizer=None) -> Optional[dict]:
    """On a Train worker: the run's latest checkpoint, if any, loaded (weights through
    ``load_weights``, the optimizer state when saved); returns its ``state.json``, else None."""
    import ray.train
    from safetensors.torch import load_file

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return None
    with ckpt.as_directory() as d:
        load_weights(load_file(str(Path(d) / weights_file)))
        if optimizer is not None and (Path(d) / "optimizer.safetensors").is_file():
            load_optimizer(optimizer, d)
        return json.loads((Path(d) / "state.json").read_text())


def report_checkpoint(metrics: dict, state: dict, write_weights, optimizer=None) -> None:
    """On a Train worker: report ``metrics``; rank 0 attaches a checkpoint (the weights that
    ``write_weights(dir)`` writes, the optimizer state, ``state`` as ``state.json``)."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        write_weights(d)
        if optimizer is not None:
            save_optimizer(optimizer, d)
        Path(d, "state.json").write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def deepspeed_engine(model, optimizer, batch_size: int, stage: int):
    """A DeepSpeed ZeRO engine around a model and a client optimizer (no fused-op build)."""
    try:
        import deepspeed
    except ImportError:
        raise AimfairError("deepspeed=true needs DeepSpeed: pip install 'aimfair-ray[deepspeed]' "
                           "(on CPU with DS_BUILD_OPS=0), or turn the deepspeed option off") from None
    conf = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=conf, dist_init_required=False)
    return engine


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from aimfair_ray.minmax import GroupWeights
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

    model = build_model(mmeta["backbone"], mmeta["num_classes"], mmeta["image_size"], cfg_model["pretrained"],
                        mmeta["width"])
    if spec.init is not None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in spec.init.items()})
    frozen_bn = freeze(model, spec.trainable if spec.trainable is not None else [n for n, _ in model.named_parameters()],
                       spec.bn_stats)
    G = len(mmeta["group_names"])
    dro = GroupWeights(mmeta["num_classes"] * G, spec.eta, reduce=allreduce, ema=spec.ema) if spec.objective == "group_dro" else None
    optimizer = loop.make_optimizer(model.parameters(), tc)  # trainable tensors only
    start, history = 0, []
    state = restore_checkpoint(model.load_state_dict, WEIGHTS, optimizer)
    if state:
        start, history = state["epoch"], state["history"]
        if dro is not None and state.get("group_weights"):
            dro.load_state_dict(state["group_weights"])
        if rank == 0:
            log.info(f"[aimfair] resuming from checkpoint after epoch {start}")
    masker = ElementMask(model, {k: torch.from_numpy(np.array(v)) for k, v in spec.masks.items()}) if spec.masks else None

    device = ray.train.torch.get_device()
    if spec.deepspeed_stage is not None:
        # The engine owns the step; a resumed DeepSpeed run keeps its weights but restarts the optimizer moments.
        model = deepspeed_engine(model.to(device), optimizer, tc.batch_size, spec.deepspeed_stage)
        optimizer = None
    else:
        model = ray.train.torch.prepare_model(model)
    mean, std = mmeta["mean"], mmeta["std"]
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    objective = None
    if dro is not None:
        def objective(losses, b):
            return dro(losses, (b["target"].to(losses.device).long() * G + b["group"].to(losses.device).long()))

    for epoch in range(start, tc.epochs):
        batches = train_shard.iter_torch_batches(batch_size=tc.batch_size, local_shuffle_buffer_size=4 * tc.batch_size,
                                                 local_shuffle_seed=tc.seed + epoch)
        t0 = time.perf_counter()
        st = loop.train_epoch(model, batches, optimizer, mean, std, device, objective, masker, frozen_bn)
        epoch_time = time.perf_counter() - t0
        n, loss_sum, correct = allreduce(torch.tensor([st["n"], st["loss_sum"], st["correct"]], dtype=torch.float64)).tolist()
        val = gather(loop.predict(model, val_shard.iter_torch_batches(batch_size=256), mean, std, device))
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
            "world_size": ctx.get_world_size(),
        }
        if spec.score:
            metrics["objective"] = sum(w * metrics[k] for k, w in spec.score.items())
        history.append(metrics)
        if rank == 0:
            log.info("[aimfair] {stage} epoch {epoch}/{total}  loss {train_loss:.4f}  val_acc {val_acc:.4f}  "
                     "val_wst {val_wst:.4f}  {epoch_time_s:.1f}s".format(stage=spec.stage, total=tc.epochs, **metrics))
        state = {"epoch": epoch + 1, "history": history, "group_weights": dro.state_dict() if dro is not None else None}
        report_checkpoint(metrics, state, lambda d: write_classifier(unwrap(model), dict(mmeta, epoch=epoch + 1,
                                                                                    metrics=metrics), d), optimizer)


def _trainer(cfg: Config, tc: TrainConfig, datasets: dict, loop_config: dict, run_name: str, callbacks=None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = tc.gpus_per_worker
    metric = "epoch" if tc.select_metric == "last" else tc.select_metric
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        datasets=datasets,
        run_config=RunConfig(
            name=run_name,
            storage_path=cfg.ray_storage,
            callbacks=list(callbacks or []),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=tc.keep_checkpoints,
                checkpoint_score_attribute=metric,
                checkpoint_score_order="min" if metric == "val_loss" else "max",
            ),
        ),
    )


def _fingerprint(cfg: Config, spec: RunSpec) -> dict:
    """What decides a run's outcome: the config (less Ray's address) and the spec."""
    s = asdict(spec)
    s["train"] = spec.train.model_dump(mode="json", exclude=Config.RESOURCE_FIELDS["train"])
    s.pop("init")
    s["masks"] = {k: int(np.asarray(v).sum()) for k, v in (spec.masks or {}).items()}
    return {"config": cfg.outcome(), "spec": s}


def fit(cfg: Config, spec: RunSpec, datasets, model_meta: dict, force: bool = False, log=print,
        callbacks=None) -> dict:
    """Train (or resume, or reuse) one run; export its chosen epoch to ``<stage>/model``.

    ``datasets``: the Ray Datasets by name, or a function that builds them; it is called only when
    the run trains, so a reused run reads no data.
    ``callbacks``: Ray Train callbacks, e.g. Tune's ``TuneReportCallback`` when a sweep trial runs it.
    A reused run (same config, finished) returns its ``result.json`` with ``reused: True``.
    """
    from aimfair_ray.runtime import ensure_ray

    stage = cfg.stage_dir(spec.stage)
    model_dir = f"{stage}/model"
    run_name = f"{cfg.name}-{spec.stage.replace('/', '-')}"
    run_path = f"{cfg.ray_storage}/{run_name}"
    fp = _fingerprint(cfg, spec)
    same = exists(f"{stage}/run.json") and json.loads(read_text(f"{stage}/run.json")) == json.loads(json.dumps(fp))
    if same and not force and exists(f"{model_dir}/{META}") and exists(f"{stage}/result.json"):
        log(f"train: reusing {model_dir} (same config; --force retrains)")
        return dict(json.loads(read_text(f"{stage}/result.json")), reused=True)
    if (force or not same) and exists(run_path) and not cfg.ray_storage.startswith(("s3://", "gs://")):
        log(f"train: starting fresh (removing {run_path})")
        shutil.rmtree(run_path, ignore_errors=True)
    elif exists(run_path):
        log(f"train: resuming the interrupted run at {run_path}")

    ensure_ray(cfg.ray)
    cfg.save(stage)
    write_json(f"{stage}/run.json", fp)
    spec_d = asdict(spec)
    spec_d["train"] = spec.train.model_dump(mode="json")
    loop_config = {"spec": spec_d, "model": cfg.model.model_dump(mode="json"), "model_meta": model_meta}
    if callable(datasets):
        datasets = datasets()
    result = _trainer(cfg, spec.train, datasets, loop_config, run_name, callbacks).fit()
    if result.error:
        raise AimfairError(f"training failed: {result.error}")
    metric = "epoch" if spec.train.select_metric == "last" else spec.train.select_metric
    best = result.get_best_checkpoint(metric=metric, mode="min" if metric == "val_loss" else "max") or result.checkpoint
    if best is None:
        raise AimfairError(f"training at {run_path} reported no checkpoint")
    from safetensors.torch import load_file

    with best.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
        model = build_model(model_meta["backbone"], model_meta["num_classes"], model_meta["image_size"], False,
                            model_meta["width"])
        model.load_state_dict(load_file(str(Path(d) / WEIGHTS)))
        best_meta = json.loads((Path(d) / META).read_text())
    save_classifier(model, dict(best_meta, stage=spec.stage, **spec.info), model_dir)
    with result.checkpoint.as_directory() as d:
        last = json.loads((Path(d) / "state.json").read_text())
    out = {"model_dir": model_dir, "run_path": run_path, "history": last["history"], "best": best_meta["metrics"],
           "best_epoch": state["epoch"], "group_weights": last.get("group_weights"), **spec.info}
    write_json(f"{stage}/result.json", out)
    log(f"train: {spec.stage}: epoch {state['epoch']} ({metric} {best_meta['metrics'][metric]:.4f}) -> {model_dir}")
    return out
