"""The audit: predictions on a labeled Parquet split (Ray Data, actor pool) -> the
fairness report as JSON, a per-cell accuracy chart as PNG and a terminal table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aimfair_ray import AimfairError
from aimfair_ray.data.io import decode_batch, read_split
from aimfair_ray.metrics import fairness_report
from aimfair_ray.models import check_checkpoint_dir, load_classifier, weights_sha
from aimfair_ray.storage import atomic_write_bytes, exists, is_uri, read_json, write_json


class Predictor:
    """Ray Data UDF: a checkpoint's predictions for batches of the image schema."""

    def __init__(self, model_dir: str, threads: int = 1, device: str = "cpu"):
        import torch

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
                  gpus: float = 0.0) -> dict:
    """Predictions in an actor pool of ``actors`` actors with ``cpus`` / ``gpus`` each (audit.* in config)."""
    import ray

    check_checkpoint_dir(model_dir)
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


def group_acc_chart(report: dict, title: str) -> bytes:
    from aimfair_ray.reports import figure_png, pyplot

    keys = list(report["group_acc"])
    vals = [report["group_acc"][k] for k in keys]
    tn, gn = report.get("target_names"), report.get("group_names")
    labels = [f"{tn[int(k[1:k.index('_')])]}\n{gn[int(k[k.index('_s') + 2:])]}" if tn and gn else k for k in keys]
    fig, ax = pyplot().subplots(figsize=(max(4, 1.3 * len(keys)), 3.4), dpi=100)
    bars = ax.bar(labels, vals, color=["#c0392b" if v == min(vals) else "#2e86c1" for v in vals])
    ax.axhline(report["acc"], ls="--", color="k", lw=1, label=f"ACC {report['acc']:.3f}")
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nWST {report['wst']:.3f}  STD {report['std']:.3f}  EO {report['eo']:.3f}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def audit(model_dir: str, split_dir: str, out_dir: str, acfg=None, title: str | None = None) -> dict:
    """Evaluate ``model_dir`` on ``split_dir`` with the resources of ``acfg`` (an AuditConfig;
    None: its defaults); write audit.json and group_acc.png into ``out_dir``."""
    from aimfair_ray.config import AuditConfig

    acfg = acfg or AuditConfig()
    title = title or f"audit of {model_dir}"
    check_checkpoint_dir(model_dir)  # a missing or pickled checkpoint: a clear error before anything else
    key = _audit_key(model_dir, split_dir, title)
    if key is not None and exists(f"{out_dir}/run.json") and read_json(f"{out_dir}/run.json") == key \
            and exists(f"{out_dir}/audit.json") and exists(f"{out_dir}/group_acc.png"):
        return read_json(f"{out_dir}/audit.json")  # the same weights on the same files: nothing to redo
    _, meta = load_classifier(model_dir)
    p = predict_split(model_dir, split_dir, acfg.batch_size, acfg.actors, acfg.cpus_per_actor, acfg.gpus_per_actor)
    if len(p["target"]) == 0:
        raise AimfairError(f"{split_dir} holds no rows to audit")
    report = fairness_report(p["target"], p["pred"], p["group"], meta["num_classes"], len(meta["group_names"]))
    report.update({"model_dir": model_dir, "split_dir": split_dir,
                   "target_names": meta["target_names"], "group_names": meta["group_names"]})
    write_json(f"{out_dir}/audit.json", report)
    atomic_write_bytes(f"{out_dir}/group_acc.png", group_acc_chart(report, title))
    if key is not None:
        write_json(f"{out_dir}/run.json", key)
    return report


def _audit_key(model_dir: str, split_dir: str, title: str) -> dict | None:
    """What decides an audit: the weights, the split's files, and the chart's title (None for a split
    on object storage: always recomputed)."""
    if is_uri(split_dir):
        return None
    files = sorted(Path(split_dir).glob("*.parquet"))
    return {"weights": weights_sha(model_dir), "split": str(split_dir), "title": title,
            "files": [[f.name, f.stat().st_size] for f in files]}


def table(reports: dict[str, dict]):
    """A rich table: one row per model, headline metrics and each cell's accuracy."""
    from rich.table import Table

    first = next(iter(reports.values()))
    cells = list(first["group_acc"])
    t = Table(title="fairness audit", show_lines=False)
    for col in ["model", "ACC", "WST", "STD", "EO", "EOD(worst)", "DP", "n"] + cells:
        t.add_column(col, justify="right" if col != "model" else "left")
    for name, r in reports.items():
        t.add_row(name, *[f"{r[k]:.4f}" for k in ("acc", "wst", "std", "eo", "eod_worst", "dp")], str(r["n"]),
                  *[f"{r['group_acc'].get(c, float('nan')):.4f}" for c in cells])
    return t


__all__ = ["audit", "predict_split", "table", "group_acc_chart"]
