"""Figures in the docs come from results files, never from typing.

A Markdown page holds a generated block where a table of figures goes::

    <!-- figures: aimfair benchmarks/results/aimfair-cmnist.json -->
    (what the ``aimfair`` renderer makes of that file)
    <!-- /figures -->

The path is relative to the repository root. ``python -m aimfair_ray.figures PAGE...`` writes every
block again from its file; ``--check`` only lists the blocks that differ (the tests check the README and
every page of ``docs/``, and the docs build fails on a stale block, so a page and its results file can't
disagree). A renderer is one ``@renderer`` function
from a results file's JSON to Markdown.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Callable

from aimfair_ray.tables import markdown_table

RENDERERS: dict[str, Callable[[dict], str]] = {}
BLOCK = re.compile(r"(<!-- figures: (\S+) (\S+) -->\n)(.*?)(<!-- /figures -->)", re.S)
ROOT = Path(__file__).resolve().parents[1]


def renderer(name: str):
    """Register ``fn(result) -> markdown`` as the renderer ``name`` of figures blocks."""
    def add(fn):
        RENDERERS[name] = fn
        return fn
    return add


@renderer("aimfair")
def _aimfair(result: dict) -> str:
    """An AIM-Fair benchmark's tables (``benchmark.render``) without the page title."""
    from aimfair_ray.benchmark import render

    return render(result).split("\n", 2)[2]  # drop "# title" and the blank line after it


@renderer("egt")
def _egt(result: dict) -> str:
    """An EGT benchmark's tables (``egt.benchmark.published_markdown``), every metric with min–max's paired
    difference to ERM and its interval, without the page title."""
    from aimfair_ray.egt.benchmark import published_markdown

    return published_markdown(result).split("\n", 2)[2].replace("\n## ", "\n#### ")


def _provenance(result: dict, command: str) -> str:
    """The line that says where a speed file's figures come from; one run each, so no interval."""
    machine = result.get("machine") or f"{result.get('cores', result.get('cpus', '?'))} CPU cores, no GPU"
    return (f"Command: `{result.get('command', command)}`. Machine: {machine}. Date: {result.get('date', '?')}. "
            "One run per row: no interval was measured, so a ratio here is an indication, not a result.")


@renderer("generate_scale")
def _generate_scale(result: dict) -> str:
    """``benchmarks/generate_scale.py``: the Ray Data image pipeline against a plain loop, by size."""
    rows = [[f"{r['size']:,}", r["plain"]["images_per_s"], r["ray"]["images_per_s"], r["ratio"],
             r["ray"]["steady_images_per_s"], r["ray"]["first_shard_after_s"], r["ray"]["rss_growth_mb"],
             r["ray"]["peak_object_store_mb"]] for r in result["rows"]]
    cmd = (f"python benchmarks/generate_scale.py --pipeline {result['pipeline']} --steps {result['steps']} "
           f"--sizes {','.join(str(r['size']) for r in result['rows'])}")
    table = markdown_table(["images", "plain img/s", "Ray img/s", "ratio", "Ray steady img/s", "first shard (s)",
                            "driver RSS growth (MB)", "object store peak (MB)"], rows)
    notes = [f"Notes: {result['notes']}"] if result.get("notes") else []
    return "\n".join([_provenance(result, cmd), "", *table, "", *notes])


@renderer("train_scale")
def _train_scale(result: dict) -> str:
    """``benchmarks/train_scale.py``: the Ray Train loop against a plain loop, by size."""
    rows = [[f"{r['size']:,}", r["ray_epoch_s"], r["plain_epoch_s"], r["ratio"], r["ray_run_s"]] for r in result["rows"]]
    cmd = (f"python benchmarks/train_scale.py --sizes {','.join(str(r['size']) for r in result['rows'])} "
           f"--epochs {result['epochs']}")
    head = (f"{result['backbone']}, batch {result['batch_size']}, {result['workers']} Ray Train workers x "
            f"{result['torch_threads']} thread against one process; epochs after the first averaged.")
    return "\n".join([_provenance(result, cmd), "", head, "", *markdown_table(
        ["images", "Ray epoch (s)", "plain epoch (s)", "ratio", "Ray run (s)"], rows)])


@renderer("serve_load")
def _serve_load(result: dict) -> str:
    """``benchmarks/serve_load.py``: Serve against a plain FastAPI + uvicorn server around the same model."""
    serve, plain = result["results"]["serve"], result["results"]["plain"]
    rows = [[s["clients"], s["p50_ms"], s["p99_ms"], s["rps"], p["p50_ms"], p["rps"], round(s["rps"] / p["rps"], 2)]
            for s, p in zip(serve, plain)]
    cmd = f"python benchmarks/serve_load.py --backbone {result.get('backbone')} --in-ingress {result.get('in_ingress')}"
    out = [_provenance(result, cmd), "", f"Model in the ingress: `{result.get('in_ingress')}`; image size "
           f"{result['image_size']}.", "", *markdown_table(["clients", "Serve p50 ms", "Serve p99 ms", "Serve req/s",
                                                           "plain p50 ms", "plain req/s", "Serve / plain req/s"], rows)]
    h = result.get("healthz")
    if h:
        out += ["", f"`/healthz` while two clients post decompression bombs: p50 {h['bombs_p50_ms']} ms, p90 "
                    f"{h['bombs_p90_ms']} ms ({h['bombs_refused']} bomb requests refused), against p90 {h['idle_p90_ms']} ms "
                    f"idle; decoding one request's bombs takes {h['decode_one_bomb_request_ms']} ms."]
    return "\n".join(out)


@renderer("store_cost")
def _store_cost(result: dict) -> str:
    """``benchmarks/store_cost.py``: the tiny chain on one node with a local disk against three share-nothing nodes."""
    one, s3 = result["one_node_local_disk"], result["share_nothing_s3"]
    rows = [[stage, one["stages_s"].get(stage, "—"), t] for stage, t in s3["stages_s"].items()]
    rows.append(["whole chain", one["wall_s"], s3["wall_s"]])
    moved = [[k, f"{v['up']:,}", f"{v['down']:,}", v["requests"]] for k, v in s3["bytes_by_stage_folder"].items()]
    tot = s3["bytes_total"]
    moved.append(["all", f"{tot['up']:,}", f"{tot['down']:,}", tot["requests"]])
    return "\n".join([_provenance(result, "python benchmarks/store_cost.py"), "", f"What: {result['what']}.", "",
                      *markdown_table(["stage", "one node, local disk (s)", "3 nodes, S3 only (s)"], rows), "",
                      f"Bytes moved by folder of the run ({result['bytes_are']}):", "",
                      *markdown_table(["folder", "up", "down", "requests"], moved), "", f"Notes: {result['notes']}"])


def expand(name: str, path: str, root: Path = ROOT) -> str:
    """The block body for renderer ``name`` on the results file ``path`` (relative to ``root``)."""
    if name not in RENDERERS:
        raise ValueError(f"figures block names renderer {name!r}; known: {', '.join(sorted(RENDERERS))}")
    result = json.loads((root / path).read_text())
    body = RENDERERS[name](result).rstrip("\n")
    return (f"<!-- generated from {path} by `python -m aimfair_ray.figures`: edit the results file's "
            f"renderer, not this block -->\n{body}\n")


def synced(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """``text`` with every figures block rendered again, and the results files whose blocks changed."""
    changed = []

    def one(m):
        body = expand(m.group(2), m.group(3), root)
        if body != m.group(4):
            changed.append(m.group(3))
        return m.group(1) + body + m.group(5)

    return BLOCK.sub(one, text), changed


def main(argv: list[str]) -> int:
    check = "--check" in argv
    pages = [a for a in argv if a != "--check"]
    if not pages:
        print("usage: python -m aimfair_ray.figures [--check] PAGE.md ...", file=sys.stderr)
        return 2
    stale = []
    for page in map(Path, pages):
        text, changed = synced(page.read_text())
        if changed and not check:
            page.write_text(text)
            print(f"{page}: rendered again from {', '.join(changed)}")
        stale += [f"{page}: {c}" for c in changed]
    if check and stale:
        print("figures that differ from their results files (run python -m aimfair_ray.figures on the page):\n  "
              + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
