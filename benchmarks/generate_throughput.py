"""Images/s of the Ray Data generation pipeline against a plain single-process loop over
the same model, the same batch size and the same CPU threads, printed as a ratio.

    python benchmarks/generate_throughput.py [--images 192] [--batch-size 16] [--steps 30] [--repeats 3]

The Ray figure is taken at steady state, from the first committed shard to the last (the
actor's model load is reported apart). With ``--repeats N`` the two run alternately N
times and the median ratio is reported: on a 2-core machine single runs vary by about 5%.
The GPU figures of an SD-1.5-architecture pipeline are benchmarks/gpu_suite.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def plain_loop(pipeline: str, plan, batch_size: int, steps: int, guidance: float, threads: int) -> dict:
    from aimfair_ray.data.codecs import encode_png
    from aimfair_ray.generate.images import generate_batch
    from aimfair_ray.generate.t2i import load_pipeline

    torch.set_num_threads(threads)
    pipe = load_pipeline(pipeline)
    generate_batch(pipe, plan["prompt"].tolist()[:batch_size], plan["seed"].tolist()[:batch_size], steps, guidance)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(plan), batch_size):
        b = plan.iloc[i:i + batch_size]
        for im in generate_batch(pipe, b["prompt"].tolist(), b["seed"].tolist(), steps, guidance):
            encode_png(im)
    secs = time.perf_counter() - t0
    return {"images": len(plan), "seconds": round(secs, 2), "images_per_s": round(len(plan) / secs, 3)}


def ray_pipeline(cfg, plan, out: str) -> dict:
    from aimfair_ray.generate.images import generate_images

    t0 = time.time()
    stats = generate_images(cfg.generate, {out: plan}, {"benchmark": True}, log=lambda *_: None)[out]
    shards = sorted(Path(out).glob("shard-*.parquet"), key=lambda p: p.stat().st_mtime)
    first, last = shards[0].stat().st_mtime, shards[-1].stat().st_mtime
    steady_images = len(plan) - cfg.generate.batch_size  # images committed after the first shard
    return {"images": len(plan), "seconds_total": stats["seconds"], "first_shard_after_s": round(first - t0, 2),
            "steady_seconds": round(last - first, 2), "images_per_s": round(steady_images / (last - first), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=1, help="alternate plain and Ray runs this many times; report the median")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=None, help="default: the preset's generate.guidance_scale")
    ap.add_argument("--pipeline", default=None, help="default: the embedded model")
    a = ap.parse_args()

    import ray
    from generate_scale import make_plan  # this folder's: the same plan at any size

    from aimfair_ray.config import load_config
    from aimfair_ray.generate.t2i import embedded_weights

    pipeline = a.pipeline or str(embedded_weights())
    plan = make_plan(a.images)
    res = {"config": vars(a), "cpu_threads": a.threads, "cores": os.cpu_count()}
    cfg = load_config("cmnist", overrides=[f"generate.pipeline={pipeline}", f"generate.batch_size={a.batch_size}",
                                           f"generate.steps={a.steps}", "generate.actors=1",
                                           f"generate.cpus_per_actor={a.threads}"]
                      + ([f"generate.guidance_scale={a.guidance}"] if a.guidance is not None else []))
    res["guidance_scale"] = cfg.generate.guidance_scale  # the same for both: CFG > 1 doubles the UNet work
    ray.init(num_cpus=a.threads + 1, include_dashboard=False, _temp_dir="/tmp/aimfair-bench")
    runs = []
    for _ in range(a.repeats):
        p = plain_loop(pipeline, plan, a.batch_size, a.steps, cfg.generate.guidance_scale, a.threads)
        with tempfile.TemporaryDirectory() as d:
            r = ray_pipeline(cfg, plan, f"{d}/set")
        runs.append({"plain_loop": p, "ray_data": r, "ratio": round(r["images_per_s"] / p["images_per_s"], 3)})
        print(f"plain {p['images_per_s']} images/s, Ray Data {r['images_per_s']} images/s: ratio {runs[-1]['ratio']}",
              flush=True)
    mid = sorted(runs, key=lambda x: x["ratio"])[len(runs) // 2]  # the median run
    res.update(runs=runs, plain_loop=mid["plain_loop"], ray_data=mid["ray_data"])
    res["ratio_ray_over_plain"] = mid["ratio"]
    res["overhead_pct"] = round(100 * (1 - res["ratio_ray_over_plain"]), 1)
    print(json.dumps(res, indent=2))
    print(f"median of {a.repeats}: plain loop {res['plain_loop']['images_per_s']} images/s; "
          f"Ray Data {res['ray_data']['images_per_s']} images/s "
          f"(steady state); ratio {res['ratio_ray_over_plain']} -> overhead {res['overhead_pct']}% (target <= 10%)")


if __name__ == "__main__":
    main()
