"""Ray Tune sweeps around the Ray Train trainers, with a Pareto view of fairness against utility.

A sweep YAML (see ``presets/sweeps/``) names config paths and how to search them::

    kind: selective                 # a registered kind (sweep/kinds.py): selective, group_dro,
                                    # egt-image, egt-text
    space:
      finetune.k:  {grid: [0.2, 0.5, 0.8]}
      finetune.lr: {loguniform: [3.0e-4, 3.0e-3]}
    objective: {val_acc: 1.0, val_eo: -1.0}   # a metric name, or weights: ACC - 1.0 * EO
    pareto: [val_acc, val_eo]                 # utility (up) against unfairness (down)

Each trial is a Tune function trainable that launches one TorchTrainer (the run of
:mod:`train.raytrain`, or of :mod:`egt.run`); a Train callback hands every epoch's (EGT: every
checkpoint's) metrics to the trial, which reports them to Tune, so ASHA can stop weak trials early.
The sweep resumes with ``Tuner.restore``: finished and failed trials are kept, interrupted ones
continue from their Train checkpoints.

The package: :mod:`.spec` (the YAML spec, validation, trial configs), :mod:`.kinds` (the
registry of sweep kinds), :mod:`.run` (Tune around the trainers, resume, collection) and
:mod:`.pareto` (Pareto front, chart, summary).

Outputs under ``<run>/sweep/<name>/``: ``trials.csv``/``trials.json`` (config, metrics,
status, checkpoint of every trial), ``pareto.png``, ``summary.md``, ``sweep.yaml`` and
``config.yaml`` (the base config).
"""

from aimfair_ray.sweep.pareto import pareto_front
from aimfair_ray.sweep.run import sweep
from aimfair_ray.sweep.spec import SweepSpec, check_space, concurrency, load_spec, trial_config

__all__ = ["SweepSpec", "load_spec", "sweep", "pareto_front", "trial_config", "check_space", "concurrency"]
