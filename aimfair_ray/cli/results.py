"""Result commands: the AIM-Fair and EGT benchmarks, EGT min–max fine-tuning, and sweeps."""

from __future__ import annotations

import sys
import time
from typing import List, Optional

import typer

from aimfair_ray import AimfairError, pipeline, renamed
from aimfair_ray.cli.common import ConfigOpt, ForceOpt, PresetOpt, SetOpt, WandbOpt, console, log, run, run_with_config
from aimfair_ray.storage import read_text
from aimfair_ray.sweep.kinds import KINDS as SWEEP_KINDS

top = typer.Typer()
bench_app = typer.Typer(no_args_is_help=True, help="Results tables over seeds.")
GROUPS = {None: top, "benchmark": bench_app}


def _egt_table(task: str, rows: dict) -> None:
    from rich.table import Table

    from aimfair_ray.egt.tasks import get

    metrics = get(task).metrics
    t = Table(title=f"EGT {task}: per-group quality (lower is better)")
    first = next(iter(rows.values()))
    groups = list(first[metrics[0]])
    t.add_column("model")
    for m in metrics:
        for g in groups:
            t.add_column(f"{m} {g}", justify="right")
        t.add_column(f"{m} gap", justify="right")
        t.add_column(f"{m} overall", justify="right")
    for name, q in rows.items():
        t.add_row(name, *[f"{v:.4g}" for m in metrics for v in [*(q[m][g] for g in groups), q["gap"][m], q["overall"][m]]])
    console.print(t)


@top.command("egt")
def egt_cmd(task: str = typer.Argument(..., help="image (diffusion) | text (causal LM)"),
               preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
               force: bool = ForceOpt, wandb: bool = WandbOpt):
    """EGT min–max fine-tuning of a generator on group-imbalanced data (objective: egt.objective), then
    its per-group quality and the EGT gap beside the pretrained model's."""
    from aimfair_ray.egt.run import pretrained_quality, train_generator
    from aimfair_ray.egt.tasks import check_task

    def body(cfg):
        e = cfg.egt
        log(f"egt: {task}, objective {e.objective} (eta {e.eta}), {e.steps} steps on {cfg.train.num_workers} "
            f"Ray Train worker(s)")
        base = pretrained_quality(cfg, task, log)
        res = train_generator(cfg, task, force, log)
        _egt_table(task, {"pretrained": base, e.objective: res["quality"]})
        log(f"egt: wrote {res['model_dir']} and its quality.json")
        pipeline.log_wandb(cfg, f"egt-{task}-{e.objective}", res, log=log, tables={
            "egt/quality": pipeline.quality_table({"pretrained": base, e.objective: res["quality"]})})

    run(lambda: check_task(task))
    run_with_config(body, preset, config, set_, wandb)


@top.command("minmax", hidden=True)
def minmax_cmd(task: str = typer.Argument(..., help="image | text"), preset: str = PresetOpt,
               config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt):
    """The old spelling of `aimfair egt`."""
    renamed("aimfair minmax")
    egt_cmd(task, preset, config, set_, force)


@bench_app.command("egt")
def benchmark_egt_cmd(task: str = typer.Argument("all", help="image | text | all"),
                      seeds: int = typer.Option(2, "--seeds", min=1, help="number of seeds (0, 1, ...)"),
                      objectives: Optional[str] = typer.Option(None, "--objectives",
                                                               help="comma-separated: erm, reweight, minmax, conditional"),
                      publish: Optional[str] = typer.Option(None, "--publish", help="also write PREFIX.md and .json with "
                                                            "the command, wall time and machine (one task: image or text)"),
                      preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                      wandb: bool = WandbOpt):
    """EGT table: ERM, reweighting, min–max and group-conditional fine-tuning over seeds: per-group
    quality, the gap and overall quality, each row with its setting; Markdown, CSV and JSON."""
    from aimfair_ray.egt.benchmark import benchmark_egt
    from aimfair_ray.egt.tasks import tasks

    known = tasks()
    chosen = list(known) if task == "all" else [task]

    def check():
        if any(k not in known for k in chosen):
            raise AimfairError(f"unknown EGT task {task!r}; choose {', '.join(known)} or all")
        if publish and len(chosen) > 1:
            raise AimfairError("--publish writes one task's table: pass image or text, not all")

    def body(cfg):
        for k in chosen:
            objs = [o.strip() for o in objectives.split(",") if o.strip()] if objectives else None
            bad = [o for o in objs or [] if o not in known[k].objectives]
            if bad:
                raise AimfairError(f"unknown --objectives {bad} for {k}; choose from {', '.join(known[k].objectives)}")
            t0 = time.time()
            command = "aimfair " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("aimfair") else None
            out = benchmark_egt(cfg, k, list(range(seeds)), objs, log=log, publish=publish, command=command)
            console.print(read_text(f"{out['dir']}/results.md"), highlight=False)
            log(f"benchmark egt {k}: wrote {out['dir']}/results.md, .csv and .json in {time.time() - t0:.0f}s")
            pipeline.log_wandb(cfg, f"benchmark-egt-{k}", {}, log=log, tables={
                "benchmark/egt": pipeline.egt_benchmark_table(out)})

    run(check)
    run_with_config(body, preset, config, set_, wandb)


@bench_app.command("aimfair")
def benchmark_aimfair_cmd(seeds: int = typer.Option(5, "--seeds", min=1, help="number of seeds (0, 1, ...)"),
                          methods: Optional[str] = typer.Option(None, "--methods", help="comma-separated rows of the table; "
                                                                "default: every row (see `aimfair benchmark aimfair --help`)"),
                          publish: Optional[str] = typer.Option(None, "--publish", help="also write PREFIX.md, .json "
                                                                "and .png with the command, wall time and machine"),
                          finished_only: bool = typer.Option(False, "--finished-only", help="train nothing: tabulate "
                                                             "the runs that finished, each row over its seeds"),
                          preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                          wandb: bool = WandbOpt):
    """Results table over seeds: the baseline, every fine-tuning method on the synthetic sets, selective with the
    project's default recipe, JTT, Group DRO (uses group labels), and oracle rows fine-tuned on real balanced
    images. Mean ± std, 95% intervals, the official seed-averaged WST/STD, and paired per-seed differences."""
    from aimfair_ray.benchmark import REAL_ONLY, benchmark_aimfair, rows

    def body(cfg):
        known = rows()
        chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else list(known)
        bad = [m for m in chosen if m not in known]
        if bad:
            raise AimfairError(f"unknown --methods {bad}; choose from {', '.join(known)}")
        pipeline.run_prepare(cfg, log=log)
        if set(chosen) - set(REAL_ONLY) and not finished_only:  # rows that read the synthetic sets
            pipeline.ensure_synthetic(cfg, log=log)
        t0 = time.time()
        command = "aimfair " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("aimfair") else None
        out = benchmark_aimfair(cfg, list(range(seeds)), chosen, log=log, publish=publish, command=command,
                                finished_only=finished_only)
        console.print(read_text(f"{out['dir']}/results.md"), highlight=False)
        log(f"benchmark: wrote {out['dir']}/results.md, .csv, .json and .png in {time.time() - t0:.0f}s")
        pipeline.log_wandb(cfg, "benchmark-aimfair", {}, log=log, images={"benchmark/chart": f"{out['dir']}/results.png"},
                           tables={"benchmark/aimfair": pipeline.aimfair_benchmark_table(out["table"])})

    run_with_config(body, preset, config, set_, wandb)


@bench_app.command("render")
def benchmark_render_cmd(prefix: str = typer.Argument(..., help="a published AIM-Fair benchmark without its suffix, "
                                                      "e.g. benchmarks/results/aimfair-cmnist")):
    """Recompute a published AIM-Fair benchmark's paired differences, claims and verdicts from the per-seed figures
    in PREFIX.json, and write PREFIX.json and PREFIX.md again (saying so, with this command): for when the tables'
    code changed, not the runs. Trains nothing."""
    from aimfair_ray.benchmark import rerender
    from aimfair_ray.storage import exists

    def go():
        if not exists(f"{prefix}.json"):
            raise AimfairError(f"no {prefix}.json: give a published benchmark's path without .json, e.g. "
                               "benchmarks/results/aimfair-cmnist")
        log(f"benchmark: wrote {rerender(prefix, 'aimfair ' + ' '.join(sys.argv[1:]))}")

    run(go)


@top.command("sweep")
def sweep_cmd(kind: str = typer.Argument(..., help=" | ".join(f"{k.name} ({k.help})" for k in SWEEP_KINDS.values())),
              space: Optional[str] = typer.Option(None, "--space", help="sweep YAML; default: the shipped one for KIND"),
              name: Optional[str] = typer.Option(None, "--name", help="sweep name (its folder under <run>/sweep); default: KIND"),
              fresh: bool = typer.Option(False, "--fresh", help="discard an earlier sweep of this name instead of resuming it"),
              wandb: bool = typer.Option(False, "--wandb", help="log every trial to W&B (offline by default)"),
              preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Ray Tune sweep (ASHA) over the Ray Train trainers; writes trials.csv/json, pareto.png and summary.md.
    Rerunning resumes: finished and failed trials are kept."""
    from aimfair_ray.sweep import load_spec, sweep

    def body(cfg):
        spec = load_spec(kind, space)
        out = sweep(cfg, spec, name=name, wandb=wandb, fresh=fresh, log=log)
        console.print(read_text(f"{out['dir']}/summary.md"), highlight=False)
        best = out["best"]
        if best is None:
            raise AimfairError(f"no trial finished; see {out['dir']}/summary.md for the errors")
        log(f"sweep: best trial {best['trial_id']}: "
            + ", ".join(f"{k}={v}" for k, v in best["params"].items())
            + f" (objective {best['metrics']['objective']:.4f}); {len(out['rows'])} trials in {out['wall_s']:.0f}s; "
            f"wrote {out['dir']}/trials.csv, trials.json, pareto.png, summary.md")

    run_with_config(body, preset, config, set_)
