"""What each Ray Train worker reads, and in which order: a seeded shuffle of the whole split every
epoch, dealt out by rank, with no row silently dropped.

:func:`image_dataset` (in :mod:`data.io`) hands the stages one of two sources:

- :class:`InMemory`, for sets whose decoded images fit ``train.cache_mb``: the arrays sit once in
  Ray's object store (shared by the workers of a node). Every epoch each worker takes its slice of
  one permutation of *all* rows, drawn from ``(seed, epoch)`` (:func:`epoch_rows`). The order is
  exact, so the same seed and worker count give the same model on every rerun; a file sorted by
  class reaches every worker mixed.
- :class:`Streamed`, for larger sets: a Ray Dataset read from Parquet. Its block order is drawn
  again every epoch from the seed (Ray Data's ``randomize_block_order``, reseeded per execution),
  and each worker mixes rows in a local shuffle buffer. That is a global shuffle at block
  granularity, costing no all-to-all exchange at millions of rows (a full ``random_shuffle`` would
  move every row across the cluster every epoch). Which worker gets which block is decided by
  Ray Data's streaming split as blocks arrive, so this path is not bit-reproducible; its equal
  split may leave out up to ``workers - 1`` rows an epoch, which :func:`check_rows` counts and logs.

Training pads each worker's slice to the same length (DDP needs the same number of steps on every
worker), repeating at most ``workers - 1`` rows of that epoch's permutation; scoring and
validation take every row once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np


def epoch_rows(n: int, world: int, rank: int, seed: Optional[int], epoch: int = 0, pad: bool = False) -> np.ndarray:
    """The row indices worker ``rank`` of ``world`` reads in ``epoch``: a slice of a permutation of
    all ``n`` rows drawn from ``(seed, epoch)`` (file order when ``seed`` is None). With ``pad`` every
    worker gets ``ceil(n / world)`` rows (the first rows of the permutation fill the last slices)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if seed is not None else np.arange(n)
    if pad and n % world:
        order = np.concatenate([order, order[: world - n % world]])
    return order[rank::world]


class InMemory:
    """Decoded arrays (``image`` uint8 NCHW, ``target``, ``group``, optionally ``set``) in Ray's
    object store; :meth:`batches` is the worker side."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        import ray

        self.n = int(len(arrays["target"]))
        self.ref = ray.put({k: np.ascontiguousarray(v) for k, v in arrays.items()})

    def batches(self, batch_size: int, world: int, rank: int, seed: Optional[int] = None, epoch: int = 0,
                pad: bool = False) -> Iterator[dict]:
        import ray
        import torch

        arrays = ray.get(self.ref)  # zero-copy from the node's object store
        idx = epoch_rows(self.n, world, rank, seed, epoch, pad)
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            yield {k: torch.from_numpy(v[j]) for k, v in arrays.items()}


@dataclass
class Streamed:
    """A Ray Dataset over Parquet and its row count; Ray Train splits it across the workers."""

    ds: object
    n: int


def shuffled_blocks(ds, seed: int):
    """``ds`` with its block order drawn again on every execution (epoch) from ``seed``."""
    from ray.data import RandomSeedConfig

    return ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def worker_batches(feed: dict, name: str, batch_size: int, seed: Optional[int] = None, epoch: int = 0,
                   pad: bool = False) -> Iterator[dict]:
    """Inside a Ray Train worker: the batches of dataset ``name`` for this worker and epoch.
    ``feed`` is the ``"feed"`` entry :func:`distributed.make_trainer` put into the loop config."""
    import ray.train

    ctx = ray.train.get_context()
    src = feed[name]
    if isinstance(src, InMemory):
        return src.batches(batch_size, ctx.get_world_size(), ctx.get_world_rank(), seed, epoch, pad)
    shard = ray.train.get_dataset_shard(name)
    if seed is None:
        return shard.iter_torch_batches(batch_size=batch_size)
    return shard.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=16 * batch_size,
                                    local_shuffle_seed=seed * 1000 + epoch)


def check_rows(feed: dict, name: str, seen: int, log) -> None:
    """Log (never silently drop) rows of ``name`` that the workers did not read; ``seen`` is the
    count summed over the workers."""
    n = feed[name].n
    if seen < n:
        log(f"[aimfair] {name}: Ray Data's equal split left out {n - seen} of {n} rows this pass")


def split_sources(datasets: dict) -> tuple[dict, dict]:
    """``(ray_datasets, feed)`` for ``TorchTrainer``: streamed sets go to Ray Train's split, and every
    source (in-memory or streamed, with its row count) is named in the loop config's feed."""
    ray_ds = {k: v.ds for k, v in datasets.items() if isinstance(v, Streamed)}
    feed = {k: Streamed(None, v.n) if isinstance(v, Streamed) else v for k, v in datasets.items()}
    return ray_ds, feed
