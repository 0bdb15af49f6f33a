"""EGT fine-tuning on Ray Train: one loop for the diffusion and the language-model task.

Each worker builds the (deterministic) fine-tuning set and draws its batches from its own
shard; the group losses are summed over the workers before the group weights move, so
every worker keeps the same weights. Gradients go through DDP (``prepare_model``), or
through DeepSpeed ZeRO for the LM (``egt.text.deepspeed``). Every ``checkpoint_every``
steps rank 0 reports a checkpoint (trained tensors as safetensors, optimizer state, group
weights); a rerun with the same config resumes from it, a finished one is reused.

Each task (its data, losses, quality and saved model) sits behind :mod:`egt.tasks`. At every
checkpoint rank 0 also reports the task's per-group validation loss on ``egt.val_per_group``
held-out samples per group: ``val_quality`` (their mean over groups) and ``val_quality_gap``
(max − min), and with a sweep's ``score`` weights their ``objective``; Tune's ASHA ranks by it.

Outputs, under ``<run>/egt/<task>/<objective>-seed<seed>/``: ``model/`` (image: a diffusers
pipeline folder; text: the trained tensors over the named base model), ``quality.json``
(the per-group quality and the EGT gap), ``result.json`` and ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from aimfair_ray import manifest
from aimfair_ray.config import Config
from aimfair_ray.egt.tasks import check_task, get
from aimfair_ray.storage import atomic_dir, made_with, on_store, write_json

CHECKPOINT = "trained.safetensors"  # the trained tensors in a Ray Train checkpoint


def group_names(cfg: Config, task: str) -> list[str]:
    return get(task).group_names(cfg)


def per_group_head(data, n: int):
    """The first ``n`` samples of each group of a task's set (any dataclass of per-sample fields)."""
    keep = np.concatenate([np.flatnonzero(data.groups == g)[:n] for g in np.unique(data.groups)])
    pick = lambda v: None if v is None else v[keep] if isinstance(v, np.ndarray) else [v[i] for i in keep]
    return dataclasses.replace(data, **{f.name: pick(getattr(data, f.name)) for f in dataclasses.fields(data)})


def validation(task, cfg: Config, val_set, score: Optional[dict]) -> dict:
    """The checkpoint's validation figures: the mean over groups of the task's loss, its gap, the objective."""
    per = task.validate(cfg, val_set)
    out = {"val_quality": float(np.mean(list(per.values()))), "val_quality_gap": float(max(per.values()) - min(per.values())),
           "val_groups": json.dumps(per)}
    if score:
        out["objective"] = sum(w * out[m] for m, w in score.items())
    return out


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from safetensors.torch import save_file

    from aimfair_ray.distributed import allreduce, deepspeed_engine, report_checkpoint, restore_checkpoint, worker_log
    from aimfair_ray.minmax import Objective

    cfg, task = Config.model_validate(config["cfg"]), config["task"]
    e, tc = cfg.egt, cfg.train
    if not tc.use_gpu:
        torch.set_num_threads(tc.torch_threads)
    torch.manual_seed(e.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    Task = get(task)
    task = Task(cfg, str(device))
    train_set, eval_set = Task.datasets(cfg, e.seed)
    val_set = per_group_head(eval_set, e.val_per_group) if e.val_per_group and rank == 0 else None
    shard = np.arange(len(train_set.groups))[rank::world]
    per_worker = max(1, e.batch_size // world)
    task.bind(train_set, shard)
    groups = torch.from_numpy(train_set.groups[shard])

    objective = Objective(e.objective, 2, e.eta, e.ema, e.n_buckets if Task.noise_levels else 1,
                          task.T if Task.noise_levels else None, reduce=allreduce, rule=e.update)
    params = [p for p in task.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=e.lr, weight_decay=0.0)
    start, history = 0, []
    state = restore_checkpoint(task.load_trained, CHECKPOINT, optimizer)
    if state:
        start, history = state["step"], state["history"]
        objective.load_state_dict(state["objective"])
        if rank == 0:
            worker_log.info(f"[aimfair] egt resuming from checkpoint after step {start}")
    zero = task.deepspeed_stage()
    if zero is not None:
        model = deepspeed_engine(task.model.to(device), optimizer, per_worker, zero)
        optimizer = None
    else:
        model = ray.train.torch.prepare_model(task.model)
    model.train()

    window, t0 = [], time.perf_counter()
    for step in range(start, e.steps):
        g = torch.Generator().manual_seed((e.seed * 1_000_003 + rank) * 100_003 + step)  # resumable draws
        b = torch.randint(0, len(shard), (per_worker,), generator=g)
        losses, t = task.losses(model, b, g)
        loss = objective(losses, groups[b].to(losses.device), t)
        if optimizer is None:
            model.backward(loss)
            model.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        window.append(float(losses.detach().mean()))
        if (step + 1) % e.checkpoint_every and step + 1 != e.steps:
            continue
        q = objective.weights.q.tolist() if objective.weights is not None else None
        metrics = {"step": step + 1, "loss": float(np.mean(window)), "s_per_step": (time.perf_counter() - t0) / len(window),
                   "q": json.dumps(q), "world_size": world}
        if val_set is not None:
            metrics.update(validation(task, cfg, val_set, config.get("score")))
            model.train()
        history.append(metrics)
        window, t0 = [], time.perf_counter()
        if rank == 0:
            val = f" val {metrics['val_quality']:.4f} gap {metrics['val_quality_gap']:.4f}" if val_set is not None else ""
            worker_log.info(f"[aimfair] egt {task.name} {e.objective} step {step + 1}/{e.steps} loss {metrics['loss']:.4f}{val} "
                            f"{metrics['s_per_step']:.2f}s/step q {np.round(q, 3).tolist() if q else None}")
        report_checkpoint(metrics, {"step": step + 1, "history": history, "objective": objective.state_dict()},
                          lambda d: save_file(task.trained_state(), str(Path(d) / CHECKPOINT)), optimizer)


def _fingerprint(cfg: Config, task: str) -> dict:
    """What decides a fine-tuning run's outcome."""
    others = {k for k in ("image", "text") if k != task}  # the other tasks' config sections
    return {"task": task, "egt": cfg.egt.model_dump(mode="json", exclude=others), "workers": cfg.train.num_workers,
            "data": get(task).data_key(cfg)}


def stage_of(cfg: Config, task: str) -> str:
    return cfg.stage_dir(f"egt/{task}/{cfg.egt.objective}-seed{cfg.egt.seed}")


def train_generator(cfg: Config, task: str, force: bool = False, log=print, stage: Optional[str] = None,
                    callbacks=None, score: Optional[dict] = None, quality: bool = True) -> dict:
    """EGT fine-tuning of one generator (or resume, or reuse), then its per-group quality.

    A sweep trial passes its ``stage`` folder, Tune's ``callbacks`` and the ``score`` weights of
    its objective, and skips the (generation-heavy) quality measurement: ``quality=False``."""
    from safetensors.torch import load_file

    from aimfair_ray import workgroup
    from aimfair_ray.distributed import reuse_or_resume
    from aimfair_ray.runtime import ensure_ray

    check_task(task)
    get(task).datasets(cfg, cfg.egt.seed)  # bad sizes fail here, before any cluster work
    run_name = (f"{cfg.name}-egt-{task}-{cfg.egt.objective}-seed{cfg.egt.seed}" if stage is None
                else f"{cfg.name}-{stage.replace('/', '-')}")
    stage = cfg.stage_dir(stage) if stage else stage_of(cfg, task)
    run_path = f"{cfg.ray_storage}/{run_name}"
    key = dict(_fingerprint(cfg, task), score=score, quality=quality)
    done = reuse_or_resume(stage, key, run_path, force, log=log, what="egt")
    if done is not None:
        return done
    ensure_ray(cfg.ray, cfg.output_dir)
    cfg.save(stage)
    t0 = time.time()
    result = workgroup.run(train_loop_per_worker, {"cfg": cfg.model_dump(mode="json"), "task": task, "score": score},
                           cfg.train, cfg.ray_storage, run_name, callbacks=callbacks, what="EGT fine-tuning")
    with result.checkpoint.as_directory() as d:
        trained = load_file(str(Path(d) / CHECKPOINT))
        state = json.loads((Path(d) / "state.json").read_text())
    train_s = time.time() - t0
    log(f"egt: {task} {cfg.egt.objective} seed {cfg.egt.seed}: {state['step']} steps in {train_s:.0f}s"
        + ("; measuring quality" if quality else ""))
    q = measure(cfg, task, trained, f"{stage}/model", quality=quality)
    if not quality:  # a sweep trial: its trained tensors stay, to measure it later if it is the best
        from safetensors.torch import save as to_bytes

        from aimfair_ray.storage import atomic_write_bytes

        atomic_write_bytes(f"{stage}/{CHECKPOINT}", to_bytes(trained))
    out = {"task": task, "objective": cfg.egt.objective, "seed": cfg.egt.seed, "steps": state["step"],
           "train_s": round(train_s, 1), "history": state["history"], "group_weights": state["objective"],
           "quality": q, "model_dir": f"{stage}/model", "checkpoint": on_store(result.checkpoint.path, cfg.ray_storage)}
    if q is not None:
        write_json(f"{stage}/quality.json", q)
    write_json(f"{stage}/result.json", out)
    return out


def _quality(cfg_json: dict, task: str, trained: dict | None, save: bool, threads: int,
             quality: bool = True) -> tuple[Optional[dict], dict]:
    """Runs on a worker: load the base model, apply the trained tensors, measure (unless not
    ``quality``); with ``save``, also return the fine-tuned model's files."""
    cfg = Config.model_validate(cfg_json)
    torch.set_num_threads(threads)
    Task = get(task)
    task = Task(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    if trained is not None:
        task.load_trained(trained)
    q = None
    if quality:
        _, ev = Task.datasets(cfg, cfg.egt.seed)
        t0 = time.time()
        q = task.quality(cfg, ev)
        q["eval_s"] = round(time.time() - t0, 1)
    files = {}
    if save:  # the model's files go back to the driver, which may be on another node
        with tempfile.TemporaryDirectory() as d:
            task.save(cfg, d)
            files = {str(f.relative_to(d)): f.read_bytes() for f in Path(d).rglob("*") if f.is_file()}
    return q, files


def measure(cfg: Config, task: str, trained: dict | None, model_dir: str | None, quality: bool = True) -> Optional[dict]:
    """Per-group quality (a Ray task with the Train workers' resources, which are free by then);
    with ``model_dir``, the fine-tuned model is written there."""
    import ray

    from aimfair_ray.runtime import ensure_ray

    ensure_ray(cfg.ray, cfg.output_dir)
    tc = cfg.train
    cpus = tc.cpus_per_worker * tc.num_workers
    from aimfair_ray.runtime import require

    require("the EGT quality task", 1, cpus, tc.gpus_per_worker if tc.use_gpu else 0,
            "train.num_workers, train.cpus_per_worker or train.gpus_per_worker")
    fn = ray.remote(num_cpus=cpus, num_gpus=tc.gpus_per_worker if tc.use_gpu else 0)(_quality)
    q, files = ray.get(fn.remote(cfg.model_dump(mode="json"), task, trained, model_dir is not None, max(1, int(cpus)),
                                 quality))
    if model_dir is not None:
        from aimfair_ray.egt.quality import HIGHER_IS_BETTER
        from aimfair_ray.modelcard import CARD, generator_card

        Task = get(task)
        card = generator_card(task, Task.model_name(cfg), Task.group_names(cfg), q, cfg.egt.model_dump(mode="json"),
                              Task.metrics, HIGHER_IS_BETTER, adapters=any("lora" in rel for rel in files))
        files = {**files, CARD: str(card).encode()}
        with atomic_dir(model_dir) as tmp:
            for rel, data in files.items():
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / rel).write_bytes(data)
            manifest.write(tmp, redo=f"aimfair egt {task} --force")
    return q


def pretrained_quality(cfg: Config, task: str, log=print) -> dict:
    """Quality of the model before any fine-tuning (cached per evaluation config)."""
    Task = get(task)
    path = cfg.stage_dir(f"egt/{task}/pretrained{'-conditional' if Task.conditional_eval(cfg) else ''}/quality.json")
    key = {"task": task, "sub": Task.settings(cfg).model_dump(mode="json"), "data_seed": cfg.data.seed,
           "colors": cfg.data.colors, "conditional": Task.conditional_eval(cfg), "data": Task.data_key(cfg)}
    done = made_with(path, key, "key")
    if done is not None:
        return done
    log(f"egt: measuring the pretrained {task} model")
    q = dict(measure(cfg, task, None, None), key=key)
    write_json(path, q)
    return q
