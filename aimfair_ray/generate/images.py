"""CSDG image stage: planned (id, prompt, seed) rows -> a diffusers pipeline in a Ray Data
actor pool -> PNG rows in the shared schema, committed shard by shard.

- The plan is deterministic: ids are ``{set}-{cell}-{k}``, prompts are dealt round-robin
  from the cell's prompts, and each id has its own seed, so the same id gives the same
  image.
- The generating actor commits each batch itself: ``shard-<ids hash>.parquet.tmp``, then
  a rename. A killed run leaves only whole shards; a retried batch rewrites its own shard
  (the name depends on its ids only); a rerun skips the ids already written. Nothing is
  lost and nothing is written twice. ``_COMPLETE`` marks a finished set.
- It streams: only the small plan and the written ids pass through the driver.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from aimfair_ray import AimfairError, progress
from aimfair_ray.data.codecs import encode_png
from aimfair_ray.data.io import SCHEMA
from aimfair_ray.storage import COMPLETE, write_json


def sample_seed(base: int, sample_id: str) -> int:
    return zlib.crc32(f"{base}:{sample_id}".encode()) & 0x7FFFFFFF


def plan(prompts: pd.DataFrame, kind: str, counts: dict[str, int], seed: int) -> pd.DataFrame:
    rows = []
    for cell, n in counts.items():
        ps = prompts[prompts["cell"] == cell].sort_values("id")
        if n and ps.empty:
            raise AimfairError(f"no prompts for cell {cell}: run `aimfair generate prompts` again or raise prompts_per_cell")
        for k in range(n):
            p = ps.iloc[k % len(ps)]
            sid = f"{kind}-{cell}-{k:06d}"
            rows.append({"id": sid, "target": int(p.target), "group": int(p.group), "prompt": p.prompt,
                         "seed": sample_seed(seed, sid), "split": kind})
    return pd.DataFrame(rows, columns=["id", "target", "group", "prompt", "seed", "split"])


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
    """Ray Data UDF: plan rows -> images, committed as Parquet shards, one per output folder
    (a row's ``out_dir``) in the batch; returns the ids.

    Writing in the actor (PNG encoding and a small Parquet file per batch) keeps the
    pipeline to one stage: no second worker process per batch, no image bytes through
    the object store."""

    def __init__(self, pipeline: str, dtype: str, scheduler: str | None, steps: int, guidance: float,
                 size: int | None, negative_prompt: str | None, save_size: int | None, meta: dict, threads: int = 1):
        import torch

        from aimfair_ray.generate.t2i import load_pipeline

        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(pipeline, device=device, dtype=dtype if device == "cuda" else "float32",
                                  scheduler=scheduler)
        self.kw = {"steps": steps, "guidance": guidance, "size": size, "negative_prompt": negative_prompt,
                   "save_size": save_size}
        self.meta = json.dumps(meta)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        imgs = generate_batch(self.pipe, batch["prompt"].tolist(), batch["seed"].tolist(), **self.kw)
        rows = pd.DataFrame({
            "id": batch["id"].to_numpy(), "image": [encode_png(im) for im in imgs],
            "target": batch["target"].astype("int64").to_numpy(), "group": batch["group"].astype("int64").to_numpy(),
            "split": batch["split"].to_numpy(), "source": "synthetic", "prompt": batch["prompt"].to_numpy(),
            "generator": self.meta,
        })
        out_dirs = batch["out_dir"].to_numpy()
        return pd.concat([write_shard(rows[out_dirs == d].reset_index(drop=True), d) for d in dict.fromkeys(out_dirs)],
                         ignore_index=True)


def write_shard(batch: pd.DataFrame, out_dir: str) -> pd.DataFrame:
    """Commit one batch as one Parquet shard (temp file, then rename); the name hashes the
    batch's ids, so writing the same batch again replaces its shard. Returns the ids."""
    digest = hashlib.sha1("\n".join(batch["id"]).encode()).hexdigest()[:16]
    name = f"shard-{digest}.parquet"
    tmp = Path(out_dir) / f"{name}.tmp"
    pq.write_table(pa.Table.from_pandas(batch, schema=SCHEMA, preserve_index=False), tmp)
    tmp.replace(Path(out_dir) / name)
    return pd.DataFrame({"id": batch["id"].to_numpy()})


def written_ids(out_dir: str) -> list[str]:
    files = sorted(Path(out_dir).glob("shard-*.parquet"))
    return [i for f in files for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]


def generate_images(gcfg, plans: dict[str, pd.DataFrame], meta: dict, save_size: int | None = None,
                    log=print) -> dict[str, dict]:
    """Generate every planned id not yet written, for each output folder of ``plans`` (folder ->
    plan), in one Ray Data pipeline (one actor pool for all the sets); returns each folder's
    throughput figures."""
    import ray

    todos, done = {}, {}
    for out_dir, plan_df in plans.items():
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("*.tmp"):  # a killed run's unfinished shard
            stale.unlink()
        done[out_dir] = set(written_ids(out_dir))
        todos[out_dir] = plan_df[~plan_df["id"].isin(done[out_dir])].assign(out_dir=str(out))
        if len(todos[out_dir]):
            (out / COMPLETE).unlink(missing_ok=True)
        log(f"images: {out.name}: {len(plan_df)} planned, {len(done[out_dir])} already written, "
            f"{len(todos[out_dir])} to generate")
    t0, n = time.time(), {d: 0 for d in plans}
    where = {i: d for d, todo in todos.items() for i in todo["id"]}
    if where:
        from aimfair_ray.generate.t2i import embedded_weights

        pipeline = gcfg.pipeline or str(embedded_weights())
        # one block per generation batch (never across two sets), so each batch is committed as soon as it is done
        chunks = [todo.iloc[i:i + gcfg.batch_size] for todo in todos.values() for i in range(0, len(todo), gcfg.batch_size)]
        ds = ray.data.from_pandas(chunks).map_batches(
            DiffusionActor,
            fn_constructor_kwargs={"pipeline": pipeline, "dtype": gcfg.dtype, "scheduler": gcfg.scheduler,
                                   "steps": gcfg.steps, "guidance": gcfg.guidance_scale, "size": gcfg.image_size,
                                   "negative_prompt": gcfg.negative_prompt, "save_size": save_size, "meta": meta,
                                   "threads": max(1, int(gcfg.cpus_per_actor))},
            batch_size=gcfg.batch_size, batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=gcfg.actors),
            num_cpus=gcfg.cpus_per_actor, num_gpus=gcfg.gpus_per_actor or None,
        )
        shown = {d: 0 for d in plans}  # quarters of a set already logged: a line per quarter, a bar per batch
        for d in todos:
            progress.update(f"images {Path(d).name}", len(done[d]), len(plans[d]))
        for b in ds.iter_batches(batch_size=None, batch_format="pandas"):
            for d in dict.fromkeys(where[i] for i in b["id"]):
                n[d] += sum(where[i] == d for i in b["id"])
                written, planned = len(done[d]) + n[d], len(plans[d])
                progress.update(f"images {Path(d).name}", written, planned)
                if 4 * written // planned > shown[d]:
                    shown[d] = 4 * written // planned
                    log(f"images: {Path(d).name}: {written}/{planned} written, "
                        f"{sum(n.values()) / (time.time() - t0):.2f} images/s")
    secs = time.time() - t0
    stats = {}
    for out_dir, plan_df in plans.items():
        ids = written_ids(out_dir)
        if sorted(ids) != sorted(plan_df["id"]):
            missing = len(set(plan_df["id"]) - set(ids))
            raise AimfairError(f"{out_dir}: {missing} planned images missing, {len(ids) - len(set(ids))} duplicated; rerun")
        k = n[out_dir]
        stats[out_dir] = {"planned": len(plan_df), "generated_now": k, "seconds": round(secs, 2),
                          "images_per_s": round(k / secs, 3) if k else None}
        write_json(str(Path(out_dir) / "stats.json"), stats[out_dir])
        (Path(out_dir) / COMPLETE).touch()
    return stats
