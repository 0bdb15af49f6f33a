"""AIM-Fair fine-tuning on Ray Train: score the baseline's tensors, pick the ones a
method trains, then fine-tune them on synthetic balanced data (optionally mixed with real).

Methods: ``full`` (every tensor), ``linear`` (the last layer), ``random`` (random
tensors, as many as selective picks) and ``selective`` (AIM-Fair), or any other
method registered in :mod:`train.methods`. Scoring runs on
Ray Train too: each worker sums gradients over its shards of Rb, Sb and Su, the sums
are all-reduced, and the math is :mod:`train.selective`.

The methods (which tensors train) are registered in :mod:`train.methods`.

Outputs under ``<run>/finetune/``: ``scores/`` (scores.json, grads.safetensors), and per
method ``<method>/`` (model, result.json, selection.json, selection.png).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from aimfair_ray import AimfairError, workgroup
from aimfair_ray.config import Config
from aimfair_ray.data.feed import check_rows, worker_batches
from aimfair_ray.data.io import files_sha, first_row, image_dataset, read_table
from aimfair_ray.data.synthetic import IMPORT, synthetic_source
from aimfair_ray.distributed import allreduce, report_files, reuse_or_resume, worker_log
from aimfair_ray.models import build_model, load_classifier, weights_sha
from aimfair_ray.storage import atomic_dir, atomic_write_bytes, exists, local_copy, made_with, read_json, write_json
from aimfair_ray.train import methods as registry
from aimfair_ray.train import selective as sel
from aimfair_ray.train.augment import augmenter
from aimfair_ray.train.raytrain import RunSpec, fit


def synthetic_dir(cfg: Config, balance: str = "balanced", log=print, check: bool = True) -> str:
    """The synthetic set a run uses: ``balanced``/``imbalanced`` (``finetune.synthetic`` and
    ``finetune.synthetic_imbalanced``): the run's own, filtered when the filter ran (a set you imported
    as the run's is yours, used as it is), or the user's (a set directory, or a manifest imported into
    the run). ``check``: a missing set is an error."""
    choice = cfg.finetune.synthetic if balance == "balanced" else cfg.finetune.synthetic_imbalanced
    if choice not in ("auto", balance, f"{balance}_filtered"):
        return synthetic_source(cfg, choice, balance, log=log) if check else choice
    imported = exists(f"{cfg.paths.synthetic_set(balance)}/{IMPORT}")
    filtered = choice == f"{balance}_filtered" or (choice == "auto" and not imported and (
        cfg.finetune.synthetic.endswith("_filtered") or (cfg.finetune.synthetic == "auto" and cfg.generate.filter)))
    path = cfg.paths.synthetic_set(balance, filtered)
    if check and not exists(path):
        raise AimfairError(f"no synthetic {balance} set at {path}: run `aimfair generate all` first, or bring your own "
                           f"with `aimfair data import-synthetic MANIFEST --as {balance}`"
                           + (" (with generate.filter=true, or set finetune.synthetic=balanced)" if filtered else ""))
    return path


def sample_ids(directory: str, n: int | None, seed: int) -> frozenset | None:
    """``n`` ids of the split chosen by seed (the same on every rerun); None for all of them."""
    if n is None:
        return None
    ids = sorted(read_table(directory, ["id"])["id"].to_pylist())
    return None if n >= len(ids) else frozenset(np.random.default_rng(seed).choice(ids, size=n, replace=False).tolist())


# ---- scoring ---------------------------------------------------------------------------


def score_loop_per_worker(config: dict) -> None:
    """Summed gradients over this worker's shards of Rb, Sb, Su; rank 0 reports the global means."""
    import ray.train
    import ray.train.torch
    from safetensors.torch import save

    mmeta = config["model_meta"]
    torch.set_num_threads(config["threads"])
    model = build_model(mmeta["backbone"], mmeta["num_classes"], mmeta["image_size"], False, mmeta["width"])
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in config["init"].items()})
    device = ray.train.torch.get_device()
    model.to(device)
    sums = {s: {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in model.named_parameters()} for s in sel.SCORE_SETS}
    ns = {s: 0 for s in sel.SCORE_SETS}
    mode, rank = config["mode"], ray.train.get_context().get_world_rank()
    torch.manual_seed(config["seed"] * 1009 + rank)  # dropout, in train mode
    if mode == "eval":  # every row once, split by rank; per-sample sums do not depend on the batching
        batches = ((i, {k: b[k][b["set"] == i] for k in ("image", "target")})
                   for b in worker_batches(config["feed"], "score", 128) for i in range(len(sel.SCORE_SETS))
                   if bool((b["set"] == i).any()))
        augment = None
    else:  # seeded shuffle, one set per batch of exactly score_batch_size, augmented as in training
        batches = sel.set_batches(worker_batches(config["feed"], "score", config["batch_size"], seed=config["seed"]),
                                  len(sel.SCORE_SETS), config["batch_size"])
        augment = augmenter(config["augment"], config["crop_scale"], config["seed"], 0, rank)
    for i, b in batches:
        s = sel.SCORE_SETS[i]
        part, n = sel.grad_sums(model, [b], mmeta["mean"], mmeta["std"], device, mode, augment)
        sums[s] = {k: sums[s][k] + part[k] for k in part}
        ns[s] += n
    out, counts = {}, {}
    for s in sel.SCORE_SETS:
        means, counts[s] = sel.reduce_mean_grads(sums[s], ns[s], reduce=allreduce)
        out.update({f"{s}/{k}": v for k, v in means.items()})
    if rank == 0 and mode == "eval":
        check_rows(config["feed"], "score", sum(counts.values()), worker_log.info)
    report_files({"n_rb": counts["rb"], "n_sb": counts["sb"], "n_su": counts["su"]},
                 {"grads.safetensors": save(out), "counts.json": json.dumps(counts).encode()})


def _weights(model_dir: str) -> tuple[dict, dict, list[str], dict]:
    model, meta = load_classifier(model_dir)
    init = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    numels = {n: p.numel() for n, p in model.named_parameters()}
    return init, meta, names, numels


def compute_scores(cfg: Config, baseline_dir: str, force: bool = False, log=print,
                   stage: str = "finetune/scores") -> dict:
    """Mean gradients of the baseline on Rb, Sb, Su -> domain and bias scores per tensor (cached)."""
    from safetensors.torch import load_file, save_file

    from aimfair_ray.runtime import ensure_ray

    name = stage
    stage = cfg.stage_dir(stage)
    ft, tc = cfg.finetune, cfg.train
    sources = {"rb": cfg.paths.split("train"), "sb": synthetic_dir(cfg, "imbalanced", log),
               "su": synthetic_dir(cfg, "balanced", log)}
    train_mode = ft.score_mode == "train"
    augment = ft.augment or tc.augment  # fine-tuning's augmentation, also that of train-mode scores
    key = {"baseline": weights_sha(baseline_dir), "sources": sources,
           "files": {s: files_sha(d) for s, d in sources.items()}, "score_samples": ft.score_samples,
           "seed": ft.seed if ft.score_samples or train_mode else None,  # picks the subset, the batches, the crops
           "mode": ft.score_mode, **({"batch_size": ft.score_batch_size, "augment": augment,
                                      "crop_scale": list(tc.crop_scale)} if train_mode else {})}
    run_name = f"{cfg.name}-{name.replace('/', '-')}"
    done = reuse_or_resume(stage, key, f"{cfg.ray_storage}/{run_name}", force, result="scores.json", log=log,
                           what="scores")
    if done is not None:
        return done
    shared = cfg.paths.scores()  # the run's own scores (`aimfair finetune`), for a sweep or another stage
    if not force and shared != stage and exists(f"{shared}/scores.json") and made_with(f"{shared}/run.json", key):
        with atomic_dir(stage) as tmp:
            shutil.copytree(local_copy(shared), tmp, dirs_exist_ok=True)
        log(f"scores: reusing {shared} (same baseline and sets) -> {stage}")
        return read_json(f"{stage}/scores.json")
    ensure_ray(cfg.ray, cfg.output_dir)
    init, meta, names, numels = _weights(baseline_dir)
    # One dataset, one read (its `set` column tells Rb, Sb, Su apart): one split coordinator, not three.
    dirs = [sources[s] for s in sel.SCORE_SETS]
    score = image_dataset(dirs, cfg.data.image_size, tc.cache_mb, [sample_ids(d, ft.score_samples, ft.seed) for d in dirs],
                          sets=True)
    result = workgroup.run(score_loop_per_worker, {"init": init, "model_meta": meta, "threads": tc.torch_threads,
                                                   "mode": ft.score_mode, "batch_size": ft.score_batch_size,
                                                   "seed": ft.seed, "augment": augment,
                                                   "crop_scale": list(tc.crop_scale)},
                           tc, cfg.ray_storage, run_name, {"score": score}, what="scoring")
    with result.checkpoint.as_directory() as d:
        flat = load_file(f"{d}/grads.safetensors")
        counts = json.loads(Path(d, "counts.json").read_text())
    for s, n in counts.items():
        if n == 0:
            raise AimfairError(f"scoring: the {s} set ({sources[s]}) has no images" + (
                f" in a full batch of {ft.score_batch_size} on a worker: lower finetune.score_batch_size"
                if train_mode else ""))
    grads = {s: {n: flat[f"{s}/{n}"] for n in names} for s in sel.SCORE_SETS}
    domain, bias = sel.scores(grads)
    out = {"key": key, "counts": counts, "domain": domain, "bias": bias, "numels": numels,
           "world_size": tc.num_workers}
    with atomic_dir(stage) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        save_file(flat, f"{tmp}/grads.safetensors")
        write_json(f"{tmp}/scores.json", out)
        write_json(f"{tmp}/run.json", key)
    log(f"scores ({ft.score_mode} mode): mean gradients over Rb {counts['rb']}, Sb {counts['sb']}, Su {counts['su']} "
        f"{'images' if ft.score_mode == 'eval' else f'batches of {ft.score_batch_size}'} on {tc.num_workers} worker(s) "
        f"-> {stage}")
    return out


def load_grads(cfg: Config, names: list[str], stage: str = "finetune/scores") -> dict:
    from safetensors.torch import load_file

    flat = load_file(f"{cfg.stage_dir(stage)}/grads.safetensors")
    return {s: {n: flat[f"{s}/{n}"] for n in names} for s in sel.SCORE_SETS}


# ---- choosing what trains ------------------------------------------------------------------
SMALL_SELECTION = 0.01  # a k-based choice training under this share of the weights is warned about, naming finetune.k


def small_selection(info: dict, k) -> str | None:
    """The warning for a k-based selection (``info`` as selection.json has it) that trains under
    ``SMALL_SELECTION`` of the weights: such a fine-tuning can barely move the model. None otherwise."""
    if info.get("k") is None or info["trainable_fraction"] >= SMALL_SELECTION:
        return None
    return (f"{info['method']} chose {info['n_trainable_tensors']} of {info['n_tensors']} tensors, "
            f"{100 * info['trainable_fraction']:.2f}% of the weights (< {100 * SMALL_SELECTION:.0f}%): the fine-tuning "
            f"can barely move the model; raise finetune.k (now {k}) to train more")


def choose(cfg: Config, method: str, baseline_dir: str, force: bool = False, log=print,
           scores_stage: str = "finetune/scores") -> dict:
    """The tensors (and element masks) a registered method trains, with the scores behind the choice."""
    model, _ = load_classifier(baseline_dir)
    names = [n for n, _ in model.named_parameters()]
    cache: dict = {}

    def scores() -> dict:  # on Ray Train, only for the methods that ask
        if "scores" not in cache:
            cache["scores"] = compute_scores(cfg, baseline_dir, force=force, log=log, stage=scores_stage)
        return cache["scores"]

    def grads() -> dict:
        scores()
        return load_grads(cfg, names, scores_stage)

    c = registry.METHODS[method].choose(registry.Candidates(model, names, cfg.finetune, scores, grads, log))
    return {"method": method, "trainable": c.trainable, "masks": c.masks,
            "numels": {n: p.numel() for n, p in model.named_parameters()}, **c.info}


def _write_selection(stage: str, choice: dict) -> dict:
    numels = choice["numels"]
    chosen = choice["trainable"]
    trained = (sum(int(m.sum()) for m in choice["masks"].values()) if choice["masks"]
               else sum(numels[n] for n in chosen))
    info = {"method": choice["method"], "n_tensors": len(numels), "n_trainable_tensors": len(chosen),
            "trainable": chosen, "trainable_params": trained, "total_params": sum(numels.values()),
            "trainable_fraction": trained / sum(numels.values()), "k": choice.get("k"), "k_used": choice.get("k_used"),
            "mask": "element" if choice["masks"] else "tensor"}
    if "domain" in choice:
        info.update(domain=choice["domain"], bias=choice["bias"])
    write_json(f"{stage}/selection.json", info)
    if "domain" in choice:
        atomic_write_bytes(f"{stage}/selection.png", sel.plot(choice["domain"], choice["bias"], chosen, choice["method"]))
    return info


def finetune(cfg: Config, method: str | None = None, force: bool = False, log=print, stage: str | None = None,
             baseline_dir: str | None = None, scores_stage: str | None = None, callbacks=None,
             score: dict | None = None, real_set: str | None = None) -> dict:
    """Fine-tune the baseline with ``method``; returns the run's result (model_dir, history, selection).

    ``scores_stage``: where the gradient scores are cached (default: beside ``stage``);
    ``real_set``: a split directory of *real* images to train on instead of the synthetic set (the
    benchmark's oracle rows); the choice of tensors still comes from the synthetic scores;
    ``callbacks``/``score``: as in :func:`raytrain.fit` (a sweep trial passes them)."""
    from aimfair_ray.runtime import ensure_ray

    method = method or cfg.finetune.method
    if method not in registry.METHODS:
        raise AimfairError(f"unknown fine-tuning method {method!r}; choose one of {', '.join(registry.METHODS)}")
    baseline_dir = baseline_dir or cfg.paths.baseline_model
    if not exists(f"{baseline_dir}/model.json"):
        raise AimfairError(f"no baseline at {baseline_dir}: run `aimfair train baseline` first")
    stage = stage or f"finetune/{method}"
    ensure_ray(cfg.ray, cfg.output_dir)  # before any Ray Data call, which would otherwise start a default local cluster
    # scoring and fine-tuning on one worker group (a sweep trial's run reports to Tune: a run of its own)
    shared = (workgroup.shared_workers(cfg.train, cfg.ray_storage, f"{cfg.name}-{stage.replace('/', '-')}")
              if callbacks is None else contextlib.nullcontext())
    with shared:
        return _finetune(cfg, method, force, log, stage, baseline_dir, scores_stage, callbacks, score, real_set)


def _finetune(cfg: Config, method: str, force: bool, log, stage: str, baseline_dir: str, scores_stage: str | None,
              callbacks, score: dict | None, real_set: str | None) -> dict:
    ft = cfg.finetune
    choice = choose(cfg, method, baseline_dir, force=force, log=log,
                    scores_stage=scores_stage or f"{stage.rsplit('/', 1)[0]}/scores")
    syn_dir = real_set or synthetic_dir(cfg, "balanced", log)
    n_syn = read_table(syn_dir, ["id"]).num_rows
    n_real = int(round(ft.mix_real * n_syn))

    def datasets() -> dict:  # built only if the run trains
        train_dir, size, cache = cfg.paths.split("train"), cfg.data.image_size, cfg.train.cache_mb
        train = ([syn_dir, train_dir], [None, sample_ids(train_dir, n_real, ft.seed)]) if n_real else ([syn_dir], None)
        return {"train": image_dataset(*train[:1], size, cache, keep=train[1], shuffle_seed=ft.seed),
                "val": image_dataset([cfg.paths.split("val")], size, cache)}

    init, meta, _, _ = _weights(baseline_dir)
    info = _write_selection(cfg.stage_dir(stage), choice)
    log(f"finetune: {method}: training {info['n_trainable_tensors']}/{info['n_tensors']} tensors "
        f"({100 * info['trainable_fraction']:.1f}% of the weights) on {n_syn} {'real' if real_set else 'synthetic'}"
        + (f" + {n_real} real" if n_real else "") + " images")
    if said := small_selection(info, ft.k):
        log(f"finetune: warning: {said}")
    tc = cfg.train.model_copy(update={"epochs": ft.epochs, "lr": ft.lr, "batch_size": ft.batch_size, "seed": ft.seed,
                                      "optimizer": ft.optimizer, "lr_steps": ft.lr_steps,
                                      "augment": ft.augment or cfg.train.augment})
    spec = RunSpec(stage=stage, train=tc, init=init, trainable=choice["trainable"],
                   masks={k: v.numpy() for k, v in choice["masks"].items()} if choice["masks"] else None,
                   bn_stats=ft.bn_stats, score=score,
                   deepspeed_stage=ft.zero_stage if ft.deepspeed else None,
                   info={"method": method, "baseline_sha": weights_sha(baseline_dir), "synthetic_files": files_sha(syn_dir),
                         "selection": {k: info[k] for k in ("n_trainable_tensors", "n_tensors", "trainable_fraction",
                                                            "trainable")}},
                   provenance=provenance(method, syn_dir, n_syn, n_real) if not real_set else
                   {"real_share": 1.0, "synthetic_share": 0.0, "generator": None, "real_set": real_set, "method": method})
    return fit(cfg, spec, datasets, meta, force=force, log=log, callbacks=callbacks)


def provenance(method: str, syn_dir: str, n_syn: int, n_real: int) -> dict:
    """The training data of a fine-tuned model, as the generate stage wrote it into the synthetic set."""
    row = first_row(syn_dir, ["generator"])
    gen = json.loads(row["generator"]) if row.get("generator") else {}
    return {"real_share": n_real / (n_syn + n_real), "synthetic_share": n_syn / (n_syn + n_real),
            "generator": gen.get("pipeline"), "prompts": gen.get("prompt_backend"), "synthetic_set": syn_dir,
            "method": method}


def mean_epoch_time(result: dict) -> float:
    times = [h["epoch_time_s"] for h in result["history"]]
    return float(np.mean(times[1:] if len(times) > 1 else times))


__all__ = ["finetune", "compute_scores", "choose"]
