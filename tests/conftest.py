"""One local Ray cluster for the whole test session; tiny real runs on it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
# Where `make setup` built DeepSpeed's CPU comm op (the Makefile exports it): a plain `pytest` outside make would
# otherwise build it again into torch's default folder, inside the DeepSpeed test (~1 min on 2 cores).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/aimfair/torch_extensions"))
os.environ.setdefault("AIMFAIR_PROGRESS", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# The session's head is local: no preemption watcher actor starts with every Ray Train run. (Ray Train's
# 2 s worker poll stays: at 0.2 s a sweep trial deadlocked in Ray Tune, when its run's last report and
# its end came too close together; see runtime.LOCAL_TRAIN_ENV.)
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Token auth, as the session's head runs it (the ray_head fixture makes the token): set before any test
# imports ray, which reads the auth mode once, at import (a test that imported ray before the head
# started could not join it).
os.environ["RAY_AUTH_MODE"] = "token"

# W&B's settings models are built (pydantic parses their source with `ast`) here, before any Ray thread runs:
# on CPython 3.11.7 an `ast.parse` in this process once failed with "SystemError: AST constructor recursion
# depth mismatch" (CPython gh-106905: a counter the AST constructor shares, left wrong on an error path) when
# W&B was first imported late in the session, inside test_train's W&B test.
try:
    import wandb  # noqa: F401
except ImportError:  # the `wandb` extra is not installed: its tests skip
    pass


def bench_script(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package): tests use their pieces."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Free loopback ports, and waiting for a server to answer: the share-nothing cluster's (benchmarks/store_cost.py).
_STORE_COST = bench_script("store_cost")
_free_ports, _wait_up = _STORE_COST.free_ports, _STORE_COST._wait_up


# The tests' S3 endpoint (a moto server on loopback, started by the `s3` fixture): set before the session's
# head starts, so that its Ray Train workers and job drivers reach it too. Fake credentials; no AWS anywhere.
S3_PORT = _free_ports(1)[0]
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                  AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")

TINY = [
    "data.n_train=400",
    "data.n_val=100",
    "data.n_test_per_cell=50",
    "data.n_generator=40",
    "train.epochs=2",
    "train.batch_size=64",
    "model.width=8",
    "generate.backend=template",
    "generate.prompts_per_cell=3",
    "generate.n_balanced_per_cell=4",
    "generate.n_imbalanced=10",
    "generate.steps=2",
    "generate.batch_size=4",
    "generate.filter=false",
    "generate.cpus_per_actor=1",
    "finetune.epochs=2",
    "finetune.batch_size=8",  # single-threaded actors: same ids give the same images across processes
]


# Fixtures that start or need the session's Ray cluster; a test using one is marked `ray`, so
# `make test-fast` (pytest -m "not ray") runs the plain-PyTorch and config tests alone.
RAY_FIXTURES = {"ray_head", "ray_cluster", "trained", "synth", "served", "cmnist_run", "cluster"}


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: needs the session's Ray cluster (left out by make test-fast)")
    config.addinivalue_line("markers", "faults: injects a fault (a killed node, worker or driver, a full disk, damaged "
                            "files, a stale store) and checks nothing is lost or mixed; `pytest -m faults`")


def pytest_sessionstart(session):
    session.config._aimfair_t0 = time.time()


def pytest_terminal_summary(terminalreporter, config):
    """The suite's wall time beside the machine's score (`make test` runs benchmarks/machine_score.py first
    and names its file in AIMFAIR_MACHINE_SCORE): times from different machines compare as ratios."""
    import json

    wall = time.time() - config._aimfair_t0
    path = os.environ.get("AIMFAIR_MACHINE_SCORE")
    if not path or not os.path.isfile(path):
        return
    ms = json.load(open(path))
    terminalreporter.write_line(
        f"suite: {wall:.0f} s on a machine of score {ms['score']} ({ms['machine']}); about "
        f"{wall * ms['score'] / 100:.0f} s on the reference machine (score 100, benchmarks/machine_score.py)")


def pytest_collection_modifyitems(items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


def cli(args, env, cwd=None):
    """`python -m aimfair_ray.cli ARGS` in its own process group (a test may kill it), output in ``.stdout``."""
    return subprocess.Popen([sys.executable, "-m", "aimfair_ray.cli", *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _cmdlines() -> dict[int, list[str]]:
    """Every process's whole argument list, by pid, from /proc (a process gone meanwhile is skipped)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[int(pid)] = f.read().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
    return out


def wait_for(what, cond, proc, timeout=240):
    """Until ``cond()``; fails with the process's output if it ends first, or when ``timeout`` s have passed."""
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


def kill_after(proc, ready, what, timeout=300) -> None:
    """Once ``ready()``, SIGKILL the process group of ``proc`` (a driver, hard, mid-run), and give Ray a moment to
    reap the dead driver's actors."""
    wait_for(what, ready, proc, timeout=timeout)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)


def tiny_gen(pipeline_dir) -> list[str]:
    """Overrides that point generation at a tiny random pipeline (fast; not the shipped model)."""
    return [f"generate.pipeline={pipeline_dir}"]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A real, tiny, randomly initialised embedded-architecture pipeline saved with save_pretrained."""
    import torch

    from aimfair_ray.generate.t2i import AimfairT2IPipeline, TextProjection, make_scheduler, make_unet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_t2i") / "pipeline"
    pipe = AimfairT2IPipeline(unet=make_unet(32, (8, 16, 16), 1), text_proj=TextProjection(out_dim=32),
                              scheduler=make_scheduler())
    pipe.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible endpoint: moto's server on loopback (``AWS_ENDPOINT_URL``, set above), with a
    bucket ``aimfair``; yields ``s3://aimfair``. Stopped at the end of the session."""
    import pyarrow.fs as pafs

    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_up(f"http://127.0.0.1:{S3_PORT}/", proc, 60, lambda: "the moto S3 server did not start")
    fs, _ = pafs.FileSystem.from_uri("s3://aimfair?allow_bucket_creation=true")
    fs.create_dir("aimfair")
    yield "s3://aimfair"
    os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def ray_head():
    """A real Ray head started with `ray start --head --block` on loopback: 4 logical CPUs, a
    short temp dir, the dashboard with its job server. Stopped (SIGTERM to the blocking
    `ray start`, which drains and stops every process it started) at the end of the session."""
    tmp = tempfile.mkdtemp(prefix="aft-", dir="/tmp")  # short: AF_UNIX paths < 107 bytes
    gcs, dash, agent, agent_grpc, env_agent, metrics, client = _free_ports(7)
    bindir = os.path.dirname(sys.executable)
    # Token auth on, as Ray 2.60 heads have it by default once a token exists: the same on every machine.
    subprocess.run([os.path.join(bindir, "ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
    os.environ["RAY_AUTH_MODE"] = "token"
    env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '')}")  # job entrypoints run this venv's python
    env.pop("RAY_ADDRESS", None)
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # stop at once at the end (no 30 s drain)
    cmd = [os.path.join(bindir, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--num-cpus=4", f"--temp-dir={tmp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={client}", "--disable-usage-stats"]
    log = open(os.path.join(tmp, "ray-start.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    # up once the dashboard answers at all (401 without the cluster's auth token)
    _wait_up(f"{url}/api/version", proc, 180, lambda: f"ray start --head failed: {open(log.name).read()[-3000:]}")
    yield {"address": f"127.0.0.1:{gcs}", "dashboard": url, "temp_dir": tmp}
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    """The test process joined to the session's head; its GCS address for subprocesses."""
    import ray

    ray.init(address=ray_head["address"], log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray_head["address"]
    ray.shutdown()


@pytest.fixture
def tiny_overrides(tmp_path):
    return TINY + [f"output_dir={tmp_path / 'runs'}"]


@pytest.fixture
def tiny_cfg(tiny_overrides):
    from aimfair_ray.config import load_config

    return load_config("cmnist", overrides=tiny_overrides)


@pytest.fixture(scope="session")
def trained(ray_cluster, tmp_path_factory):
    """A tiny prepared dataset and a trained baseline (2 workers), shared by several tests."""
    from aimfair_ray.config import load_config
    from aimfair_ray.data.prepare import prepare_data
    from aimfair_ray.train.baseline import train_baseline

    out = tmp_path_factory.mktemp("trained")
    cfg = load_config("cmnist", overrides=TINY + [f"output_dir={out}", "train.num_workers=2"])
    meta = prepare_data(cfg)
    result = train_baseline(cfg)
    return cfg, meta, result


@pytest.fixture(scope="session")
def synth(trained, tiny_pipeline):
    """The trained tiny run plus tiny synthetic balanced and imbalanced sets (tiny random T2I model)."""
    from aimfair_ray.config import load_config
    from aimfair_ray.generate.stage import run_images, run_prompts

    cfg0, _, result = trained
    cfg = load_config("cmnist", overrides=TINY + tiny_gen(tiny_pipeline) + [
        f"output_dir={cfg0.output_dir}", "train.num_workers=2", "finetune.epochs=2", "finetune.batch_size=8"])
    quiet = dict(log=lambda *_: None)
    run_images(cfg, run_prompts(cfg, **quiet), **quiet)
    return cfg, result


def egt_image_sets(pipeline_dir, output_dir) -> list[str]:
    """A tiny EGT image run on 2 Train workers: balanced enough that both groups meet in a bucket (a batch
    with one group moves no weights)."""
    return [f"output_dir={output_dir}", "egt.steps=4", "egt.checkpoint_every=2", "egt.batch_size=16",
            "train.num_workers=2", f"egt.image.pipeline={pipeline_dir}", "egt.image.n_train=48",
            "egt.image.n_eval_per_group=4", "egt.image.sample_steps=2", "egt.image.noise_levels=3",
            "egt.image.feature_size=32", "egt.image.nearest_k=2", "egt.image.max_draws=40", "egt.n_buckets=3",
            "egt.eta=2.0", "egt.minority_share=0.5", "egt.val_per_group=4"]


@pytest.fixture(scope="session")
def sd_lora_egt(ray_cluster, tmp_path_factory):
    """A tiny random Stable-Diffusion pipeline, and its min–max EGT LoRA run on Ray Train (2 workers, the
    worst-group rule), shared by the EGT test and the Serve test that serves the adapters. No quality
    measurement: the random model's noise never passes the checker as green, so the unconditional
    setting has no minority samples to measure."""
    from tiny_models import tiny_sd

    from aimfair_ray.config import load_config
    from aimfair_ray.egt.run import train_generator

    root = tmp_path_factory.mktemp("sd_lora")
    base = tiny_sd(root)
    cfg = load_config("cmnist", overrides=egt_image_sets(base, root / "runs") + [
        "egt.image.lora_rank=2", "egt.objective=minmax", "egt.update=worst", "egt.lr=0.01"])
    return cfg, base, train_generator(cfg, "image", log=lambda *_: None, quality=False)


@pytest.fixture(scope="session")
def cmnist_run(ray_cluster, tmp_path_factory):
    """The embedded default's data at full size and its checker (trained once on real digits outside
    the generator split): the quality bar of the shipped model and the faithfulness filter share it."""
    from aimfair_ray.config import load_config
    from aimfair_ray.data.prepare import prepare_data
    from aimfair_ray.generate.stage import checker_for

    cfg = load_config("cmnist", overrides=[f"output_dir={tmp_path_factory.mktemp('cmnist')}"])
    prepare_data(cfg, log=lambda *_: None)
    checker_for(cfg, log=lambda *_: None)
    return cfg
