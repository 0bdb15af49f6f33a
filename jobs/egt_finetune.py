"""Ray job entrypoint: min–max fine-tuning.

    image | text: EGT on a generator (`aimfair egt image|text`), e.g.
        ray job submit --working-dir . -- python jobs/egt_finetune.py text --set egt.eta=0.5 \
            --set train.num_workers=4 --set train.use_gpu=true --set egt.text.model=HuggingFaceTB/SmolLM2-1.7B
    groupdro (the default when no task is named): the Group DRO classifier baseline,
        `aimfair train groupdro`, with step size group_dro.eta.

Inside a job, RAY_ADDRESS is set, so the stage joins the job's cluster.
"""

import sys

from aimfair_ray.cli import app

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] in (["image"], ["text"]):
        app(["egt", *args])
    else:
        app(["train", "groupdro", *(args[1:] if args[:1] == ["groupdro"] else args)])
