"""Ray Train runs, each on its own worker group or, inside :func:`shared_workers`, as jobs on one.

Every stage trains through :func:`run`. Outside a shared group it is a plain ``TorchTrainer`` run.
Inside one, it is a *job*: the same per-worker loop with the same config, executed by workers that
stay up between jobs, so Ray Train's controller, the worker processes and their process group
start once, not once per run (about 15 s each on a 2-core machine; a benchmark seed has 13 runs)::

    with shared_workers(cfg.train, cfg.ray_storage, "seed0"):
        train_baseline(cfg)            # each fit() and scoring run inside is a job
        finetune(cfg, "selective")

A job's reports and checkpoints go to its run's folder (``<storage>/<run>/job/checkpoint_<n>``,
written by rank 0, the best ``keep_checkpoints`` by the run's metric and the latest kept), not to
Ray Train's: an interrupted job resumes from its latest epoch as a run does, and the driver picks
the best epoch the same way. A run that needs a Ray Train run of its own is not a job: Ray Data
(streamed) datasets, Tune callbacks, DeepSpeed, other resources, or storage on a URI.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Callable, Optional

from aimfair_ray import AimfairError
from aimfair_ray.distributed import fit_or_raise, job_reports, make_trainer
from aimfair_ray.storage import read_json

_ACTIVE: Optional["SharedWorkers"] = None


class Board:
    """A Ray actor between the driver and the workers: the jobs in order, and which have finished."""

    def __init__(self):
        self.jobs: list = []
        self.finished = 0
        self.changed: Optional[asyncio.Condition] = None

    def _cond(self) -> asyncio.Condition:
        if self.changed is None:
            self.changed = asyncio.Condition()
        return self.changed

    async def put(self, job) -> int:
        async with self._cond():
            self.jobs.append(job)
            self._cond().notify_all()
            return len(self.jobs) - 1

    async def get(self, seq: int):
        """Job ``seq`` (None: no more jobs), once the driver has put it."""
        async with self._cond():
            await self._cond().wait_for(lambda: len(self.jobs) > seq)
            return self.jobs[seq]

    async def first_unfinished(self) -> int:
        return self.finished

    async def done(self, seq: int) -> None:
        async with self._cond():
            self.finished = max(self.finished, seq + 1)
            self._cond().notify_all()

    async def wait(self, seq: int) -> None:
        async with self._cond():
            await self._cond().wait_for(lambda: self.finished > seq)


def serve(config: dict) -> None:
    """The workers' loop: run each job's loop in turn until the driver closes the group. After a
    worker failure Ray Train starts this again: it picks up at the first unfinished job."""
    import ray
    import ray.train

    board = config["board"]
    rank = ray.train.get_context().get_world_rank()
    seq = ray.get(board.first_unfinished.remote())
    while (job := ray.get(board.get.remote(seq))) is not None:
        with job_reports(job["run_path"], job["keep"], job["metric"], job["mode"]):
            job["loop"](job["config"])
        if rank == 0:
            ray.get(board.done.remote(seq))
        seq += 1


class JobResult:
    """What a job left in its run folder, read as Ray Train's ``Result`` is: ``checkpoint`` (the
    latest) and :meth:`get_best_checkpoint`."""

    def __init__(self, run_path: str):
        import ray.train

        from aimfair_ray.distributed import job_checkpoints

        self.checkpoints = [(ray.train.Checkpoint(d), read_json(f"{d}/metrics.json")) for d in job_checkpoints(run_path)]
        self.checkpoint = self.checkpoints[-1][0] if self.checkpoints else None

    def get_best_checkpoint(self, metric: str, mode: str):
        sign = 1 if mode == "max" else -1
        return max(self.checkpoints, key=lambda c: sign * c[1][metric])[0] if self.checkpoints else None


class SharedWorkers:
    """One worker group (the resources of a ``TrainConfig``), started at the first job, and the decoded
    datasets its jobs share (:func:`kept`)."""

    def __init__(self, tc, storage_path: str, name: str):
        self.tc, self.storage_path, self.name = tc, storage_path, name
        self.board = self.thread = self.error = None
        self.datasets: dict = {}

    def accepts(self, tc, datasets: Optional[dict]) -> bool:
        from aimfair_ray.data.feed import InMemory

        same = all(getattr(tc, k) == getattr(self.tc, k) for k in ("num_workers", "use_gpu", "cpus_per_worker",
                                                                    "gpus_per_worker", "max_failures"))
        return same and all(isinstance(d, InMemory) for d in (datasets or {}).values())

    def _start(self) -> None:
        import ray

        self.board = ray.remote(num_cpus=0)(Board).remote()
        trainer = make_trainer(serve, {"board": self.board}, self.tc, self.storage_path, f"{self.name}-workers")

        def fit():
            try:
                self.error = getattr(trainer.fit(), "error", None)
            except Exception as e:  # noqa: BLE001 - kept for the job that waits on it
                self.error = e

        self.thread = threading.Thread(target=fit, name="aimfair-shared-workers", daemon=True)
        self.thread.start()

    def run(self, loop: Callable, loop_config: dict, run_path: str, datasets: Optional[dict], select_metric: Optional[str],
            keep: int, what: str) -> JobResult:
        import ray

        if self.board is None:
            self._start()
        mode = "min" if select_metric == "val_loss" else "max"
        job = {"loop": loop, "config": dict(loop_config, feed=dict(datasets or {})), "run_path": run_path,
               "keep": keep, "metric": select_metric, "mode": mode}
        seq = ray.get(self.board.put.remote(job))
        ref = self.board.wait.remote(seq)
        while not ray.wait([ref], timeout=0.5)[0]:
            if not self.thread.is_alive():
                raise AimfairError(f"{what} failed: the shared worker group stopped: {self.error or 'no error given'}")
        result = JobResult(run_path)
        if result.checkpoint is None:
            raise AimfairError(f"{what} at {run_path} reported no checkpoint")
        return result

    def close(self, abort: bool = False) -> None:
        """Let the workers finish and the run end; ``abort`` (the driver is leaving on an error or
        Ctrl-C): drop the board, so that no job waits for them."""
        import ray

        if self.board is None:
            return
        if not abort:
            with contextlib.suppress(Exception):
                ray.get(self.board.put.remote(None))
                self.thread.join(timeout=60)
        with contextlib.suppress(Exception):
            ray.kill(self.board)


def kept(key, build: Callable):
    """``build()``, kept while a shared group is open: the runs of a benchmark seed decode each set once
    (the arrays stay in Ray's object store until the group closes). ``key`` must name everything
    ``build`` depends on, the files' hashes included."""
    if _ACTIVE is None:
        return build()
    if key not in _ACTIVE.datasets:
        _ACTIVE.datasets[key] = build()
    return _ACTIVE.datasets[key]


@contextlib.contextmanager
def shared_workers(tc, storage_path: str, name: str):
    """Inside the block, every :func:`run` that can be a job runs on one worker group of ``tc``'s
    resources (started at the first job, closed at the end). Nested blocks use the outer group."""
    global _ACTIVE
    if _ACTIVE is not None:
        yield _ACTIVE
        return
    _ACTIVE = group = SharedWorkers(tc, storage_path, name)
    try:
        yield group
    except BaseException:
        group.close(abort=True)
        raise
    else:
        group.close()
    finally:
        _ACTIVE = None
        group.datasets.clear()


def run(loop: Callable, loop_config: dict, tc, storage_path: str, name: str, datasets: Optional[dict] = None,
        callbacks=None, select_metric: Optional[str] = None, what: str = "training", shareable: bool = True):
    """Run ``loop`` on Ray Train workers: a job on the shared group when one is open and the run
    fits it, else its own ``TorchTrainer`` run. Returns the result (``checkpoint``,
    ``get_best_checkpoint``); a failed run, or one with no checkpoint, is an :class:`AimfairError`."""
    run_path = f"{storage_path}/{name}"
    if _ACTIVE is not None and shareable and not callbacks and _ACTIVE.accepts(tc, datasets):
        return _ACTIVE.run(loop, loop_config, run_path, datasets, select_metric, tc.keep_checkpoints, what)
    trainer = make_trainer(loop, loop_config, tc, storage_path, name, datasets, callbacks, select_metric)
    return fit_or_raise(trainer, what, run_path)
