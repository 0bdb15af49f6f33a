"""The generate stage: prompts -> balanced and imbalanced synthetic sets (-> filter).

Layout under ``<run>/synthetic/``: ``prompts/`` (Parquet + report.json), ``balanced/``,
``imbalanced/`` (image schema, shards + stats.json), and with the filter on,
``balanced_filtered/`` and ``imbalanced_filtered/`` with ``filter.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from aimfair_ray import AimfairError
from aimfair_ray.data.bias import cell_counts
from aimfair_ray.data.codecs import decode_png
from aimfair_ray.data.io import SCHEMA, check_split, read_parquet, read_table, write_split
from aimfair_ray.data.samples import write_samples
from aimfair_ray.data.synthetic import IMPORT
from aimfair_ray.generate.images import Plan, generate_images
from aimfair_ray.generate.prompts import cells, generate_prompts
from aimfair_ray.storage import atomic_dir, exists, made_with, read_json, write_json

SYNTHETIC_SETS = ("balanced", "imbalanced")


def _prompt_key(cfg) -> dict:
    g = cfg.generate
    key = g.model_dump(mode="json", include={"backend", "llm", "task", "prompts_per_cell", "max_new_tokens",
                                             "temperature", "seed"})
    if g.backend == "file":  # the lists themselves decide the prompts
        from aimfair_ray.generate.prompts import read_prompt_file

        key["prompt_file"] = {f"y{c}_s{s}": v for (c, s), v in read_prompt_file(g.prompt_file, g.task).items()}
    return key


def run_prompts(cfg, force: bool = False, log=print) -> pd.DataFrame:
    check_task(cfg)
    out = f"{cfg.paths.synthetic}/prompts"
    key = _prompt_key(cfg)
    if not force and made_with(f"{out}/report.json", key, "config") is not None:
        log(f"prompts: reusing {out}")
        return pd.read_parquet(f"{out}/prompts.parquet")
    table, report = generate_prompts(cfg.generate, log=log)
    with atomic_dir(out) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), f"{tmp}/prompts.parquet")
        write_json(f"{tmp}/report.json", dict(report, config=key))
    log(f"prompts: wrote {len(table)} prompts to {out} ({report['per_cell']})")
    return table


def prompts_dry_run(cfg) -> dict:
    """What the prompt stage would run, without running it: the task's cells, the requests, an example
    LLM request or template prompt, and (backend vllm) the ray.data.llm processor config (no vLLM needed)."""
    from aimfair_ray.generate.prompts import llm_messages, requests, template_batch, vllm_config

    check_task(cfg)
    g, task = cfg.generate, cfg.generate.task
    out = {"backend": g.backend, "cells": {f"y{c}_s{s}": f"{task.classes[c].name} / {task.groups[s].name}"
                                           for c, s in cells(task)}}
    if g.backend == "file":
        from aimfair_ray.generate.prompts import read_prompt_file

        return out | {"prompt_file": g.prompt_file, "prompts": {f"y{c}_s{s}": len(v) for (c, s), v in
                                                                read_prompt_file(g.prompt_file, task).items()}}
    req = requests(task, {cell: g.prompts_per_cell for cell in cells(task)}, g.seed, 0)
    out |= {"requests": len(req), "example_template_prompt": template_batch(req.head(1), task)["prompt"].iloc[0]}
    if g.backend != "template":
        r = req.iloc[0]
        out |= {"llm": g.llm or "bundled SmolLM2-135M-Instruct", "example_messages": llm_messages(r.cls, r.grp, r.ctx, task),
                "sampling": {"temperature": g.temperature, "max_tokens": g.max_new_tokens, "seed": "per request"}}
    if g.backend == "vllm":
        out["vllm_processor_config"] = vllm_config(g).model_dump(mode="json")
    return out


def _own_task(cfg):
    """The dataset's own prompt task (None where it has none, or none for this attribute pair)."""
    from aimfair_ray.data.datasets import get

    try:
        return get(cfg.data.dataset).task(cfg.data)
    except AimfairError:
        return None


def check_task(cfg) -> None:
    """The prompt task must describe the run's data: the digit task (the default) refuses other
    datasets, and the task's classes and groups must match the prepared data's, one for one."""
    from aimfair_ray.data.datasets import get
    from aimfair_ray.prompt_tasks import DIGIT_TASK

    task = cfg.generate.task
    if task.classes is None or task.groups is None:
        get(cfg.data.dataset).task(cfg.data)  # a face pair with no phrasing says so
        raise AimfairError(f"generate.task has no classes or groups for the {cfg.data.dataset} data: set "
                           "generate.task.classes and generate.task.groups (a name and phrases for each, in the data's "
                           "order) and generate.task.subject, or bring your own synthetic sets with "
                           "`aimfair data import-synthetic`")
    if (task.classes, task.groups) == (DIGIT_TASK.classes, DIGIT_TASK.groups) and _own_task(cfg) is not DIGIT_TASK:
        raise AimfairError(f"generate.task describes handwritten digits (the Colored MNIST task), not the "
                           f"{cfg.data.dataset} data: set generate.task (subject, classes, groups) for it, or bring "
                           "your own synthetic sets with `aimfair data import-synthetic`")
    if cfg.generate.backend == "file" and not cfg.generate.prompt_file:
        raise AimfairError("generate.backend=file needs generate.prompt_file (a YAML/JSON mapping of cell to prompts, "
                           "or a folder of <cell>.txt files)")
    if exists(f"{cfg.data_dir}/dataset.json"):
        meta = read_json(f"{cfg.data_dir}/dataset.json")
        C, G = len(meta["target_names"]), len(meta["group_names"])
        if (len(task.classes), len(task.groups)) != (C, G):
            raise AimfairError(f"generate.task has {len(task.classes)} classes and {len(task.groups)} groups, the "
                               f"prepared data {C} classes {meta['target_names']} and {G} groups "
                               f"{meta['group_names']}: give generate.task one entry for each, in that order")


def _majority(cfg) -> list[int] | None:
    """The prepared data's majority group per class (the imbalanced set copies its cell shares)."""
    path = f"{cfg.data_dir}/dataset.json"
    return read_json(path).get("majority") if exists(path) else None


def set_counts(cfg) -> dict[str, dict[str, int]]:
    g, task = cfg.generate, cfg.generate.task
    C, G = len(task.classes), len(task.groups)
    imb = cell_counts(g.n_imbalanced, C, G, cfg.data.bias or 1 / 9, _majority(cfg))
    return {
        "balanced": {f"y{c}_s{s}": g.n_balanced_per_cell for c, s in cells(task)},
        "imbalanced": {f"y{c}_s{s}": int(imb[c, s]) for c, s in cells(task)},
    }


def cell_names(cfg) -> tuple[list[str], list[str]]:
    """The class and group names: the prepared data's, else the prompt task's."""
    path = f"{cfg.data_dir}/dataset.json"
    if exists(path):
        meta = read_json(path)
        return meta["target_names"], meta["group_names"]
    task = cfg.generate.task
    return [k.name for k in task.classes or []], [k.name for k in task.groups or []]


def save_size(cfg) -> int | None:
    """The size synthetic images are saved at (``generate.save_size``; data: the real data's size)."""
    s = cfg.generate.save_size
    return cfg.data.image_size if s == "data" else s


def run_images(cfg, prompts: pd.DataFrame, sets=SYNTHETIC_SETS, log=print, force: bool = False, keep: bool = False) -> dict:
    g = cfg.generate
    meta = {"pipeline": g.pipeline or "embedded:cmnist-t2i", "scheduler": g.scheduler, "steps": g.steps,
            "guidance_scale": g.guidance_scale, "negative_prompt": g.negative_prompt, "image_size": g.image_size,
            "save_size": save_size(cfg), "prompt_backend": g.backend, "seed": g.seed}
    counts = set_counts(cfg)
    imported = [k for k in sets if exists(f"{cfg.paths.synthetic_set(k)}/{IMPORT}")]
    for balance in imported:
        log(f"images: {balance} is your imported set ({cfg.paths.synthetic_set(balance)}); not generating it")
    sets = [k for k in sets if k not in imported]
    plans = {cfg.paths.synthetic_set(balance): Plan(prompts, balance, counts[balance], g.seed) for balance in sets}
    # one pipeline (one actor pool) for every set
    by_dir = generate_images(g, plans, meta, save_size(cfg), log=log, force=force, keep=keep)
    stats = {balance: by_dir[cfg.paths.synthetic_set(balance)] for balance in sets}
    for balance in sets:
        write_samples(cfg.paths.synthetic_set(balance), f"{balance} synthetic set ({meta['pipeline']})", *cell_names(cfg))
    cfg.save(cfg.paths.synthetic)
    return stats


def checker_name(cfg) -> str:
    """``generate.checker``, with auto resolved by the dataset's entry (digits for Colored MNIST, gender where an
    attribute is gender; one line where it has none)."""
    from aimfair_ray.data.datasets import default_checker

    if cfg.generate.checker != "auto":
        return cfg.generate.checker
    return default_checker(cfg.data)


def checker_for(cfg, log=print):
    """The filter's checker (``checker_name``)."""
    name = checker_name(cfg)
    if name == "gender":
        from aimfair_ray.generate.face_checker import GenderChecker

        return GenderChecker.for_config(cfg)
    if name == "clip":
        from aimfair_ray.generate.face_checker import ClipChecker

        return ClipChecker(cfg.generate.clip_model, cfg.generate.task, batch_size=cfg.generate.checker_batch_size)
    from aimfair_ray.data.datasets import get
    from aimfair_ray.generate.checker import Checker, train_checker

    if get(cfg.data.dataset).checker(cfg.data) != "digits":
        raise AimfairError("generate.checker=digits checks Colored MNIST digits only: use generate.checker=gender "
                           "or clip for faces, or generate.filter=false")
    path = cfg.paths.checker
    if exists(f"{path}/checker.json"):
        return Checker.load(path)
    gen_ids = read_table(f"{cfg.data_dir}/generator", ["id"])["id"].to_pylist()
    ck, _ = train_checker(cfg.data.colors, exclude={int(i.rsplit("-", 1)[1]) for i in gen_ids}, log=log)
    ck.save(path)
    return ck


def set_shards(directory: str) -> list[str]:
    from aimfair_ray.storage import listdir

    files = listdir(directory, "shard-*.parquet")
    if not files:
        raise AimfairError(f"no synthetic images in {directory}: run `aimfair generate images` first")
    return files


def run_filter(cfg, sets=SYNTHETIC_SETS, log=print) -> dict:
    """Drop images whose checker-predicted target or group (what the checker checks) disagrees with their
    labels; one shard in memory at a time."""
    ck = checker_for(cfg, log)
    report = {}
    for balance in sets:
        if exists(f"{cfg.paths.synthetic_set(balance)}/{IMPORT}"):
            log(f"filter: {balance} is your imported set; used as it is, not filtered")
            continue
        kept, checked = [], set()
        check_split(cfg.paths.synthetic_set(balance))
        for f in set_shards(cfg.paths.synthetic_set(balance)):
            df = read_parquet(str(f)).to_pandas()
            pred = ck.predict(np.stack([decode_png(b) for b in df["image"]]))
            pred = {role: pred[role] for role in ("target", "group") if role in pred}  # what the labels say
            checked |= set(pred)
            keep = np.ones(len(df), bool)
            for role, p in pred.items():
                keep &= p == df[role].to_numpy()
            kept.append(df.assign(_keep=keep))  # PNG bytes: the decoded images are dropped with the shard
        df = pd.concat(kept, ignore_index=True).sort_values("id")
        keep = df.pop("_keep").to_numpy()
        cells_ = df["target"].astype(str).radd("y") + "_s" + df["group"].astype(str)
        per_cell = {c: {"kept": int(keep[cells_ == c].sum()), "total": int((cells_ == c).sum()),
                        "kept_fraction": round(float(keep[cells_ == c].mean()), 4)} for c in sorted(set(cells_))}
        write_split(pa.Table.from_pandas(df[keep][list(SCHEMA.names)], schema=SCHEMA, preserve_index=False),
                    cfg.paths.synthetic_set(balance, filtered=True), "aimfair generate filter")
        write_samples(cfg.paths.synthetic_set(balance, filtered=True), f"{balance}, filtered ({type(ck).__name__})",
                      *cell_names(cfg))
        report[balance] = {"checker": type(ck).__name__, "checked": sorted(checked), "kept": int(keep.sum()),
                        "total": len(df), "per_cell": per_cell}
        fractions = ", ".join(f"{c}: {v['kept_fraction']:.2f}" for c, v in per_cell.items())
        log(f"filter: {balance} ({type(ck).__name__}, checks {', '.join(sorted(checked))}): kept {int(keep.sum())}/"
            f"{len(df)}; kept fraction per cell {fractions}")
    write_json(f"{cfg.paths.synthetic}/filter.json", report)
    return report


def quality_report(cfg, pipeline: str | None = None, per_cell: int = 200, log=print) -> tuple[dict, np.ndarray, pd.DataFrame]:
    """The embedded model's quality bar: checker agreement on generated images, no filtering."""
    import torch

    from aimfair_ray.config import DIGITS
    from aimfair_ray.generate.images import generate_batch, sample_seed
    from aimfair_ray.generate.prompts import requests, template_batch
    from aimfair_ray.generate.t2i import embedded_weights, load_pipeline

    ck = checker_for(cfg, log)
    g = cfg.generate
    pipe = load_pipeline(pipeline or g.pipeline or str(embedded_weights()))
    torch.set_num_threads(2)
    req = template_batch(requests(g.task, {c: per_cell for c in cells(g.task)}, g.seed + 7, 0), g.task)
    want_digit = np.array([DIGITS.index(c) if c in DIGITS else int(c) for c in req["cls"]])
    imgs = np.concatenate([generate_batch(pipe, req["prompt"].iloc[i:i + 100].tolist(),
                                          [sample_seed(g.seed, f"q{j}") for j in range(i, min(i + 100, len(req)))],
                                          g.steps, g.guidance_scale) for i in range(0, len(req), 100)])
    pred = ck.predict(imgs)
    res = {"n_per_cell": per_cell, "steps": g.steps, "guidance_scale": g.guidance_scale,
           "target_acc": float((pred["target"] == req["target"].to_numpy()).mean()),
           "color_acc": float((pred["group"] == req["group"].to_numpy()).mean()),
           "digit_acc": float((pred["digit"] == want_digit).mean()),
           "per_cell": {}}
    for c, s in cells(g.task):
        m = ((req["target"] == c) & (req["group"] == s)).to_numpy()
        res["per_cell"][f"y{c}_s{s}"] = {"target_acc": float((pred["target"][m] == c).mean()),
                                         "color_acc": float((pred["group"][m] == s).mean()),
                                         "digit_acc": float((pred["digit"][m] == want_digit[m]).mean())}
    return res, imgs, req
