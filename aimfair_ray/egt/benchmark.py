"""The EGT results table: ERM, group-balanced reweighting and min–max fine-tuning (and, for
text, group-conditional fine-tuning) over seeds, beside the pretrained model.

For each objective and seed one EGT run (reused when finished). Per group: the quality
metrics; then their gap (max − min over groups) and the overall quality on the balanced
evaluation set. The targets compare min–max with ERM: the gap cut by ≥ 50%, the overall
quality worse by ≤ 5%. Writes ``<run>/egt/benchmark/<kind>/results.{md,csv,json}``.
"""

from __future__ import annotations

import numpy as np

from aimfair_ray.config import Config
from aimfair_ray.egt.run import finetune, group_names, pretrained_quality
from aimfair_ray.storage import atomic_write_text, write_json

OBJECTIVES = {"image": ("erm", "reweight", "minmax"), "text": ("erm", "reweight", "minmax", "conditional")}
METRICS = {"image": ("denoise", "fd"), "text": ("ppl",)}   # lower is better for all of them
PRIMARY = {"image": "denoise", "text": "ppl"}


def _stats(vals: list[float]) -> dict:
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, "values": vals}


def row(qualities: list[dict], kind: str, groups: list[str]) -> dict:
    """Mean ± std over seeds of each per-group metric, its gap and its overall value."""
    out = {}
    for m in METRICS[kind]:
        out[m] = {"groups": {g: _stats([q[m][g] for q in qualities]) for g in groups},
                  "gap": _stats([q["gap"][m] for q in qualities]),
                  "overall": _stats([q["overall"][m] for q in qualities])}
    if kind == "image":
        out["group_confirmed"] = {g: _stats([q["group_confirmed"][g] for q in qualities]) for g in groups}
    return out


def targets(table: dict, kind: str) -> dict:
    """Min–max against ERM on every metric: the gap cut and the change of overall quality."""
    out = {}
    if "erm" not in table or "minmax" not in table:
        return out
    for m in METRICS[kind]:
        e, x = table["erm"][m], table["minmax"][m]
        cut = 1 - x["gap"]["mean"] / e["gap"]["mean"] if e["gap"]["mean"] > 0 else float("nan")
        worse = x["overall"]["mean"] / e["overall"]["mean"] - 1
        out[m] = {"gap_cut": cut, "overall_worse": worse, "gap_target_met": bool(cut >= 0.5),
                  "overall_target_met": bool(worse <= 0.05)}
    return out


def to_markdown(res: dict) -> str:
    kind, groups, table = res["kind"], res["groups"], res["table"]
    lines = [f"# EGT on {kind}: {res['model']}", "",
             f"Seeds {', '.join(map(str, res['seeds']))}; {res['steps']} fine-tuning steps on a group-imbalanced set "
             f"({100 * (1 - res['minority_share']):.0f}% {groups[0]} / {100 * res['minority_share']:.0f}% {groups[1]}); "
             f"quality on {res['n_per_group']} held-out samples per group. Mean ± std over seeds; lower is better. "
             "Wall: training and quality time of all seeds' runs.", ""]
    for m in METRICS[kind]:
        lines += [f"## {m}", "", "| objective | " + " | ".join(groups) + " | gap | overall | wall (s) |",
                  "|---|" + "---|" * (len(groups) + 3)]
        for name, r in table.items():
            c = r[m]
            cells = [f"{c['groups'][g]['mean']:.4g} ± {c['groups'][g]['std']:.2g}" for g in groups]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {c['gap']['mean']:.4g} ± {c['gap']['std']:.2g} | "
                         f"{c['overall']['mean']:.4g} ± {c['overall']['std']:.2g} | {r.get('wall_s', '—')} |")
        t = res["targets"].get(m)
        if t:
            lines += ["", f"Min–max against ERM: gap cut {100 * t['gap_cut']:.1f}% (target ≥ 50%: "
                          f"{'met' if t['gap_target_met'] else 'not met'}), overall quality "
                          f"{'worse' if t['overall_worse'] > 0 else 'better'} by {100 * abs(t['overall_worse']):.1f}% "
                          f"(target ≤ 5% worse: {'met' if t['overall_target_met'] else 'not met'})."]
        lines.append("")
    if kind == "image":
        lines += ["## group confirmed by the checker (share of generated images in the requested colour)", "",
                  "| objective | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        for name, r in table.items():
            lines.append(f"| {name} | " + " | ".join(f"{r['group_confirmed'][g]['mean']:.3f}" for g in groups) + " |")
    return "\n".join(lines) + "\n"


def to_csv(res: dict) -> str:
    kind, groups = res["kind"], res["groups"]
    head = ["objective", "metric"] + [f"{g}_mean" for g in groups] + ["gap_mean", "gap_std", "overall_mean", "overall_std"]
    rows = [",".join(head)]
    for name, r in res["table"].items():
        for m in METRICS[kind]:
            c = r[m]
            rows.append(",".join([name, m] + [f"{c['groups'][g]['mean']:.6g}" for g in groups]
                                 + [f"{c['gap'][s]:.6g}" for s in ("mean", "std")]
                                 + [f"{c['overall'][s]:.6g}" for s in ("mean", "std")]))
    return "\n".join(rows) + "\n"


def benchmark_egt(cfg: Config, kind: str, seeds: list[int], objectives=None, log=print) -> dict:
    objectives = list(objectives or OBJECTIVES[kind])
    groups = group_names(cfg, kind)
    table = {"pretrained": dict(row([pretrained_quality(cfg, kind, log)], kind, groups), wall_s="—")}
    for obj in objectives:
        runs = []
        for s in seeds:
            c = cfg.model_copy(deep=True)
            c.egt.objective, c.egt.seed = obj, s
            log(f"benchmark egt {kind}: {obj}, seed {s}")
            runs.append(finetune(c, kind, log=log))
        # compute time of the runs (training + quality), also when this call reused them
        table[obj] = dict(row([r["quality"] for r in runs], kind, groups),
                          wall_s=round(sum(r["train_s"] + r["quality"].get("eval_s", 0) for r in runs)))
    e = cfg.egt
    model = (e.image.pipeline or "the embedded text-to-image model") if kind == "image" else (e.text.model or "SmolLM2-135M-Instruct")
    res = {"kind": kind, "model": model, "seeds": seeds, "groups": groups, "steps": e.steps,
           "minority_share": e.minority_share,
           "n_per_group": e.image.n_eval_per_group if kind == "image" else e.text.n_eval_per_group,
           "table": table, "targets": targets(table, kind)}
    out = cfg.stage_dir(f"egt/benchmark/{kind}")
    write_json(f"{out}/results.json", res)
    atomic_write_text(f"{out}/results.md", to_markdown(res))
    atomic_write_text(f"{out}/results.csv", to_csv(res))
    return dict(res, dir=out)
