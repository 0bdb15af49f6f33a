"""A sweep spec: what varies (config paths and their distributions), what is optimised, and
how the search runs; its validation, the trial configs and how many trials fit at once."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aimfair_ray import AimfairError
from aimfair_ray.config import Config, apply_override, format_validation_error, set_value
from aimfair_ray.sweep.kinds import KINDS, SweepKind, get

SWEEP_DIR = Path(__file__).parent.parent / "presets" / "sweeps"
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
SWEEP_METRICS = (  # what a trial reports and a spec may name (EGT: val_quality, its gap; lower is better)
    "val_acc", "val_wst", "val_eo", "val_std", "val_gap", "val_loss", "train_loss", "train_acc",
    "val_quality", "val_quality_gap")
HIGHER_IS_BETTER = frozenset({"val_acc", "val_wst", "train_acc"})


class Asha(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    grace_period: int = Field(1, ge=1, description="epochs (EGT: steps) every trial runs before it may be stopped")
    reduction_factor: float = Field(2, gt=1)


class SweepSpec(BaseModel):
    """A sweep: what varies, what is optimised, and how the search runs."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(description="a sweep kind registered in sweep/kinds.py")
    space: dict[str, dict[str, list]] = Field(min_length=1)
    objective: Union[str, dict[str, float]] = "val_wst"
    mode: Literal["max", "min"] = "max"
    pareto: tuple[str, str] = ("val_acc", "val_eo")
    num_samples: int = Field(1, ge=1, description="draws of the space (a grid is repeated this often)")
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="null: as many as the cluster's resources hold")
    asha: Asha = Asha()
    overrides: list[str] = Field([], description="--set style overrides applied to every trial's config")

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in KINDS:
            raise ValueError(f"unknown sweep kind {v!r}; choose one of {', '.join(KINDS)}")
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict) -> dict:
        for key, dist in v.items():
            if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ValueError(f"space.{key}: give exactly one of {', '.join(DISTRIBUTIONS)}, e.g. {{grid: [1, 2]}}")
            (how, vals), = dist.items()
            if not vals:
                raise ValueError(f"space.{key}.{how}: empty list")
            if how in ("uniform", "loguniform"):
                if len(vals) != 2 or not all(isinstance(x, (int, float)) for x in vals) or vals[0] >= vals[1]:
                    raise ValueError(f"space.{key}.{how}: expected [low, high] numbers with low < high, got {vals}")
                if how == "loguniform" and vals[0] <= 0:
                    raise ValueError(f"space.{key}.loguniform: bounds must be > 0, got {vals}")
        return v

    @field_validator("objective", "pareto")
    @classmethod
    def _metrics(cls, v):
        bad = [m for m in ([v] if isinstance(v, str) else list(v)) if m not in SWEEP_METRICS]
        if bad:
            raise ValueError(f"unknown metric(s) {bad}; allowed: {', '.join(SWEEP_METRICS)}")
        return v

    @property
    def registered(self) -> SweepKind:
        """What this sweep's trials train (:mod:`.kinds`)."""
        return get(self.kind)

    @property
    def egt(self) -> str | None:
        """The EGT task a sweep of EGT fine-tuning runs (image, text), else None."""
        return self.registered.egt

    @property
    def time_attr(self) -> str:
        return self.registered.time_attr

    @property
    def n_trials(self) -> int:
        """How many trials the sweep runs: ``num_samples`` draws of every grid point."""
        return self.num_samples * math.prod(len(d["grid"]) for d in self.space.values() if "grid" in d)

    @property
    def weights(self) -> dict[str, float]:
        return {self.objective: 1.0} if isinstance(self.objective, str) else dict(self.objective)

    def describe_objective(self) -> str:
        parts = []
        for i, (m, c) in enumerate(self.weights.items()):
            sign = ("- " if c < 0 else "+ ") if i else ("-" if c < 0 else "")
            parts.append(f"{sign}{'' if abs(c) == 1 else f'{abs(c):g}*'}{m}")
        return " ".join(parts) + f" ({self.mode})"


def load_spec(kind: str, path: Optional[str] = None) -> SweepSpec:
    """The shipped sweep for ``kind``, or a user YAML."""
    from aimfair_ray import renamed

    if kind == "minmax":
        kind = renamed("sweep minmax").split()[1]
    src = Path(path) if path else SWEEP_DIR / f"{kind}.yaml"
    if not src.is_file():
        raise AimfairError(f"sweep file {src} does not exist" if path else
                           f"unknown sweep {kind!r}; choose {', '.join(KINDS)}")  # a registered kind ships its YAML
    try:
        raw = yaml.safe_load(src.read_text()) or {}
    except yaml.YAMLError as e:
        raise AimfairError(f"{src}: not valid YAML ({e})") from None
    raw.setdefault("kind", kind)
    if raw["kind"] == "minmax":
        raw["kind"] = renamed("sweep minmax").split()[1]
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise AimfairError(f"invalid sweep {src}:\n" + "\n".join(lines)) from None
    if spec.kind != kind:
        raise AimfairError(f"{src} is a {spec.kind!r} sweep; run `aimfair sweep {spec.kind}`")
    return spec


def trial_config(base: Config, params: dict, spec: SweepSpec) -> Config:
    """A trial's config: the base, the sweep's overrides, then the sampled values."""
    raw = base.model_dump(mode="json")
    for item in spec.overrides:
        raw = apply_override(raw, item)
    for key, value in params.items():
        raw = set_value(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise AimfairError(format_validation_error(e, f"trial config {params}")) from None


def check_space(base: Config, spec: SweepSpec) -> None:
    """Every listed value (and both bounds of a range) must make a valid config: fail before any trial runs."""
    for key, dist in spec.space.items():
        for value in next(iter(dist.values())):
            trial_config(base, {key: value}, spec)


def param_space(spec: SweepSpec) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: make[how](vals) for key, dist in spec.space.items() for how, vals in dist.items()}


# Ray Data splits the CPUs the Train workers leave among the datasets being read, in whole
# CPUs; each trial reads two (train, val), so it needs 2 CPUs beside its workers or it stalls.
DATA_CPUS_PER_TRIAL = 2


def concurrency(cfg: Config, spec: SweepSpec, resources: dict) -> int:
    """Trials that fit at once: each holds its Train workers plus a CPU for each dataset it reads
    (an EGT trial reads none through Ray Data)."""
    tc = cfg.train
    data_cpus = 0 if spec.egt else DATA_CPUS_PER_TRIAL
    n = int(resources.get("CPU", 1) // (tc.num_workers * tc.cpus_per_worker + data_cpus))
    if tc.use_gpu:
        n = min(n, int(resources.get("GPU", 0) // max(tc.num_workers * tc.gpus_per_worker, 1e-9)))
    if n < 1:
        raise AimfairError(f"one trial needs {tc.num_workers} worker(s) x {tc.cpus_per_worker} CPU"
                           + (f" and {tc.gpus_per_worker} GPU" if tc.use_gpu else "")
                           + f" plus {data_cpus} CPUs for its data, but the cluster has {resources}; "
                           "lower train.num_workers")
    return max(1, min(n, spec.max_concurrent_trials or n))
