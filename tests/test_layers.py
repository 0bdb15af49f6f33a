"""Imports go one way: shared pieces, then data -> generate -> train (and egt) -> evaluate and the
results -> serving and the entry points. A stage never imports a sibling or a later stage; every
import counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "aimfair_ray"

# The level of every module, by its dotted name below aimfair_ray (a package covers its modules).
LEVELS = {
    # shared pieces, below every stage
    "": 0, "config": 0, "storage": 0, "paths": 0, "models": 0, "llm": 0, "distributed": 0, "metrics": 0,
    "minmax": 0, "registry": 0, "tables": 0, "runtime": 0, "assets": 0, "tracking": 0, "prompt_tasks": 0, "modelcard": 0,
    "data": 1,
    "generate": 2,
    "train": 3, "egt": 3,
    "evaluate": 4, "benchmark": 5, "sweep": 5,
    "serving": 6, "pipeline": 6, "submit": 6, "plan": 6, "report": 6, "figures": 6,
    "cli": 7, "api": 7,
}
# Shared pieces inside the data package, which every stage may read.
SHARED_DATA = {"data.codecs", "data.captions", "data.io", "data.feed", "data.cmnist", "data.bias", "data.samples"}
# The two deliberate exceptions, each a lazy import inside a function:
ALLOWED = {
    ("", "generate"), ("", "generate.t2i"),  # diffusers finds a saved pipeline's classes as aimfair_ray.<Class>
    ("config", "train.methods"),             # config validation reads the fine-tuning methods' registry
    ("config", "data.datasets"),             # ... and the datasets' registry (a dataset's checks and prompt task)
}


def _stage(mod: str) -> str:
    parts = mod.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LEVELS:
            return ".".join(parts[:n])
    return ""


def _level(mod: str) -> int:
    return 0 if mod in SHARED_DATA else LEVELS[_stage(mod)]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aimfair_ray"):
            base = node.module[len("aimfair_ray"):].lstrip(".")
            out.add(base)
            out |= {f"{base}.{a.name}".lstrip(".") for a in node.names if (PKG / base.replace(".", "/") / a.name).exists()
                    or (PKG / base.replace(".", "/") / f"{a.name}.py").exists()}
        elif isinstance(node, ast.Import):
            out |= {a.name[len("aimfair_ray"):].lstrip(".") for a in node.names if a.name.startswith("aimfair_ray")}
    return out


def test_every_module_has_a_level():
    for path in PKG.rglob("*.py"):
        mod = ".".join(path.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__").removesuffix("__init__")
        assert _stage(mod) in LEVELS, mod


def test_no_module_imports_a_sibling_or_a_later_stage():
    bad = []
    for path in PKG.rglob("*.py"):
        mod = ".".join(path.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__").removesuffix("__init__")
        for imp in _imports(path):
            same_stage = _stage(imp) == _stage(mod) and _stage(mod) != ""
            if not same_stage and _level(imp) >= _level(mod) and _level(imp) > 0 and (mod, imp) not in ALLOWED:
                bad.append(f"{mod} imports {imp}")
    assert not bad, "\n".join(sorted(bad))
