"""The Python API, for notebooks: the stages the ``aimfair`` command runs, and audits as objects.

    from aimfair_ray import api

    cfg = api.config("cmnist", overrides=["train.epochs=1"])    # a preset, layers, --set style overrides
    api.prepare(cfg)                                            # the real splits
    api.generate(cfg)                                           # prompts, images (and the filter if on)
    base = api.train(cfg)                                       # the biased baseline ("group_dro", "jtt" too)
    tuned = api.finetune(cfg, "selective")                      # any registered fine-tuning method
    a = api.audit(cfg, tuned["model_dir"])                      # an Audit of the run's test split
    a.summary                                                   # ACC, WST, STD, EO, DP with 95% intervals
    a.by_cell                                                   # each (target, group) cell: n, accuracy, interval

and any PyTorch classifier on your own labelled images, without this project's checkpoint format::

    a = api.audit_classifier(model, images, targets, groups, transform=my_preprocessing)

Every function is the one the CLI calls (``aimfair_ray.pipeline``), so a notebook and a job give the
same figures for the same config and seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from aimfair_ray.config import Config, load_config

__all__ = ["Audit", "audit", "audit_classifier", "config", "finetune", "generate", "prepare", "train"]


def config(preset: str = "cmnist", layers: Sequence[str] = (), overrides: Sequence[str] = ()) -> Config:
    """A run's config: a shipped preset (or a YAML file), layers merged over it (``cpu``, ``gpu``,
    ``aimfair-official``, your files) and ``key=value`` overrides, validated."""
    return load_config(preset, list(layers), list(overrides))


def prepare(cfg: Config, force: bool = False, log=print) -> dict:
    """Write the dataset's splits (train, val, test, ...); returns the dataset's metadata."""
    from aimfair_ray.pipeline import run_prepare

    return run_prepare(cfg, force=force, log=log)


def generate(cfg: Config, what: str = "all", force: bool = False, log=print) -> dict:
    """CSDG: ``prompts``, ``images`` or ``all`` (then the filter when ``generate.filter``)."""
    from aimfair_ray.pipeline import run_generate

    return run_generate(cfg, what, force=force, log=log)


TRAINERS = {"baseline": "run_baseline", "group_dro": "run_group_dro", "jtt": "run_jtt"}


def train(cfg: Config, what: str = "baseline", force: bool = False, log=print) -> dict:
    """Train on the real data: the ERM ``baseline``, ``group_dro`` (uses group labels) or ``jtt``; returns the
    run's result (``model_dir``, ``history``, ...)."""
    from aimfair_ray import AimfairError, pipeline

    if what not in TRAINERS:
        raise AimfairError(f"train {what!r}: choose one of {', '.join(TRAINERS)}")
    return getattr(pipeline, TRAINERS[what])(cfg, force=force, log=log)


def finetune(cfg: Config, method: Optional[str] = None, force: bool = False, log=print) -> dict:
    """Fine-tune the run's baseline on the synthetic sets with a registered method (default
    ``finetune.method``); the sets are generated first where missing."""
    from aimfair_ray.pipeline import ensure_synthetic, run_finetune

    ensure_synthetic(cfg, log=log)
    return run_finetune(cfg, method, force=force, log=log)


@dataclass
class Audit:
    """A fairness audit: ``report`` is what ``audit.json`` holds; ``summary`` and ``by_cell`` are its figures as
    pandas frames (as fairlearn's ``MetricFrame`` gives ``overall`` and ``by_group``), with their intervals."""

    report: dict
    warnings: list = field(init=False)

    def __post_init__(self):
        self.warnings = list(self.report.get("warnings", []))

    @property
    def summary(self):
        """One row per metric: value, ci_low, ci_high (the 95% bootstrap interval; NaN without one)."""
        import pandas as pd

        ci = self.report.get("intervals") or {}
        rows = [{"metric": m, "value": self.report[m], "ci_low": ci.get(m, [np.nan])[0],
                 "ci_high": ci.get(m, [np.nan, np.nan])[1]} for m in ("acc", "wst", "std", "eo", "dp")]
        return pd.DataFrame(rows).set_index("metric")

    @property
    def by_cell(self):
        """One row per (target, group) cell: its names, n, accuracy and the accuracy's interval."""
        import pandas as pd

        tn = self.report.get("target_names") or []
        gn = self.report.get("group_names") or []
        ci = self.report.get("group_acc_intervals") or {}
        rows = []
        for cell, acc in self.report["group_acc"].items():
            c, g = (int(x[1:]) for x in cell.split("_"))
            rows.append({"cell": cell, "target": tn[c] if c < len(tn) else c, "group": gn[g] if g < len(gn) else g,
                         "n": self.report.get("cell_counts", {}).get(cell), "accuracy": acc,
                         "ci_low": ci.get(cell, [np.nan])[0], "ci_high": ci.get(cell, [np.nan, np.nan])[1]})
        return pd.DataFrame(rows).set_index("cell")

    @property
    def one_class(self) -> bool:
        """The model predicts (nearly) one class for every image: its EO and DP measure nothing."""
        return bool(self.report.get("trivial"))

    def __repr__(self) -> str:
        from aimfair_ray.evaluate import fmt

        return "Audit(" + ", ".join(f"{m.upper()} {fmt(self.report, m, 3)}" for m in ("acc", "wst", "eo")) + ")"


def audit(cfg: Config, model_dir: Optional[str] = None, split: Optional[str] = None, log=print) -> Audit:
    """Audit a model folder (default: the run's baseline) on a split (default ``audit.split``) with the config's
    bootstrap settings; writes ``audit/`` beside the model and its model card, as ``aimfair audit`` does."""
    from aimfair_ray.pipeline import run_audit

    return Audit(run_audit(cfg, model_dir, split, log=log))


def audit_classifier(model, images, targets, groups, transform: Optional[Callable] = None, batch_size: int = 64,
                     target_names: Optional[list] = None, group_names: Optional[list] = None,
                     n_bootstrap: int = 1000, seed: int = 0, device: str = "cpu", min_cell: int = 30) -> Audit:
    """Audit any PyTorch classifier on labelled images, in this process: ``images`` are what ``transform`` takes
    (default: uint8 arrays ``[N, H, W, 3]`` scaled to [0, 1] and put channels-first), ``targets`` and ``groups``
    one integer each per image; the model's argmax is the prediction."""
    import torch

    from aimfair_ray import AimfairError
    from aimfair_ray.evaluate import audit_report

    y, s = np.asarray(targets, dtype=int), np.asarray(groups, dtype=int)
    if not len(images) == len(y) == len(s):
        raise AimfairError(f"audit_classifier: {len(images)} images, {len(y)} targets and {len(s)} groups: give one "
                           "target and one group per image")
    to_input = transform or (lambda b: torch.as_tensor(np.asarray(b), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0)
    model = model.to(device).eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            preds.append(model(to_input(images[i:i + batch_size]).to(device)).argmax(1).cpu().numpy())
    p = np.concatenate(preds)
    n_cls = int(max(y.max(), p.max()) + 1) if target_names is None else len(target_names)
    n_grp = int(s.max() + 1) if group_names is None else len(group_names)
    return Audit(audit_report(y, p, s, target_names or [f"class {c}" for c in range(n_cls)],
                              group_names or [f"group {g}" for g in range(n_grp)], min_cell, n_bootstrap, seed,
                              knob="min_cell"))
