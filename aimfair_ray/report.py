"""``aimfair report``: one self-contained HTML page of a run (images inlined), for whatever stages ran:
the data (cell counts, real examples per cell), the synthetic sets (sample grids with prompts,
backend, generator, kept fractions, throughput), every audited model side by side (metrics, per-cell
accuracies and sizes, one comparison chart), the selection (scores chart, trained tensors), results
of benchmarks, EGT and sweeps, and provenance (config, versions, stage times). Built from the files
the stages wrote (Jinja2 and matplotlib); it reads, never runs, a stage."""

from __future__ import annotations

import base64
import json
import platform
import time
from pathlib import Path

from aimfair_ray.manifest import MANIFEST
from aimfair_ray.storage import atomic_write_text, base_name, local_copy

METRICS = ("acc", "wst", "std", "eo")


def _b64(png: bytes | None) -> str | None:
    return base64.b64encode(png).decode() if png else None


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _data(run: Path, src: str) -> dict | None:
    from aimfair_ray.data.samples import sample_grid

    meta = _json(run / "data" / "dataset.json")
    if not meta:
        return None
    cells = sorted({c for s in meta["splits"].values() for c in s.get("cell_counts", {})})
    rows = [{"split": name, "n": s.get("n"), "cells": [s.get("cell_counts", {}).get(c, 0) for c in cells]}
            for name, s in meta["splits"].items()]
    grid = sample_grid(f"{src}/data/train", "real train images, first by id", meta["target_names"],
                       meta["group_names"]) if (run / "data" / "train").is_dir() else None
    return {"meta": meta, "cells": cells, "rows": rows, "grid": _b64(grid),
            "bias": (meta.get("config") or {}).get("bias"), "names": (meta["target_names"], meta["group_names"])}


def _synthetic(run: Path, src: str, names) -> dict | None:
    from aimfair_ray.data.io import first_row
    from aimfair_ray.data.samples import sample_grid

    syn = run / "synthetic"
    if not syn.is_dir():
        return None
    prompts = _json(syn / "prompts" / "report.json") or {}
    filt = _json(syn / "filter.json") or {}
    out = []
    for d in sorted(p for p in syn.iterdir() if p.is_dir() and p.name != "prompts"
                    and (any(p.glob("*.parquet")) or (p / MANIFEST).is_file())):
        shards = f"{src}/synthetic/{d.name}"  # the set where it lives (its shards are not copied here)
        png = (d / "samples.png").read_bytes() if (d / "samples.png").is_file() else \
            sample_grid(shards, d.name, *(names or (None, None)))
        gen = first_row(shards, ["generator"])["generator"]  # every set is in the image schema
        base = d.name.removesuffix("_filtered")
        out.append({"name": d.name, "grid": _b64(png), "stats": _json(d / "stats.json"),
                    "imported": _json(d / "import.json"), "generator": json.loads(gen) if gen else None,
                    "filter": filt.get(base) if d.name.endswith("_filtered") else None})
    return {"prompts": prompts, "sets": out} if out else None


def _models(run: Path) -> dict | None:
    from aimfair_ray.tables import figure_png, pyplot

    audits = {}
    for f in sorted(run.rglob("audit/audit.json")):
        rep = _json(f)
        if rep and "acc" in rep:
            audits[str(f.parent.parent.relative_to(run)) or "baseline"] = rep
    if not audits:
        return None
    cells = sorted({c for r in audits.values() for c in r.get("group_acc", {})})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cells), 3.0))
    width = 0.8 / len(audits)
    for i, (name, r) in enumerate(audits.items()):
        accs = [r.get("group_acc", {}).get(c, 0) for c in cells]
        ax.bar([j + i * width for j in range(len(cells))], accs, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))], cells)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy per (target, group) cell")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return {"audits": audits, "cells": cells, "chart": _b64(figure_png(fig))}


def _selection(run: Path) -> list[dict]:
    out = []
    for f in sorted(run.rglob("selection.json")):
        info = _json(f) or {}
        png = f.parent / "selection.png"
        out.append({"stage": str(f.parent.relative_to(run)), "info": info,
                    "chart": _b64(png.read_bytes()) if png.is_file() else None})
    return out


def _results(run: Path) -> list[dict]:
    """Benchmark, EGT and sweep tables (results.md) and their charts."""
    out = []
    for md in sorted(run.rglob("results.md")):
        if "ray" in md.relative_to(run).parts:
            continue
        out.append({"where": str(md.parent.relative_to(run)), "table": md.read_text(),
                    "charts": [_b64(p.read_bytes()) for p in sorted(md.parent.glob("*.png"))]})
    return out


def _provenance(run: Path) -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for pkg in ("aimfair-ray", "ray", "torch", "diffusers", "transformers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    configs = sorted(run.rglob("config.yaml"), key=lambda p: p.stat().st_mtime)
    times = {}
    stages = run / "logs" / "stages.jsonl"  # each stage run through the pipeline, timed (the last 40)
    records = [json.loads(x) for x in stages.read_text().splitlines() if x.strip()][-40:] if stages.is_file() else []
    for r in records:
        failed = "" if r["status"] == "done" else ", failed"
        times[f"{r['stage']} (started {r['started'].replace('T', ' ')}{failed})"] = r["seconds"]
    for f in [] if records else sorted(run.rglob("result.json")):  # runs from before stage times were kept
        r = _json(f) or {}
        secs = r.get("wall_s") or sum(h.get("epoch_time_s", 0) for h in r.get("history", []))
        if secs:
            label = "" if r.get("wall_s") else " (training epochs only)"
            times[f"{f.parent.relative_to(run)}{label}"] = round(float(secs), 1)
    for f in sorted((run / "synthetic").glob("*/stats.json")) if (run / "synthetic").is_dir() and not records else []:
        r = _json(f) or {}
        if r.get("seconds"):
            times[f"synthetic/{f.parent.name} (generation, all sets)"] = r["seconds"]
    demo = _json(run / "demo.json")
    if demo:
        times["the whole demo (aimfair demo)"] = demo["wall_s"]
    return {"versions": versions, "config": configs[-1].read_text() if configs else None,
            "config_from": str(configs[-1].relative_to(run)) if configs else None, "times": times}


def build_report(run_dir: str) -> str:
    """The HTML of a run's report."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    src = run_dir.rstrip("/")
    # on a store: its records, fetched once per content (not the last report, which would change the key each time)
    run = Path(local_copy(src, skip=("ray", "report.html", ".parquet", ".safetensors")))
    data = _data(run, src)
    env = Environment(loader=PackageLoader("aimfair_ray", "templates"), autoescape=select_autoescape())
    return env.get_template("report.html").render(
        name=base_name(src), when=time.strftime("%Y-%m-%d %H:%M"), data=data,
        synthetic=_synthetic(run, src, data["names"] if data else None), models=_models(run), metrics=METRICS,
        selection=_selection(run), results=_results(run), prov=_provenance(run))


def write_report(run_dir: str) -> str:
    """``<run>/report.html``, written whole; its path."""
    path = f"{run_dir.rstrip('/')}/report.html"
    atomic_write_text(path, build_report(run_dir))
    return path
