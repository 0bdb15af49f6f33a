"""Stage commands: data, generate, train, finetune, audit, and demo (the whole chain)."""

from __future__ import annotations

from typing import List, Optional

import typer

from aimfair_ray import pipeline
from aimfair_ray.cli.common import ConfigOpt, ForceOpt, PresetOpt, SetOpt, WandbOpt, console, headline, log, run_with_config
from aimfair_ray.train import methods

top = typer.Typer()
data_app = typer.Typer(no_args_is_help=True, help="Prepare datasets as Parquet splits.")
train_app = typer.Typer(no_args_is_help=True, help="Train models on Ray Train.")
gen_app = typer.Typer(no_args_is_help=True, help="Synthetic data (CSDG): prompts, then images.")
GROUPS = {None: top, "data": data_app, "train": train_app, "generate": gen_app}


@data_app.command("prepare")
def data_prepare(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                 force: bool = ForceOpt):
    """Build the dataset's Parquet splits (train/val/test, and generator for Colored MNIST)."""
    run_with_config(lambda cfg: pipeline.run_prepare(cfg, force, log), preset, config, set_)


@data_app.command("import-synthetic")
def data_import_synthetic(manifest: str = typer.Argument(..., help="CSV or Parquet: path, target, group (prompt, "
                                                         "generator optional); paths relative to the manifest"),
                          balance: str = typer.Option(..., "--as", help="balanced | imbalanced: which set of the run it is"),
                          generator: Optional[str] = typer.Option(None, "--generator",
                                                                  help="the generator's name, shown on model cards"),
                          preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt,
                          set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt):
    """Your own synthetic images as the run's balanced or imbalanced set (tagged synthetic, with the generator's
    name); class and group names must be the prepared data's."""
    run_with_config(lambda cfg: pipeline.run_import(cfg, manifest, balance, generator, force, log), preset, config, set_)


@train_app.command("baseline")
def train_baseline_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                       force: bool = ForceOpt, wandb: bool = WandbOpt):
    """Train the biased (ERM) baseline on Ray Train; an interrupted run resumes."""

    def body(cfg):
        res = pipeline.run_baseline(cfg, force, log)
        rep = pipeline.run_audit(cfg, title="baseline (ERM)", log=log) if cfg.train.wandb else None
        pipeline.log_wandb(cfg, "baseline", res, rep, log=log)

    run_with_config(body, preset, config, set_, wandb)


@train_app.command("groupdro")
def train_groupdro_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                       force: bool = ForceOpt, wandb: bool = WandbOpt):
    """Train the Group DRO baseline on real data with group labels (step size: group_dro.eta)."""
    from aimfair_ray.evaluate import table

    def body(cfg):
        res = pipeline.run_group_dro(cfg, force, log)
        rep = pipeline.run_audit(cfg, res["model_dir"], title=f"Group DRO (eta {cfg.group_dro.eta})", log=log)
        console.print(table({"group_dro": rep}))
        headline("group_dro", rep)
        pipeline.log_wandb(cfg, "group_dro", res, rep, log=log)

    run_with_config(body, preset, config, set_, wandb)


@train_app.command("jtt")
def train_jtt_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                  force: bool = ForceOpt, wandb: bool = WandbOpt):
    """Train JTT (Just Train Twice) on real data without group labels: ERM for jtt.epochs, then ERM again with its
    train errors upweighted by jtt.upweight."""
    from aimfair_ray.evaluate import table

    def body(cfg):
        res = pipeline.run_jtt(cfg, force, log)
        rep = pipeline.run_audit(cfg, res["model_dir"], title=f"JTT (T {cfg.jtt.epochs}, upweight {cfg.jtt.upweight})",
                                 log=log)
        console.print(table({"jtt": rep}))
        headline("jtt", rep)
        pipeline.log_wandb(cfg, "jtt", res, rep, log=log)

    run_with_config(body, preset, config, set_, wandb)


@top.command("finetune")
def finetune_cmd(method: Optional[str] = typer.Option(None, "--method", "-m",
                                                      help=f"{methods.describe()} (default: finetune.method)"),
                 preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                 force: bool = ForceOpt, wandb: bool = WandbOpt):
    """Fine-tune the baseline on the synthetic balanced set, then audit it beside the baseline."""
    from aimfair_ray.evaluate import table

    def body(cfg):
        res = pipeline.run_finetune(cfg, method, force, log)
        base = pipeline.run_audit(cfg, title="biased baseline (ERM)", log=log)
        rep = pipeline.run_audit(cfg, res["model_dir"], title=f"fine-tuned: {res['method']}", log=log)
        console.print(table({"baseline (ERM)": base, f"finetune: {res['method']}": rep}))
        headline(f"finetune: {res['method']}", rep)
        pipeline.log_wandb(cfg, f"finetune-{res['method']}", res, rep, log=log, images=pipeline.finetune_images(cfg, res))

    run_with_config(body, preset, config, set_, wandb)


@gen_app.command("prompts")
def generate_prompts_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                         force: bool = ForceOpt,
                         dry_run: bool = typer.Option(False, "--dry-run", help="print what would run (the task's cells, "
                                                      "an example LLM request, the vLLM processor config) and stop")):
    """Write N checked, de-duplicated prompts per (target, group) cell."""
    import json

    from aimfair_ray.generate.stage import prompts_dry_run

    def body(cfg):
        if dry_run:
            console.print_json(json.dumps(prompts_dry_run(cfg), default=str))
            return
        pipeline.run_generate(cfg, "prompts", force, log)

    run_with_config(body, preset, config, set_)


KeepOpt = typer.Option(False, "--keep", help="never draw a set again because its settings or prompts changed: "
                       "refuse instead")


@gen_app.command("images")
def generate_images_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                        force: bool = typer.Option(False, "--force", help="draw the sets again (from the same prompts)"),
                        keep: bool = KeepOpt):
    """Generate the balanced and imbalanced synthetic sets (resumes where a run stopped; a set made with
    other settings or prompts is drawn again; a lower count keeps the first images of each cell)."""
    run_with_config(lambda cfg: pipeline.run_generate(cfg, "images", force, log, keep=keep), preset, config, set_)


@gen_app.command("all")
def generate_all_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                     force: bool = ForceOpt, keep: bool = KeepOpt):
    """Prompts, then images (then the faithfulness filter if generate.filter is on)."""
    run_with_config(lambda cfg: pipeline.run_generate(cfg, "all", force, log, keep=keep), preset, config, set_)


@gen_app.command("filter")
def generate_filter_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Drop synthetic images whose checker-predicted target or group disagrees with the prompt's."""
    run_with_config(lambda cfg: pipeline.run_generate(cfg, "filter", log=log), preset, config, set_)


@gen_app.command("quality")
def generate_quality_cmd(per_cell: int = typer.Option(200, help="generated images per cell"),
                         pipeline_dir: Optional[str] = typer.Option(None, "--pipeline",
                                                                    help="pipeline folder; default: the embedded model"),
                         preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """The embedded model's quality bar: an independent checker on generated images, before filtering."""
    from aimfair_ray.generate.stage import quality_report
    from aimfair_ray.storage import write_json

    def body(cfg):
        res, _, _ = quality_report(cfg, pipeline_dir, per_cell, log=log)
        write_json(f"{cfg.paths.synthetic}/quality.json", res)
        console.print(f"[bold]quality[/] ({per_cell}/cell, {res['steps']} steps, CFG {res['guidance_scale']}): "
                      f"target {res['target_acc']:.4f} (bar 0.80)  colour {res['color_acc']:.4f} (bar 0.95)  "
                      f"digit {res['digit_acc']:.4f}", highlight=False)
        for c, v in res["per_cell"].items():
            console.print(f"  {c}: target {v['target_acc']:.3f}  colour {v['color_acc']:.3f}  digit {v['digit_acc']:.3f}")

    run_with_config(body, preset, config, set_)


@top.command("audit")
def audit_cmd(checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="model folder; default: the run's baseline"),
              split: Optional[str] = typer.Option(None, "--split", help="split name (test, val, ...) or a split folder"),
              out: Optional[str] = typer.Option(None, "--out", help="output folder; default: beside the model"),
              preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Audit a checkpoint on a labeled split: JSON report, PNG chart and a table."""
    from aimfair_ray.evaluate import table

    def body(cfg):
        rep = pipeline.run_audit(cfg, checkpoint, split, out, f"audit: {checkpoint or 'baseline'}", log)
        console.print(table({checkpoint or "baseline": rep}))
        headline(checkpoint or "baseline", rep)

    run_with_config(body, preset, config, set_)


@top.command("report")
def report_cmd(name: Optional[str] = typer.Option(None, "--name", help="the run's name (default: the config's)"),
               preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Write runs/<name>/report.html: one self-contained page of what the run's stages made (data, synthetic
    samples with prompts, models side by side, selection, results, provenance); opens in any browser."""
    from aimfair_ray import AimfairError
    from aimfair_ray.report import write_report

    def body(cfg):
        if name:
            cfg.name = name
        from aimfair_ray.storage import exists

        if not exists(cfg.run_dir):
            raise AimfairError(f"no run at {cfg.run_dir}: run a stage first, or give --name / --set output_dir=")
        console.print(f"report: {write_report(cfg.run_dir)}", highlight=False)

    run_with_config(body, preset, config, set_)


@top.command("demo")
def demo(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
         wandb: bool = WandbOpt):
    """The whole chain on the embedded default: data -> synthetic sets -> biased baseline ->
    AIM-Fair selective fine-tuning -> audits of both."""
    from aimfair_ray.evaluate import table

    def body(cfg):
        r = pipeline.run_demo(cfg, log)
        console.print(table({"baseline (ERM)": r["baseline"], f"finetune: {r['method']}": r["finetuned"]}))
        headline("biased baseline on the test set", r["baseline"])
        headline(f"fine-tuned ({r['method']}) on the test set", r["finetuned"])
        from aimfair_ray.report import write_report

        log(f"demo: done in {r['wall_s']:.0f}s; outputs under {cfg.run_dir}")
        log(f"report: {write_report(cfg.run_dir)} (open it in a browser)")

    run_with_config(body, preset, config, set_, wandb)
