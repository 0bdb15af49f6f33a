"""Model cards and the audit page. A card is what the stages wrote beside a checkpoint: its
``model.json`` (with the training data's provenance), the run's ``config.yaml`` and the
``audit/audit.json`` of ``aimfair audit``. The page is ``templates/audit.html`` (Jinja2)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Optional

AUDIT_KEYS = ("acc", "wst", "std", "eo", "eod_worst", "dp", "group_acc", "n", "cell_counts", "warnings")


def provenance(meta: dict) -> dict:
    """The training data of a checkpoint, as its training stage wrote it into ``model.json``. A
    checkpoint written before stages recorded it still names its method: baseline and Group DRO
    train on real data alone; for any other the shares are unknown (None)."""
    if meta.get("provenance"):
        return meta["provenance"]
    method = meta.get("method")
    real = method in ("baseline", "group_dro")
    return {"real_share": 1.0 if real else None, "synthetic_share": 0.0 if real else None, "generator": None,
            "method": method}


def model_card(model_id: str, model_dir: str) -> tuple[dict, Optional[bytes]]:
    """The card (checkpoint metadata, training config, provenance, audit) and the audit chart PNG."""
    import yaml

    from aimfair_ray.evaluate import group_acc_chart
    from aimfair_ray.models import check_checkpoint_dir

    d = check_checkpoint_dir(model_dir).resolve()
    meta = json.loads((d / "model.json").read_text())
    config = yaml.safe_load((d.parent / "config.yaml").read_text()) if (d.parent / "config.yaml").is_file() else None
    card = {"id": model_id, "path": str(d), "backbone": meta["backbone"], "dataset": meta.get("dataset"),
            "target_names": meta["target_names"], "group_names": meta["group_names"], "image_size": meta["image_size"],
            "val_metrics": meta.get("metrics"), "provenance": provenance(meta), "config": config, "audit": None}
    chart = None
    if (d.parent / "audit" / "audit.json").is_file():
        a = json.loads((d.parent / "audit" / "audit.json").read_text())
        card["audit"] = {k: a[k] for k in AUDIT_KEYS if k in a}
        chart = group_acc_chart(dict(a, target_names=meta["target_names"], group_names=meta["group_names"]),
                                f"{model_id}: per-group accuracy", a.get("min_cell", 30))
    return card, chart


def audit_page(cards: dict, charts: dict) -> str:
    """The HTML audit page: each model's headline metrics, provenance and per-group accuracy chart, and
    for a model fine-tuned on a synthetic set, that set's sample grid (``samples.png``) when it has one."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape())
    b64 = {mid: base64.b64encode(png).decode() for mid, png in charts.items() if png}
    samples = {}
    for mid, c in cards.items():
        syn = (c.get("provenance") or {}).get("synthetic_set")
        if syn and (Path(syn) / "samples.png").is_file():
            samples[mid] = base64.b64encode((Path(syn) / "samples.png").read_bytes()).decode()
    return env.get_template("audit.html").render(cards=cards, charts=b64, samples=samples)
