"""Ray job entrypoint: min-max fine-tuning, `aimfair train groupdro` (Group DRO over the
(target, group) cells, exponentiated-gradient group weights with step size group_dro.eta).

    ray job submit --working-dir . -- python jobs/minmax_finetune.py --set group_dro.eta=0.01 \
        --set train.num_workers=4 --set train.use_gpu=true

Inside a job, RAY_ADDRESS is set, so the stage joins the job's cluster.
"""

import sys

from aimfair_ray.cli import app

if __name__ == "__main__":
    app(["train", "groupdro", *sys.argv[1:]])
