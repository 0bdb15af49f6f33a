"""EGT fine-tuning on Ray Train: one loop for the diffusion and the language-model task.

Each worker builds the (deterministic) fine-tuning set and draws its batches from its own
shard; the group losses are summed over the workers before the group weights move, so
every worker keeps the same weights. Gradients go through DDP (``prepare_model``), or
through DeepSpeed ZeRO for the LM (``egt.text.deepspeed``). Every ``checkpoint_every``
steps rank 0 reports a checkpoint (trained tensors as safetensors, optimizer state, group
weights); a rerun with the same config resumes from it, a finished one is reused.

Each task (its data, losses, quality and saved model) sits behind :mod:`egt.tasks`.

Outputs, under ``<run>/egt/<kind>/<objective>-seed<seed>/``: ``model/`` (image: a diffusers
pipeline folder; text: the trained tensors over the named base model), ``quality.json``
(the per-group quality and the EGT gap), ``result.json`` and ``config.yaml``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aimfair_ray import manifest
from aimfair_ray.config import Config
from aimfair_ray.egt.tasks import check_kind, get
from aimfair_ray.storage import atomic_dir, exists, read_json, write_json

CHECKPOINT = "trained.safetensors"  # the trained tensors in a Ray Train checkpoint


def group_names(cfg: Config, kind: str) -> list[str]:
    return get(kind).group_names(cfg)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from safetensors.torch import save_file

    from aimfair_ray.distributed import allreduce, deepspeed_engine, report_checkpoint, restore_checkpoint, worker_log
    from aimfair_ray.minmax import Objective

    cfg, kind = Config.model_validate(config["cfg"]), config["kind"]
    e, tc = cfg.egt, cfg.train
    if not tc.use_gpu:
        torch.set_num_threads(tc.torch_threads)
    torch.manual_seed(e.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    Task = get(kind)
    task = Task(cfg, str(device))
    train_set, _ = Task.datasets(cfg, e.seed)
    shard = np.arange(len(train_set.groups))[rank::world]
    per_worker = max(1, e.batch_size // world)
    task.bind(train_set, shard)
    groups = torch.from_numpy(train_set.groups[shard])

    objective = Objective(e.objective, 2, e.eta, e.ema, e.n_buckets if Task.noise_levels else 1,
                          task.T if Task.noise_levels else None, reduce=allreduce)
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
        history.append(metrics)
        window, t0 = [], time.perf_counter()
        if rank == 0:
            worker_log.info(f"[aimfair] egt {kind} {e.objective} step {step + 1}/{e.steps} loss {metrics['loss']:.4f} "
                            f"{metrics['s_per_step']:.2f}s/step q {np.round(q, 3).tolist() if q else None}")
        report_checkpoint(metrics, {"step": step + 1, "history": history, "objective": objective.state_dict()},
                          lambda d: save_file(task.trained_state(), str(Path(d) / CHECKPOINT)), optimizer)


def _fingerprint(cfg: Config, kind: str) -> dict:
    """What decides a fine-tuning run's outcome."""
    others = {k for k in ("image", "text") if k != kind}  # the other tasks' config sections
    return {"kind": kind, "egt": cfg.egt.model_dump(mode="json", exclude=others), "workers": cfg.train.num_workers,
            "data": get(kind).data_key(cfg)}


def stage_of(cfg: Config, kind: str) -> str:
    return cfg.stage_dir(f"egt/{kind}/{cfg.egt.objective}-seed{cfg.egt.seed}")


def train_generator(cfg: Config, kind: str, force: bool = False, log=print) -> dict:
    """EGT fine-tuning of one generator (or resume, or reuse), then its per-group quality."""
    from safetensors.torch import load_file

    from aimfair_ray import workgroup
    from aimfair_ray.distributed import reuse_or_resume
    from aimfair_ray.runtime import ensure_ray

    check_kind(kind)
    get(kind).datasets(cfg, cfg.egt.seed)  # bad sizes fail here, before any cluster work
    stage = stage_of(cfg, kind)
    run_name = f"{cfg.name}-egt-{kind}-{cfg.egt.objective}-seed{cfg.egt.seed}"
    run_path = f"{cfg.ray_storage}/{run_name}"
    done = reuse_or_resume(stage, _fingerprint(cfg, kind), run_path, force, log=log, what="egt")
    if done is not None:
        return done
    ensure_ray(cfg.ray)
    cfg.save(stage)
    t0 = time.time()
    result = workgroup.run(train_loop_per_worker, {"cfg": cfg.model_dump(mode="json"), "kind": kind}, cfg.train,
                           cfg.ray_storage, run_name, what="EGT fine-tuning")
    with result.checkpoint.as_directory() as d:
        trained = load_file(str(Path(d) / CHECKPOINT))
        state = json.loads((Path(d) / "state.json").read_text())
    train_s = time.time() - t0
    log(f"egt: {kind} {cfg.egt.objective} seed {cfg.egt.seed}: {state['step']} steps in {train_s:.0f}s; measuring quality")
    quality = measure(cfg, kind, trained, f"{stage}/model")
    out = {"kind": kind, "objective": cfg.egt.objective, "seed": cfg.egt.seed, "steps": state["step"],
           "train_s": round(train_s, 1), "history": state["history"], "group_weights": state["objective"],
           "quality": quality, "model_dir": f"{stage}/model"}
    write_json(f"{stage}/quality.json", quality)
    write_json(f"{stage}/result.json", out)
    return out


def _quality(cfg_json: dict, kind: str, trained: dict | None, save: bool, threads: int) -> tuple[dict, dict]:
    """Runs on a worker: load the base model, apply the trained tensors, measure; with ``save``,
    also return the fine-tuned model's files."""
    cfg = Config.model_validate(cfg_json)
    torch.set_num_threads(threads)
    Task = get(kind)
    task = Task(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    if trained is not None:
        task.load_trained(trained)
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


def measure(cfg: Config, kind: str, trained: dict | None, model_dir: str | None) -> dict:
    """Per-group quality (a Ray task with the Train workers' resources, which are free by then)."""
    import ray

    from aimfair_ray.runtime import ensure_ray

    ensure_ray(cfg.ray)
    tc = cfg.train
    cpus = tc.cpus_per_worker * tc.num_workers
    fn = ray.remote(num_cpus=cpus, num_gpus=tc.gpus_per_worker if tc.use_gpu else 0)(_quality)
    q, files = ray.get(fn.remote(cfg.model_dump(mode="json"), kind, trained, model_dir is not None, max(1, int(cpus))))
    if model_dir is not None:
        with atomic_dir(model_dir) as tmp:
            for rel, data in files.items():
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / rel).write_bytes(data)
            manifest.write(tmp, redo=f"aimfair minmax {kind} --force")
    return q


def pretrained_quality(cfg: Config, kind: str, log=print) -> dict:
    """Quality of the model before any fine-tuning (cached per evaluation config)."""
    Task = get(kind)
    path = cfg.stage_dir(f"egt/{kind}/pretrained/quality.json")
    key = {"kind": kind, "sub": Task.settings(cfg).model_dump(mode="json"), "data_seed": cfg.data.seed,
           "colors": cfg.data.colors, "conditional": Task.conditional_eval(cfg)}
    key = json.loads(json.dumps(key))
    if exists(path) and read_json(path).get("key") == key:
        return read_json(path)
    log(f"egt: measuring the pretrained {kind} model")
    q = dict(measure(cfg, kind, None, None), key=key)
    write_json(path, q)
    return q
