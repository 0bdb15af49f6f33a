"""The AIM-Fair results table: baseline, fine-tuning methods and Group DRO over seeds.

For every seed: train the ERM baseline (that seed), fine-tune it with each method
(that seed), train Group DRO (that seed), and audit all of them on the test split.
Writes ``<run>/benchmark/aimfair/results.{md,csv,json}`` and a chart; reruns reuse
every finished run.
"""

from __future__ import annotations

import math

import numpy as np

from aimfair_ray.config import Config
from aimfair_ray.metrics import HEADLINE
from aimfair_ray.reports import csv_text, figure_png, markdown_table, mean_std, pyplot
from aimfair_ray.storage import atomic_write_bytes, atomic_write_text, write_json


def rows() -> tuple[str, ...]:
    """The table's rows: the baseline, every registered fine-tuning method, then Group DRO."""
    from aimfair_ray.train.methods import METHODS

    return ("baseline", *METHODS, "group_dro")


def _audit(cfg: Config, model_dir: str, title: str) -> dict:
    from aimfair_ray.data.prepare import split_dir
    from aimfair_ray.evaluate import audit

    return audit(model_dir, split_dir(cfg, cfg.audit.split), f"{model_dir.rstrip('/').rsplit('/', 1)[0]}/audit",
                 cfg.audit, title=title)


def run_seed(cfg: Config, seed: int, methods=None, log=print) -> dict[str, dict]:
    from aimfair_ray.train.baseline import train_baseline, train_group_dro
    from aimfair_ray.train.finetune import finetune
    from aimfair_ray.train.methods import METHODS

    methods = methods or rows()
    scfg = cfg.model_copy(deep=True)
    scfg.train.seed = seed
    scfg.finetune.seed = seed
    root = f"benchmark/aimfair/seed{seed}"
    out = {}
    base = train_baseline(scfg, log=log, stage=f"{root}/baseline")
    if "baseline" in methods:
        out["baseline"] = _audit(scfg, base["model_dir"], f"baseline, seed {seed}")
    for m in METHODS:
        if m in methods:
            res = finetune(scfg, m, log=log, stage=f"{root}/{m}", baseline_dir=base["model_dir"])
            out[m] = dict(_audit(scfg, res["model_dir"], f"{m}, seed {seed}"),
                          epoch_time_s=float(np.mean([h["epoch_time_s"] for h in res["history"]])),
                          trainable_fraction=res["selection"]["trainable_fraction"])
    if "group_dro" in methods:
        res = train_group_dro(scfg, log=log, stage=f"{root}/group_dro")
        out["group_dro"] = _audit(scfg, res["model_dir"], f"group_dro, seed {seed}")
    return out


def aggregate(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Mean and sample std over seeds of each method's metrics."""
    methods = [m for m in rows() if all(m in r for r in per_seed.values())]
    table = {}
    for m in methods:
        row = {}
        for k in HEADLINE + ("epoch_time_s", "trainable_fraction"):
            vals = [r[m][k] for r in per_seed.values() if r[m].get(k) is not None]
            if vals:
                row[k] = mean_std(vals)
        table[m] = row
    return table


def selection_rule(metric: str) -> str:
    """How every row picked its epoch, as the tables print it."""
    if metric == "last":
        return "the last epoch"
    labels = " (uses group labels)" if metric == "val_wst" else " (no group labels)"
    return f"the best {metric} on val{labels}"


def to_markdown(table: dict, seeds: list[int], title: str, select_metric: str = "val_acc") -> str:
    def cell(r, k, scale=100):
        v = r.get(k)
        return "—" if v is None else f"{scale * v['mean']:.1f} ± {scale * v['std']:.1f}"

    lines = [f"# {title}", "", f"Seeds: {', '.join(map(str, seeds))}. Test split; mean ± std over seeds, in %. "
             f"Every row's epoch: {selection_rule(select_metric)}.", ""]
    body = []
    for m, r in table.items():
        tf, et = r.get("trainable_fraction"), r.get("epoch_time_s")
        trained = "100%" if m in ("baseline", "group_dro") else "—" if tf is None else f"{100 * tf['mean']:.1f}%"
        body.append([m, cell(r, "acc"), cell(r, "wst"), cell(r, "std"), cell(r, "eo"), trained,
                     "—" if et is None else f"{et['mean']:.2f}"])
    lines += markdown_table(["method", "ACC ↑", "WST ↑", "STD ↓", "EO ↓", "trained weights", "epoch time (s)"], body)
    return "\n".join(lines) + "\n"


def to_csv(table: dict) -> str:
    head = ["method"] + [f"{k}_{s}" for k in HEADLINE for s in ("mean", "std")] + ["epoch_time_s_mean", "trainable_fraction_mean"]
    return csv_text(head, [[m, *(f"{r[k][s]:.6f}" for k in HEADLINE for s in ("mean", "std")),
                            *(f"{r[k]['mean']:.6f}" if k in r else "" for k in ("epoch_time_s", "trainable_fraction"))]
                           for m, r in table.items()])


def chart(table: dict, title: str) -> bytes:
    methods = list(table)
    fig, axes = pyplot().subplots(1, len(HEADLINE), figsize=(3.2 * len(HEADLINE), 3.2), dpi=100)
    for ax, k in zip(axes, HEADLINE):
        means = [table[m][k]["mean"] for m in methods]
        stds = [0 if math.isnan(table[m][k]["std"]) else table[m][k]["std"] for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, capsize=3,
               color=["#7f8c8d" if m == "baseline" else "#e67e22" if m == "selective" else "#2e86c1" for m in methods])
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(k.upper(), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def benchmark_aimfair(cfg: Config, seeds: list[int], methods=None, log=print) -> dict:
    per_seed = {}
    for s in seeds:
        log(f"benchmark: seed {s}")
        per_seed[s] = run_seed(cfg, s, methods, log=log)
    table = aggregate(per_seed)
    out = cfg.stage_dir("benchmark/aimfair")
    title = f"AIM-Fair on {cfg.data.dataset} ({cfg.model.backbone})"
    write_json(f"{out}/results.json", {"seeds": seeds, "select_metric": cfg.train.select_metric,
                                       "selection": selection_rule(cfg.train.select_metric), "table": table, "per_seed": {
        str(s): {m: {k: r[k] for k in HEADLINE + ("eod_worst", "dp", "group_acc")} for m, r in res.items()}
        for s, res in per_seed.items()}})
    atomic_write_text(f"{out}/results.md", to_markdown(table, seeds, title, cfg.train.select_metric))
    atomic_write_text(f"{out}/results.csv", to_csv(table))
    atomic_write_bytes(f"{out}/results.png", chart(table, title))
    cfg.save(out)
    return {"dir": out, "table": table, "seeds": seeds}
