"""EGT fine-tuning on Ray Train: one loop for the diffusion and the language-model task.

Each worker builds the (deterministic) fine-tuning set and draws its batches from its own
shard; the group losses are summed over the workers before the group weights move, so
every worker keeps the same weights. Gradients go through DDP (``prepare_model``), or
through DeepSpeed ZeRO for the LM (``egt.text.deepspeed``). Every ``checkpoint_every``
steps rank 0 reports a checkpoint (trained tensors as safetensors, optimizer state, group
weights); a rerun with the same config resumes from it, a finished one is reused.

Outputs, under ``<run>/egt/<kind>/<objective>-seed<seed>/``: ``model/`` (image: a diffusers
pipeline folder; text: the trained tensors over the named base model), ``quality.json``
(the per-group quality and the EGT gap), ``result.json`` and ``config.yaml``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aimfair_ray import AimfairError
from aimfair_ray.config import Config
from aimfair_ray.storage import atomic_dir, exists, read_json, write_json

KINDS = ("image", "text")
TRAINED = "trained.safetensors"


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise AimfairError(f"unknown EGT task {kind!r}; choose image or text")


def group_names(cfg: Config, kind: str) -> list[str]:
    if kind == "text":
        from aimfair_ray.egt.text import GROUPS

        return list(GROUPS)
    from aimfair_ray.data.cmnist import group_names as names

    return names(cfg.data.colors)


def make_task(cfg: Config, kind: str, device: str = "cpu"):
    if kind == "image":
        from aimfair_ray.egt.image import DiffusionTask

        return DiffusionTask(cfg.egt.image.pipeline, device)
    from aimfair_ray.egt.text import LMTask

    t = cfg.egt.text
    return LMTask(t.model, t.train_layers, t.max_len, device, t.lora_rank)


def datasets(cfg: Config, kind: str, seed: int):
    """(fine-tuning set, evaluation set) of a task; the evaluation set does not depend on ``seed``."""
    e = cfg.egt
    if len(cfg.data.colors) != 2 and kind == "image":
        raise AimfairError("EGT on images compares 2 groups: set data.colors to 2 colours")
    if kind == "image":
        from aimfair_ray.egt.image import image_sets

        return image_sets(cfg.data.colors, group_names(cfg, kind), e.image.n_train, e.minority_share,
                          e.image.n_eval_per_group, cfg.data.color_jitter, cfg.data.seed, seed)
    from aimfair_ray.egt.text import text_sets, with_group_tags

    tr, ev = text_sets(e.text.n_train, e.minority_share, e.text.n_eval_per_group, cfg.data.seed, seed)
    return (with_group_tags(tr), with_group_tags(ev)) if e.objective == "conditional" else (tr, ev)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from safetensors.torch import save_file

    from aimfair_ray.minmax import Objective
    from aimfair_ray.train.raytrain import allreduce, deepspeed_engine, log, report_checkpoint, restore_checkpoint

    cfg, kind = Config.model_validate(config["cfg"]), config["kind"]
    e, tc = cfg.egt, cfg.train
    if not tc.use_gpu:
        torch.set_num_threads(tc.torch_threads)
    torch.manual_seed(e.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    task = make_task(cfg, kind, str(device))
    train_set, _ = datasets(cfg, kind, e.seed)
    shard = np.arange(len(train_set.groups))[rank::world]
    per_worker = max(1, e.batch_size // world)
    if kind == "image":  # frozen encodings of the shard, once
        x0 = task.encode_images(train_set.images[shard])
        text = task.encode_text([train_set.captions[i] for i in shard])
    groups = torch.from_numpy(train_set.groups[shard])

    objective = Objective(e.objective, 2, e.eta, e.ema, e.n_buckets if kind == "image" else 1,
                          task.T if kind == "image" else None, reduce=allreduce)
    params = [p for p in task.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=e.lr, weight_decay=0.0)
    start, history = 0, []
    state = restore_checkpoint(task.load_trained, TRAINED, optimizer)
    if state:
        start, history = state["step"], state["history"]
        objective.load_state_dict(state["objective"])
    if kind == "text" and e.text.deepspeed:
        model = deepspeed_engine(task.model.to(device), optimizer, per_worker, e.text.zero_stage)
        optimizer = None
    else:
        model = ray.train.torch.prepare_model(task.model)
    model.train()

    window, t0 = [], time.perf_counter()
    for step in range(start, e.steps):
        g = torch.Generator().manual_seed((e.seed * 1_000_003 + rank) * 100_003 + step)  # resumable draws
        b = torch.randint(0, len(shard), (per_worker,), generator=g)
        if kind == "image":
            losses, t = task.losses(model, x0[b].to(device), {k: v[b].to(device) for k, v in text.items()}, g)
        else:
            rows = [shard[i] for i in b.tolist()]
            pre = [train_set.prefixes[i] for i in rows] if train_set.prefixes else None
            losses, _ = task.losses(model, task.batch([train_set.texts[i] for i in rows], pre))
            t = None
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
            log.info(f"[aimfair] egt {kind} {e.objective} step {step + 1}/{e.steps} loss {metrics['loss']:.4f} "
                     f"{metrics['s_per_step']:.2f}s/step q {np.round(q, 3).tolist() if q else None}")
        report_checkpoint(metrics, {"step": step + 1, "history": history, "objective": objective.state_dict()},
                          lambda d: save_file(task.trained_state(), str(Path(d) / TRAINED)), optimizer)


def _fingerprint(cfg: Config, kind: str) -> dict:
    """What decides a fine-tuning run's outcome."""
    other = "text" if kind == "image" else "image"
    fp = {"kind": kind, "egt": cfg.egt.model_dump(mode="json", exclude={other}), "workers": cfg.train.num_workers}
    if kind == "image":
        fp["data"] = {"colors": cfg.data.colors, "color_jitter": cfg.data.color_jitter, "seed": cfg.data.seed}
    else:
        fp["data"] = {"seed": cfg.data.seed}
    return json.loads(json.dumps(fp))


def stage_of(cfg: Config, kind: str) -> str:
    return cfg.stage_dir(f"egt/{kind}/{cfg.egt.objective}-seed{cfg.egt.seed}")


def finetune(cfg: Config, kind: str, force: bool = False, log=print) -> dict:
    """Fine-tune (or resume, or reuse) one EGT run, then measure its per-group quality."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    from aimfair_ray.runtime import ensure_ray

    check_kind(kind)
    datasets(cfg, kind, cfg.egt.seed)  # bad sizes fail here, before any cluster work
    stage = stage_of(cfg, kind)
    fp = _fingerprint(cfg, kind)
    same = exists(f"{stage}/run.json") and read_json(f"{stage}/run.json") == fp
    if same and not force and exists(f"{stage}/result.json"):
        log(f"egt: reusing {stage} (same config; --force redoes it)")
        return dict(read_json(f"{stage}/result.json"), reused=True)
    run_name = f"{cfg.name}-egt-{kind}-{cfg.egt.objective}-seed{cfg.egt.seed}"
    run_path = f"{cfg.ray_storage}/{run_name}"
    if (force or not same) and exists(run_path) and not cfg.ray_storage.startswith(("s3://", "gs://")):
        shutil.rmtree(run_path, ignore_errors=True)
    elif exists(run_path):
        log(f"egt: resuming the interrupted run at {run_path}")
    ensure_ray(cfg.ray)
    cfg.save(stage)
    write_json(f"{stage}/run.json", fp)
    tc = cfg.train
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": tc.gpus_per_worker} if tc.use_gpu else {})}
    t0 = time.time()
    result = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "kind": kind},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=cfg.ray_storage,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints)),
    ).fit()
    if result.error:
        raise AimfairError(f"EGT fine-tuning failed: {result.error}")
    if result.checkpoint is None:
        raise AimfairError(f"EGT fine-tuning at {run_path} reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        trained = load_file(str(Path(d) / TRAINED))
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    task = make_task(cfg, kind, device)
    if trained is not None:
        task.load_trained(trained)
    _, ev = datasets(cfg, kind, cfg.egt.seed)
    t0 = time.time()
    if kind == "image":
        from aimfair_ray.egt.image import image_quality
        from aimfair_ray.egt.quality import Features

        i = cfg.egt.image
        q = image_quality(task, ev, group_names(cfg, kind), cfg.data.colors, Features(i.features, i.feature_size, device),
                          i.noise_levels, i.sample_steps, i.guidance_scale, cfg.data.seed)
    else:
        from aimfair_ray.egt.text import text_quality

        q = text_quality(task, ev)
    q["eval_s"] = round(time.time() - t0, 1)
    files = {}
    if save:  # the model's files go back to the driver, which may be on another node
        with tempfile.TemporaryDirectory() as d:
            if kind == "image":
                task.pipe.save_pretrained(d)
            else:
                from safetensors.torch import save_file

                save_file(task.trained_state(), str(Path(d) / TRAINED))
                Path(d, "egt.json").write_text(json.dumps({"base_model": cfg.egt.text.model or "smollm2",
                                                           "train_layers": cfg.egt.text.train_layers,
                                                           "lora_rank": cfg.egt.text.lora_rank}))
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
    return q


def pretrained_quality(cfg: Config, kind: str, log=print) -> dict:
    """Quality of the model before any fine-tuning (cached per evaluation config)."""
    e = cfg.egt
    path = cfg.stage_dir(f"egt/{kind}/pretrained/quality.json")
    sub = e.image if kind == "image" else e.text
    key = {"kind": kind, "sub": sub.model_dump(mode="json"), "data_seed": cfg.data.seed, "colors": cfg.data.colors,
           "conditional": e.objective == "conditional" and kind == "text"}
    key = json.loads(json.dumps(key))
    if exists(path) and read_json(path).get("key") == key:
        return read_json(path)
    log(f"egt: measuring the pretrained {kind} model")
    q = dict(measure(cfg, kind, None, None), key=key)
    write_json(path, q)
    return q
