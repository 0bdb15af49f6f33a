"""Running a sweep on Ray Tune: each trial is a Tune function trainable that launches one
TorchTrainer (the run of ``aimfair finetune``, ``aimfair train groupdro`` or ``aimfair egt train``);
``ToTune`` hands every epoch's metrics to the trial, which reports them, so ASHA can stop weak trials early.
The sweep resumes with ``Tuner.restore``: finished and failed trials are kept, interrupted
ones continue from their Train checkpoints."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Optional

import yaml

from aimfair_ray import AimfairError
from aimfair_ray.config import Config
from aimfair_ray.storage import (
    append_line,
    atomic_write_bytes,
    atomic_write_text,
    exists,
    is_uri,
    local_copy,
    made_with,
    on_store,
    parent,
    read_json,
    read_text,
    remove,
    write_json,
)
from aimfair_ray.sweep.pareto import best_row, pareto_chart, pareto_front, summary_md, trials_csv
from aimfair_ray.sweep.spec import HIGHER_IS_BETTER, SWEEP_METRICS, SweepSpec, check_space, concurrency, param_space, trial_config


# ---- one trial ---------------------------------------------------------------------------
def _train_and_record(cfg: Config, sp: SweepSpec, stage: str, sweep_stage: str, baseline_dir: Optional[str], callbacks,
                      params: dict) -> dict:
    """The trial's Train run, and one line for it in the trial's ``attempts.log``, written as soon as it
    ends: "trained" when this call ran (or resumed) the run, "reused" when it had already finished
    before an interruption (Tune reruns a trial it had not yet recorded as ended)."""
    res = sp.registered.train(cfg, stage, sweep_stage, baseline_dir, callbacks, sp.weights)
    append_line(f"{cfg.stage_dir(stage)}/attempts.log", f"{time.strftime('%Y-%m-%dT%H:%M:%S')} "
                f"{'reused' if res.get('reused') else 'trained'} {json.dumps(params)}")
    return res


def _to_tune_callback(queue):
    """A Ray Train callback that hands each report's metrics (and its checkpoint's path) to ``queue``."""
    from ray.train.v2.api.callback import UserCallback

    class ToTune(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            queue.put(dict(metrics[0], **({"checkpoint_path": checkpoint.path} if checkpoint else {})))

    return ToTune()


def run_trial(params: dict, base: dict, spec: dict, sweep_stage: str, baseline_dir: Optional[str]) -> None:
    """Tune function trainable: one Ray Train run for the sampled ``params``.

    The Train run's metrics reach Tune through this function's own ``tune.report``, never through Ray's
    ``TuneReportCallback``: that one hands them to Tune's main thread, which deadlocks when its last
    report is still in flight as this function returns (Ray 2.60, seen as a resumed sweep hanging)."""
    import ray
    from ray import tune
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    sp = SweepSpec.model_validate(spec)
    cfg = trial_config(Config.model_validate(base), params, sp)
    stage = f"{sweep_stage}/trials/{tune.get_context().get_trial_id()}"
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})  # Train waits while Tune decides on a report
    # Run the TorchTrainer outside the trial's placement group (Tune captures child tasks into it):
    # inside it, Ray Data's tasks would wait forever for CPUs the small trial bundle does not have.
    # The task is owned by this trial, so a trial that ASHA stops takes its Train run down with it.
    outside = PlacementGroupSchedulingStrategy(placement_group=None)
    run = ray.remote(_train_and_record).options(num_cpus=0, scheduling_strategy=outside).remote(
        cfg, sp, stage, sweep_stage, baseline_dir, [_to_tune_callback(reports)], params)
    while True:
        ended = bool(ray.wait([run], timeout=0)[0])  # its last report is queued before it ends
        try:
            tune.report(reports.get(timeout=1))  # returns once Tune has the result; ASHA may stop us here
        except Empty:
            if ended:
                break
    res = ray.get(run)
    if res.get("reused"):  # the run had ended before an interruption: its last report, with its checkpoint
        tune.report(dict(res["history"][-1], **({"checkpoint_path": res["checkpoint"]} if res.get("checkpoint") else {})))


# ---- results -----------------------------------------------------------------------------
def _trial_id(result) -> str:
    found = re.search(r"_([0-9a-f]{5}_\d{5})", Path(result.path).name)
    return (result.metrics or {}).get("trial_id") or (found.group(1) if found else Path(result.path).name)


def collect(grid, spec: SweepSpec, cfg: Config, sweep_stage: str) -> list[dict]:
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        tid = _trial_id(r)
        stage_dir = cfg.stage_dir(f"{sweep_stage}/trials/{tid}")
        attempts = f"{stage_dir}/attempts.log"
        # A trial that ran to its end exported its model; one that ASHA stopped did not.
        done = exists(f"{stage_dir}/result.json")
        status = "ERROR" if r.error else ("DONE" if done else "STOPPED")
        rows.append({
            "trial_id": tid, "status": status,
            "params": {k: (r.config or {}).get(k) for k in spec.space},
            "metrics": {k: m.get(k) for k in SWEEP_METRICS + ("objective", spec.time_attr) if k in m},
            "checkpoint": on_store(m.get("checkpoint_path") or (r.checkpoint.path if r.checkpoint else None),
                                   cfg.ray_storage),
            "model_dir": f"{stage_dir}/model" if exists(f"{stage_dir}/model/_manifest.json")
            or exists(f"{stage_dir}/model/model.json") else None,
            "trainings": read_text(attempts).split().count("trained") if exists(attempts) else 0,
            "error": str(r.error).strip().splitlines()[-1][:300] if r.error else None,
        })
    return sorted(rows, key=lambda x: x["trial_id"])


def _egt_quality(cfg: Config, spec: SweepSpec, best: dict, log) -> Optional[dict]:
    """The best EGT trial's quality on the whole evaluation set (trials report a cheap validation
    loss only), measured once and kept beside the trial."""
    from safetensors.torch import load_file

    from aimfair_ray.egt.run import CHECKPOINT, measure

    stage = parent(best["model_dir"])
    path = f"{stage}/quality.json"
    if exists(path):
        return read_json(path)
    if not exists(f"{stage}/{CHECKPOINT}"):
        return None
    log(f"sweep: measuring the quality of the best trial {best['trial_id']}")
    q = measure(trial_config(cfg, best["params"], spec), spec.egt, load_file(f"{local_copy(stage)}/{CHECKPOINT}"), None)
    write_json(path, q)
    return q


# ---- the sweep ---------------------------------------------------------------------------
def _wandb_callback(cfg: Config, name: str, out_dir: str):
    from ray.air.integrations.wandb import WandbLoggerCallback

    from aimfair_ray.tracking import wandb_mode

    mode = wandb_mode()
    if is_uri(out_dir):  # W&B writes its run files to a local folder; a run on a store keeps them on this node
        import tempfile

        out_dir = tempfile.mkdtemp(prefix="aimfair-wandb-")
    return WandbLoggerCallback(project=cfg.train.wandb_project, group=name, mode=mode, dir=out_dir, log_config=True)


def _absolute(cfg: Config) -> Config:
    """The config with local paths made absolute: Tune runs each trial in its own working directory."""
    raw = cfg.model_dump(mode="json")
    if not is_uri(cfg.output_dir):
        raw["output_dir"] = str(Path(cfg.output_dir).absolute())
    for section, key in (("train", "storage_path"), ("data", "root"), ("generate", "pipeline"), ("generate", "llm")):
        v = raw[section][key]
        if v and "://" not in v and (key in ("storage_path", "root") or Path(v).exists()):
            raw[section][key] = str(Path(v).absolute())
    for sub, key in (("image", "pipeline"), ("text", "model")):  # EGT's models, when they are local folders
        v = raw["egt"][sub][key]
        if v and Path(v).exists():
            raw["egt"][sub][key] = str(Path(v).absolute())
    return Config.model_validate(raw)


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
    kind = spec.registered
    first = trial_config(cfg, {}, spec)  # the base plus the sweep's overrides
    if kind.check:
        kind.check(cfg)  # before Ray starts: what is missing is one line, at once
    resources = ensure_ray(cfg.ray, cfg.output_dir)
    t0 = time.time()
    exp_name = f"{cfg.name}-sweep-{name}"
    exp_path = f"{cfg.ray_storage}/{exp_name}"
    if fresh:
        remove(out)
        remove(exp_path)
    baseline_dir = kind.prepare(cfg, first, sweep_stage, log) if kind.prepare else None
    saved = {"spec": spec.model_dump(mode="json"), "config": cfg.outcome()}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), spec=spec.model_dump(mode="json"),
                             sweep_stage=sweep_stage, baseline_dir=baseline_dir),
        {"CPU": 0.1})  # the trial only drives a TorchTrainer; its workers hold the CPUs/GPUs
    epochs = kind.length(first)
    n_conc = concurrency(first, spec, resources)
    from ray.tune import Tuner

    # Save the experiment state every 2 s (Tune's default: 10 s), so a sweep killed right after a
    # trial ends still knows it ended. A trial finished inside that window reruns, but its Train run is
    # reused (same config, model exported), so nothing trains twice.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")

    if exists(exp_path) and not Tuner.can_restore(exp_path):
        remove(exp_path)  # started but never saved a state: nothing to resume
    if exists(f"{out}/sweep.json") and Tuner.can_restore(exp_path):
        if made_with(f"{out}/sweep.json", saved) is None:
            raise AimfairError(f"a different sweep named {name!r} exists at {out}; pass --name NEW, or --fresh to "
                               "discard it")
        tuner = Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                              restart_errored=False)
        before = tuner.get_results()
        done = sum(1 for r in before if r.error is None
                   and exists(cfg.stage_dir(f"{sweep_stage}/trials/{_trial_id(r)}/result.json")))
        log(f"sweep: resuming {exp_path}: {done} finished, {before.num_errors} failed, "
            f"{spec.n_trials - done - before.num_errors} to run (Tuner.restore)")
    else:
        from ray.tune import FailureConfig, RunConfig, TuneConfig
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        write_json(f"{out}/sweep.json", saved)
        # max_t one past the last epoch: a trial that survives every rung ends by itself (and exports its model)
        scheduler = (ASHAScheduler(time_attr=spec.time_attr, max_t=epochs + 1, grace_period=min(spec.asha.grace_period, epochs),
                                   reduction_factor=spec.asha.reduction_factor)
                     if spec.asha.enabled else FIFOScheduler())
        from aimfair_ray.sweep.trial_bar import TrialBar

        callbacks = [TrialBar()] + ([_wandb_callback(cfg, exp_name, out)] if wandb else [])
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
    front = pareto_front([(r["metrics"][spec.pareto[0]], r["metrics"][spec.pareto[1]]) for r in ok],
                         x_high=spec.pareto[0] in HIGHER_IS_BETTER)
    front_ids = {ok[i]["trial_id"] for i in front}
    best = best_row(rows, spec)
    test_audit = None
    if best is not None and best["model_dir"] and spec.egt:
        test_audit = _egt_quality(cfg, spec, best, log)
    elif best is not None and best["model_dir"]:
        from aimfair_ray.data.prepare import split_dir
        from aimfair_ray.evaluate import audit

        test_audit = audit(best["model_dir"], split_dir(cfg, cfg.audit.split), f"{out}/best_audit",
                           cfg.audit, title=f"best trial {best['trial_id']}")
    if spec.egt:
        from aimfair_ray.egt.tasks import get

        title = f"{spec.kind} sweep {name!r}: {get(spec.egt).model_name(first)}"
    else:
        title = f"{spec.kind} sweep {name!r} on {cfg.data.dataset}"
    for r in rows:
        r["pareto"] = r["trial_id"] in front_ids
    write_json(f"{out}/trials.json", {"objective": spec.weights, "mode": spec.mode, "pareto_axes": list(spec.pareto),
                                      "best": best, "best_test_audit": test_audit, "trials": rows, "wall_s": wall})
    atomic_write_text(f"{out}/trials.csv", trials_csv(rows, spec))
    atomic_write_bytes(f"{out}/pareto.png", pareto_chart(rows, [ok.index(r) for r in ok if r["trial_id"] in front_ids],
                                                  best, spec, title))
    atomic_write_text(f"{out}/summary.md", summary_md(rows, front_ids, best, spec, title, wall, test_audit))
    atomic_write_text(f"{out}/sweep.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    cfg.save(out)
    return {"dir": out, "rows": rows, "best": best, "front": sorted(front_ids), "wall_s": wall,
            "test_audit": test_audit}
