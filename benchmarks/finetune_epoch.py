"""Wall time per fine-tuning epoch, selective against full, on the same data and workers.

    python benchmarks/finetune_epoch.py [--epochs 4] [--set finetune.k=0.5 ...]

Part 1 (Ray Train): runs `full` and `selective` fine-tuning of the run's baseline on
its synthetic balanced set with the same workers, batch size and epochs, and prints
the mean epoch time (the first epoch excluded) and the ratio selective / full.
Part 2 (plain PyTorch, no Ray): times `train_epoch` over the same images in one
process with every tensor trainable, then with only the selected ones; on a GPU
machine this is the figure to quote (`--device cuda`).
Needs `aimfair demo` (or `generate all` + `train baseline`) to have run first.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def plain(model_dir: str, images: torch.Tensor, targets: torch.Tensor, trainable, batch_size: int, epochs: int,
          device: str, threads: int) -> float:
    from aimfair_ray.config import TrainConfig
    from aimfair_ray.models import load_classifier
    from aimfair_ray.train import loop, selective

    torch.set_num_threads(threads)
    model, meta = load_classifier(model_dir)
    model.to(device)
    frozen_bn = selective.freeze(model, trainable or [n for n, _ in model.named_parameters()], "keep")
    opt = loop.make_optimizer(model.parameters(), TrainConfig(lr=1e-3))
    batches = [{"image": images[i:i + batch_size], "target": targets[i:i + batch_size]}
               for i in range(0, len(images), batch_size)]
    times = []
    for _ in range(epochs):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loop.train_epoch(model, batches, opt, meta["mean"], meta["std"], device, frozen_bn=frozen_bn)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.mean(times[1:] if len(times) > 1 else times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cmnist")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-ray", action="store_true", help="only the plain-PyTorch part")
    a = ap.parse_args()

    from aimfair_ray.config import load_config
    from aimfair_ray.data.codecs import decode_png
    from aimfair_ray.data.io import read_table
    from aimfair_ray.train.finetune import choose, finetune, mean_epoch_time, synthetic_dir

    cfg = load_config(a.preset, overrides=a.sets + [f"finetune.epochs={a.epochs}"])
    base = f"{cfg.stage_dir('baseline')}/model"
    out = {"epochs": a.epochs, "batch_size": cfg.finetune.batch_size, "workers": cfg.train.num_workers}
    if not a.skip_ray:
        res = {m: finetune(cfg, m, stage=f"bench_epoch/{m}", force=True, log=lambda *_: None) for m in ("full", "selective")}
        out["ray"] = {m: round(mean_epoch_time(r), 4) for m, r in res.items()}
        out["ray"]["ratio_selective_over_full"] = round(out["ray"]["selective"] / out["ray"]["full"], 3)
    t = read_table(synthetic_dir(cfg, "balanced"), ["image", "target"])
    images = torch.from_numpy(np.stack([decode_png(b) for b in t["image"].to_pylist()])).permute(0, 3, 1, 2).contiguous()
    targets = torch.tensor(t["target"].to_pylist())
    chosen = choose(cfg, "selective", base, log=lambda *_: None)["trainable"]
    threads = int(cfg.train.torch_threads * cfg.train.num_workers)
    full_s = plain(base, images, targets, None, cfg.finetune.batch_size, a.epochs, a.device, threads)
    sel_s = plain(base, images, targets, chosen, cfg.finetune.batch_size, a.epochs, a.device, threads)
    out["plain"] = {"device": a.device, "threads": threads, "images": len(images), "full": round(full_s, 4),
                    "selective": round(sel_s, 4), "ratio_selective_over_full": round(sel_s / full_s, 3),
                    "selected_tensors": len(chosen)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
