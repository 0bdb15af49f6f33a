"""The EGT results table: ERM, group-balanced reweighting and min–max fine-tuning (and, for
text, group-conditional fine-tuning) over seeds, beside the pretrained model.

For each objective and seed one EGT run (reused when finished). Per group: the quality
metrics; then their gap (max − min over groups) and the overall quality on the balanced
evaluation set. Each row names its setting: ``conditional`` (the group named in the caption or
tag) or ``unconditional`` (images: sampled without it and sorted into groups by the checker).
The targets compare min–max with ERM: the gap cut by ≥ 50%, the overall quality worse by ≤ 5%
(for precision, recall, density and coverage, higher is better: worse means lower).
Writes ``<run>/egt/benchmark/<task>/results.{md,csv,json}``.
"""

from __future__ import annotations

from aimfair_ray.config import Config
from aimfair_ray.egt.quality import HIGHER_IS_BETTER
from aimfair_ray.egt.run import group_names, pretrained_quality, train_generator
from aimfair_ray.egt.tasks import get
from aimfair_ray.storage import atomic_write_text, write_json
from aimfair_ray.tables import csv_text, machine, markdown_table, mean_std, summary, verdict


def row(qualities: list[dict], task: str, groups: list[str]) -> dict:
    """Mean ± std over seeds of each per-group metric, its gap and its overall value."""
    out = {}
    for m in get(task).metrics:
        out[m] = {"groups": {g: mean_std([q[m][g] for q in qualities]) for g in groups},
                  "gap": mean_std([q["gap"][m] for q in qualities]),
                  "overall": mean_std([q["overall"][m] for q in qualities])}
    for m in get(task).extra_metrics:
        if all(m in q for q in qualities):
            out[m] = {g: mean_std([q[m][g] for q in qualities]) for g in groups}
    return out


SETTINGS = {
    "image": "Setting: unconditional (the colour is not in the captions; generated images sorted into groups by the "
             "checker, with rejection sampling) or conditional (each group's images drawn from captions naming it).",
    "text": "Setting: unconditional (plain sentences) or conditional (each sentence, in training and evaluation, after "
            "its group tag, which is not scored).",
}


def setting(objective: str) -> str:
    return "conditional" if objective == "conditional" else "unconditional"


def targets(table: dict, task: str) -> dict:
    """Min–max against ERM on every metric: the gap cut and the change of overall quality."""
    out = {}
    if "erm" not in table or "minmax" not in table:
        return out
    for m in get(task).metrics:
        e, x = table["erm"][m], table["minmax"][m]
        cut = 1 - x["gap"]["mean"] / e["gap"]["mean"] if e["gap"]["mean"] > 0 else float("nan")
        ratio = x["overall"]["mean"] / e["overall"]["mean"] if e["overall"]["mean"] else float("nan")
        worse = 1 - ratio if m in HIGHER_IS_BETTER else ratio - 1
        out[m] = {"gap_cut": cut, "overall_worse": worse, "gap_target_met": bool(cut >= 0.5),
                  "overall_target_met": bool(worse <= 0.05)}
    return out


def paired(table: dict, task: str) -> dict:
    """Min–max minus ERM, paired per seed (both rows' values are in seed order), of every metric's gap and overall
    quality: the mean difference, its 95% interval over seeds, and what the interval decides ("better": min–max's
    gap smaller, its overall quality better)."""
    out = {}
    if "erm" not in table or "minmax" not in table:
        return out
    for m in get(task).metrics:
        out[m] = {}
        for part, higher in (("gap", False), ("overall", m in HIGHER_IS_BETTER)):
            e, x = table["erm"][m][part]["values"], table["minmax"][m][part]["values"]
            if len(e) == len(x):
                d = dict(summary([b - a for a, b in zip(e, x)]), n=len(e))
                out[m][part] = dict(d, decided=verdict(d, higher))
    return out


def _pm(v: dict) -> str:
    return f"{v['mean']:.4g} ± {v['std']:.2g}"


def to_markdown(res: dict) -> str:
    task, groups, table = res["task"], res["groups"], res["table"]
    pair = paired(table, task)
    lines = [f"# EGT on {task}: {res['model']}", "",
             f"Seeds {', '.join(map(str, res['seeds']))}; {res['steps']} fine-tuning steps on a group-imbalanced set "
             f"({100 * (1 - res['minority_share']):.0f}% {groups[0]} / {100 * res['minority_share']:.0f}% {groups[1]}); "
             f"quality on {res['n_per_group']} held-out samples per group. Mean ± std over seeds. "
             "Wall: training and quality time of all seeds' runs. " + SETTINGS[task], ""]
    for m in get(task).metrics:
        better = "higher" if m in HIGHER_IS_BETTER else "lower"
        lines += [f"## {m} ({better} is better)", ""] + markdown_table(
            ["objective", "setting", *groups, "gap", "overall", "wall (s)"],
            [[name.split(" ")[0], r.get("setting", "—"), *(_pm(r[m]["groups"][g]) for g in groups), _pm(r[m]["gap"]),
              _pm(r[m]["overall"]), r.get("wall_s", "—")] for name, r in table.items()])
        t, d = res["targets"].get(m), pair.get(m, {})
        if t:
            lines += ["", f"Min–max against ERM: gap cut {100 * t['gap_cut']:.1f}% (target ≥ 50%: "
                          f"{'met' if t['gap_target_met'] else 'not met'}), overall quality "
                          f"{'worse' if t['overall_worse'] > 0 else 'better'} by {100 * abs(t['overall_worse']):.1f}% "
                          f"(target ≤ 5% worse: {'met' if t['overall_target_met'] else 'not met'})."]
        if d:
            lines += ["Paired per seed, min–max minus ERM (95% interval; what it decides): " + "; ".join(
                f"{part} {v['mean']:+.4g} [{v['ci95'][0]:+.4g}, {v['ci95'][1]:+.4g}], {v['decided']}"
                for part, v in d.items()) + "."]
        lines.append("")
    for m, title in get(task).extra_metrics.items():
        rows = [[name.split(" ")[0], r.get("setting", "—"), *(f"{r[m][g]['mean']:.3f}" for g in groups)]
                for name, r in table.items() if m in r]
        if rows:
            lines += [f"## {title}", ""] + markdown_table(["objective", "setting", *groups], rows) + [""]
    return "\n".join(lines) + "\n"


def published_markdown(res: dict) -> str:
    """The table with its command, machine and wall time after the title."""
    head = (f"Command: `{res['command']}`\n\n" if res.get("command") else "") + (
        f"Machine: {res['machine']}. Wall time of this command: {res['wall_s'] / 60:.1f} min (finished runs are "
        "reused; the wall column is each row's own training and quality time).\n")
    title, rest = to_markdown(res).split("\n", 1)
    return f"{title}\n\n{head}{rest}"


def to_csv(res: dict) -> str:
    task, groups = res["task"], res["groups"]
    head = ["objective", "setting", "metric"] + [f"{g}_mean" for g in groups] + ["gap_mean", "gap_std", "overall_mean",
                                                                                  "overall_std"]
    return csv_text(head, [[name.split(" ")[0], r.get("setting", ""), m, *(f"{r[m]['groups'][g]['mean']:.6g}" for g in groups),
                            *(f"{r[m]['gap'][s]:.6g}" for s in ("mean", "std")),
                            *(f"{r[m]['overall'][s]:.6g}" for s in ("mean", "std"))]
                           for name, r in res["table"].items() for m in get(task).metrics])


def benchmark_egt(cfg: Config, task: str, seeds: list[int], objectives=None, log=print, publish: str | None = None,
                  command: str | None = None) -> dict:
    """Every objective's runs over the seeds, then the table. ``publish``: also write
    ``<publish>.{md,json}`` with ``command``, the wall time and the machine
    (e.g. ``benchmarks/results/egt-image``)."""
    import time

    t0 = time.time()
    objectives = list(objectives or get(task).objectives)
    groups = group_names(cfg, task)
    table = {}
    for where in dict.fromkeys(setting(o) for o in objectives):  # the model before fine-tuning, in each setting
        c = cfg.model_copy(deep=True)
        c.egt.objective = "conditional" if where == "conditional" else "erm"
        name = "pretrained" if len(table) == 0 else f"pretrained ({where})"
        table[name] = dict(row([pretrained_quality(c, task, log)], task, groups), wall_s="—", setting=where)
    for obj in objectives:
        runs = []
        for s in seeds:
            c = cfg.model_copy(deep=True)
            c.egt.objective, c.egt.seed = obj, s
            log(f"benchmark egt {task}: {obj}, seed {s}")
            runs.append(train_generator(c, task, log=log))
        # compute time of the runs (training + quality), also when this call reused them
        table[obj] = dict(row([r["quality"] for r in runs], task, groups), setting=setting(obj),
                          wall_s=round(sum(r["train_s"] + r["quality"].get("eval_s", 0) for r in runs)))
    e = cfg.egt
    model = get(task).model_name(cfg)
    res = {"task": task, "model": model, "seeds": seeds, "groups": groups, "steps": e.steps,
           "minority_share": e.minority_share, "update": e.update, "eta": e.eta, "ema": e.ema,
           "n_buckets": e.n_buckets if get(task).noise_levels else None,
           "n_per_group": get(task).settings(cfg).n_eval_per_group,
           "table": table, "targets": targets(table, task)}
    res.update(wall_s=round(time.time() - t0), machine=machine(), command=command, config=cfg.outcome())
    out = cfg.stage_dir(f"egt/benchmark/{task}")
    md = to_markdown(res)
    write_json(f"{out}/results.json", res)
    atomic_write_text(f"{out}/results.md", md)
    atomic_write_text(f"{out}/results.csv", to_csv(res))
    if publish:
        write_json(f"{publish}.json", res)
        atomic_write_text(f"{publish}.md", published_markdown(res))
        log(f"benchmark egt {task}: published {publish}.md and .json")
    return dict(res, dir=out)
