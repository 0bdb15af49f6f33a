"""The ``aimfair`` command line: one command per stage, and ``demo`` for the whole chain."""

from __future__ import annotations

import os
import sys
import time
from typing import List, Optional

import typer
from rich.console import Console

from aimfair_ray import AimfairError
from aimfair_ray.config import Config, list_presets, list_resource_layers, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Prepare datasets as Parquet splits.")
train_app = typer.Typer(no_args_is_help=True, help="Train models on Ray Train.")
config_app = typer.Typer(no_args_is_help=True, help="Show presets and resolved configs.")
gen_app = typer.Typer(no_args_is_help=True, help="Synthetic data (CSDG): prompts, then images.")
bench_app = typer.Typer(no_args_is_help=True, help="Results tables over seeds.")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(config_app, name="config")
app.add_typer(gen_app, name="generate")
app.add_typer(bench_app, name="benchmark")
jobs_app = typer.Typer(no_args_is_help=True, help="Ray jobs on a cluster: list, logs, stop.")
app.add_typer(jobs_app, name="jobs")
# Wide enough for the audit table when output is a pipe or a CI log.
console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)

PresetOpt = typer.Option("cmnist", "--preset", "-p", help="config preset shipped with the package")
ConfigOpt = typer.Option(None, "--config", "-c", help="a YAML file merged over the preset (repeatable, later wins), "
                         "e.g. --config gpu --config my.yaml (cpu, gpu: the shipped resource layers)")
SetOpt = typer.Option(None, "--set", "-s", help="override a value: --set train.epochs=3 (repeatable)")
ForceOpt = typer.Option(False, "--force", help="redo the stage even if its outputs exist")


_LOADED: list[Config] = []  # configs of the running command, whose run dirs are published to storage_uri


def _cfg(preset: str, config: Optional[List[str]], overrides: Optional[List[str]], wandb: bool = False) -> Config:
    cfg = load_config(preset, config or [], overrides or [])
    if wandb:
        cfg.train.wandb = True
    if cfg.storage_uri:
        from aimfair_ray.storage import pull_run

        n = pull_run(cfg)
        if n:
            log(f"storage: fetched {n} files of run {cfg.name} from {cfg.storage_uri}")
    _LOADED.append(cfg)
    return cfg


def _publish() -> None:
    from aimfair_ray.storage import push_run

    while _LOADED:
        cfg = _LOADED.pop()
        if cfg.storage_uri:
            log(f"storage: published {push_run(cfg)} new files of run {cfg.name} to {cfg.storage_uri}")


def _run(fn):
    """Run a command body; user errors print their message and exit 2. The run's outputs,
    also those a failed command committed, are then published to ``storage_uri``."""
    try:
        return fn()
    except AimfairError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2)
    finally:
        _publish()


def log(msg: str) -> None:
    console.print(f"[cyan]{time.strftime('%H:%M:%S')}[/] {msg}", highlight=False)


# ---- stages ------------------------------------------------------------------------------
def do_prepare(cfg: Config, force: bool = False) -> dict:
    from aimfair_ray.data.prepare import prepare_data
    from aimfair_ray.runtime import ensure_ray

    ensure_ray(cfg.ray)
    log(f"data: preparing {cfg.data.dataset} -> {cfg.data_dir}")
    return prepare_data(cfg, force=force, log=log)


def do_train(cfg: Config, force: bool = False) -> dict:
    from aimfair_ray.train.baseline import train_baseline

    log(f"train: baseline {cfg.model.backbone} on {cfg.train.num_workers} Ray Train worker(s)")
    return train_baseline(cfg, force=force, log=log)


def do_finetune(cfg: Config, method: Optional[str] = None, force: bool = False) -> dict:
    from aimfair_ray.train.finetune import finetune

    m = method or cfg.finetune.method
    log(f"finetune: {m} on {cfg.train.num_workers} Ray Train worker(s)"
        + (f" through DeepSpeed ZeRO-{cfg.finetune.zero_stage}" if cfg.finetune.deepspeed else ""))
    return finetune(cfg, m, force=force, log=log)


def do_generate(cfg: Config, what: str, force: bool = False) -> dict:
    from aimfair_ray.generate import stage
    from aimfair_ray.runtime import ensure_ray

    ensure_ray(cfg.ray)
    out: dict = {}
    if what in ("prompts", "images", "all"):
        log(f"generate: prompts with the {cfg.generate.backend} backend")
        prompts = stage.run_prompts(cfg, force=force, log=log)
        out["prompts"] = len(prompts)
    if what in ("images", "all"):
        out["images"] = stage.run_images(cfg, prompts, log=log)
    if what == "filter" or (what == "all" and cfg.generate.filter):
        out["filter"] = stage.run_filter(cfg, log=log)
    return out


def do_audit(cfg: Config, checkpoint: Optional[str], split: Optional[str], out: Optional[str], title: str) -> dict:
    from aimfair_ray.data.prepare import split_dir
    from aimfair_ray.evaluate import audit
    from aimfair_ray.runtime import ensure_ray

    ensure_ray(cfg.ray)
    model_dir = checkpoint or f"{cfg.stage_dir('baseline')}/model"
    sdir = split_dir(cfg, split or cfg.audit.split)
    out_dir = out or f"{os.path.dirname(model_dir.rstrip('/'))}/audit"
    log(f"audit: {model_dir} on {sdir}")
    rep = audit(model_dir, sdir, out_dir, cfg.audit, title=title)
    cfg.save(out_dir)
    log(f"audit: wrote {out_dir}/audit.json and {out_dir}/group_acc.png")
    return rep


def _wandb(cfg: Config, result: dict, report: Optional[dict]) -> None:
    if not cfg.train.wandb:
        return
    from aimfair_ray.tracking import log_run

    stage = cfg.stage_dir("baseline")
    d = log_run(cfg, "baseline", result["history"], report, f"{stage}/audit/group_acc.png" if report else None, stage)
    log(f"wandb: logged to {d} (mode {os.environ.get('WANDB_MODE')})")


def _headline(name: str, r: dict) -> None:
    console.print(f"[bold]{name}[/]: ACC {r['acc']:.4f}  WST {r['wst']:.4f}  STD {r['std']:.4f}  EO {r['eo']:.4f}",
                  highlight=False)


# ---- commands ------------------------------------------------------------------------------
@data_app.command("prepare")
def data_prepare(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                 force: bool = ForceOpt):
    """Build the dataset's Parquet splits (train/val/test, and generator for Colored MNIST)."""
    _run(lambda: do_prepare(_cfg(preset, config, set_), force))


@train_app.command("baseline")
def train_baseline_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                       force: bool = ForceOpt, wandb: bool = typer.Option(False, "--wandb", help="log to W&B (offline by default)")):
    """Train the biased (ERM) baseline on Ray Train; an interrupted run resumes."""

    def body():
        cfg = _cfg(preset, config, set_, wandb)
        res = do_train(cfg, force)
        rep = do_audit(cfg, None, None, None, "baseline (ERM)") if cfg.train.wandb else None
        _wandb(cfg, res, rep)

    _run(body)


@train_app.command("groupdro")
def train_groupdro_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                       force: bool = ForceOpt):
    """Train the Group DRO baseline on real data with group labels (step size: group_dro.eta)."""
    from aimfair_ray.evaluate import table

    def body():
        cfg = _cfg(preset, config, set_)
        res = train_group_dro_stage(cfg, force)
        rep = do_audit(cfg, res["model_dir"], None, None, f"Group DRO (eta {cfg.group_dro.eta})")
        console.print(table({"group_dro": rep}))
        _headline("group_dro", rep)

    _run(body)


def train_group_dro_stage(cfg: Config, force: bool = False) -> dict:
    from aimfair_ray.train.baseline import train_group_dro

    log(f"train: Group DRO (eta {cfg.group_dro.eta}) on {cfg.train.num_workers} Ray Train worker(s)")
    return train_group_dro(cfg, force=force, log=log)


@app.command("finetune")
def finetune_cmd(method: Optional[str] = typer.Option(None, "--method", "-m",
                                                      help="full | linear | random | selective (default: finetune.method)"),
                 preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                 force: bool = ForceOpt):
    """Fine-tune the baseline on the synthetic balanced set, then audit it beside the baseline."""
    from aimfair_ray.evaluate import table

    def body():
        cfg = _cfg(preset, config, set_)
        res = do_finetune(cfg, method, force)
        base = do_audit(cfg, None, None, None, "biased baseline (ERM)")
        rep = do_audit(cfg, res["model_dir"], None, None, f"fine-tuned: {res['method']}")
        console.print(table({"baseline (ERM)": base, f"finetune: {res['method']}": rep}))
        _headline(f"finetune: {res['method']}", rep)

    _run(body)


@app.command("minmax")
def minmax_cmd(kind: str = typer.Argument(..., help="image (diffusion) | text (causal LM)"),
               preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
               force: bool = ForceOpt):
    """EGT min–max fine-tuning of a generator on group-imbalanced data (objective: egt.objective), then
    its per-group quality and the EGT gap beside the pretrained model's."""

    def body():
        from aimfair_ray.egt.run import check_kind, finetune, pretrained_quality

        check_kind(kind)
        cfg = _cfg(preset, config, set_)
        e = cfg.egt
        log(f"egt: {kind}, objective {e.objective} (eta {e.eta}), {e.steps} steps on {cfg.train.num_workers} "
            f"Ray Train worker(s)")
        base = pretrained_quality(cfg, kind, log)
        res = finetune(cfg, kind, force, log)
        _egt_table(kind, {"pretrained": base, e.objective: res["quality"]})
        log(f"egt: wrote {res['model_dir']} and its quality.json")

    _run(body)


def _egt_table(kind: str, rows: dict) -> None:
    from rich.table import Table

    from aimfair_ray.egt.benchmark import METRICS

    t = Table(title=f"EGT {kind}: per-group quality (lower is better)")
    first = next(iter(rows.values()))
    groups = list(first[METRICS[kind][0]])
    t.add_column("model")
    for m in METRICS[kind]:
        for g in groups:
            t.add_column(f"{m} {g}", justify="right")
        t.add_column(f"{m} gap", justify="right")
        t.add_column(f"{m} overall", justify="right")
    for name, q in rows.items():
        t.add_row(name, *[f"{v:.4g}" for m in METRICS[kind] for v in [*(q[m][g] for g in groups), q["gap"][m], q["overall"][m]]])
    console.print(t)


@bench_app.command("egt")
def benchmark_egt_cmd(kind: str = typer.Argument("all", help="image | text | all"),
                      seeds: int = typer.Option(2, "--seeds", min=1, help="number of seeds (0, 1, ...)"),
                      objectives: Optional[str] = typer.Option(None, "--objectives",
                                                               help="comma-separated: erm, reweight, minmax, conditional (text)"),
                      preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """EGT table: ERM, reweighting and min–max (and group-conditional for text) over seeds: per-group
    quality, the gap and overall quality; Markdown, CSV and JSON."""

    def body():
        from aimfair_ray.egt.benchmark import OBJECTIVES, benchmark_egt

        kinds = ["image", "text"] if kind == "all" else [kind]
        if any(k not in OBJECTIVES for k in kinds):
            raise AimfairError(f"unknown EGT task {kind!r}; choose image, text or all")
        cfg = _cfg(preset, config, set_)
        for k in kinds:
            objs = [o.strip() for o in objectives.split(",") if o.strip()] if objectives else None
            bad = [o for o in objs or [] if o not in OBJECTIVES[k]]
            if bad:
                raise AimfairError(f"unknown --objectives {bad} for {k}; choose from {', '.join(OBJECTIVES[k])}")
            t0 = time.time()
            out = benchmark_egt(cfg, k, list(range(seeds)), objs, log=log)
            console.print(open(f"{out['dir']}/results.md").read(), highlight=False)
            log(f"benchmark egt {k}: wrote {out['dir']}/results.md, .csv and .json in {time.time() - t0:.0f}s")

    _run(body)


@bench_app.command("aimfair")
def benchmark_aimfair_cmd(seeds: int = typer.Option(3, "--seeds", min=1, help="number of seeds (0, 1, ...)"),
                          methods: str = typer.Option(",".join(("baseline", "full", "linear", "random", "selective", "group_dro")),
                                                      "--methods", help="comma-separated rows of the table"),
                          preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Results table: baseline, full, linear, random, selective and Group DRO, mean ± std over seeds."""
    from aimfair_ray.benchmark import ROWS, benchmark_aimfair

    def body():
        cfg = _cfg(preset, config, set_)
        rows = [m.strip() for m in methods.split(",") if m.strip()]
        bad = [m for m in rows if m not in ROWS]
        if bad:
            raise AimfairError(f"unknown --methods {bad}; choose from {', '.join(ROWS)}")
        from aimfair_ray.runtime import ensure_ray

        ensure_ray(cfg.ray)
        do_prepare(cfg)
        do_generate(cfg, "all")
        t0 = time.time()
        out = benchmark_aimfair(cfg, list(range(seeds)), rows, log=log)
        console.print(open(f"{out['dir']}/results.md").read(), highlight=False)
        log(f"benchmark: wrote {out['dir']}/results.md, .csv, .json and .png in {time.time() - t0:.0f}s")

    _run(body)


@app.command("sweep")
def sweep_cmd(kind: str = typer.Argument(..., help="selective (AIM-Fair k, lr) | minmax (group-weight eta, EMA decay)"),
              space: Optional[str] = typer.Option(None, "--space", help="sweep YAML; default: the shipped one for KIND"),
              name: Optional[str] = typer.Option(None, "--name", help="sweep name (its folder under <run>/sweep); default: KIND"),
              fresh: bool = typer.Option(False, "--fresh", help="discard an earlier sweep of this name instead of resuming it"),
              wandb: bool = typer.Option(False, "--wandb", help="log every trial to W&B (offline by default)"),
              preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Ray Tune sweep (ASHA) over the Ray Train trainers; writes trials.csv/json, pareto.png and summary.md.
    Rerunning resumes: finished and failed trials are kept."""
    from aimfair_ray.sweep import load_spec, sweep

    def body():
        cfg = _cfg(preset, config, set_)
        spec = load_spec(kind, space)
        out = sweep(cfg, spec, name=name, wandb=wandb, fresh=fresh, log=log)
        console.print(open(f"{out['dir']}/summary.md").read(), highlight=False)
        best = out["best"]
        if best is None:
            raise AimfairError(f"no trial finished; see {out['dir']}/summary.md for the errors")
        log(f"sweep: best trial {best['trial_id']}: "
            + ", ".join(f"{k}={v}" for k, v in best["params"].items())
            + f" (objective {best['metrics']['objective']:.4f}); {len(out['rows'])} trials in {out['wall_s']:.0f}s; "
            f"wrote {out['dir']}/trials.csv, trials.json, pareto.png, summary.md")

    _run(body)


@gen_app.command("prompts")
def generate_prompts_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                         force: bool = ForceOpt):
    """Write N checked, de-duplicated prompts per (target, group) cell."""
    _run(lambda: do_generate(_cfg(preset, config, set_), "prompts", force))


@gen_app.command("images")
def generate_images_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Generate the balanced and imbalanced synthetic sets (resumes where a run stopped)."""
    _run(lambda: do_generate(_cfg(preset, config, set_), "images"))


@gen_app.command("all")
def generate_all_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Prompts, then images (then the faithfulness filter if generate.filter is on)."""
    _run(lambda: do_generate(_cfg(preset, config, set_), "all"))


@gen_app.command("filter")
def generate_filter_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Drop synthetic images whose checker-predicted target or group disagrees with the prompt's."""
    _run(lambda: do_generate(_cfg(preset, config, set_), "filter"))


@gen_app.command("quality")
def generate_quality_cmd(per_cell: int = typer.Option(200, help="generated images per cell"),
                         pipeline: Optional[str] = typer.Option(None, help="pipeline folder; default: the embedded model"),
                         preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """The embedded model's quality bar: an independent checker on generated images, before filtering."""
    from aimfair_ray.generate.stage import quality_report, synth_dir
    from aimfair_ray.storage import write_json

    def body():
        cfg = _cfg(preset, config, set_)
        res, _, _ = quality_report(cfg, pipeline, per_cell, log=log)
        write_json(f"{synth_dir(cfg)}/quality.json", res)
        console.print(f"[bold]quality[/] ({per_cell}/cell, {res['steps']} steps, CFG {res['guidance_scale']}): "
                      f"target {res['target_acc']:.4f} (bar 0.80)  colour {res['color_acc']:.4f} (bar 0.95)  "
                      f"digit {res['digit_acc']:.4f}", highlight=False)
        for c, v in res["per_cell"].items():
            console.print(f"  {c}: target {v['target_acc']:.3f}  colour {v['color_acc']:.3f}  digit {v['digit_acc']:.3f}")

    _run(body)


@app.command("audit")
def audit_cmd(checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="model folder; default: the run's baseline"),
              split: Optional[str] = typer.Option(None, "--split", help="split name (test, val, ...) or a split folder"),
              out: Optional[str] = typer.Option(None, "--out", help="output folder; default: beside the model"),
              preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Audit a checkpoint on a labeled split: JSON report, PNG chart and a table."""
    from aimfair_ray.evaluate import table

    def body():
        cfg = _cfg(preset, config, set_)
        rep = do_audit(cfg, checkpoint, split, out, f"audit: {checkpoint or 'baseline'}")
        console.print(table({checkpoint or "baseline": rep}))
        _headline(checkpoint or "baseline", rep)

    _run(body)


@app.command("demo")
def demo(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
         wandb: bool = typer.Option(False, "--wandb", help="log to W&B (offline by default)")):
    """The whole chain on the embedded default: data -> synthetic sets -> biased baseline ->
    AIM-Fair selective fine-tuning -> audits of both."""
    from aimfair_ray.evaluate import table

    def body():
        t0 = time.time()
        cfg = _cfg(preset, config, set_, wandb)
        do_prepare(cfg)
        do_generate(cfg, "all")
        res = do_train(cfg)
        rep = do_audit(cfg, None, None, None, "biased baseline (ERM)")
        _wandb(cfg, res, rep)
        ft = do_finetune(cfg)
        ft_rep = do_audit(cfg, ft["model_dir"], None, None, f"AIM-Fair fine-tuned ({ft['method']})")
        console.print(table({"baseline (ERM)": rep, f"finetune: {ft['method']}": ft_rep}))
        _headline("biased baseline on the test set", rep)
        _headline(f"fine-tuned ({ft['method']}) on the test set", ft_rep)
        log(f"demo: done in {time.time() - t0:.0f}s; outputs under {cfg.run_dir}")

    _run(body)


# ---- Ray Serve ---------------------------------------------------------------------------------
@app.command("serve")
def serve_cmd(config: str = typer.Option("serve/config.yaml", "--config", help="Serve config YAML (serve run format)"),
              model: Optional[List[str]] = typer.Option(None, "--model", help="ID=MODEL_DIR: serve these models "
                                                                                "instead of the config's (repeatable)"),
              image_pipeline: Optional[str] = typer.Option(None, "--image-pipeline",
                                                           help="diffusers pipeline folder for /v1/generate/image, e.g. "
                                                                "an EGT run's runs/cmnist/egt/image/minmax-seed0/model"),
              host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8000, "--port"),
              token: Optional[str] = typer.Option(None, "--token", help="bearer token (else args.token or "
                                                                          "AIMFAIR_SERVE_TOKEN); /healthz stays open"),
              out: str = typer.Option("runs/serve", "--out", help="where the resolved Serve config is written")):
    """Serve the audited models and the generators over HTTP (Ray Serve), on 127.0.0.1 by default:
    the config's app with --model/--token applied, run with `serve run` until Ctrl-C."""
    import signal
    import subprocess

    from aimfair_ray.config import read_yaml
    from aimfair_ray.serving.app import build_app
    from aimfair_ray.storage import atomic_write_text

    def body():
        import yaml
        from pathlib import Path

        if not Path(config).is_file():
            raise AimfairError(f"Serve config {config} does not exist; pass --config (the shipped one is serve/config.yaml)")
        cfg = read_yaml(Path(config))
        apps = cfg.get("applications") or []
        if len(apps) != 1:
            raise AimfairError(f"{config}: expected one application, found {len(apps)}")
        args = dict(apps[0].get("args") or {})
        if model:
            bad = [m for m in model if "=" not in m]
            if bad:
                raise AimfairError(f"--model {bad[0]!r}: expected ID=MODEL_DIR, e.g. --model baseline=runs/cmnist/baseline/model")
            args["models"] = dict(m.split("=", 1) for m in model)
        if image_pipeline:
            if not Path(image_pipeline, "model_index.json").is_file():
                raise AimfairError(f"--image-pipeline {image_pipeline}: no diffusers pipeline there (model_index.json "
                                   "is missing); pass a pipeline folder, e.g. the model/ of an `aimfair minmax image` run")
            args["image_pipeline"] = str(Path(image_pipeline).resolve())
        # Serve refuses options for deployments the app does not build: keep those it does
        keep = ({f"Classifier-{i}" for i in args.get("models") or {}} | {"Api"}
                | ({"ImageGenerator"} if args.get("image_pipeline", "embedded") is not None else set())
                | ({"TextGenerator"} if args.get("text_model", "smollm2") is not None else set()))
        apps[0]["deployments"] = [d for d in apps[0].get("deployments", []) if d.get("name") in keep]
        args["models"] = {i: str(Path(p).resolve()) for i, p in (args.get("models") or {}).items()}
        if token:
            args["token"] = token
        build_app(args)  # checks the args and every model folder before Ray starts
        apps[0]["args"] = args
        cfg["http_options"] = dict(cfg.get("http_options") or {}, host=host, port=port)
        path = f"{Path(out).resolve()}/config.yaml"
        atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
        log(f"serve: {', '.join(args['models'])} on http://{host}:{port} (audit page at /, API docs at /docs); "
            f"config {path}")
        proc = subprocess.Popen([str(Path(sys.executable).with_name("serve")), "run", path])

        def interrupt(*_):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop `serve run` (it deletes the app), then make sure
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
            code = 0
        if code:
            raise typer.Exit(code)

    _run(body)


# ---- Ray jobs ----------------------------------------------------------------------------------
AddressOpt = typer.Option(None, "--address", "-a", help="job server, http://<head>:8265; default: RAY_API_SERVER_ADDRESS, "
                                                        "an http RAY_ADDRESS, or http://127.0.0.1:8265")


@app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit_cmd(ctx: typer.Context,
               stage: str = typer.Argument(..., help="prepare | generate | baseline | finetune | minmax | sweep | audit | pipeline"),
               address: Optional[str] = AddressOpt,
               working_dir: str = typer.Option(".", "--working-dir", help="the project checkout, uploaded with the job"),
               runtime_env: Optional[str] = typer.Option(None, "--runtime-env", help="runtime_env YAML; default: "
                                                                                     "<working-dir>/cluster/runtime_env.yaml"),
               python: str = typer.Option("python", "--python", help="the interpreter on the cluster"),
               entrypoint_cpus: float = typer.Option(0, "--entrypoint-cpus", help="CPUs reserved for the job's driver"),
               entrypoint_gpus: float = typer.Option(0, "--entrypoint-gpus", help="GPUs reserved for the job's driver"),
               job_id: Optional[str] = typer.Option(None, "--job-id", help="submission id; default: Ray picks one"),
               wait: bool = typer.Option(True, "--wait/--no-wait", help="stream the logs and exit with the job's status")):
    """Submit a stage as a Ray job: `aimfair submit pipeline -- --preset cmnist --set train.epochs=3`.
    Everything after the stage (or after --) goes to jobs/<stage>.py. With --wait (the default) the
    logs stream here and the exit status is 0 only if the job SUCCEEDED."""
    from aimfair_ray import submit

    def body():
        c, jid = submit.submit(stage, list(ctx.args), address=address, working_dir=working_dir,
                               runtime_env_file=runtime_env, python=python, entrypoint_cpus=entrypoint_cpus,
                               entrypoint_gpus=entrypoint_gpus, submission_id=job_id)
        log(f"submit: job {jid} ({stage}) on {submit.job_address(address)}")
        if not wait:
            console.print(jid, highlight=False)
            return
        try:
            status = submit.follow(c, jid, out=lambda s: console.print(s, highlight=False, markup=False))
        except KeyboardInterrupt:
            log(f"submit: stopped following; job {jid} keeps running (aimfair jobs stop {jid})")
            raise typer.Exit(130)
        info = c.get_job_info(jid)
        log(f"submit: job {jid} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""))
        if status != "SUCCEEDED":
            raise typer.Exit(1)

    _run(body)


@jobs_app.command("list")
def jobs_list_cmd(address: Optional[str] = AddressOpt):
    """The cluster's jobs, oldest first."""
    from rich.table import Table

    from aimfair_ray import submit

    def body():
        t = Table("id", "status", "stage", "start", "entrypoint")
        for r in submit.jobs_table(submit.client(address)):
            t.add_row(r["id"], r["status"], r["stage"], r["start"], r["entrypoint"])
        console.print(t)

    _run(body)


@jobs_app.command("logs")
def jobs_logs_cmd(job_id: str = typer.Argument(...), address: Optional[str] = AddressOpt,
                  follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends")):
    """A job's logs."""
    from aimfair_ray import submit

    def body():
        c = submit.client(address)
        try:
            if follow:
                submit.follow(c, job_id, out=lambda s: console.print(s, highlight=False, markup=False))
            else:
                console.print(c.get_job_logs(job_id), highlight=False, markup=False)
        except RuntimeError as e:  # the job server's 404
            raise AimfairError(f"no job {job_id!r} on {submit.job_address(address)}: {e}; see `aimfair jobs list`") from None

    _run(body)


@jobs_app.command("stop")
def jobs_stop_cmd(job_id: str = typer.Argument(...), address: Optional[str] = AddressOpt):
    """Stop a running job."""
    from aimfair_ray import submit

    def body():
        try:
            stopped = submit.client(address).stop_job(job_id)
        except RuntimeError as e:
            raise AimfairError(f"no job {job_id!r} on {submit.job_address(address)}: {e}; see `aimfair jobs list`") from None
        log(f"jobs: {job_id} {'stopping' if stopped else 'had already ended'}")

    _run(body)


@config_app.command("show")
def config_show(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Print the resolved config."""
    _run(lambda: console.print(load_config(preset, config or [], set_ or []).to_yaml(), highlight=False))


@config_app.command("presets")
def config_presets():
    """List the shipped presets and resource layers (--config cpu|gpu)."""
    for p in list_presets():
        console.print(p)
    for p in list_resource_layers():
        console.print(f"{p} (resource layer: --config {p})")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
