"""The one Ray Train runner every stage uses: collectives, the DeepSpeed engine, checkpoint
save and restore on the workers, ``make_trainer`` and ``reuse_or_resume`` on the driver.

The per-worker loops (classifier runs in ``train.raytrain``, gradient scores in
``train.finetune``, EGT in ``egt.run``) call :func:`allreduce`, :func:`gather`,
:func:`restore_checkpoint` and :func:`report_checkpoint`; the stages build their
``TorchTrainer`` with :func:`make_trainer` and decide reuse with :func:`reuse_or_resume`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from aimfair_ray import AimfairError
from aimfair_ray.models import META, WEIGHTS, load_optimizer, save_optimizer
from aimfair_ray.models import load_weights as checked_weights
from aimfair_ray.storage import (
    atomic_dir,
    base_name,
    exists,
    filesystem,
    is_complete,
    is_uri,
    made_with,
    read_json,
    remove,
    subdirs,
    write_json,
)

# A child of Ray Train's logger: shown once on the driver (plain print() is echoed twice by Train V2).
worker_log = logging.getLogger("ray.train.aimfair")


# ---- collectives (identity outside a process group) ---------------------------------------------
def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def allreduce(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the workers."""
    import torch.distributed as dist

    if _world() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def gather(arrays: dict) -> dict:
    """Concatenate per-worker prediction arrays (``loss_sum`` is summed)."""
    import torch.distributed as dist

    if _world() == 1:
        return arrays
    parts = [None] * _world()
    dist.all_gather_object(parts, arrays)
    out = {k: np.concatenate([p[k] for p in parts]) for k in arrays if k != "loss_sum"}
    out["loss_sum"] = sum(p["loss_sum"] for p in parts)
    return out


def deepspeed_engine(model, optimizer, batch_size: int, stage: int):
    """A DeepSpeed ZeRO engine around a model and a client optimizer (no fused-op build)."""
    from aimfair_ray.assets import use_venv_tools

    use_venv_tools()  # the ninja `make setup` built the CPU comm op with: its cached build is reused
    try:
        import deepspeed
    except ImportError:
        raise AimfairError("deepspeed=true needs DeepSpeed: pip install 'aimfair-ray[deepspeed]' "
                           "(on CPU with DS_BUILD_OPS=0), or turn the deepspeed option off") from None
    conf = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=conf, dist_init_required=False)
    return engine


# ---- checkpoints on the workers -----------------------------------------------------------------
def job_checkpoints(run_path: str) -> list[str]:
    """A shared worker group's job's whole checkpoints (``<run_path>/job/checkpoint_*``, on any storage), oldest first."""
    return [d for d in subdirs(f"{run_path}/job", "checkpoint_*") if is_complete(d)]


class _Job:
    """A shared worker group's job (:mod:`workgroup`): its checkpoints in ``<run_path>/job/`` (a local folder or
    an object store), each written whole by rank 0 (:func:`storage.atomic_dir`), the best ``keep`` by ``metric``
    and the latest kept."""

    def __init__(self, run_path: str, keep: int, metric: Optional[str], mode: str):
        self.run_path, self.keep, self.metric, self.sign = run_path, keep, metric, 1 if mode == "max" else -1

    def latest(self) -> Optional[str]:
        dirs = job_checkpoints(self.run_path)
        return dirs[-1] if dirs else None

    def report(self, metrics: dict, write: Callable[[str], None]) -> None:
        import ray.train

        if ray.train.get_context().get_world_rank() != 0:
            return
        last = self.latest()
        n = int(base_name(last).rsplit("_", 1)[1]) + 1 if last else 0
        with atomic_dir(f"{self.run_path}/job/checkpoint_{n:06d}") as tmp:
            os.makedirs(tmp, exist_ok=True)
            write(tmp)
            write_json(f"{tmp}/metrics.json", metrics)
        dirs = job_checkpoints(self.run_path)
        scored = {d: read_json(f"{d}/metrics.json") for d in dirs}
        kept = sorted(dirs, key=lambda d: -self.sign * scored[d][self.metric])[:self.keep] if self.metric else dirs[-self.keep:]
        for d in set(dirs) - set(kept) - {dirs[-1]}:
            remove(d)


_JOB: Optional[_Job] = None


@contextlib.contextmanager
def job_reports(run_path: str, keep: int, metric: Optional[str], mode: str):
    """On a worker: the reports and checkpoints of the loop run inside go to a job's folder (:class:`_Job`)."""
    global _JOB
    _JOB = _Job(run_path, keep, metric, mode)
    try:
        yield _JOB
    finally:
        _JOB = None


def restore_checkpoint(load_weights, weights_file: str, optimizer=None) -> Optional[dict]:
    """The run's latest checkpoint, if any, loaded (weights through ``load_weights``, the optimizer
    state when saved); returns its ``state.json``, else None."""
    import ray.train
    from safetensors.torch import load_file

    if _JOB is not None:
        latest = _JOB.latest()
        ckpt = ray.train.Checkpoint(latest) if latest else None  # a local folder or a URI
    else:
        ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return None
    with ckpt.as_directory() as d:
        meta = Path(d) / META
        if weights_file == WEIGHTS and meta.is_file():  # a classifier's: checked against its recorded sha256
            load_weights(checked_weights(d, json.loads(meta.read_text())))
        else:
            load_weights(load_file(str(Path(d) / weights_file)))
        if optimizer is not None and (Path(d) / "optimizer.safetensors").is_file():
            load_optimizer(optimizer, d)
        return json.loads((Path(d) / "state.json").read_text())


def _report(metrics: dict, write: Callable[[str], None]) -> None:
    """Report ``metrics``; rank 0 attaches a checkpoint, the folder that ``write(dir)`` fills."""
    import ray.train

    if _JOB is not None:
        _JOB.report(metrics, write)
    elif ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
    else:
        with tempfile.TemporaryDirectory() as d:
            write(d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def report_checkpoint(metrics: dict, state: dict, write_weights, optimizer=None) -> None:
    """Report ``metrics``; rank 0 attaches a checkpoint (the weights that ``write_weights(dir)``
    writes, the optimizer state, ``state`` as ``state.json``)."""
    def write(d: str) -> None:
        write_weights(d)
        if optimizer is not None:
            save_optimizer(optimizer, d)
        Path(d, "state.json").write_text(json.dumps(state))

    _report(metrics, write)


def report_files(metrics: dict, files: dict[str, bytes]) -> None:
    """Report ``metrics``; rank 0 attaches ``files`` (name -> bytes) as the checkpoint."""
    def write(d: str) -> None:
        for name, data in files.items():
            Path(d, name).write_bytes(data)

    _report(metrics, write)


# ---- the driver side ----------------------------------------------------------------------------
def make_trainer(loop: Callable, loop_config: dict, tc, storage_path: str, name: str, datasets: Optional[dict] = None,
                 callbacks=None, select_metric: Optional[str] = None):
    """A ``TorchTrainer`` with the workers and resources of ``tc`` (a ``TrainConfig``), its failure and
    checkpoint policy, and ``select_metric`` (a reported metric, "max" is better but for ``val_loss``)
    deciding which checkpoints are kept. ``datasets`` are :mod:`data.feed` sources by name; the loop
    reads them with ``feed.worker_batches(config["feed"], name, ...)``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from aimfair_ray.data.feed import split_sources
    from aimfair_ray.runtime import require

    ray_datasets, feed = split_sources(datasets or {})

    resources = {"CPU": tc.cpus_per_worker, **({"GPU": tc.gpus_per_worker} if tc.use_gpu else {})}
    require(f"Ray Train run {name}", tc.num_workers, tc.cpus_per_worker, tc.gpus_per_worker if tc.use_gpu else 0,
            "train.num_workers, train.cpus_per_worker or train.gpus_per_worker")
    keep = {"num_to_keep": tc.keep_checkpoints}
    if select_metric:
        keep.update(checkpoint_score_attribute=select_metric,
                    checkpoint_score_order="min" if select_metric == "val_loss" else "max")
    return TorchTrainer(
        loop,
        train_loop_config=dict(loop_config, feed=feed),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        datasets=ray_datasets,
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks or []),
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(**keep)),
    )


def fit_or_raise(trainer, what: str, run_path: str):
    """``trainer.fit()``; a failed run, or one that reported no checkpoint, is an :class:`AimfairError`."""
    result = trainer.fit()
    if result.error:
        raise AimfairError(f"{what} failed: {result.error}")
    if result.checkpoint is None:
        raise AimfairError(f"{what} at {run_path} reported no checkpoint")
    return result


def reuse_or_resume(stage: str, key: dict, run_path: Optional[str] = None, force: bool = False,
                    result: str = "result.json", outputs: tuple[str, ...] = (), log=print,
                    what: str = "train", before: Optional[Callable[[], object]] = None) -> Optional[dict]:
    """Whether a stage's run is reused, resumed or started over, decided by its ``key`` (what decides
    the outcome), kept in ``<stage>/run.json``.

    A finished run (``result`` and ``outputs`` written) with the same key and no ``force``: its
    ``result`` is returned with ``reused: True``. Otherwise None, after the key is recorded; with
    ``force`` or a changed key the Ray Train run at ``run_path`` is removed, so Ray Train starts
    fresh instead of restoring it; with the same key an interrupted run there resumes. ``before`` (e.g.
    reading the inputs, which checks them) runs once the run is to train, before anything is removed.
    """
    same = made_with(f"{stage}/run.json", key) is not None
    if same and not force and all(exists(f"{stage}/{f}") for f in (result, *outputs)):
        log(f"{what}: reusing {stage} (same config; --force redoes it)")
        return dict(read_json(f"{stage}/{result}"), reused=True)
    if before is not None:
        before()
    if run_path and exists(run_path):
        if force or not same:  # on any storage: a run made with another config is never resumed
            log(f"{what}: starting fresh (removing {run_path})")
            if is_uri(run_path):
                fs, p = filesystem(run_path)
                fs.delete_dir(p)
            else:
                shutil.rmtree(run_path, ignore_errors=True)
        else:
            log(f"{what}: resuming the interrupted run at {run_path}")
    # An earlier run's result must not pass for this one's if this one is interrupted: the key is
    # recorded first, so the old result goes before it.
    fs, p = filesystem(f"{stage}/{result}")
    if exists(f"{stage}/{result}"):
        fs.delete_file(p)
    write_json(f"{stage}/run.json", key)
    return None
