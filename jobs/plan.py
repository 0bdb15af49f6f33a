"""Ray job entrypoint: `aimfair plan`, checked against the cluster the job runs on.

    aimfair submit plan -- --preset celeba --config gpu

Inside a job, RAY_ADDRESS is set, so the plan reads the live nodes' resources and refuses a stage
that none of them can hold. (`aimfair plan` on a laptop, without RAY_ADDRESS, only prints the plan.)
"""

import sys

from aimfair_ray.cli import app

if __name__ == "__main__":
    app(["plan", *sys.argv[1:]])
