"""Recipe that reproduces the embedded text-to-image weights shipped in
aimfair_ray/generate/weights/cmnist-t2i (trained on the Colored MNIST generator split).
The shipped weights (6,500 steps) came from three runs on one --out folder:

    aimfair data prepare                      # writes runs/cmnist/data/generator
    python jobs/train_t2i.py --steps 3500 --caption-bank recipe --out runs/t2i
    python jobs/train_t2i.py --steps 7500 --stop-at 3750 --caption-bank recipe --out runs/t2i
    python jobs/train_t2i.py --steps 6500 --out runs/t2i          # caption bank "all" from here
    cp -r runs/t2i/pipeline/* aimfair_ray/generate/weights/cmnist-t2i/

About 1.2-1.4 s/step on 2 CPU cores (batch 64). Resumable: rerunning with the same --out
continues from the last checkpoint (every 250 steps); ckpt/state.json records the caption
banks used and from which step.
"""

import argparse
import json

from aimfair_ray.generate.t2i_train import train

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/cmnist/data")
    ap.add_argument("--out", default="runs/t2i")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--caption-bank", default="all", choices=["all", "recipe"],
                    help="all: recipe and prompt-stage phrasings; recipe: the recipe's own templates only")
    ap.add_argument("--captions-per-image", type=int, default=8)
    ap.add_argument("--stop-at", type=int, default=None, help="end at this step (the LR schedule stays that of --steps)")
    a = ap.parse_args()
    groups = json.load(open(f"{a.data}/dataset.json"))["group_names"]
    print(train(f"{a.data}/generator", a.out, groups, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                threads=a.threads, seed=a.seed, caption_bank=a.caption_bank, captions_per_image=a.captions_per_image,
                stop_at=a.stop_at, log=lambda m: print(m, flush=True)))
