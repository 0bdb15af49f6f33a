"""Ray job entrypoint: `aimfair generate all` (prompts, then the balanced and imbalanced sets).

    ray job submit --working-dir . -- python jobs/generate_synthetic.py --set generate.backend=vllm \
        --set generate.pipeline=/models/sd15 --set generate.gpus_per_actor=1 --set generate.actors=8
"""

import sys

from aimfair_ray.cli import app

if __name__ == "__main__":
    app(["generate", "all", *sys.argv[1:]])
