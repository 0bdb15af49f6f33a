"""One local Ray cluster for the whole test session; tiny real runs on it."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("AIMFAIR_PROGRESS", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

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
def ray_cluster():
    """A 4-logical-CPU local cluster with a short temp dir; its address for subprocesses."""
    import ray

    tmp = tempfile.mkdtemp(prefix="aft-", dir="/tmp")  # short: AF_UNIX paths < 107 bytes
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", _temp_dir=tmp, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    address = ray.get_runtime_context().gcs_address
    yield address
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


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
