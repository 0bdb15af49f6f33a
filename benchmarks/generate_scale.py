"""Generation as the work grows: the Ray Data pipeline (``generate_images``: one actor pool, Parquet shards
committed by the actors) against a plain loop doing the same work in one process (the same
``DiffusionActor`` called batch by batch: generation, PNG encoding, shard commits), with the same model,
batch size and CPU threads, at growing sizes.

    python benchmarks/generate_scale.py --pipeline tiny --sizes 1000,10000,100000   # per-image overhead shows
    python benchmarks/generate_scale.py --pipeline embedded --sizes 1000,5000 --steps 10   # compute-bound

Per size: images/s of both (whole run, model load included, and Ray's steady state from its first shard
to its last), the ratio, the growth of the driver's RSS during the Ray run and the object store's peak use
(sampled every 0.2 s).
Targets: overhead <= 10% (embedded) and <= 25% (tiny) at every size; the driver's memory flat from 10k to
100k. Writes benchmarks/results/generate_scale-<pipeline>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Peak:
    """Samples this process's RSS and the Ray object store's used bytes in a thread; keeps the peaks."""

    def __init__(self, ray_on: bool, every: float = 0.2):
        import psutil

        self.proc, self.ray_on, self.every = psutil.Process(), ray_on, every
        self.start_rss = self.proc.memory_info().rss
        self.rss = self.store = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import ray

        total = ray.cluster_resources().get("object_store_memory", 0) if self.ray_on else 0
        while not self.stop.is_set():
            self.rss = max(self.rss, self.proc.memory_info().rss)
            if self.ray_on:
                self.store = max(self.store, int(total - ray.available_resources().get("object_store_memory", total)))
            time.sleep(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def make_plan(n: int):
    """A plan of ``n`` images over the four (target, group) cells, five digit prompts per cell."""
    import pandas as pd

    from aimfair_ray.generate.images import Plan

    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    prompts = pd.DataFrame([{"id": f"p{t}{g}{d}", "cell": f"y{t}_s{g}", "target": t, "group": g,
                             "prompt": f"a handwritten digit {digits[5 * t + d]} in {'red' if g else 'green'}"}
                            for t in (0, 1) for g in (0, 1) for d in range(5)])
    return Plan(prompts, "benchmark", {f"y{t}_s{g}": n // 4 + (2 * t + g < n % 4) for t in (0, 1) for g in (0, 1)}, 0)


def plain(pipeline: str, plan, out: str, a) -> dict:
    """The same actor class, called in this process batch by batch."""
    import pandas as pd
    import torch

    from aimfair_ray.generate.images import DiffusionActor

    torch.set_num_threads(a.threads)
    Path(out).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with Peak(ray_on=False) as peak:
        actor = DiffusionActor(pipeline, "float32", None, a.steps, a.guidance, None, None, None, {"benchmark": True},
                               {out: plan}, threads=a.threads)
        t_loaded = time.perf_counter()
        for i in range(0, len(plan), a.batch_size):
            actor(pd.DataFrame({"out_dir": [out], "start": [i], "stop": [i + a.batch_size]}))
    secs = time.perf_counter() - t0
    n = len(plan)
    return {"images": n, "seconds": round(secs, 2), "images_per_s": round(n / secs, 3),
            "steady_images_per_s": round(n / (time.perf_counter() - t_loaded), 3), "peak_rss_mb": peak.rss >> 20}


def ray_run(cfg, plan, out: str) -> dict:
    from aimfair_ray.generate.images import generate_images

    t0 = time.time()
    with Peak(ray_on=True) as peak:
        generate_images(cfg.generate, {out: plan}, {"benchmark": True}, log=lambda *_: None)
    secs = time.time() - t0
    shards = sorted(Path(out).glob("shard-*.parquet"), key=lambda p: p.stat().st_mtime)
    first, last = shards[0].stat().st_mtime, shards[-1].stat().st_mtime
    n = len(plan)
    steady = (n - cfg.generate.batch_size) / (last - first) if last > first else None
    return {"images": n, "seconds": round(secs, 2), "images_per_s": round(n / secs, 3),
            "steady_images_per_s": round(steady, 3) if steady else None, "first_shard_after_s": round(first - t0, 2),
            "peak_rss_mb": peak.rss >> 20, "rss_growth_mb": (peak.rss - peak.start_rss) >> 20,
            "peak_object_store_mb": peak.store >> 20}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="tiny", help="tiny (a random tiny SD-architecture pipeline, 32 px), "
                                                       "embedded (the bundled model), or a diffusers folder")
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="default: 2 for tiny, 30 otherwise")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plain-from", default=None, help="a results JSON whose plain-loop rows are reused (Ray side only)")
    a = ap.parse_args(argv)
    a.steps = a.steps or (2 if a.pipeline == "tiny" else 30)

    import ray

    from aimfair_ray.config import load_config
    from aimfair_ray.generate.random_arch import TINY, random_sd
    from aimfair_ray.generate.t2i import embedded_weights

    work = Path(tempfile.mkdtemp(prefix="gen-scale-"))
    if a.pipeline == "tiny":
        pipeline = str(work / "tiny-sd")
        random_sd(work, TINY).save_pretrained(pipeline)
    else:
        pipeline = str(embedded_weights()) if a.pipeline == "embedded" else a.pipeline
    cfg = load_config("cmnist", overrides=[f"generate.pipeline={pipeline}", f"generate.batch_size={a.batch_size}",
                                           f"generate.steps={a.steps}", f"generate.guidance_scale={a.guidance}",
                                           "generate.actors=1", f"generate.cpus_per_actor={a.threads}"])
    ray.init(num_cpus=a.threads + 1, include_dashboard=False, _temp_dir="/tmp/aimfair-bench", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    print(f"{'size':>7} {'plain img/s':>11} {'ray img/s':>9} {'ratio':>6} {'ray steady':>10} {'driver +MB':>10} "
          f"{'store MB':>8}  (pipeline {a.pipeline}, {a.steps} steps, batch {a.batch_size}, {a.threads} threads)",
          flush=True)
    for n in [int(s) for s in a.sizes.split(",")]:
        plan = make_plan(n)
        earlier = {r["size"]: r["plain"] for r in json.loads(Path(a.plain_from).read_text())["rows"]} if a.plain_from else {}
        p = earlier.get(n) or plain(pipeline, plan, str(work / f"plain-{n}"), a)
        r = ray_run(cfg, plan, str(work / f"ray-{n}"))
        ratio = r["images_per_s"] / p["images_per_s"]
        rows.append({"size": n, "plain": p, "ray": r, "ratio": round(ratio, 3), "overhead_pct": round(100 * (1 - ratio), 1)})
        print(f"{n:>7} {p['images_per_s']:>11} {r['images_per_s']:>9} {ratio:>6.3f} {r['steady_images_per_s']!s:>10} "
              f"{r['rss_growth_mb']:>10} {r['peak_object_store_mb']:>8}", flush=True)
        for d in (work / f"plain-{n}", work / f"ray-{n}"):
            for f in d.glob("*") if d.is_dir() else []:
                f.unlink()
    ray.shutdown()
    res = {"pipeline": a.pipeline, "steps": a.steps, "batch_size": a.batch_size, "threads": a.threads,
           "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    name = a.pipeline if a.pipeline in ("tiny", "embedded") else "custom"
    out = Path(a.out or f"benchmarks/results/generate_scale-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
