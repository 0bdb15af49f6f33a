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


def log_run(cfg, stage: str, history: list[dict], report: dict | None, chart_path: str | None, out_dir: str) -> str:
    mode = wandb_mode()
    import wandb
    os.makedirs(out_dir, exist_ok=True)
    run = wandb.init(project=cfg.train.wandb_project, name=f"{cfg.name}-{stage}", dir=out_dir, mode=mode,
                     config=cfg.model_dump(mode="json"), settings=wandb.Settings(init_timeout=30, silent=True))
    for row in history:
        run.log(row, step=int(row["epoch"]))
    if report:
        run.summary.update({f"audit/{k}": report[k] for k in ("acc", "wst", "std", "eo", "eod_worst", "dp")})
        run.summary.update({f"audit/group_acc/{k}": v for k, v in report["group_acc"].items()})
        if chart_path:
            run.log({"audit/group_acc_chart": wandb.Image(chart_path)})
    run_dir = run.dir
    run.finish()
    return run_dir
