"""Ray job entrypoint: `aimfair sweep selective|minmax` (Ray Tune around Ray Train).

    ray job submit --working-dir . -- python jobs/sweep.py selective \
        --set train.use_gpu=true --set train.num_workers=2
    ray job submit --working-dir . -- python jobs/sweep.py minmax --space my_sweep.yaml --wandb

The sweep YAML (--space) holds the search space (grid, choice, uniform, loguniform),
the objective and the ASHA settings; the shipped ones are in
aimfair_ray/presets/sweeps/. Resubmitting the same command resumes the sweep.
"""

import sys

from aimfair_ray.cli import app

if __name__ == "__main__":
    app(["sweep", *sys.argv[1:]])
