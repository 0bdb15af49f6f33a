"""Cluster commands: ``serve`` (Ray Serve), ``submit`` a stage as a Ray job, and ``jobs``."""

from __future__ import annotations

from typing import List, Optional

import typer

from aimfair_ray import AimfairError
from aimfair_ray.cli.common import console, log, run

top = typer.Typer()
jobs_app = typer.Typer(no_args_is_help=True, help="Ray jobs on a cluster: list, logs, stop.")
GROUPS = {None: top, "jobs": jobs_app}

AddressOpt = typer.Option(None, "--address", "-a", help="job server, http://<head>:8265; default: RAY_API_SERVER_ADDRESS, "
                                                        "an http RAY_ADDRESS, or http://127.0.0.1:8265")


@top.command("serve")
def serve_cmd(config: str = typer.Option("serve/config.yaml", "--config", help="Serve config YAML (serve run format)"),
              model: Optional[List[str]] = typer.Option(None, "--model", help="ID=MODEL_DIR: serve these models "
                                                                                "instead of the config's (repeatable)"),
              image_pipeline: Optional[str] = typer.Option(None, "--image-pipeline",
                                                           help="diffusers pipeline folder for /v1/generate/image, e.g. "
                                                                "an EGT run's runs/cmnist/egt/image/minmax-seed0/model"),
              adapter: Optional[List[str]] = typer.Option(None, "--adapter", help="ID=ADAPTER_DIR: an EGT LoRA model "
                                                          "folder over --image-pipeline, chosen per request by its id "
                                                          "(repeatable; Ray Serve model multiplexing)"),
              host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8000, "--port"),
              token_file: Optional[str] = typer.Option(None, "--token-file", help="a file holding the bearer token "
                                                       "(else $AIMFAIR_SERVE_TOKEN, else no auth); /healthz and /login "
                                                       "stay open"),
              token: Optional[str] = typer.Option(None, "--token", hidden=True),
              out: str = typer.Option("runs/serve", "--out", help="where the resolved Serve config is written")):
    """Serve the audited models and the generators over HTTP (Ray Serve), on 127.0.0.1 by default:
    the config's app with --model/--token-file applied, run with `serve run` until Ctrl-C. The token is never
    written into the resolved config: it stays in its file or in $AIMFAIR_SERVE_TOKEN."""
    from pathlib import Path

    import yaml

    from aimfair_ray.serving import config as serve_config
    from aimfair_ray.storage import atomic_write_text

    def body():
        if token is not None:
            from aimfair_ray import AimfairError

            raise AimfairError("--token puts the token in the process list: use --token-file FILE (chmod 600) or "
                               "AIMFAIR_SERVE_TOKEN=... aimfair serve")
        cfg = serve_config.resolve(config, model, image_pipeline, host, port, token_file, adapter)
        path = f"{Path(out).resolve()}/config.yaml"
        atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
        models = cfg["applications"][0]["args"]["models"]
        log(f"serve: {', '.join(models)} on http://{host}:{port} (audit page at /, API docs at /docs); config {path}")
        return serve_config.run(path)

    code = run(body)
    if code:
        raise typer.Exit(code)


@top.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit_cmd(ctx: typer.Context,
               stage: str = typer.Argument(..., help="prepare | generate | baseline | finetune | egt | sweep | audit "
                                                     "| pipeline"),
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
            raise typer.Exit(130) from None
        info = c.get_job_info(jid)
        log(f"submit: job {jid} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""))
        if status != "SUCCEEDED":
            raise typer.Exit(1)

    run(body)


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

    run(body)


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

    run(body)


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

    run(body)
