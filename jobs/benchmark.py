"""Ray job entrypoint: `aimfair benchmark aimfair` (the results table over seeds).

    aimfair submit benchmark -- --preset celeba --config gpu --set data.root=/data/celeba --seeds 5
"""

import sys

from aimfair_ray.cli import app

if __name__ == "__main__":
    app(["benchmark", "aimfair", *sys.argv[1:]])
