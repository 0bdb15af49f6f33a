"""Figures in the docs come from results files, never from typing.

A Markdown page holds a generated block where a table of figures goes::

    <!-- figures: aimfair benchmarks/results/aimfair-cmnist.json -->
    (what the ``aimfair`` renderer makes of that file)
    <!-- /figures -->

The path is relative to the repository root. ``python -m aimfair_ray.figures PAGE...`` writes every
block again from its file; ``--check`` only lists the blocks that differ (the tests run it on the
README, so a page and its results file can't disagree). A renderer is one ``@renderer`` function
from a results file's JSON to Markdown.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Callable

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
