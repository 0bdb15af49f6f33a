"""The AIM-Fair results table: the baseline, every fine-tuning method, the project-default
selective recipe, JTT, Group DRO and the oracle rows, over seeds.

For every seed: train the ERM baseline (that seed), fine-tune it with each method (that seed; the
selection mask is recomputed from that seed's baseline), train JTT and Group DRO (that seed), and
audit all of them on the test split. The oracle rows fine-tune on *real* balanced images (the
generator split) with the same choice of tensors, which tells the method's effect apart from the
synthetic data's quality. Writes ``<run>/benchmark/aimfair/results.{md,csv,json,png}``; reruns
reuse every finished run.
"""

from __future__ import annotations

import math

import numpy as np

from aimfair_ray.config import Config, FinetuneConfig
from aimfair_ray.metrics import HEADLINE
from aimfair_ray.storage import atomic_write_bytes, atomic_write_text, exists, write_json
from aimfair_ray.tables import csv_text, figure_png, machine, markdown_table, pyplot, summary, verdict

EXTRA_ROWS = {  # rows beyond the baseline and the registered fine-tuning methods, in table order
    "selective_project": "selective with the project's default fine-tuning recipe (AdamW lr 1e-3, batch 32, eval-mode "
                         "scores, k 0.5, BatchNorm statistics kept, no augmentation), as many epochs as the other rows",
    "jtt": "Just Train Twice: ERM, then ERM again with its train errors upweighted (no group labels)",
    "group_dro": "Group DRO on the real data (uses group labels)",
    "oracle_full": "full fine-tuning on real balanced images (the generator split), not synthetic ones",
    "oracle_selective": "selective (the synthetic scores' tensors) fine-tuned on real balanced images",
}
GROUP_LABELS = ("group_dro",)  # rows that train with group labels
REAL_ONLY = ("baseline", "jtt", "group_dro")  # rows that need no synthetic set
HIGHER = {"acc": True, "wst": True, "std": False, "eo": False}  # which way is better
PAIRED_AGAINST = ("baseline", "full", "random", "linear")


def rows() -> tuple[str, ...]:
    """The table's rows: the baseline, every registered fine-tuning method, then the extra rows."""
    from aimfair_ray.train.methods import METHODS

    return ("baseline", *METHODS, *EXTRA_ROWS)


def _audit(cfg: Config, model_dir: str, title: str) -> dict:
    from aimfair_ray.data.prepare import split_dir
    from aimfair_ray.evaluate import audit

    return audit(model_dir, split_dir(cfg, cfg.audit.split), f"{model_dir.rstrip('/').rsplit('/', 1)[0]}/audit",
                 cfg.audit, title=title)


def project_config(cfg: Config) -> Config:
    """``cfg`` with the project's default fine-tuning recipe and no augmentation; the synthetic sets, the
    seed and the number of epochs stay the run's (both selective rows train as long)."""
    p = cfg.model_copy(deep=True)
    keep = ("seed", "epochs", "synthetic", "synthetic_imbalanced", "score_samples", "deepspeed", "zero_stage")
    p.finetune = FinetuneConfig(**{k: getattr(cfg.finetune, k) for k in keep})
    p.train.augment = "none"
    return p


def finished_rows(cfg: Config, seed: int, methods) -> list[str]:
    """The rows of ``methods`` whose runs for ``seed`` have finished (their ``result.json`` exists)."""
    root = cfg.stage_dir(f"benchmark/aimfair/seed{seed}")
    if not exists(f"{root}/baseline/result.json"):
        return []
    return [m for m in methods if exists(f"{root}/{m}/result.json")]


def run_seed(cfg: Config, seed: int, methods=None, log=print, finished_only: bool = False) -> dict[str, dict]:
    """Train (or reuse) and audit the rows of one seed; ``finished_only``: train nothing, audit the rows
    whose runs have finished."""

    methods = methods or rows()
    scfg = cfg.model_copy(deep=True)
    scfg.train.seed = seed
    scfg.finetune.seed = seed
    root = f"benchmark/aimfair/seed{seed}"
    if finished_only:
        methods = finished_rows(scfg, seed, methods)
        if not methods:
            return {}
    from aimfair_ray.workgroup import shared_workers

    # every run of the seed (baseline, scores, fine-tuning, JTT, Group DRO, oracles) on one worker group;
    # the audits after it closes (an audit's actor pool may need the devices the group holds)
    with shared_workers(scfg.train, scfg.ray_storage, f"{scfg.name}-{root.replace('/', '-')}"):
        runs = _train_seed(scfg, methods, root, log)
    out = {}
    for row, res in runs.items():
        title = {"baseline": "baseline", "selective_project": "selective (project defaults)"}.get(row, row)
        out[row] = _audit(scfg, res["model_dir"], f"{title}, seed {seed}")
        if "selection" in res:  # fine-tuned rows
            out[row].update(epoch_time_s=float(np.mean([h["epoch_time_s"] for h in res["history"]])),
                            trainable_fraction=res["selection"]["trainable_fraction"])
        if row == "jtt":
            out[row]["n_errors"] = res["n_errors"]
    return out


def _train_seed(scfg: Config, methods, root: str, log) -> dict[str, dict]:
    """Train (or reuse) the runs of the rows of ``methods``; returns each row's run result."""
    from aimfair_ray.train.baseline import train_baseline, train_group_dro
    from aimfair_ray.train.finetune import finetune
    from aimfair_ray.train.jtt import train_jtt
    from aimfair_ray.train.methods import METHODS

    out = {}
    base = train_baseline(scfg, log=log, stage=f"{root}/baseline")
    if "baseline" in methods:
        out["baseline"] = base
    for m in METHODS:
        if m in methods:
            out[m] = finetune(scfg, m, log=log, stage=f"{root}/{m}", baseline_dir=base["model_dir"])
    if "selective_project" in methods:
        out["selective_project"] = finetune(project_config(scfg), "selective", log=log, stage=f"{root}/selective_project",
                                            baseline_dir=base["model_dir"], scores_stage=f"{root}/scores_project")
    if "jtt" in methods:
        out["jtt"] = train_jtt(scfg, log=log, stage=f"{root}/jtt")
    if "group_dro" in methods:
        out["group_dro"] = train_group_dro(scfg, log=log, stage=f"{root}/group_dro")
    real = scfg.paths.split("generator")
    for m in ("full", "selective"):
        if f"oracle_{m}" not in methods:
            continue
        if not exists(real):
            log(f"benchmark: no real balanced set ({real}: Colored MNIST's generator split); skipping oracle_{m}")
            continue
        out[f"oracle_{m}"] = finetune(scfg, m, log=log, stage=f"{root}/oracle_{m}", baseline_dir=base["model_dir"],
                                      real_set=real, scores_stage=f"{root}/scores")
    return out


def official(cell_accs: list[dict]) -> dict:
    """The official code's aggregation: average each cell's accuracy over seeds, then WST (the minimum)
    and STD (np.std, population) of those averages."""
    cells = sorted(set.intersection(*(set(c) for c in cell_accs)))
    avg = np.array([np.mean([c[k] for c in cell_accs]) for k in cells])
    return {"wst": float(avg.min()), "std": float(avg.std()), "cells": dict(zip(cells, avg.tolist()))}


def one_class(audit: dict) -> bool:
    """Whether an audit's model predicts (nearly) one class for every image: its ``trivial`` flag, or, in a
    per-seed record from before audits carried it, read off a two-class audit's cell accuracies and counts."""
    from aimfair_ray.evaluate import ONE_CLASS

    if "trivial" in audit:
        return bool(audit["trivial"])
    acc, n = audit.get("group_acc", {}), audit.get("cell_counts", {})
    if not acc or set(acc) != set(n) or {k.split("_")[0] for k in acc} != {"y0", "y1"}:
        return False
    ones = sum(n[k] * (acc[k] if k.startswith("y1") else 1 - acc[k]) for k in acc)  # images predicted class 1
    return max(ones, sum(n.values()) - ones) >= ONE_CLASS * sum(n.values())


def aggregate(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Per row, over the seeds that have it: each metric's summary (per-seed values), the official
    aggregation, and the seeds."""
    table = {}
    for m in [m for m in rows() if any(m in r for r in per_seed.values())]:
        have = {s: r[m] for s, r in per_seed.items() if m in r}
        row = {"seeds": sorted(have)}
        for k in HEADLINE + ("epoch_time_s", "trainable_fraction"):
            vals = [r[k] for r in have.values() if r.get(k) is not None]
            if vals:
                row[k] = summary(vals)
        row["official"] = official([r["group_acc"] for r in have.values()])
        row["one_class_seeds"] = sorted(s for s, r in have.items() if one_class(r))
        table[m] = row
    return table


def paired(per_seed: dict[int, dict[str, dict]], ref: str = "selective", against=PAIRED_AGAINST) -> dict:
    """Per-seed differences ``ref - other`` of each headline metric: summary and wins (seeds where
    ``ref`` is better)."""
    out = {}
    for o in against:
        both = [r for r in per_seed.values() if ref in r and o in r]
        if not both:
            continue
        out[o] = {}
        for k in HEADLINE:
            d = [r[ref][k] - r[o][k] for r in both]
            out[o][k] = dict(summary(d), wins=int(sum((x > 0) if HIGHER[k] else (x < 0) for x in d)), n=len(d))
    return out


def versus_baseline(per_seed: dict[int, dict[str, dict]]) -> dict:
    """Every row minus the baseline, paired per seed (as :func:`paired` gives it, with the row as ``ref``)."""
    out = {}
    for m in (m for m in rows() if m != "baseline"):
        d = paired(per_seed, ref=m, against=("baseline",))
        if d:
            out[m] = d["baseline"]
    return out


def _ci(d: dict) -> str:
    """A paired difference's 95% interval in points, e.g. ``[-2.9, +28.5]``."""
    return f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"


def _paired_cell(d: dict, k: str) -> str:
    """A paired-table cell: mean difference, its interval, the wins, and what the interval decides."""
    return f"{100 * d[k]['mean']:+.1f} {_ci(d[k])} {d[k]['wins']}/{d[k]['n']}, {verdict(d[k], HIGHER[k])}"


def comparisons(table: dict, per_seed: dict[int, dict[str, dict]]) -> dict:
    """What a benchmark's JSON derives from its per-seed figures: selective against the other rows, every row
    against the baseline, and the paper's claims."""
    pair = paired(per_seed)
    return {"paired": pair, "versus_baseline": versus_baseline(per_seed), "targets": targets(table, pair)}


def targets(table: dict, pair: dict) -> list[dict]:
    """The paper's claims for selective, checked two-sided, each with what the paired per-seed differences
    decide ("decided": better / worse / not decided at n seeds; for the ACC claim, inside / outside ±2 points)."""
    out = []
    if "selective" in table and "baseline" in table:
        s, b = table["selective"], table["baseline"]
        gain = 100 * (s["wst"]["mean"] - b["wst"]["mean"])
        d = pair.get("baseline", {}).get("wst")
        above = d is not None and d["n"] > 1 and d["ci95"][0] > 0
        out.append({"target": "WST at least 10 points above the baseline, the paired interval above 0",
                    "measured": f"{gain:+.1f} points" + (f" {_ci(d)}" if d else ""),
                    "met": gain >= 10 and above, "decided": verdict(d, True) if d else "no paired seeds"})
        d = pair.get("baseline", {}).get("eo")
        one = s.get("one_class_seeds", [])
        out.append({"target": "EO at most half the baseline's", "measured":
                    f"{100 * s['eo']['mean']:.1f} vs {100 * b['eo']['mean']:.1f}"
                    + (f" ({len(one)} seed(s) one-class: EO 0 by construction)" if one else ""),
                    "met": s["eo"]["mean"] <= b["eo"]["mean"] / 2 and not one,
                    "decided": ("not decided: one-class models" if one else verdict(d, False) if d else "no paired seeds")})
    if "selective" in table and "full" in table:
        gap = 100 * (table["selective"]["acc"]["mean"] - table["full"]["acc"]["mean"])
        d = pair.get("full", {}).get("acc")
        lo, hi = (100 * d["ci95"][0], 100 * d["ci95"][1]) if d else (float("nan"),) * 2
        decided = ("no paired seeds" if not d else "inside ±2 points" if -2 <= lo and hi <= 2
                   else "outside ±2 points" if hi < -2 or lo > 2 else f"not decided at {d['n']} seeds")
        out.append({"target": "ACC within ±2 points of full fine-tuning", "measured": f"{gap:+.1f} points"
                    + (f" [{lo:+.1f}, {hi:+.1f}]" if d else ""), "met": abs(gap) <= 2, "decided": decided})
    if "random" in pair:
        w, n = pair["random"]["wst"]["wins"], pair["random"]["wst"]["n"]
        need = math.ceil(0.8 * n)
        out.append({"target": f"WST above random in at least {need} of {n} seeds (8 of 10)", "measured": f"{w} of {n}",
                    "met": w >= need, "decided": verdict(pair["random"]["wst"], True)})
    return out


def selection_rule(metric: str) -> str:
    """How every row picked its epoch, as the tables print it."""
    if metric == "last":
        return "the last epoch"
    labels = " (uses group labels)" if metric == "val_wst" else " (no group labels)"
    return f"the best {metric} on val{labels}"


def _pct(v: dict, key: str = "mean") -> str:
    return f"{100 * v[key]:.1f}"


def to_markdown(table: dict, seeds: list[int], title: str, select_metric: str = "val_acc", pair: dict | None = None,
                header: list[str] | None = None, vs_base: dict | None = None) -> str:
    def cell(r, k):
        v = r.get(k)
        return "—" if v is None else f"{_pct(v)} ± {_pct(v, 'std')}"

    lines = [f"# {title}", "", *(header or []),
             f"Seeds: {', '.join(map(str, seeds))}. Test split; mean ± std over seeds (per-seed values), in %. "
             f"WST* and STD*: the official code's aggregation (each cell's accuracy averaged over seeds first). "
             f"Every row's epoch: {selection_rule(select_metric)}.", ""]
    body = []
    for m, r in table.items():
        tf, et = r.get("trainable_fraction"), r.get("epoch_time_s")
        trained = "100%" if tf is None else f"{100 * tf['mean']:.1f}%"
        name = f"{m} (group labels)" if m in GROUP_LABELS else m
        off = r.get("official", {})
        one = r.get("one_class_seeds", [])
        name += f" ({len(one)} one-class)" if one else ""
        body.append([name, len(r.get("seeds", seeds)), cell(r, "acc"), cell(r, "wst"), cell(r, "std"), cell(r, "eo"),
                     f"{100 * off['wst']:.1f}" if off else "—", f"{100 * off['std']:.1f}" if off else "—", trained,
                     "—" if et is None else f"{et['mean']:.2f}"])
    lines += markdown_table(["row", "seeds", "ACC ↑", "WST ↑", "STD ↓", "EO ↓", "WST* ↑", "STD* ↓", "trained weights",
                             "epoch time (s)"], body)
    lines += ["", "95% intervals of the mean over seeds (Student t), in %:", ""]
    lines += markdown_table(["row", *(k.upper() for k in HEADLINE)],
                            [[m, *(f"[{100 * r[k]['ci95'][0]:.1f}, {100 * r[k]['ci95'][1]:.1f}]" for k in HEADLINE)]
                             for m, r in table.items()])
    if vs_base:
        lines += ["", "Each row minus the baseline, paired per seed (points; 95% interval; seeds where the row is "
                  "better; what the interval decides):", ""]
        lines += markdown_table(["row vs baseline", *(k.upper() for k in HEADLINE)],
                                [[m, *(_paired_cell(d, k) for k in HEADLINE)] for m, d in vs_base.items()])
    if pair:
        lines += ["", "Paired per-seed differences, selective minus the row (points; 95% interval; seeds where "
                  "selective is better):", ""]
        lines += markdown_table(["selective vs", *(k.upper() for k in HEADLINE)],
                                [[o, *(_paired_cell(d, k) for k in HEADLINE)] for o, d in pair.items()])
    goals = targets(table, pair or {})
    if goals:
        lines += ["", "Targets (selective): the paper's claims, checked two-sided; \"decided\" is what the paired "
                  "per-seed differences settle at this many seeds:", ""]
        lines += markdown_table(["target", "measured", "met", "decided"],
                                [[g["target"], g["measured"], "yes" if g["met"] else "**no**", g["decided"]] for g in goals])
    if any(r.get("one_class_seeds") for r in table.values()):
        lines += ["", "A row marked *one-class* has seeds whose model predicts (nearly) one class for every test image: "
                  "its EO and DP are 0 by construction there, not a fairness gain."]
    rows_help = {m: h for m, h in EXTRA_ROWS.items() if m in table}
    if rows_help:
        lines += ["", *[f"- `{m}`: {h}" for m, h in rows_help.items()]]
    return "\n".join(lines) + "\n"


def to_csv(table: dict) -> str:
    head = (["method"] + [f"{k}_{s}" for k in HEADLINE for s in ("mean", "std", "ci95_low", "ci95_high")]
            + ["official_wst", "official_std", "epoch_time_s_mean", "trainable_fraction_mean"])
    return csv_text(head, [[m, *(f"{v:.6f}" for k in HEADLINE for v in (r[k]["mean"], r[k]["std"], *r[k]["ci95"])),
                            f"{r['official']['wst']:.6f}", f"{r['official']['std']:.6f}",
                            *(f"{r[k]['mean']:.6f}" if k in r else "" for k in ("epoch_time_s", "trainable_fraction"))]
                           for m, r in table.items()])


def chart(table: dict, title: str) -> bytes:
    """Each headline metric per row: the mean with its 95% interval, and every seed as a dot."""
    methods = list(table)
    fig, axes = pyplot().subplots(1, len(HEADLINE), figsize=(3.4 * len(HEADLINE), 3.6), dpi=100)
    for ax, k in zip(axes, HEADLINE):
        means = [table[m][k]["mean"] for m in methods]
        err = [[0 if math.isnan(x) else x for x in (table[m][k]["mean"] - table[m][k]["ci95"][0],
                                                    table[m][k]["ci95"][1] - table[m][k]["mean"])] for m in methods]
        ax.bar(range(len(methods)), means, yerr=np.array(err).T, capsize=3,
               color=["#7f8c8d" if m == "baseline" else "#e67e22" if m.startswith("selective") else
                      "#a9cce3" if m.startswith("oracle") else "#2e86c1" for m in methods])
        for i, m in enumerate(methods):
            vals = table[m][k]["values"]
            ax.plot([i] * len(vals), vals, "k.", ms=3)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=7)
        ax.set_title(k.upper() + (" ↑" if HIGHER[k] else " ↓"), fontsize=9)
        ax.set_ylim(0, 1.05)  # every headline metric is a rate: intervals of few seeds can reach past it
    fig.suptitle(title + " (bars: mean and 95% interval; dots: seeds)", fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def render(result: dict) -> str:
    """The markdown tables of a benchmark's ``results.json``: the same file always gives the same page (a page
    re-rendered after the tables' code changed says so, with the command that did it)."""
    c = result["config"]
    title = f"AIM-Fair on {c['data']['dataset']} ({c['model']['backbone']})"
    n_run = result.get("n_seeds_run", len(result["seeds"]))
    header = [f"Command: `{result['command']}`" if result.get("command") else "",
              f"Machine: {result['machine']}. Wall time of this command: {result['wall_s'] / 60:.1f} min for {n_run} "
              "seed(s) (finished runs are reused: a rerun, or a --finished-only table, takes only the audits)."
              + (" Tabulated with --finished-only: each row over the seeds whose run finished."
                 if result.get("finished_only") else ""), ""]
    if result.get("rendered"):
        r = result["rendered"]
        header[-1:] = [f"Tables re-rendered from the JSON on {r['date']} by `{r['command']}` (the runs' figures are "
                       "unchanged; the claims and verdicts follow the current code).", ""]
    return to_markdown(result["table"], result["seeds"], title, result["select_metric"], result["paired"], header,
                       result.get("versus_baseline"))


def rerender(path: str, command: str) -> str:
    """Recompute a published benchmark's paired differences and claims from its per-seed figures, and write its
    ``.json`` and ``.md`` again (``path`` without the suffix): for when the tables' code changed, not the runs."""
    import datetime

    from aimfair_ray.storage import read_json

    result = read_json(f"{path}.json")
    per_seed = {int(s): r for s, r in result["per_seed"].items()}
    for m, row in result["table"].items():
        row["one_class_seeds"] = sorted(s for s, r in per_seed.items() if m in r and one_class(r[m]))
    result.update(comparisons(result["table"], per_seed))
    result["rendered"] = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "machine": machine()}
    write_json(f"{path}.json", result)
    atomic_write_text(f"{path}.md", render(result))
    return f"{path}.md"


def benchmark_aimfair(cfg: Config, seeds: list[int], methods=None, log=print, publish: str | None = None,
                      command: str | None = None, finished_only: bool = False) -> dict:
    """Every seed's rows, then the tables. ``publish``: also write ``<publish>.{md,json,png}`` with
    ``command``, the wall time and the machine (e.g. ``benchmarks/results/aimfair-cmnist``).
    ``finished_only``: train nothing; tabulate the runs that finished (each row over its seeds)."""
    import time

    t0 = time.time()
    per_seed = {}
    for s in seeds:
        log(f"benchmark: seed {s}")
        t = time.time()
        per_seed[s] = run_seed(cfg, s, methods, log=log, finished_only=finished_only)
        log(f"benchmark: seed {s} took {time.time() - t:.0f}s")
    per_seed = {s: r for s, r in per_seed.items() if r}
    if not per_seed:
        from aimfair_ray import AimfairError

        raise AimfairError("no finished runs to tabulate: run `aimfair benchmark aimfair` without --finished-only")
    table = aggregate(per_seed)
    out = cfg.stage_dir("benchmark/aimfair")
    title = f"AIM-Fair on {cfg.data.dataset} ({cfg.model.backbone})"
    wall = time.time() - t0
    result = {"seeds": sorted(per_seed), "finished_only": finished_only, "select_metric": cfg.train.select_metric,
              "selection": selection_rule(cfg.train.select_metric), "table": table, **comparisons(table, per_seed),
              "rows": {m: EXTRA_ROWS.get(m, m) for m in table},
              "wall_s": wall, "machine": machine(), "command": command, "config": cfg.outcome(),
              "per_seed": {str(s): {m: {k: r[k] for k in HEADLINE + ("eod_worst", "dp", "group_acc", "cell_counts", "trivial")
                                    if k in r}
                                    for m, r in res.items()} for s, res in per_seed.items()}}
    result["n_seeds_run"] = len(seeds)
    md = render(result)
    png = chart(table, title)
    write_json(f"{out}/results.json", result)
    atomic_write_text(f"{out}/results.md", md)
    atomic_write_text(f"{out}/results.csv", to_csv(table))
    atomic_write_bytes(f"{out}/results.png", png)
    cfg.save(out)
    if publish:
        write_json(f"{publish}.json", result)
        atomic_write_text(f"{publish}.md", md)
        atomic_write_bytes(f"{publish}.png", png)
        log(f"benchmark: published {publish}.md, .json and .png")
    return {"dir": out, "table": table, "seeds": sorted(per_seed), "paired": result["paired"]}
