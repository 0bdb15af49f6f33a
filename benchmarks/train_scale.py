"""Training as the work grows: an epoch of the project's Ray Train loop (``train_baseline``: 2 workers,
Ray Data feeding the split, the per-epoch global shuffle) against a plain PyTorch epoch (``loop.train_epoch``
in one process, the same model, batch size and total CPU threads) on the same images, at growing sizes.
The Colored MNIST train split is prepared once (2,500 images) and repeated, with new ids, to each size.

    python benchmarks/train_scale.py --sizes 2500,25000,100000 [--epochs 3]

Per size: Ray's steady epoch (the train pass of epochs 2.., from its history), the plain epoch (same), their
ratio, and the Ray run's whole wall time (start-up, the epochs, validation, checkpoints, export) against
the epochs' sum. Target: Ray's epoch at most 1.5x plain at 25k and above. Writes
benchmarks/results/train_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def repeat_split(src: str, dst: str, n: int) -> None:
    """The split at ``src`` repeated (ids suffixed) to ``n`` rows, written as a split at ``dst``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from aimfair_ray.data.io import read_table, write_split

    base = read_table(src)
    parts, k = [], 0
    while sum(len(p) for p in parts) < n:
        t = base.slice(0, min(len(base), n - sum(len(p) for p in parts)))
        parts.append(t.set_column(t.schema.get_field_index("id"), "id", pc.binary_join_element_wise(
            t["id"], pa.scalar(f"r{k}"), "-")))
        k += 1
    write_split(pa.concat_tables(parts), dst, "benchmarks/train_scale.py")


def plain_epochs(cfg, epochs: int, threads: int) -> list[float]:
    """Train-pass seconds of each epoch, plain PyTorch, a seeded global shuffle per epoch."""
    import numpy as np
    import torch

    from aimfair_ray.data.codecs import decode_png
    from aimfair_ray.data.io import read_table
    from aimfair_ray.data.prepare import load_meta
    from aimfair_ray.models import build_model, model_meta
    from aimfair_ray.train import loop

    torch.set_num_threads(threads)
    t = read_table(cfg.paths.split("train"), columns=["image", "target"])
    images = torch.from_numpy(np.stack([decode_png(b) for b in t["image"].to_pylist()])).permute(0, 3, 1, 2).contiguous()
    targets = torch.tensor(t["target"].to_pylist())
    meta = model_meta(cfg, load_meta(cfg.data_dir))
    torch.manual_seed(cfg.train.seed)
    model = build_model(meta["backbone"], meta["num_classes"], meta["image_size"], pretrained=False, width=meta["width"])
    opt = loop.make_optimizer(model.parameters(), cfg.train)
    bs, times = cfg.train.batch_size, []
    for epoch in range(epochs):
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch))
        batches = ({"image": images[perm[i:i + bs]], "target": targets[perm[i:i + bs]]}
                   for i in range(0, len(perm), bs))
        t0 = time.perf_counter()
        loop.train_epoch(model, batches, opt, meta["mean"], meta["std"], "cpu")
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2500,25000,100000")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config overrides, e.g. train.batch_size=128")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import ray

    from aimfair_ray.config import load_config
    from aimfair_ray.data.prepare import prepare_data
    from aimfair_ray.train.baseline import train_baseline

    work = Path(tempfile.mkdtemp(prefix="train-scale-"))
    base = load_config("cmnist", overrides=[f"output_dir={work}", "name=base", "ray.temp_dir=/tmp/aimfair-bench",
                                            f"train.epochs={a.epochs}", *a.sets])
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    prepare_data(base, log=lambda *_: None)
    ray.data.DataContext.get_current().enable_progress_bars = False
    threads = base.train.num_workers * base.train.torch_threads
    rows = []
    print(f"{'size':>7} {'ray epoch s':>11} {'plain epoch s':>13} {'ratio':>6} {'ray run s':>9} {'epochs s':>8}  "
          f"({base.train.num_workers} Ray Train workers x {base.train.torch_threads} threads vs plain {threads} "
          f"threads; batch {base.train.batch_size}; {base.model.backbone})", flush=True)
    for n in [int(s) for s in a.sizes.split(",")]:
        cfg = base.model_copy(update={"name": f"n{n}"}, deep=True)
        os.makedirs(cfg.data_dir, exist_ok=True)
        for f in Path(base.data_dir).iterdir():  # val, test and the metadata as they are; train repeated to n
            if f.name != "train":
                os.symlink(f, Path(cfg.data_dir) / f.name)
        repeat_split(base.paths.split("train"), cfg.paths.split("train"), n)
        t0 = time.time()
        res = train_baseline(cfg, force=True, log=lambda *_: None)
        wall = time.time() - t0
        ray_epochs = [h["epoch_time_s"] for h in res["history"]]
        plain = plain_epochs(cfg, a.epochs, threads)
        steady_ray = sum(ray_epochs[1:]) / max(len(ray_epochs) - 1, 1)
        steady_plain = sum(plain[1:]) / max(len(plain) - 1, 1)
        row = {"size": n, "ray_epoch_s": round(steady_ray, 2), "plain_epoch_s": round(steady_plain, 2),
               "ratio": round(steady_ray / steady_plain, 3), "ray_run_s": round(wall, 1),
               "ray_epochs_s": [round(x, 2) for x in ray_epochs], "plain_epochs_s": [round(x, 2) for x in plain]}
        rows.append(row)
        print(f"{n:>7} {row['ray_epoch_s']:>11} {row['plain_epoch_s']:>13} {row['ratio']:>6} {row['ray_run_s']:>9} "
              f"{sum(ray_epochs):>8.1f}", flush=True)
    res = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "epochs": a.epochs, "sets": a.sets,
           "workers": base.train.num_workers, "torch_threads": base.train.torch_threads,
           "batch_size": base.train.batch_size, "backbone": base.model.backbone, "rows": rows}
    out = Path(a.out or "benchmarks/results/train_scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
