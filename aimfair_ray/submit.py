"""Ray jobs: submit a stage's entrypoint (``jobs/<stage>.py``) to a cluster, stream its logs,
and return its final status. A thin layer over Ray's ``JobSubmissionClient``.

The working dir (the project checkout) is uploaded with the job, so the cluster runs the
code you have; ``cluster/runtime_env.yaml`` adds the environment and upload excludes.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path
from typing import Callable, Optional

from aimfair_ray import AimfairError
from aimfair_ray.config import read_yaml

# stage -> entrypoint under jobs/
STAGES = {
    "prepare": "prepare_data.py",
    "generate": "generate_synthetic.py",
    "baseline": "train_baseline.py",
    "finetune": "selective_finetune.py",
    "egt": "egt_finetune.py",
    "sweep": "sweep.py",
    "audit": "audit.py",
    "benchmark": "benchmark.py",
    "pipeline": "pipeline.py",
    "plan": "plan.py",
}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_RUNTIME_ENV = "cluster/runtime_env.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_address(address: Optional[str] = None) -> str:
    """The job server (dashboard) address: the argument, RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, or localhost."""
    if address:
        return address
    for a in (os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if a and a.startswith(("http://", "https://")):
            return a
    return DEFAULT_ADDRESS


def client(address: Optional[str] = None):
    from ray.job_submission import JobSubmissionClient

    from aimfair_ray.runtime import use_cluster_token

    addr = job_address(address)
    use_cluster_token()
    try:
        return JobSubmissionClient(addr)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        if "uthenticat" in str(e):
            raise AimfairError(f"the Ray job server at {addr} needs the cluster's auth token: put it in "
                               "~/.ray/auth_token (or RAY_AUTH_TOKEN) and set RAY_AUTH_MODE=token") from None
        raise AimfairError(f"cannot reach the Ray job server at {addr}: {e}; start a cluster (ray start --head) "
                           "or pass --address http://<head>:8265 (or set RAY_API_SERVER_ADDRESS)") from None


def runtime_env(working_dir: str, env_file: Optional[str]) -> dict:
    """``env_file`` (YAML) with ``working_dir`` set; the default file is used when the checkout has it."""
    wd = Path(working_dir).resolve()
    if not wd.is_dir():
        raise AimfairError(f"--working-dir {working_dir} is not a directory; pass the project checkout")
    env: dict = {}
    path = Path(env_file) if env_file else wd / DEFAULT_RUNTIME_ENV
    if env_file and not path.is_file():
        raise AimfairError(f"--runtime-env {env_file} does not exist")
    if path.is_file():
        env = read_yaml(path)
    env["working_dir"] = str(wd)
    return env


def entrypoint(stage: str, args: list[str], working_dir: str, python: str = "python") -> str:
    if stage == "minmax":
        from aimfair_ray import renamed

        stage = renamed("submit minmax").split()[1]
    if stage not in STAGES:
        raise AimfairError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    script = f"jobs/{STAGES[stage]}"
    if not (Path(working_dir) / script).is_file():
        raise AimfairError(f"{script} is not in the working dir {Path(working_dir).resolve()}; "
                           "run from the project checkout or pass --working-dir")
    return shlex.join([python, script, *args])


def submit(stage: str, args: list[str], *, address: Optional[str] = None, working_dir: str = ".",
           runtime_env_file: Optional[str] = None, python: str = "python", entrypoint_cpus: float = 0,
           entrypoint_gpus: float = 0, submission_id: Optional[str] = None) -> tuple[object, str]:
    """Submit one stage; returns (client, submission id)."""
    cmd = entrypoint(stage, args, working_dir, python)
    env = runtime_env(working_dir, runtime_env_file)
    c = client(address)
    try:
        job_id = c.submit_job(entrypoint=cmd, runtime_env=env, submission_id=submission_id,
                              entrypoint_num_cpus=entrypoint_cpus or None, entrypoint_num_gpus=entrypoint_gpus or None,
                              metadata={"aimfair_stage": stage})
    except Exception as e:  # noqa: BLE001 - the job server's reason, with the fix
        raise AimfairError(f"the job server refused the {stage} job: {e}") from None
    return c, job_id


def follow(c, job_id: str, out: Callable[[str], None] = print, poll_s: float = 1.0) -> str:
    """Stream the job's logs until it ends; returns its final status (SUCCEEDED, FAILED, STOPPED)."""

    async def tail():
        async for lines in c.tail_job_logs(job_id):
            out(lines.rstrip("\n"))

    try:
        asyncio.run(tail())
    except Exception:  # noqa: BLE001 - the log stream can drop; the status below is what counts
        pass
    while (status := str(c.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    return status


def jobs_table(c) -> list[dict]:
    rows = []
    for j in sorted(c.list_jobs(), key=lambda j: j.start_time or 0):
        rows.append({"id": j.submission_id or j.job_id, "status": str(j.status.value),
                     "stage": (j.metadata or {}).get("aimfair_stage", ""),
                     "start": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000)),
                     "entrypoint": j.entrypoint, "message": j.message or ""})
    return rows
