"""A sweep's results: the Pareto front of utility against unfairness, the best trial, its
chart, the Markdown summary and the trials' CSV."""

from __future__ import annotations

from typing import Optional

from aimfair_ray.sweep.spec import HIGHER_IS_BETTER, SWEEP_METRICS, SweepSpec
from aimfair_ray.tables import csv_text, figure_png, markdown_table, pyplot


def pareto_front(points: list[tuple[float, float]], x_high: bool = True) -> list[int]:
    """Indices of the points no other point beats: x as high (``x_high``, else as low) and y as low,
    one strictly better."""
    if not x_high:
        points = [(-x, y) for x, y in points]
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 <= y) and (x2 > x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


def best_row(rows: list[dict], spec: SweepSpec) -> Optional[dict]:
    ok = [r for r in rows if r["status"] != "ERROR" and r["metrics"].get("objective") is not None]
    if not ok:
        return None
    pick = max if spec.mode == "max" else min
    # Early-stopped trials compete with their last epoch, as Tune's scope="last".
    return pick(ok, key=lambda r: r["metrics"]["objective"])


def pareto_chart(rows: list[dict], front: list[int], best: Optional[dict], spec: SweepSpec, title: str) -> bytes:
    xk, yk = spec.pareto
    ok = [r for r in rows if r["status"] != "ERROR" and xk in r["metrics"] and yk in r["metrics"]]
    fig, ax = pyplot().subplots(figsize=(5.6, 4.2), dpi=100)
    for status, marker in (("DONE", "o"), ("STOPPED", "x")):
        pts = [(r["metrics"][xk], r["metrics"][yk]) for r in ok if r["status"] == status]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, c="#95a5a6", label=f"{status.lower()} trials")
    fr = sorted((ok[i]["metrics"][xk], ok[i]["metrics"][yk]) for i in front)
    if fr:
        ax.plot(*zip(*fr), "-o", c="#e67e22", label="Pareto front")
    if best is not None:
        ax.scatter([best["metrics"][xk]], [best["metrics"][yk]], s=180, facecolors="none", edgecolors="#c0392b",
                   linewidths=2, label="best objective")
    for r in ok:
        ax.annotate(str(rows.index(r)), (r["metrics"][xk], r["metrics"][yk]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"{xk} ({'higher' if xk in HIGHER_IS_BETTER else 'lower'} is better)")
    ax.set_ylabel(f"{yk} (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def summary_md(rows, front_ids, best, spec, title, wall_s, test_audit) -> str:
    keys = list(spec.space)
    cols = ["objective", *dict.fromkeys([*spec.pareto, *(() if spec.egt else ("val_acc", "val_wst", "val_eo"))]),
            spec.time_attr]
    where = "held-out samples (egt.val_per_group per group)" if spec.egt else "the val split"
    lines = [f"# {title}", "", f"Objective: {spec.describe_objective()} on {where}. "
             f"Trials: {len(rows)} ({sum(r['status'] == 'DONE' for r in rows)} done, "
             f"{sum(r['status'] == 'STOPPED' for r in rows)} stopped early by ASHA, "
             f"{sum(r['status'] == 'ERROR' for r in rows)} failed). Wall time of this call: {wall_s:.0f} s.", ""]
    if best is not None:
        lines += [f"**Best trial** `{best['trial_id']}`: " + ", ".join(f"{k}={best['params'][k]}" for k in keys)
                  + f"; objective {best['metrics']['objective']:.4f}.", ""]
        if test_audit and spec.egt:
            lines += ["Best trial's quality on the whole evaluation set: "
                      + "; ".join(f"{m} {test_audit['overall'][m]:.4g} (gap {test_audit['gap'][m]:.4g})"
                                  for m in test_audit["overall"]), ""]
        elif test_audit:
            lines += ["Best trial on the test split: " + "  ".join(f"{k.upper()} {test_audit[k]:.4f}"
                                                                 for k in ("acc", "wst", "std", "eo")), ""]
    lines += markdown_table(["#", "trial", "status", *keys, *cols, "Pareto"],
                            [[i, r["trial_id"], r["status"], *(_fmt(r["params"][k]) for k in keys),
                              *(_fmt(r["metrics"].get(c)) for c in cols), "yes" if r["trial_id"] in front_ids else ""]
                             for i, r in enumerate(rows)])
    errs = [r for r in rows if r["error"]]
    if errs:
        lines += ["", "Failed trials:", ""] + [f"- `{r['trial_id']}`: {r['error']}" for r in errs]
    return "\n".join(lines) + "\n"


def trials_csv(rows: list[dict], spec: SweepSpec) -> str:
    keys = list(spec.space)
    mcols = list(SWEEP_METRICS) + ["objective", spec.time_attr]
    return csv_text(["trial_id", "status", *keys, *mcols, "trainings", "checkpoint", "model_dir", "error"],
                    [[r["trial_id"], r["status"], *[r["params"][k] for k in keys],
                      *[r["metrics"].get(c, "") for c in mcols], r["trainings"], r["checkpoint"] or "",
                      r["model_dir"] or "", r["error"] or ""] for r in rows])
