"""Model cards and the audit page. A card is what the stages wrote beside a checkpoint: its
``model.json`` (with the training data's provenance), the run's ``config.yaml`` and the
``audit/audit.json`` of ``aimfair audit``. The page is ``templates/audit.html`` (Jinja2)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Optional

from aimfair_ray.modelcard import CARD, card_config
from aimfair_ray.storage import exists, is_uri, parent, read_bytes, read_json, read_text

AUDIT_KEYS = ("acc", "wst", "std", "eo", "eod_worst", "dp", "group_acc", "n", "cell_counts", "warnings", "intervals",
              "interval_level", "n_bootstrap", "trivial")


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


def shown_path(path: Path, root: str) -> str:
    """A model folder as a card shows it: relative to the serving root, else its last three parts."""
    try:
        return str(path.relative_to(Path(root).resolve()))
    except ValueError:
        return "/".join(path.parts[-3:])


def _hf_card(d: Path) -> Optional[dict]:
    """The metadata of the folder's Hugging Face model card (``README.md``), or None when it has none."""
    from huggingface_hub import ModelCard

    return ModelCard.load(d / CARD).data.to_dict() if (d / CARD).is_file() else None


def model_card(model_id: str, model_dir: str, root: str = ".") -> tuple[dict, dict]:
    """The card (checkpoint metadata, the training config reduced to ``CARD_CONFIG``, provenance, audit; the
    model's path relative to the serving root ``root``) and its page images: ``chart`` (the audit's per-group
    accuracy) and ``samples`` (the synthetic set it was tuned on), PNG bytes or None."""
    import yaml

    from aimfair_ray.evaluate import group_acc_chart
    from aimfair_ray.models import check_checkpoint_dir

    d = check_checkpoint_dir(model_dir).resolve()  # on a store: this node's copy of the model folder
    stage = parent(str(model_dir)) if is_uri(str(model_dir)) else str(d.parent)  # its config and audit, where they are
    meta = json.loads((d / "model.json").read_text())
    config = yaml.safe_load(read_text(f"{stage}/config.yaml")) if exists(f"{stage}/config.yaml") else None
    prov = dict(provenance(meta))
    if prov.get("synthetic_set") and not is_uri(prov["synthetic_set"]):
        prov["synthetic_set"] = shown_path(Path(prov["synthetic_set"]), root)
    shown = str(model_dir) if is_uri(str(model_dir)) else shown_path(d, root)
    card = {"id": model_id, "path": shown, "backbone": meta["backbone"], "dataset": meta.get("dataset"),
            "target_names": meta["target_names"], "group_names": meta["group_names"], "image_size": meta["image_size"],
            "val_metrics": meta.get("metrics"), "provenance": prov, "config": card_config(config), "audit": None,
            "model_card": _hf_card(d)}
    samples = (meta.get("provenance") or {}).get("synthetic_set")
    chart = None
    if exists(f"{stage}/audit/audit.json"):
        a = read_json(f"{stage}/audit/audit.json")
        card["audit"] = {k: a[k] for k in AUDIT_KEYS if k in a}
        chart = group_acc_chart(dict(a, target_names=meta["target_names"], group_names=meta["group_names"]),
                                f"{model_id}: per-group accuracy", a.get("min_cell", 30))
    grid = f"{samples}/samples.png" if samples else None  # read here: the card shows only a relative path
    return card, {"chart": chart, "samples": read_bytes(grid) if grid and exists(grid) else None}


def _render(template: str, **values) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape())
    return env.get_template(template).render(**values)


def audit_page(cards: dict, images: dict) -> str:
    """The HTML audit page: each model's headline metrics, provenance and per-group accuracy chart, and
    for a model fine-tuned on a synthetic set, that set's sample grid (``samples.png``) when it has one;
    ``images``: each model's ``model_card`` images."""
    b64 = {part: {mid: base64.b64encode(im[part]).decode() for mid, im in images.items() if im.get(part)}
           for part in ("chart", "samples")}
    return _render("audit.html", cards=cards, charts=b64["chart"], samples=b64["samples"])


def login_page(root: str, enabled: bool = True, failed: bool = False) -> str:
    """The sign-in form (``templates/login.html``): the token for a session cookie."""
    return _render("login.html", root=root, enabled=enabled, failed=failed)
