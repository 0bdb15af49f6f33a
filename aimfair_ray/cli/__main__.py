import sys

from aimfair_ray.cli import app

sys.exit(app())
