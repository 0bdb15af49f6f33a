"""Ray Tune sweeps around the Ray Train trainers, with a Pareto view of fairness against utility.

A sweep YAML (see ``presets/sweeps/``) names config paths and how to search them::

    kind: selective                 # selective (AIM-Fair fine-tuning) | minmax (min-max group weights)
    space:
      finetune.k:  {grid: [0.2, 0.5, 0.8]}
      finetune.lr: {loguniform: [3.0e-4, 3.0e-3]}
    objective: {val_acc: 1.0, val_eo: -1.0}   # a metric name, or weights: ACC - 1.0 * EO
    pareto: [val_acc, val_eo]                 # utility (up) against unfairness (down)

Each trial is a Tune function trainable that launches one TorchTrainer (the run of
:mod:`train.raytrain`); ``TuneReportCallback`` forwards every epoch's metrics to Tune,
so ASHA can stop weak trials early. The sweep resumes with ``Tuner.restore``: finished
and failed trials are kept, interrupted ones continue from their Train checkpoints.

Outputs under ``<run>/sweep/<name>/``: ``trials.csv``/``trials.json`` (config, metrics,
status, checkpoint of every trial), ``pareto.png``, ``summary.md``, ``sweep.yaml`` and
``config.yaml`` (the base config).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aimfair_ray import AimfairError
from aimfair_ray.config import Config, apply_override, format_validation_error, set_value
from aimfair_ray.storage import atomic_write_bytes, atomic_write_text, exists, write_json

SWEEP_DIR = Path(__file__).parent / "presets" / "sweeps"
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
METRICS = ("val_acc", "val_wst", "val_eo", "val_std", "val_gap", "val_loss", "train_loss", "train_acc")


class Asha(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it may be stopped")
    reduction_factor: float = Field(2, gt=1)


class SweepSpec(BaseModel):
    """A sweep: what varies, what is optimised, and how the search runs."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["selective", "minmax"]
    space: dict[str, dict[str, list]] = Field(min_length=1)
    objective: Union[str, dict[str, float]] = "val_wst"
    mode: Literal["max", "min"] = "max"
    pareto: tuple[str, str] = ("val_acc", "val_eo")
    num_samples: int = Field(1, ge=1, description="draws of the space (a grid is repeated this often)")
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="null: as many as the cluster's resources hold")
    asha: Asha = Asha()
    overrides: list[str] = Field([], description="--set style overrides applied to every trial's config")

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict) -> dict:
        for key, dist in v.items():
            if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ValueError(f"space.{key}: give exactly one of {', '.join(DISTRIBUTIONS)}, e.g. {{grid: [1, 2]}}")
            (kind, vals), = dist.items()
            if not vals:
                raise ValueError(f"space.{key}.{kind}: empty list")
            if kind in ("uniform", "loguniform"):
                if len(vals) != 2 or not all(isinstance(x, (int, float)) for x in vals) or vals[0] >= vals[1]:
                    raise ValueError(f"space.{key}.{kind}: expected [low, high] numbers with low < high, got {vals}")
                if kind == "loguniform" and vals[0] <= 0:
                    raise ValueError(f"space.{key}.loguniform: bounds must be > 0, got {vals}")
        return v

    @field_validator("objective", "pareto")
    @classmethod
    def _metrics(cls, v):
        bad = [m for m in ([v] if isinstance(v, str) else list(v)) if m not in METRICS]
        if bad:
            raise ValueError(f"unknown metric(s) {bad}; allowed: {', '.join(METRICS)}")
        return v

    @property
    def weights(self) -> dict[str, float]:
        return {self.objective: 1.0} if isinstance(self.objective, str) else dict(self.objective)

    def describe_objective(self) -> str:
        parts = []
        for i, (m, c) in enumerate(self.weights.items()):
            sign = ("- " if c < 0 else "+ ") if i else ("-" if c < 0 else "")
            parts.append(f"{sign}{'' if abs(c) == 1 else f'{abs(c):g}*'}{m}")
        return " ".join(parts) + f" ({self.mode})"


def load_spec(kind: str, path: Optional[str] = None) -> SweepSpec:
    """The shipped sweep for ``kind``, or a user YAML."""
    src = Path(path) if path else SWEEP_DIR / f"{kind}.yaml"
    if not src.is_file():
        raise AimfairError(f"sweep file {src} does not exist" if path else
                           f"unknown sweep {kind!r}; choose selective or minmax")
    try:
        raw = yaml.safe_load(src.read_text()) or {}
    except yaml.YAMLError as e:
        raise AimfairError(f"{src}: not valid YAML ({e})") from None
    raw.setdefault("kind", kind)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise AimfairError(f"invalid sweep {src}:\n" + "\n".join(lines)) from None
    if spec.kind != kind:
        raise AimfairError(f"{src} is a {spec.kind!r} sweep; run `aimfair sweep {spec.kind}`")
    return spec


def trial_config(base: Config, params: dict, spec: SweepSpec) -> Config:
    """A trial's config: the base, the sweep's overrides, then the sampled values."""
    raw = base.model_dump(mode="json")
    for item in spec.overrides:
        raw = apply_override(raw, item)
    for key, value in params.items():
        raw = set_value(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise AimfairError(format_validation_error(e, f"trial config {params}")) from None


def check_space(base: Config, spec: SweepSpec) -> None:
    """Every listed value (and both bounds of a range) must make a valid config: fail before any trial runs."""
    for key, dist in spec.space.items():
        for value in next(iter(dist.values())):
            trial_config(base, {key: value}, spec)


def param_space(spec: SweepSpec) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: make[kind](vals) for key, dist in spec.space.items() for kind, vals in dist.items()}


# Ray Data splits the CPUs the Train workers leave among the datasets being read, in whole
# CPUs; each trial reads two (train, val), so it needs 2 CPUs beside its workers or it stalls.
DATA_CPUS_PER_TRIAL = 2


def concurrency(cfg: Config, spec: SweepSpec, resources: dict) -> int:
    """Trials that fit at once: each holds its Train workers plus a CPU for each dataset it reads."""
    tc = cfg.train
    n = int(resources.get("CPU", 1) // (tc.num_workers * tc.cpus_per_worker + DATA_CPUS_PER_TRIAL))
    if tc.use_gpu:
        n = min(n, int(resources.get("GPU", 0) // max(tc.num_workers * tc.gpus_per_worker, 1e-9)))
    if n < 1:
        raise AimfairError(f"one trial needs {tc.num_workers} worker(s) x {tc.cpus_per_worker} CPU"
                           + (f" and {tc.gpus_per_worker} GPU" if tc.use_gpu else "")
                           + f" plus {DATA_CPUS_PER_TRIAL} CPUs for its data, but the cluster has {resources}; "
                           "lower train.num_workers")
    return max(1, min(n, spec.max_concurrent_trials or n))


# ---- one trial ---------------------------------------------------------------------------
def _train(cfg: Config, sp: SweepSpec, stage: str, sweep_stage: str, baseline_dir: Optional[str], callbacks) -> dict:
    if sp.kind == "selective":
        from aimfair_ray.train.finetune import finetune

        return finetune(cfg, cfg.finetune.method, stage=stage, baseline_dir=baseline_dir,
                        scores_stage=f"{sweep_stage}/scores", callbacks=callbacks, score=sp.weights)
    from aimfair_ray.train.baseline import train_group_dro

    return train_group_dro(cfg, stage=stage, callbacks=callbacks, score=sp.weights)


def run_trial(params: dict, base: dict, spec: dict, sweep_stage: str, baseline_dir: Optional[str]) -> None:
    """Tune function trainable: one Ray Train run for the sampled ``params``."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    sp = SweepSpec.model_validate(spec)
    cfg = trial_config(Config.model_validate(base), params, sp)
    stage = f"{sweep_stage}/trials/{tune.get_context().get_trial_id()}"
    callbacks = [TuneReportCallback()]  # made here, in the Tune session; it carries a queue handle
    # Run the TorchTrainer outside the trial's placement group (Tune captures child tasks into it):
    # inside it, Ray Data's tasks would wait forever for CPUs the small trial bundle does not have.
    # The task is owned by this trial, so a trial that ASHA stops takes its Train run down with it.
    outside = PlacementGroupSchedulingStrategy(placement_group=None)
    res = ray.get(ray.remote(_train).options(num_cpus=0, scheduling_strategy=outside).remote(
        cfg, sp, stage, sweep_stage, baseline_dir, callbacks))
    # One line per call: "trained" when this call ran (or resumed) the Train run, "reused" when the run had
    # already finished before an interruption (Tune reruns a trial it had not yet recorded as ended).
    with open(Path(cfg.stage_dir(stage)) / "attempts.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {'reused' if res.get('reused') else 'trained'} "
                f"{json.dumps(params)}\n")
    if res.get("reused"):
        tune.report(res["history"][-1])


# ---- results -----------------------------------------------------------------------------
def _trial_id(result) -> str:
    found = re.search(r"_([0-9a-f]{5}_\d{5})", Path(result.path).name)
    return (result.metrics or {}).get("trial_id") or (found.group(1) if found else Path(result.path).name)


def collect(grid, spec: SweepSpec, cfg: Config, sweep_stage: str) -> list[dict]:
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        tid = _trial_id(r)
        stage_dir = Path(cfg.stage_dir(f"{sweep_stage}/trials/{tid}"))
        attempts = stage_dir / "attempts.log"
        # A trial that ran to its end exported its model; one that ASHA stopped did not.
        done = (stage_dir / "result.json").is_file()
        status = "ERROR" if r.error else ("DONE" if done else "STOPPED")
        rows.append({
            "trial_id": tid, "status": status,
            "params": {k: (r.config or {}).get(k) for k in spec.space},
            "metrics": {k: m.get(k) for k in METRICS + ("objective", "epoch") if k in m},
            "checkpoint": m.get("checkpoint_path") or (r.checkpoint.path if r.checkpoint else None),
            "model_dir": str(stage_dir / "model") if (stage_dir / "model" / "model.json").is_file() else None,
            "trainings": attempts.read_text().split().count("trained") if attempts.is_file() else 0,
            "error": str(r.error).strip().splitlines()[-1][:300] if r.error else None,
        })
    return sorted(rows, key=lambda x: x["trial_id"])


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: x as high and y as low, one strictly better."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 <= y) and (x2 > x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


def best_row(rows: list[dict], spec: SweepSpec) -> Optional[dict]:
    ok = [r for r in rows if r["status"] != "ERROR" and r["metrics"].get("objective") is not None]
    if not ok:
        return None
    pick = max if spec.mode == "max" else min
    # Early-stopped trials compete with their last epoch, as Tune's scope="last".
    return pick(ok, key=lambda r: r["metrics"]["objective"])


def chart(rows: list[dict], front: list[int], best: Optional[dict], spec: SweepSpec, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xk, yk = spec.pareto
    ok = [r for r in rows if r["status"] != "ERROR" and xk in r["metrics"] and yk in r["metrics"]]
    fig, ax = plt.subplots(figsize=(5.6, 4.2), dpi=100)
    for status, marker in (("DONE", "o"), ("STOPPED", "x")):
        pts = [(r["metrics"][xk], r["metrics"][yk]) for r in ok if r["status"] == status]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, c="#95a5a6", label=f"{status.lower()} trials")
    fr = sorted((ok[i]["metrics"][xk], ok[i]["metrics"][yk]) for i in front)
    if fr:
        ax.plot(*zip(*fr), "-o", c="#e67e22", label="Pareto front")
    if best is not None:
        ax.scatter([best["metrics"][xk]], [best["metrics"][yk]], s=180, facecolors="none", edgecolors="#c0392b",
                   linewidths=2, label="best objective")
    for r in ok:
        ax.annotate(str(rows.index(r)), (r["metrics"][xk], r["metrics"][yk]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"{xk} (higher is better)")
    ax.set_ylabel(f"{yk} (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def summary_md(rows, front_ids, best, spec, title, wall_s, test_audit) -> str:
    keys = list(spec.space)
    cols = ["objective", *dict.fromkeys([*spec.pareto, "val_acc", "val_wst", "val_eo"]), "epoch"]
    lines = [f"# {title}", "", f"Objective: {spec.describe_objective()} on the val split. "
             f"Trials: {len(rows)} ({sum(r['status'] == 'DONE' for r in rows)} done, "
             f"{sum(r['status'] == 'STOPPED' for r in rows)} stopped early by ASHA, "
             f"{sum(r['status'] == 'ERROR' for r in rows)} failed). Wall time of this call: {wall_s:.0f} s.", ""]
    if best is not None:
        lines += [f"**Best trial** `{best['trial_id']}`: " + ", ".join(f"{k}={best['params'][k]}" for k in keys)
                  + f"; objective {best['metrics']['objective']:.4f}.", ""]
        if test_audit:
            lines += ["Best trial on the test split: " + "  ".join(f"{k.upper()} {test_audit[k]:.4f}"
                                                                 for k in ("acc", "wst", "std", "eo")), ""]
    lines += ["| # | trial | status | " + " | ".join(keys) + " | " + " | ".join(cols) + " | Pareto |",
              "|" + "---|" * (len(keys) + len(cols) + 4)]
    for i, r in enumerate(rows):
        lines.append(f"| {i} | {r['trial_id']} | {r['status']} | " + " | ".join(_fmt(r["params"][k]) for k in keys)
                     + " | " + " | ".join(_fmt(r["metrics"].get(c)) for c in cols)
                     + f" | {'yes' if r['trial_id'] in front_ids else ''} |")
    errs = [r for r in rows if r["error"]]
    if errs:
        lines += ["", "Failed trials:", ""] + [f"- `{r['trial_id']}`: {r['error']}" for r in errs]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict], spec: SweepSpec) -> str:
    import csv

    keys = list(spec.space)
    mcols = list(METRICS) + ["objective", "epoch"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", "status", *keys, *mcols, "trainings", "checkpoint", "model_dir", "error"])
    for r in rows:
        w.writerow([r["trial_id"], r["status"], *[r["params"][k] for k in keys],
                    *[r["metrics"].get(c, "") for c in mcols], r["trainings"], r["checkpoint"] or "",
                    r["model_dir"] or "", r["error"] or ""])
    return buf.getvalue()


# ---- the sweep ---------------------------------------------------------------------------
def _wandb_callback(cfg: Config, name: str, out_dir: str):
    from ray.air.integrations.wandb import WandbLoggerCallback

    from aimfair_ray.tracking import wandb_mode

    mode = wandb_mode()
    return WandbLoggerCallback(project=cfg.train.wandb_project, group=name, mode=mode, dir=out_dir, log_config=True)


def _absolute(cfg: Config) -> Config:
    """The config with local paths made absolute: Tune runs each trial in its own working directory."""
    raw = cfg.model_dump(mode="json")
    raw["output_dir"] = str(Path(cfg.output_dir).absolute())
    for section, key in (("train", "storage_path"), ("data", "root"), ("generate", "pipeline"), ("generate", "llm")):
        v = raw[section][key]
        if v and "://" not in v and (key in ("storage_path", "root") or Path(v).exists()):
            raw[section][key] = str(Path(v).absolute())
    return Config.model_validate(raw)


def _prerequisites(cfg: Config, spec: SweepSpec) -> Optional[str]:
    """What every selective trial needs: the run's baseline and synthetic sets (the gradient scores come next)."""
    if spec.kind != "selective":
        return None
    from aimfair_ray.train.finetune import synthetic_dir

    baseline_dir = f"{cfg.stage_dir('baseline')}/model"
    if not exists(f"{baseline_dir}/model.json"):
        raise AimfairError(f"no baseline at {baseline_dir}: run `aimfair demo` (or `aimfair train baseline`) first")
    synthetic_dir(cfg, "balanced")  # a clear error if `aimfair generate all` has not run
    return baseline_dir


def sweep(cfg: Config, spec: SweepSpec, name: Optional[str] = None, wandb: bool = False, fresh: bool = False,
          log=print) -> dict:
    """Run (or resume) the sweep; returns the rows, the best trial and where the outputs are."""
    from ray import tune

    from aimfair_ray.runtime import ensure_ray

    name = name or spec.kind
    cfg = _absolute(cfg)
    sweep_stage = f"sweep/{name}"
    out = cfg.stage_dir(sweep_stage)
    check_space(cfg, spec)
    if wandb:
        from aimfair_ray.tracking import wandb_mode

        wandb_mode()  # fails now, not inside every trial, when online mode has no key
    baseline_dir = _prerequisites(cfg, spec)
    resources = ensure_ray(cfg.ray)
    t0 = time.time()
    first = trial_config(cfg, {}, spec)  # the base plus the sweep's overrides
    exp_name = f"{cfg.name}-sweep-{name}"
    exp_path = f"{cfg.ray_storage}/{exp_name}"
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(exp_path, ignore_errors=True)
    if spec.kind == "selective":
        from aimfair_ray.train.finetune import compute_scores

        compute_scores(first, baseline_dir, log=log, stage=f"{sweep_stage}/scores")
    saved = {"spec": spec.model_dump(mode="json"), "config": cfg.outcome()}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), spec=spec.model_dump(mode="json"),
                             sweep_stage=sweep_stage, baseline_dir=baseline_dir),
        {"CPU": 0.1})  # the trial only drives a TorchTrainer; its workers hold the CPUs/GPUs
    epochs = first.finetune.epochs if spec.kind == "selective" else (first.group_dro.epochs or first.train.epochs)
    n_conc = concurrency(first, spec, resources)
    from ray.tune import Tuner

    # Save the experiment state every 2 s (Tune's default: 10 s), so a sweep killed right after a
    # trial ends still knows it ended. A trial finished inside that window reruns, but its Train run is
    # reused (same config, model exported), so nothing trains twice.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")

    if exists(exp_path) and not Tuner.can_restore(exp_path):
        shutil.rmtree(exp_path, ignore_errors=True)  # started but never saved a state: nothing to resume
    if exists(f"{out}/sweep.json") and Tuner.can_restore(exp_path):
        prev = json.loads(Path(out, "sweep.json").read_text())
        if prev != json.loads(json.dumps(saved)):
            raise AimfairError(f"a different sweep named {name!r} exists at {out}; pass --name NEW, or --fresh to "
                               "discard it")
        tuner = Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                              restart_errored=False)
        before = tuner.get_results()
        done = sum(1 for r in before if r.error is None
                   and Path(cfg.stage_dir(f"{sweep_stage}/trials/{_trial_id(r)}"), "result.json").is_file())
        log(f"sweep: resuming {exp_path}: {done} finished, {before.num_errors} failed, "
            f"{len(before) - done - before.num_errors} to run (Tuner.restore)")
    else:
        from ray.tune import FailureConfig, RunConfig, TuneConfig
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        write_json(f"{out}/sweep.json", saved)
        # max_t one past the last epoch: a trial that survives every rung ends by itself (and exports its model)
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=epochs + 1, grace_period=min(spec.asha.grace_period, epochs),
                                   reduction_factor=spec.asha.reduction_factor)
                     if spec.asha.enabled else FIFOScheduler())
        callbacks = [_wandb_callback(cfg, exp_name, out)] if wandb else []
        tuner = Tuner(trainable, param_space=param_space(spec),
                      tune_config=TuneConfig(metric="objective", mode=spec.mode, scheduler=scheduler,
                                             num_samples=spec.num_samples, max_concurrent_trials=n_conc,
                                             # a fresh actor per trial: a stopped trial's Train run dies with it
                                             reuse_actors=False),
                      run_config=RunConfig(name=exp_name, storage_path=cfg.ray_storage, callbacks=callbacks,
                                           failure_config=FailureConfig(max_failures=0, fail_fast=False),
                                           verbose=0))
        log(f"sweep: {name}: {spec.kind}, objective {spec.describe_objective()}, up to {n_conc} trial(s) at once "
            f"-> {out}")
    grid = tuner.fit()
    wall = time.time() - t0
    rows = collect(grid, spec, cfg, sweep_stage)
    ok = [r for r in rows if r["status"] != "ERROR" and all(k in r["metrics"] for k in spec.pareto)]
    front = pareto_front([(r["metrics"][spec.pareto[0]], r["metrics"][spec.pareto[1]]) for r in ok])
    front_ids = {ok[i]["trial_id"] for i in front}
    best = best_row(rows, spec)
    test_audit = None
    if best is not None and best["model_dir"]:
        from aimfair_ray.data.prepare import split_dir
        from aimfair_ray.evaluate import audit

        test_audit = audit(best["model_dir"], split_dir(cfg, cfg.audit.split), f"{out}/best_audit",
                           cfg.audit, title=f"best trial {best['trial_id']}")
    title = f"{spec.kind} sweep {name!r} on {cfg.data.dataset}"
    for r in rows:
        r["pareto"] = r["trial_id"] in front_ids
    write_json(f"{out}/trials.json", {"objective": spec.weights, "mode": spec.mode, "pareto_axes": list(spec.pareto),
                                      "best": best, "best_test_audit": test_audit, "trials": rows, "wall_s": wall})
    atomic_write_text(f"{out}/trials.csv", to_csv(rows, spec))
    atomic_write_bytes(f"{out}/pareto.png", chart(rows, [ok.index(r) for r in ok if r["trial_id"] in front_ids],
                                                  best, spec, title))
    atomic_write_text(f"{out}/summary.md", summary_md(rows, front_ids, best, spec, title, wall, test_audit))
    atomic_write_text(f"{out}/sweep.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    cfg.save(out)
    return {"dir": out, "rows": rows, "best": best, "front": sorted(front_ids), "wall_s": wall,
            "test_audit": test_audit}


__all__ = ["SweepSpec", "load_spec", "sweep", "pareto_front", "trial_config", "concurrency"]
