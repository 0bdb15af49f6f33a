"""CSDG image stage: a planned set of (id, prompt, seed) rows -> a diffusers pipeline in a Ray
Data actor pool -> PNG rows in the shared schema, committed shard by shard.

- The plan is deterministic: ids are ``{set}-{cell}-{k}``, prompts are dealt round-robin
  from the cell's prompts, and each id has its own seed, so the same id gives the same
  image. A :class:`Plan` computes its rows from their index: a million planned images
  are never held anywhere.
- The pipeline's input is one small row per generation batch (a folder and a range of the
  plan); the actor computes the batch's rows, generates them and commits them itself:
  ``shard-<ids hash>.parquet.tmp``, then a rename. A killed run leaves only whole shards;
  a retried batch rewrites its own shard (the name depends on its ids only); a rerun skips
  the ids already written. Nothing is lost and nothing is written twice. ``_COMPLETE``
  marks a finished set.
- It streams: the driver holds the batch ranges and a count per shard, never the rows;
  checking a finished set reads its ids as one Arrow column.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aimfair_ray import AimfairError, manifest, progress
from aimfair_ray.data.codecs import encode_png
from aimfair_ray.data.io import SCHEMA, read_parquet, write_manifest
from aimfair_ray.manifest import MANIFEST, digest
from aimfair_ray.storage import (
    COMPLETE,
    atomic_write_bytes,
    base_name,
    exists,
    join,
    listdir,
    made_with,
    make_dir,
    read_json,
    remove,
    write_json,
)

PLAN_COLUMNS = ["id", "target", "group", "prompt", "seed", "split"]


def sample_seed(base: int, sample_id: str) -> int:
    return zlib.crc32(f"{base}:{sample_id}".encode()) & 0x7FFFFFFF


class Plan:
    """The planned rows of one synthetic set (``balance``), ``counts[cell]`` per cell, computed from
    their index: row k of a cell is id ``{balance}-{cell}-{k:06d}`` with the cell's k-th prompt
    (round-robin over its prompts sorted by id) and its own seed. Small: it keeps the prompts only."""

    def __init__(self, prompts: pd.DataFrame, balance: str, counts: dict[str, int], seed: int):
        self.balance, self.seed, self.cells = balance, seed, []
        for cell, n in counts.items():
            ps = prompts[prompts["cell"] == cell].sort_values("id")
            if n and ps.empty:
                raise AimfairError(f"no prompts for cell {cell}: run `aimfair generate prompts` again or raise "
                                   "prompts_per_cell")
            if n:
                self.cells.append((cell, int(n), ps["prompt"].tolist(), ps["target"].astype(int).tolist(),
                                   ps["group"].astype(int).tolist()))
        self.ends = np.cumsum([c[1] for c in self.cells], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _index(self, start: int, stop: int | None):
        stop = len(self) if stop is None else min(stop, len(self))
        for (cell, n, prompts, targets, groups), end in zip(self.cells, self.ends):
            first = int(end) - n
            for k in range(max(start, first) - first, min(stop, int(end)) - first):
                yield cell, k, k % len(prompts), prompts, targets, groups

    def fingerprint(self, meta: dict) -> str:
        """What decides the set's images, less the counts (a lower count keeps the first ids, a higher one
        adds ids): the generator settings and each cell's prompts and labels."""
        return digest({"meta": meta, "kind": self.balance,  # the key as sets on disk were fingerprinted
                       "seed": self.seed,
                       "cells": [(cell, prompts, targets, groups) for cell, _, prompts, targets, groups in self.cells]})

    def ids(self, start: int = 0, stop: int | None = None) -> pa.Array:
        """The ids of rows ``start`` to ``stop``."""
        return pa.array([f"{self.balance}-{cell}-{k:06d}" for cell, k, *_ in self._index(start, stop)], pa.string())

    def rows(self, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """Rows ``start`` to ``stop`` (the whole plan by default), in plan order."""
        out = []
        for cell, k, j, prompts, targets, groups in self._index(start, stop):
            sid = f"{self.balance}-{cell}-{k:06d}"
            out.append((sid, targets[j], groups[j], prompts[j], sample_seed(self.seed, sid), self.balance))
        return pd.DataFrame(out, columns=PLAN_COLUMNS)


def generate_batch(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                   size: int | None = None, negative_prompt: str | None = None, save_size: int | None = None) -> np.ndarray:
    """One generation batch, plain PyTorch: uint8 images [N, H, W, 3], one seed per image (its noise
    drawn on the CPU, so an id gives the same image on any device), drawn at ``size`` and resized to
    ``save_size`` with LANCZOS."""
    import torch

    from aimfair_ray.generate.t2i import as_uint8

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    kw = {"height": size, "width": size} if size else {}
    if negative_prompt:
        kw["negative_prompt"] = [negative_prompt] * len(prompts)
    out = as_uint8(pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                        output_type="np", **kw).images)
    if save_size and out.shape[1:3] != (save_size, save_size):
        from PIL import Image

        out = np.stack([np.asarray(Image.fromarray(im).resize((save_size, save_size), Image.LANCZOS)) for im in out])
    return out


class DiffusionActor:
    """Ray Data UDF: batch ranges (``out_dir``, ``start``, ``stop`` of that folder's plan) -> that plan's
    rows not yet written -> images, committed as one Parquet shard per range; returns a row per shard
    (``out_dir``, ``images``).

    Writing in the actor (PNG encoding and a small Parquet file per batch) keeps the pipeline to one
    stage: no second worker process per batch, no image bytes through the object store. The ids
    already written are read once, when the actor starts: a rerun, a batch range that a smaller
    batch size left half done, or a batch retried after an actor died regenerates none of them."""

    def __init__(self, pipeline: str, dtype: str, scheduler: str | None, steps: int, guidance: float,
                 size: int | None, negative_prompt: str | None, save_size: int | None, meta: dict,
                 plans: dict[str, Plan], threads: int = 1):
        import torch

        from aimfair_ray.generate.t2i import load_pipeline

        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(pipeline, device=device, dtype=dtype if device == "cuda" else "float32",
                                  scheduler=scheduler)
        self.kw = {"steps": steps, "guidance": guidance, "size": size, "negative_prompt": negative_prompt,
                   "save_size": save_size}
        self.meta = json.dumps(meta)
        self.plans = plans
        self.written = {d: frozenset(written_ids(d).to_pylist()) for d in plans}  # a lookup per id, not a sort per batch

    def __call__(self, ranges: pd.DataFrame) -> pd.DataFrame:
        out = []
        for d, start, stop in zip(ranges["out_dir"], ranges["start"], ranges["stop"]):
            batch = self.plans[d].rows(int(start), int(stop))
            batch = batch[~batch["id"].isin(self.written[d])]
            if len(batch):
                write_shard(self.generate(batch), d)
            out.append((d, len(batch)))
        return pd.DataFrame(out, columns=["out_dir", "images"])

    def generate(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Plan rows -> image rows in the shared schema (PNG bytes)."""
        imgs = generate_batch(self.pipe, batch["prompt"].tolist(), batch["seed"].tolist(), **self.kw)
        return pd.DataFrame({
            "id": batch["id"].to_numpy(), "image": [encode_png(im) for im in imgs],
            "target": batch["target"].astype("int64").to_numpy(), "group": batch["group"].astype("int64").to_numpy(),
            "split": batch["split"].to_numpy(), "source": "synthetic", "prompt": batch["prompt"].to_numpy(),
            "generator": self.meta,
        })


def write_shard(batch: pd.DataFrame, out_dir: str) -> str:
    """Commit one batch as one Parquet shard, whole (a local temp file renamed into place; one object
    upload on a store), straight into ``out_dir`` from the node that drew it; the name hashes the batch's
    ids, so writing the same batch again replaces its shard. Returns its path."""
    digest = hashlib.sha1("\n".join(batch["id"]).encode()).hexdigest()[:16]
    path = join(out_dir, f"shard-{digest}.parquet")
    atomic_write_bytes(path, _parquet_bytes(pa.Table.from_pandas(batch, schema=SCHEMA, preserve_index=False)))
    return path


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def written_ids(out_dir: str) -> pa.Array:
    """The ids of a folder's committed shards, as one Arrow string column (compact: no Python objects)."""
    fix = "remove it and rerun to draw its images again, or rerun with --force"
    chunks = [read_parquet(f, ["id"], fix)["id"] for f in listdir(out_dir, "shard-*.parquet")]
    return pa.chunked_array([c for ch in chunks for c in ch.chunks], pa.string()).combine_chunks()


FINGERPRINT = "_fingerprint.json"  # what the folder's images were made with, written before the first shard


def _changed(old: dict, meta: dict) -> str:
    was = old.get("meta", {})
    diff = [f"{k} {was.get(k)!r} -> {meta.get(k)!r}" for k in sorted(set(was) | set(meta)) if was.get(k) != meta.get(k)]
    return ", ".join(diff) if diff else "the prompts"


def _settle(out: str, plan: Plan, meta: dict, force: bool, keep: bool, log=print) -> None:
    """Make ``out`` hold only images of this plan's settings: a set made with other settings or prompts is
    drawn again (``keep``: refused), with ``force`` always; a lower count keeps the first ids of each cell."""
    fp = plan.fingerprint(meta)
    path = join(out, FINGERPRINT)
    old = read_json(path) if exists(path) else None
    same = made_with(path, fp, "fingerprint") is not None
    shards = listdir(out, "shard-*.parquet")
    if shards and (force or not same):
        why = "--force" if force else "it has no fingerprint" if old is None else _changed(old, meta)
        if keep:
            raise AimfairError(f"{out}: its images were made with other settings ({why}) and --keep keeps them: drop "
                               "--keep to draw the set again, or set the settings back")
        log(f"images: {base_name(out)}: drawing the set again ({why})")
        for f in listdir(out):
            remove(f)
        shards = []
    if not same:
        write_json(path, {"fingerprint": fp, "meta": meta})
    written = written_ids(out)
    planned = plan.ids()
    if len(written) and pc.sum(pc.is_in(written, value_set=planned)).as_py() != len(written):
        for f in shards:  # a lower count: the ids past it go, shard by shard (each rewritten whole)
            t = read_parquet(f)
            hit = pc.is_in(t["id"], value_set=planned)
            if not pc.all(hit).as_py():
                rest = t.filter(hit)
                if rest.num_rows:
                    atomic_write_bytes(f, _parquet_bytes(rest))
                else:
                    remove(f)
        remove(join(out, MANIFEST))
        log(f"images: {base_name(out)}: the plan is smaller now; kept its first {len(plan)} images")


def _missing(plan: Plan, written: pa.Array, batch_size: int) -> np.ndarray:
    """How many ids of each batch of the plan (rows i*batch_size onwards) are not in ``written``: one
    membership pass over chunks of whole batches (Arrow hashes ``written`` once per chunk of ~131k ids)."""
    starts = np.arange(0, len(plan), batch_size)
    if not len(written):
        return np.minimum(batch_size, len(plan) - starts)
    step = batch_size * max(1, 2**17 // batch_size)
    hit = np.concatenate([pc.is_in(plan.ids(i, i + step), value_set=written).to_numpy(zero_copy_only=False)
                          for i in range(0, len(plan), step)])
    return np.add.reduceat(~hit, starts) if len(hit) else starts


def _check(out_dir: str, plan: Plan) -> None:
    """Every planned id written once, nothing else. Per cell, the written ids' row numbers (Arrow
    string kernels, then integers) against 0..n-1: no Python string per image."""
    ids = written_ids(out_dir)
    missing = dup = matched = 0
    for cell, n, *_ in plan.cells:
        prefix = f"{plan.balance}-{cell}-"
        suffix = pc.utf8_slice_codeunits(ids.filter(pc.starts_with(ids, prefix)), len(prefix))
        ks = pc.cast(suffix.filter(pc.match_substring_regex(suffix, r"^[0-9]{6,}$")), pa.int64()).to_numpy()
        ks = ks[ks < n]
        unique = len(np.unique(ks))
        matched, dup, missing = matched + len(ks), dup + len(ks) - unique, missing + n - unique
    extra = len(ids) - matched
    if dup or missing or extra:
        raise AimfairError(f"{out_dir}: {missing} planned images missing, {dup} written twice, {extra} from another "
                           "plan: rerun the command to fill what is missing; remove the folder to generate the set again")


def generate_images(gcfg, plans: dict[str, Plan], meta: dict, save_size: int | None = None,
                    log=print, force: bool = False, keep: bool = False) -> dict[str, dict]:
    """Generate every planned id not yet written, for each output folder of ``plans`` (folder ->
    :class:`Plan`), in one Ray Data pipeline (one actor pool for all the sets); returns each folder's
    throughput figures. A folder made with other settings or prompts is drawn again (``keep``: refused;
    ``force``: always); a finished folder gets its manifest (files, rows per cell, fingerprint)."""
    import ray

    bs = gcfg.batch_size
    ranges, done = [], {}
    for out_dir, plan in plans.items():
        out = str(out_dir).rstrip("/")
        make_dir(out)
        for stale in listdir(out, "*.tmp") + listdir(out, ".*.tmp-*"):  # a killed run's unfinished shard (a disk)
            remove(stale)
        _settle(out, plan, meta, force, keep, log)
        written = written_ids(out_dir)
        missing = _missing(plan, written, bs)
        todo = [(out, i * bs, min((i + 1) * bs, len(plan))) for i in np.flatnonzero(missing)]
        done[out_dir] = len(plan) - int(missing.sum())
        ranges += todo
        if todo:
            remove(join(out, COMPLETE))
            remove(join(out, MANIFEST))
        else:  # a finished set: its files are the ones written
            manifest.verify(out)
        log(f"images: {base_name(out)}: {len(plan)} planned, {done[out_dir]} already written, "
            f"{len(plan) - done[out_dir]} to generate")
    t0, n = time.time(), {d: 0 for d in plans}
    if ranges:
        from aimfair_ray.generate.t2i import embedded_weights
        from aimfair_ray.runtime import require

        require("the diffusion actor pool", gcfg.actors, gcfg.cpus_per_actor, gcfg.gpus_per_actor,
                "generate.actors, generate.cpus_per_actor or generate.gpus_per_actor")

        # one block per generation batch, so the actors share the work and each batch is committed when done
        ds = ray.data.from_items([{"out_dir": d, "start": i, "stop": j} for d, i, j in ranges],
                                 override_num_blocks=len(ranges)).map_batches(
            DiffusionActor,
            fn_constructor_kwargs={"pipeline": gcfg.pipeline or str(embedded_weights()), "dtype": gcfg.dtype,
                                   "scheduler": gcfg.scheduler, "steps": gcfg.steps, "guidance": gcfg.guidance_scale,
                                   "size": gcfg.image_size, "negative_prompt": gcfg.negative_prompt,
                                   "save_size": save_size, "meta": meta,
                                   "plans": {str(d).rstrip("/"): p for d, p in plans.items()},
                                   "threads": max(1, int(gcfg.cpus_per_actor))},
            batch_size=1, batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=gcfg.actors),
            num_cpus=gcfg.cpus_per_actor, num_gpus=gcfg.gpus_per_actor or None,
        )
        names = {str(d).rstrip("/"): d for d in plans}
        shown = {d: 0 for d in plans}  # quarters of a set already logged: a line per quarter, a bar per batch
        for d in plans:
            progress.update(f"images {base_name(d)}", done[d], len(plans[d]))
        for b in ds.iter_batches(batch_size=None, batch_format="pandas"):
            for key, k in zip(b["out_dir"], b["images"]):
                d = names[key]
                n[d] += int(k)
                written, planned = done[d] + n[d], len(plans[d])
                progress.update(f"images {base_name(d)}", written, planned)
                if 4 * written // planned > shown[d]:
                    shown[d] = 4 * written // planned
                    log(f"images: {base_name(d)}: {written}/{planned} written, "
                        f"{sum(n.values()) / (time.time() - t0):.2f} images/s")
    secs = time.time() - t0
    stats = {}
    for out_dir, plan in plans.items():
        _check(out_dir, plan)  # every planned id is on the store, once
        k = n[out_dir]
        if done[out_dir] + k < len(plan):  # an actor committed shards, then died with its node before its count came
            log(f"images: {base_name(out_dir)}: {len(plan)}/{len(plan)} written ({len(plan) - done[out_dir] - k} by an "
                "actor lost with its node after committing them)")
        stats[out_dir] = {"planned": len(plan), "generated_now": k, "seconds": round(secs, 2),
                          "images_per_s": round(k / secs, 3) if k else None}
        if not exists(join(out_dir, MANIFEST)):
            write_json(join(out_dir, "stats.json"), stats[out_dir])
            write_manifest(out_dir, "aimfair generate images --force", plan.fingerprint(meta))
        atomic_write_bytes(join(out_dir, COMPLETE), b"")
    return stats
