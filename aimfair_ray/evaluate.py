"""The audit: predictions on a labeled Parquet split (Ray Data, actor pool) -> the
fairness report as JSON, a per-cell accuracy chart as PNG and a terminal table."""

from __future__ import annotations

import numpy as np

from aimfair_ray import AimfairError
from aimfair_ray.data.io import check_split, decode_batch, files_sha, read_split, read_table
from aimfair_ray.metrics import INTERVAL_LEVEL, bootstrap_intervals, cell_intervals, fairness_report
from aimfair_ray.models import check_checkpoint_dir, load_classifier, weights_sha
from aimfair_ray.storage import atomic_write_bytes, exists, made_with, read_json, write_json


class Predictor:
    """Ray Data UDF: a checkpoint's predictions for batches of the image schema."""

    def __init__(self, model_dir: str, threads: int | None = 1, device: str = "cpu"):
        import torch

        if threads:  # an actor's own; None in the calling process, whose threads are left alone
            torch.set_num_threads(threads)
        self.device = device
        self.model, self.meta = load_classifier(model_dir)
        self.model.to(device)

    def __call__(self, batch: dict) -> dict:
        import torch

        from aimfair_ray.train.loop import predict

        dec = decode_batch(batch)
        b = {k: torch.from_numpy(np.asarray(v)) for k, v in dec.items()}
        out = predict(self.model, [b], self.meta["mean"], self.meta["std"], self.device)
        return {k: out[k] for k in ("target", "group", "pred", "prob")}


def predict_split(model_dir: str, split_dir: str, batch_size: int = 256, actors: int = 1, cpus: float = 0.5,
                  gpus: float = 0.0, local_max_rows: int = 0) -> dict:
    """Predictions in an actor pool of ``actors`` actors with ``cpus`` / ``gpus`` each (audit.* in config);
    a split of at most ``local_max_rows`` rows in this process (starting a pool costs more than it)."""
    import ray

    check_checkpoint_dir(model_dir)
    check_split(split_dir)
    if read_table(split_dir, ["id"]).num_rows <= local_max_rows:
        t = read_table(split_dir, ["image", "target", "group"])
        pred = Predictor(model_dir, threads=None)
        parts = [pred({c: t[c].to_numpy(zero_copy_only=False)[i:i + batch_size] for c in ("image", "target", "group")})
                 for i in range(0, t.num_rows, batch_size)]
        return {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, int)
                for k in ("target", "group", "pred", "prob")}
    from aimfair_ray.runtime import require

    require("the audit's actor pool", actors, cpus, gpus, "audit.actors, audit.cpus_per_actor or audit.gpus_per_actor")
    ds = read_split(split_dir)
    preds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_dir": model_dir, "threads": max(1, int(cpus)), "device": "cuda" if gpus else "cpu"},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus or None,
    )
    cols = preds.to_pandas()
    return {k: cols[k].to_numpy() for k in ("target", "group", "pred", "prob")}


def small_cells(report: dict, min_cell: int, what: str = "test images", knob: str = "audit.min_cell") -> list[str]:
    """Warnings for the cells with fewer than ``min_cell`` test images (their accuracy is noise)."""
    counts = report.get("cell_counts", {})
    return [f"cell {k} has {counts[k]} {what} (< {knob} {min_cell}): its accuracy"
            + (", which decides WST," if report["group_acc"][k] == report["wst"] else "") + " is noise"
            for k in report["group_acc"] if counts.get(k, min_cell) < min_cell]


ONE_CLASS = 0.98  # a model that predicts one class for this share of the images or more: EO and DP measure nothing


def one_class(report: dict, target_names: list | None = None) -> list[str]:
    """A warning when the model predicts (nearly) one class for every image: its EO and DP are then ~0 by
    construction, a constant, not a fair classifier."""
    per_class = np.asarray(list(report["confusion"].values())).sum((0, 1))  # predictions per class
    share = per_class.max() / max(per_class.sum(), 1)
    if share < ONE_CLASS:
        return []
    c = int(per_class.argmax())
    name = target_names[c] if target_names else f"class {c}"
    return [f"the model predicts {name} for {share:.1%} of the {int(per_class.sum())} images: its EO and DP are "
            "trivially near 0 (they measure nothing here) and ACC is that class's share; check the model "
            "(eval-mode BatchNorm statistics, pretrained weights, the learning rate) before reading this audit"]


def with_evidence(report: dict, y, p, s, n_boot: int, seed: int = 0, target_names: list | None = None) -> dict:
    """``report`` with what a reader needs to judge it: 95% bootstrap intervals of ACC, WST, STD, EO and DP
    (``n_boot`` replicates resampled within each (target, group) cell, seeded; none for 0) and the one-class
    warning (``trivial``: True when EO and DP are ~0 by construction)."""
    n_cls, n_grp = len(report["confusion"]["s0"]), len(report["confusion"])
    report["intervals"] = bootstrap_intervals(y, p, s, n_cls, n_grp, n_boot, seed) if n_boot else {}
    report["group_acc_intervals"] = cell_intervals(y, p, s, n_cls, n_grp, n_boot, seed) if n_boot else {}
    report["n_bootstrap"], report["interval_level"] = n_boot, INTERVAL_LEVEL
    said = one_class(report, target_names)
    report["trivial"] = bool(said)
    report["warnings"] = list(report.get("warnings", [])) + said
    return report


def fmt(report: dict, metric: str, digits: int = 4) -> str:
    """A metric with its interval, e.g. ``0.8123 [0.790, 0.831]``, and ``(trivial)`` for a one-class model's EO/DP."""
    out = f"{report[metric]:.{digits}f}"
    ci = report.get("intervals", {}).get(metric)
    if ci:
        out += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    if report.get("trivial") and metric in ("eo", "eod_worst", "dp"):
        out += " (trivial)"
    return out


WORST, BAR, LOW = "#c0392b", "#2e86c1", 0.012  # LOW: the drawn height of a 0.000 bar, so it stays visible


def group_acc_chart(report: dict, title: str, min_cell: int = 30) -> bytes:
    """Per-cell accuracy bars with each cell's n; the worst cell in red with a marker above it (also at 0),
    cells under ``min_cell`` test images hatched and flagged."""
    from aimfair_ray.tables import figure_png, pyplot

    keys = list(report["group_acc"])
    vals = [report["group_acc"][k] for k in keys]
    counts = report.get("cell_counts", {})
    tn, gn = report.get("target_names"), report.get("group_names")
    labels = [f"{tn[int(k[1:k.index('_')])]}\n{gn[int(k[k.index('_s') + 2:])]}" if tn and gn else k for k in keys]
    labels = [f"{lab}\nn={counts[k]}" if k in counts else lab for lab, k in zip(labels, keys)]
    small = [counts.get(k, min_cell) < min_cell for k in keys]
    fig, ax = pyplot().subplots(figsize=(max(4, 1.3 * len(keys)), 3.8), dpi=100)
    worst = min(vals)
    bars = ax.bar(labels, [max(v, LOW) for v in vals], color=[WORST if v == worst else BAR for v in vals],
                  hatch=None, edgecolor="k", linewidth=0.5)
    for b, s in zip(bars, small):
        if s:
            b.set_hatch("//")
    ax.axhline(report["acc"], ls="--", color="k", lw=1, label=f"ACC {report['acc']:.3f}")
    for b, v, s in zip(bars, vals, small):
        x = b.get_x() + b.get_width() / 2
        ax.text(x, max(v, LOW) + 0.01, f"{v:.3f}" + (" (n<%d!)" % min_cell if s else ""), ha="center", fontsize=8,
                color=WORST if s else "k")
        if v == worst:
            ax.plot([x], [max(v, LOW) + 0.07], marker="v", color=WORST, markersize=9)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy")
    warn = f"  ({sum(small)} cell(s) under {min_cell} images)" if any(small) else ""
    ax.set_title(f"{title}\nWST {report['wst']:.3f}  STD {report['std']:.3f}  EO {report['eo']:.3f}{warn}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def audit(model_dir: str, split_dir: str, out_dir: str, acfg=None, title: str | None = None) -> dict:
    """Evaluate ``model_dir`` on ``split_dir`` with the resources of ``acfg`` (an AuditConfig;
    None: its defaults); write audit.json and group_acc.png into ``out_dir``, and the model's card
    (``README.md`` in the Hugging Face format) with the audit's figures."""
    from aimfair_ray.config import AuditConfig

    acfg = acfg or AuditConfig()
    title = title or f"audit of {model_dir}"
    check_checkpoint_dir(model_dir)  # a missing or pickled checkpoint: a clear error before anything else
    key = _audit_key(model_dir, split_dir, title, acfg)
    if made_with(f"{out_dir}/run.json", key) is not None \
            and exists(f"{out_dir}/audit.json") and exists(f"{out_dir}/group_acc.png"):
        report = read_json(f"{out_dir}/audit.json")  # the same weights on the same files: nothing to redo
        write_card(model_dir, report)
        return report
    _, meta = load_classifier(model_dir)
    p = predict_split(model_dir, split_dir, acfg.batch_size, acfg.actors, acfg.cpus_per_actor, acfg.gpus_per_actor,
                      acfg.local_max_rows)
    if len(p["target"]) == 0:
        raise AimfairError(f"{split_dir} holds no rows to audit")
    report = audit_report(p["target"], p["pred"], p["group"], meta["target_names"], meta["group_names"],
                          acfg.min_cell, acfg.n_bootstrap, acfg.bootstrap_seed)
    report.update(model_dir=model_dir, split_dir=split_dir)
    write_json(f"{out_dir}/audit.json", report)
    atomic_write_bytes(f"{out_dir}/group_acc.png", group_acc_chart(report, title, acfg.min_cell))
    write_json(f"{out_dir}/run.json", key)
    write_card(model_dir, report)
    return report


def audit_report(y, p, s, target_names: list, group_names: list, min_cell: int, n_boot: int, seed: int = 0,
                 knob: str = "audit.min_cell") -> dict:
    """An audit of predictions ``p``: the fairness figures, the class and group names, the small-cell warnings
    (``knob`` names the setting) and the evidence (:func:`with_evidence`)."""
    report = fairness_report(y, p, s, len(target_names), len(group_names))
    report.update(target_names=list(target_names), group_names=list(group_names), min_cell=min_cell,
                  warnings=small_cells(report, min_cell, knob=knob))
    return with_evidence(report, y, p, s, n_boot, seed, list(target_names))


def write_card(model_dir: str, report: dict) -> None:
    """The model folder's Hugging Face card (``README.md``) with this audit's figures and intervals."""
    import yaml

    from aimfair_ray.modelcard import CARD, classifier_card
    from aimfair_ray.models import META
    from aimfair_ray.storage import atomic_write_text, base_name, parent, read_text

    meta = read_json(f"{model_dir}/{META}")
    conf = f"{parent(model_dir)}/config.yaml"
    config = yaml.safe_load(read_text(conf)) if exists(conf) else None
    card = classifier_card(meta, report, config, split=base_name(report.get("split_dir", "test")))
    atomic_write_text(f"{model_dir}/{CARD}", str(card))


def _audit_key(model_dir: str, split_dir: str, title: str, acfg) -> dict | None:
    """What decides an audit: the weights, the split's files, the chart's title, the small-cell bar and the
    bootstrap's replicates and seed."""
    return {"weights": weights_sha(model_dir), "split": str(split_dir), "title": title, "min_cell": acfg.min_cell,
            "files": files_sha(split_dir), "n_bootstrap": acfg.n_bootstrap, "bootstrap_seed": acfg.bootstrap_seed}


def _cell(r: dict, c: str) -> str:
    """A cell's accuracy and its n, red with a "!" under ``min_cell`` images."""
    acc, n = f"{r['group_acc'].get(c, float('nan')):.4f}", r.get("cell_counts", {}).get(c)
    return acc if n is None else f"[red]{acc} ({n}!)[/]" if n < r.get("min_cell", 0) else f"{acc} ({n})"


def table(reports: dict[str, dict]):
    """A rich table: one row per model, headline metrics with their 95% intervals (``[lo, hi]``; EO and DP
    marked trivial for a one-class model) and each cell's accuracy with its n (a cell under ``audit.min_cell``
    images in red with a "!"); the warnings as its caption."""
    from rich.table import Table

    first = next(iter(reports.values()))
    cells = list(first["group_acc"])
    t = Table(title="fairness audit", show_lines=False)
    for col in ["model", "ACC", "WST", "STD", "EO", "EOD(worst)", "DP", "n"] + [f"{c} (n)" for c in cells]:
        t.add_column(col, justify="right" if col != "model" else "left")
    warnings = []
    for name, r in reports.items():
        t.add_row(name, *[fmt(r, k) for k in ("acc", "wst", "std", "eo", "eod_worst", "dp")], str(r["n"]),
                  *[_cell(r, c) for c in cells])
        warnings += [f"{name}: {w}" for w in r.get("warnings", [])]
    if warnings:
        t.caption = "[red]warning:[/] " + "\n[red]warning:[/] ".join(warnings)
    return t


__all__ = ["audit", "predict_split", "table", "group_acc_chart", "with_evidence", "fmt"]
