"""The chain of stages as plain functions: data -> synthetic sets -> baseline -> fine-tuning ->
audits. The CLI commands and the Ray job entrypoints call these; each takes a ``log``, logs its start and
its end with its wall time, and appends that time to ``runs/<name>/logs/stages.jsonl`` (the report reads it)."""

from __future__ import annotations

import functools
import inspect
import json
import os
import time
from typing import Optional

from aimfair_ray import ray_logs
from aimfair_ray.config import Config
from aimfair_ray.storage import append_line, write_json


def duration(secs: float) -> str:
    return f"{secs:.1f} s" if secs < 120 else f"{int(secs // 60)} min {int(secs % 60):02d} s"


def timed(name: str):
    """A stage function ``f(cfg, ..., log=print)``: after it, one line 'NAME: done in T' (or 'failed after T')
    and a record in the run's ``logs/stages.jsonl``."""

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            cfg, log = bound.arguments["cfg"], bound.arguments.get("log", print)
            t0, status = time.time(), "failed"
            try:
                out = fn(*args, **kwargs)
                status = "done"
                return out
            finally:
                secs = time.time() - t0
                log(f"{name}: {status} {'in' if status == 'done' else 'after'} {duration(secs)}")
                append_line(f"{cfg.run_dir}/logs/stages.jsonl", json.dumps(
                    {"stage": name, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
                     "seconds": round(secs, 1), "status": status}))
                ray_logs.sync()

        return run

    return wrap


@timed("data")
def run_prepare(cfg: Config, force: bool = False, log=print) -> dict:
    from aimfair_ray.data.prepare import prepare_data
    from aimfair_ray.runtime import ensure_ray

    ensure_ray(cfg.ray, cfg.output_dir)
    log(f"data: preparing {cfg.data.dataset} -> {cfg.data_dir}")
    return prepare_data(cfg, force=force, log=log)


@timed("import")
def run_import(cfg: Config, manifest: str, balance: str, generator: Optional[str], force: bool = False, log=print) -> dict:
    """Your own synthetic images (a manifest) as the run's ``balanced`` or ``imbalanced`` set."""
    from aimfair_ray import AimfairError
    from aimfair_ray.data.synthetic import import_synthetic

    if balance not in ("balanced", "imbalanced"):
        raise AimfairError(f"--as {balance!r}: choose balanced or imbalanced")
    info = import_synthetic(cfg, manifest, balance, generator, cfg.paths.synthetic_set(balance), force=force, log=log)
    cfg.save(cfg.paths.synthetic)
    return info


@timed("generate")
def run_generate(cfg: Config, what: str, force: bool = False, log=print, keep: bool = False) -> dict:
    """``prompts``, ``images`` (prompts first), ``all`` (then the filter if ``generate.filter``) or ``filter``.
    ``force`` redoes the stage named (for images: the images, from the same prompts; for all: both);
    ``keep`` refuses to draw again a set whose settings changed."""
    from aimfair_ray.generate import stage
    from aimfair_ray.runtime import ensure_ray

    ensure_ray(cfg.ray, cfg.output_dir)
    out: dict = {}
    if what in ("prompts", "images", "all"):
        log(f"generate: prompts with the {cfg.generate.backend} backend")
        prompts = stage.run_prompts(cfg, force=force and what != "images", log=log)
        out["prompts"] = len(prompts)
    if what in ("images", "all"):
        out["images"] = stage.run_images(cfg, prompts, log=log, force=force, keep=keep)
    if what == "filter" or (what == "all" and cfg.generate.filter):
        out["filter"] = stage.run_filter(cfg, log=log)
    return out


def ensure_synthetic(cfg: Config, log=print) -> None:
    """The synthetic sets fine-tuning reads (``finetune.synthetic*``): the run's own (generated or
    imported) or the user's when they exist; the generate stage runs only for those missing."""
    from aimfair_ray.storage import exists, is_complete, is_dir
    from aimfair_ray.train.finetune import synthetic_dir

    wanted = {k: synthetic_dir(cfg, k, log, check=False) for k in ("balanced", "imbalanced")}
    missing = [k for k, d in wanted.items() if not (exists(d) and (not is_dir(d) or is_complete(d)))]
    if not missing:
        log("generate: using the synthetic sets that exist: " + ", ".join(f"{k} {d}" for k, d in wanted.items()))
        return
    log(f"generate: no {' or '.join(missing)} set yet; generating")
    run_generate(cfg, "all", log=log)


@timed("train baseline")
def run_baseline(cfg: Config, force: bool = False, log=print) -> dict:
    from aimfair_ray.train.baseline import train_baseline

    log(f"train: baseline {cfg.model.backbone} on {cfg.train.num_workers} Ray Train worker(s)")
    return train_baseline(cfg, force=force, log=log)


@timed("train groupdro")
def run_group_dro(cfg: Config, force: bool = False, log=print) -> dict:
    from aimfair_ray.train.baseline import train_group_dro

    log(f"train: Group DRO (eta {cfg.group_dro.eta}) on {cfg.train.num_workers} Ray Train worker(s)")
    return train_group_dro(cfg, force=force, log=log)


@timed("train jtt")
def run_jtt(cfg: Config, force: bool = False, log=print) -> dict:
    from aimfair_ray.train.jtt import train_jtt

    log(f"train: JTT (T {cfg.jtt.epochs}, upweight {cfg.jtt.upweight}) on {cfg.train.num_workers} Ray Train worker(s)")
    return train_jtt(cfg, force=force, log=log)


@timed("finetune")
def run_finetune(cfg: Config, method: Optional[str] = None, force: bool = False, log=print) -> dict:
    from aimfair_ray.train.finetune import finetune

    m = method or cfg.finetune.method
    log(f"finetune: {m} on {cfg.train.num_workers} Ray Train worker(s)"
        + (f" through DeepSpeed ZeRO-{cfg.finetune.zero_stage}" if cfg.finetune.deepspeed else ""))
    return finetune(cfg, m, force=force, log=log)


@timed("audit")
def run_audit(cfg: Config, checkpoint: Optional[str] = None, split: Optional[str] = None, out: Optional[str] = None,
              title: str = "audit", log=print) -> dict:
    """Audit a model folder (default: the run's baseline) on a split; writes ``audit/`` beside the model."""
    from aimfair_ray.data.prepare import split_dir
    from aimfair_ray.evaluate import audit
    from aimfair_ray.runtime import ensure_ray

    ensure_ray(cfg.ray, cfg.output_dir)
    model_dir = checkpoint or cfg.paths.baseline_model
    sdir = split_dir(cfg, split or cfg.audit.split)
    out_dir = out or f"{os.path.dirname(model_dir.rstrip('/'))}/audit"
    log(f"audit: {title}: {model_dir} on {sdir} -> {out_dir}/")
    rep = audit(model_dir, sdir, out_dir, cfg.audit, title=title)
    cfg.save(out_dir)
    return rep


def finetune_images(cfg: Config, result: dict) -> dict:
    """A fine-tuning run's pictures for W&B: the selection chart and the sample grid of the set it trained on."""
    from aimfair_ray.storage import parent
    from aimfair_ray.train.finetune import synthetic_dir

    return {"selection": f"{parent(result['model_dir'])}/selection.png",
            "synthetic/samples": f"{synthetic_dir(cfg, 'balanced', check=False)}/samples.png"}


def quality_table(qualities: dict[str, dict]) -> tuple[list[str], list[list]]:
    """EGT quality as a W&B table: per row (pretrained, an objective) and metric, each group's value, the gap, overall."""
    groups = sorted({g for q in qualities.values() for m in q["gap"] for g in q[m]})
    rows = [[name, m, *(q[m].get(g) for g in groups), q["gap"][m], q["overall"][m]]
            for name, q in qualities.items() for m in q["gap"]]
    return ["row", "metric", *groups, "gap", "overall"], rows


def egt_benchmark_table(out: dict) -> tuple[list[str], list[list]]:
    """An EGT benchmark as a W&B table: per row and metric, the gap and overall quality, mean and std over seeds."""
    rows = [[name, m, r[m]["gap"]["mean"], r[m]["gap"]["std"], r[m]["overall"]["mean"], r[m]["overall"]["std"]]
            for name, r in out["table"].items() for m, v in r.items() if isinstance(v, dict) and "gap" in v]
    return ["row", "metric", "gap_mean", "gap_std", "overall_mean", "overall_std"], rows


def aimfair_benchmark_table(table: dict) -> tuple[list[str], list[list]]:
    """An AIM-Fair benchmark as a W&B table: per row and metric, the mean over seeds and its 95% interval."""
    rows = [[name, k, r[k]["mean"], *r[k]["ci95"], len(r["seeds"])]
            for name, r in table.items() for k in ("acc", "wst", "std", "eo") if k in r]
    return ["row", "metric", "mean", "ci95_low", "ci95_high", "seeds"], rows


def log_wandb(cfg: Config, name: str, result: dict, report: Optional[dict] = None, images: Optional[dict] = None,
              tables: Optional[dict] = None, log=print) -> None:
    """A run's history, its audit (figures, intervals, cells, chart), and any sample grids or tables to W&B, when
    ``train.wandb`` (``--wandb``) is on; the W&B files go beside the model (a temporary folder for a run on a store)."""
    if not cfg.train.wandb:
        return
    from aimfair_ray.storage import is_uri, parent
    from aimfair_ray.tracking import log_run

    stage = parent(result["model_dir"]) if result.get("model_dir") else f"{cfg.run_dir}/wandb-{name}"
    charts = {"audit/group_acc_chart": f"{stage}/audit/group_acc.png"} if report else {}  # where run_audit writes it
    d = log_run(cfg, name, result.get("history", []), report, {**charts, **(images or {})}, tables,
                None if is_uri(stage) else stage, step_key="step" if "steps" in result else "epoch")
    log(f"wandb: logged {name} to {d} (mode {os.environ.get('WANDB_MODE')})")


def run_demo(cfg: Config, log=print) -> dict:
    """The whole chain; returns the audits of the baseline and the fine-tuned model, and the method."""
    from aimfair_ray.workgroup import shared_workers

    t0 = time.time()
    run_prepare(cfg, log=log)
    run_generate(cfg, "all", log=log)
    # the baseline, the scores and the fine-tuning on one worker group; the audits after it closes (an
    # audit's actor pool may need the devices the group holds)
    with shared_workers(cfg.train, cfg.ray_storage, f"{cfg.name}-demo"):
        res = run_baseline(cfg, log=log)
        ft = run_finetune(cfg, log=log)
    base = run_audit(cfg, title="biased baseline (ERM)", log=log)
    log_wandb(cfg, "baseline", res, base, log=log)
    tuned = run_audit(cfg, ft["model_dir"], title=f"AIM-Fair fine-tuned ({ft['method']})", log=log)
    out = {"baseline": base, "finetuned": tuned, "method": ft["method"], "wall_s": time.time() - t0}
    write_json(f"{cfg.run_dir}/demo.json", {"wall_s": round(out["wall_s"], 1), "method": ft["method"]})
    return out
