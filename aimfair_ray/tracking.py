"""Weights & Biases logging from the driver: a run's epoch metrics and its audit chart.

Offline unless WANDB_MODE says otherwise, so it never hangs without network. An online
run with no API key is refused with a clear error instead of waiting.
"""

from __future__ import annotations

import os

from aimfair_ray import AimfairError


def wandb_mode() -> str:
    """The W&B mode to use (offline unless WANDB_MODE says otherwise); refuses online without a key."""
    os.environ.setdefault("WANDB_MODE", "offline")
    mode = os.environ["WANDB_MODE"]
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc"))):
        raise AimfairError("WANDB_MODE=online needs WANDB_API_KEY (or `wandb login`); "
                           "unset WANDB_MODE to log offline and `wandb sync` later")
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise AimfairError("--wandb needs the wandb package: pip install 'aimfair-ray[wandb]'") from None
    return mode


AUDIT_KEYS = ("acc", "wst", "std", "eo", "eod_worst", "dp")


def audit_table(report: dict) -> tuple[list[str], list[list]]:
    """An audit's cells as a table: each (target, group) cell's n, accuracy and its 95% interval."""
    iv = report.get("group_acc_intervals", {})
    rows = [[cell, report.get("cell_counts", {}).get(cell), acc, *(iv.get(cell) or [None, None])]
            for cell, acc in report["group_acc"].items()]
    return ["cell", "n", "accuracy", "ci95_low", "ci95_high"], rows


def log_run(cfg, name: str, history: list[dict], report: dict | None = None, images: dict[str, str] | None = None,
            tables: dict[str, tuple[list[str], list[list]]] | None = None, out_dir: str | None = None,
            step_key: str = "epoch") -> str:
    """One W&B run named ``<run>-<name>``: every history row as a step, the audit's figures with their intervals in the
    summary and its cells as a table, ``images`` (key -> PNG path, local or on the store: charts, sample grids) and
    ``tables`` (key -> (columns, rows)). Written under ``out_dir`` (a local folder; a temporary one when None)."""
    import tempfile

    from aimfair_ray.storage import exists, read_bytes

    mode = wandb_mode()
    import wandb

    out_dir = out_dir or tempfile.mkdtemp(prefix="aimfair-wandb-")
    os.makedirs(out_dir, exist_ok=True)
    run = wandb.init(project=cfg.train.wandb_project, name=f"{cfg.name}-{name}", dir=out_dir, mode=mode,
                     config=cfg.model_dump(mode="json"), settings=wandb.Settings(init_timeout=30, silent=True))
    for row in history:
        run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=int(row.get(step_key, 0)))
    if report:
        run.summary.update({f"audit/{k}": report[k] for k in AUDIT_KEYS if k in report})
        for k, (lo, hi) in report.get("intervals", {}).items():
            run.summary.update({f"audit/{k}_ci95_low": lo, f"audit/{k}_ci95_high": hi})
        tables = {"audit/cells": audit_table(report), **(tables or {})}
    logged = {}
    for key, path in (images or {}).items():
        if path and exists(path):
            local = os.path.join(out_dir, key.replace("/", "_") + ".png")
            with open(local, "wb") as f:
                f.write(read_bytes(path))
            logged[key] = wandb.Image(local)
    for key, (columns, rows) in (tables or {}).items():
        logged[key] = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
    if logged:
        run.log(logged)
    run_dir = run.dir
    run.finish()
    return run_dir
