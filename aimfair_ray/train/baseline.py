"""Baseline (ERM) training on Ray Train: a TorchTrainer around :mod:`train.loop`.

Ray Data shards feed the workers; every epoch rank 0 reports a checkpoint
(safetensors weights + optimizer state + JSON), Ray keeps the best on val and the
latest, and a rerun with the same config resumes from the latest. The best model
is exported to ``<run>/baseline/model``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from aimfair_ray import AimfairError
from aimfair_ray.config import Config
from aimfair_ray.data.io import decode_batch, read_split
from aimfair_ray.data.prepare import load_meta
from aimfair_ray.metrics import fairness_report
from aimfair_ray.storage import exists, read_text, write_json
from aimfair_ray.train import loop
from aimfair_ray.train.models import (META, WEIGHTS, build_model, load_optimizer, model_meta, save_classifier,
                                      save_optimizer, unwrap, write_classifier)


# A child of Ray Train's logger: shown once on the driver (plain print() is echoed twice by Train V2).
log = logging.getLogger("ray.train.aimfair")


def _gather(arrays: dict) -> dict:
    """Concatenate per-worker prediction arrays across the process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arrays
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    out = {k: np.concatenate([p[k] for p in parts]) for k in arrays if k != "loss_sum"}
    out["loss_sum"] = sum(p["loss_sum"] for p in parts)
    return out


def _allreduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(config["cfg"])
    mmeta = config["model_meta"]
    tc = cfg.train
    if not tc.use_gpu:
        torch.set_num_threads(tc.torch_threads)
    torch.manual_seed(tc.seed)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()

    model = build_model(cfg.model.backbone, mmeta["num_classes"], mmeta["image_size"], cfg.model.pretrained, cfg.model.width)
    optimizer = loop.make_optimizer(model.parameters(), tc)
    start, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(Path(d) / WEIGHTS)))
            load_optimizer(optimizer, d)
            state = json.loads((Path(d) / "state.json").read_text())
        start, history = state["epoch"], state["history"]
        if rank == 0:
            log.info(f"[aimfair] resuming from checkpoint after epoch {start}")
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    mean, std = mmeta["mean"], mmeta["std"]
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(start, tc.epochs):
        batches = train_shard.iter_torch_batches(batch_size=tc.batch_size, local_shuffle_buffer_size=4 * tc.batch_size,
                                                 local_shuffle_seed=tc.seed + epoch)
        st = loop.train_epoch(model, batches, optimizer, mean, std, device)
        n, loss_sum, correct = _allreduce_sum([st["n"], st["loss_sum"], st["correct"]])
        val = _gather(loop.predict(model, val_shard.iter_torch_batches(batch_size=256), mean, std, device))
        rep = fairness_report(val["target"], val["pred"], val["group"], mmeta["num_classes"], len(mmeta["group_names"]))
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(n, 1),
            "train_acc": correct / max(n, 1),
            "val_loss": val["loss_sum"] / max(len(val["target"]), 1),
            "val_acc": rep["acc"],
            "val_wst": rep["wst"],
            "val_eo": rep["eo"],
            "world_size": ctx.get_world_size(),
        }
        history.append(metrics)
        if rank == 0:
            log.info("[aimfair] epoch {epoch}/{total}  loss {train_loss:.4f}  val_acc {val_acc:.4f}  val_wst {val_wst:.4f}".format(
                total=tc.epochs, **metrics))
            with tempfile.TemporaryDirectory() as d:
                write_classifier(unwrap(model), dict(mmeta, epoch=epoch + 1, metrics=metrics), d)
                save_optimizer(optimizer, d)
                Path(d, "state.json").write_text(json.dumps({"epoch": epoch + 1, "history": history}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)


def _trainer(cfg: Config, datasets: dict, loop_config: dict, run_name: str, fn=train_loop_per_worker):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = tc.gpus_per_worker
    return TorchTrainer(
        fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        datasets=datasets,
        run_config=RunConfig(
            name=run_name,
            storage_path=cfg.ray_storage,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=tc.keep_checkpoints,
                checkpoint_score_attribute=tc.select_metric,
                checkpoint_score_order="min" if tc.select_metric == "val_loss" else "max",
            ),
        ),
    )


def _same_config(stage_dir: str, cfg: Config) -> bool:
    from aimfair_ray.config import load_saved

    path = f"{stage_dir}/config.yaml"
    if not exists(path):
        return False
    try:
        return load_saved(path).model_dump(exclude={"ray"}) == cfg.model_dump(exclude={"ray"})
    except AimfairError:
        return False


def train_baseline(cfg: Config, force: bool = False, log=print) -> dict:
    """Train the ERM baseline; returns ``{"model_dir", "history", "best"}``."""
    from aimfair_ray.runtime import ensure_ray

    stage = cfg.stage_dir("baseline")
    model_dir = f"{stage}/model"
    run_name = f"{cfg.name}-baseline"
    run_path = f"{cfg.ray_storage}/{run_name}"
    same = _same_config(stage, cfg)
    if same and not force and exists(f"{model_dir}/{META}"):
        log(f"train: reusing {model_dir} (same config; --force retrains)")
        return json.loads(read_text(f"{stage}/result.json"))
    if (force or not same) and exists(run_path) and not cfg.ray_storage.startswith(("s3://", "gs://")):
        log(f"train: starting fresh (removing {run_path})")
        shutil.rmtree(run_path, ignore_errors=True)
    elif exists(run_path):
        log(f"train: resuming the interrupted run at {run_path}")

    data_meta = load_meta(cfg.data_dir)
    ensure_ray(cfg.ray)
    cfg.save(stage)
    mmeta = model_meta(cfg, data_meta)
    datasets = {s: read_split(f"{cfg.data_dir}/{s}").map_batches(decode_batch, batch_format="numpy") for s in ("train", "val")}
    trainer = _trainer(cfg, datasets, {"cfg": cfg.model_dump(mode="json"), "model_meta": mmeta}, run_name)
    result = trainer.fit()
    if result.error:
        raise AimfairError(f"training failed: {result.error}")
    metric, mode = cfg.train.select_metric, "min" if cfg.train.select_metric == "val_loss" else "max"
    best = result.get_best_checkpoint(metric=metric, mode=mode) or result.checkpoint
    if best is None:
        raise AimfairError(f"training at {run_path} reported no checkpoint")
    with best.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
        model = build_model(mmeta["backbone"], mmeta["num_classes"], mmeta["image_size"], False, mmeta["width"])
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(Path(d) / WEIGHTS)))
        best_meta = json.loads((Path(d) / META).read_text())
    save_classifier(model, best_meta, model_dir)
    with result.checkpoint.as_directory() as d:
        history = json.loads((Path(d) / "state.json").read_text())["history"]
    out = {"model_dir": model_dir, "run_path": run_path, "history": history,
           "best": best_meta["metrics"], "best_epoch": state["epoch"]}
    write_json(f"{stage}/result.json", out)
    log(f"train: best epoch {state['epoch']} ({metric} {best_meta['metrics'][metric]:.4f}) -> {model_dir}")
    return out
