"""Ray job entrypoint: `aimfair finetune` (AIM-Fair selective fine-tuning by default).

    ray job submit --working-dir . -- python jobs/selective_finetune.py --method selective \
        --set finetune.k=0.5 --set train.num_workers=4 --set train.use_gpu=true

    # through DeepSpeed ZeRO-2 on the same Ray Train workers
    ray job submit --working-dir . -- python jobs/selective_finetune.py --set finetune.deepspeed=true

Needs the baseline (`jobs/train_baseline.py`) and the synthetic sets
(`jobs/generate_synthetic.py`) of the same run. Inside a job, RAY_ADDRESS is set,
so the stage joins the job's cluster.
"""

import sys

from aimfair_ray.cli import app

if __name__ == "__main__":
    app(["finetune", *sys.argv[1:]])
