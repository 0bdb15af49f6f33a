"""Recipe that reproduces the embedded text-to-image weights shipped in
aimfair_ray/generate/weights/cmnist-t2i (trained on the Colored MNIST generator split).

    aimfair data prepare                      # writes runs/cmnist/data/generator
    python jobs/train_t2i.py --steps 4000 --out runs/t2i
    cp -r runs/t2i/pipeline/* aimfair_ray/generate/weights/cmnist-t2i/

Resumable: rerunning with the same --out continues from the last checkpoint.
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
    a = ap.parse_args()
    groups = json.load(open(f"{a.data}/dataset.json"))["group_names"]
    print(train(f"{a.data}/generator", a.out, groups, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                threads=a.threads, seed=a.seed, log=lambda m: print(m, flush=True)))
