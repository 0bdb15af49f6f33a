"""A Ray Tune callback that moves the console's 'sweep trials' bar (``aimfair_ray.progress``). It lives in
its own module because Tune saves the callbacks with the experiment, by reference to their class."""

from __future__ import annotations

from ray.tune import Callback

from aimfair_ray import progress


class TrialBar(Callback):
    """Trials finished (or failed) of trials created so far, after each step of Tune's loop."""

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        progress.update("sweep trials", done, len(trials))
