"""Ray job entrypoint: `aimfair train baseline`.

    ray job submit --working-dir . -- python jobs/train_baseline.py --preset cmnist --set train.epochs=3

Inside a job, RAY_ADDRESS is set, so the stage joins the job's cluster.
"""

import sys

from aimfair_ray.cli import app

if __name__ == "__main__":
    app(["train", "baseline", *sys.argv[1:]])
