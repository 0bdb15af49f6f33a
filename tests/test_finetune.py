"""AIM-Fair fine-tuning on Ray Train: scores across workers, methods, DeepSpeed, Group DRO, the table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aimfair_ray.data.codecs import decode_png
from aimfair_ray.data.io import read_table
from aimfair_ray.models import load_classifier
from aimfair_ray.train import selective as sel
from aimfair_ray.train.finetune import compute_scores, finetune, synthetic_dir

QUIET = dict(log=lambda *_: None)


def _images(directory):
    t = read_table(directory, ["image", "target"])
    x = torch.from_numpy(np.stack([decode_png(b) for b in t["image"].to_pylist()])).permute(0, 3, 1, 2).contiguous()
    return {"image": x, "target": torch.tensor(t["target"].to_pylist())}


def test_scores_over_two_workers_match_plain_torch(synth):
    cfg, result = synth
    sc = compute_scores(cfg, result["model_dir"], force=True, **QUIET)
    assert sc["world_size"] == 2 and sc["counts"]["su"] == 16 and sc["counts"]["sb"] == 10
    model, meta = load_classifier(result["model_dir"])
    g = {}
    for s, d in {"rb": f"{cfg.data_dir}/train", "sb": synthetic_dir(cfg, "imbalanced"),
                 "su": synthetic_dir(cfg, "balanced")}.items():
        sums, n = sel.grad_sums(model, [_images(d)], meta["mean"], meta["std"], "cpu")
        g[s] = sel.mean_grads(sums, n)
    domain, bias = sel.scores(g)
    assert list(domain) == list(sc["domain"])
    for k in domain:
        assert sc["domain"][k] == pytest.approx(domain[k], rel=1e-3, abs=1e-7)
        assert sc["bias"][k] == pytest.approx(bias[k], rel=1e-3, abs=1e-7)
    # saved with the mean gradients; a rerun reuses them (same baseline, sets and seed)
    assert (Path(cfg.stage_dir("finetune/scores")) / "grads.safetensors").is_file()
    msgs = []
    again = compute_scores(cfg, result["model_dir"], log=msgs.append)
    assert "reusing" in msgs[0] and again["domain"] == sc["domain"]


def test_finetune_trains_only_the_chosen_tensors(synth):
    cfg, result = synth
    cfg = cfg.model_copy(deep=True)
    cfg.finetune.mix_real = 0.5  # 16 synthetic + 8 real images
    msgs = []
    res = finetune(cfg, "selective", log=msgs.append)
    assert any("on 16 synthetic + 8 real images" in m for m in msgs), msgs
    base = load_file(f"{result['model_dir']}/model.safetensors")
    tuned = load_file(f"{res['model_dir']}/model.safetensors")
    chosen = set(res["selection"]["trainable"])
    assert 0 < len(chosen) < res["selection"]["n_tensors"]
    for name, t in base.items():
        if name in chosen:
            assert not torch.equal(t, tuned[name]), f"{name} should have trained"
        else:  # frozen tensors, and every BatchNorm running statistic (finetune.bn_stats=keep)
            assert torch.equal(t, tuned[name]), f"{name} changed"
    stage = Path(res["model_dir"]).parent
    sel_info = json.loads((stage / "selection.json").read_text())
    assert sel_info["trainable"] == res["selection"]["trainable"]
    assert (stage / "selection.png").read_bytes()[:4] == b"\x89PNG"
    k = sel.resolve_k(cfg.finetune.k, sel_info["n_tensors"])
    assert sel_info["trainable"] == sel.select(sel_info["domain"], sel_info["bias"], k)
    assert len(res["history"]) == cfg.finetune.epochs and res["history"][-1]["world_size"] == 2


def test_random_method_is_reproducible_by_seed(synth):
    cfg, result = synth
    from aimfair_ray.train.finetune import choose

    a = choose(cfg, "random", result["model_dir"], **QUIET)
    b = choose(cfg, "random", result["model_dir"], **QUIET)
    s = choose(cfg, "selective", result["model_dir"], **QUIET)
    assert a["trainable"] == b["trainable"] and len(a["trainable"]) == len(s["trainable"])
    other = cfg.model_copy(deep=True)
    other.finetune.seed = 5
    assert choose(other, "random", result["model_dir"], **QUIET)["trainable"] != a["trainable"]


def test_deepspeed_and_ddp_give_the_same_result(synth):
    """Same seed, same data order, one epoch of linear fine-tuning (frozen BatchNorm, so per-sample
    gradients): ZeRO-2 and DDP land on the same weights."""
    pytest.importorskip("deepspeed")
    cfg, result = synth
    runs = {}
    for ds in (False, True):
        c = cfg.model_copy(deep=True)
        c.finetune.epochs = 1
        c.finetune.deepspeed = ds
        runs[ds] = finetune(c, "linear", stage=f"dscheck/{'ds' if ds else 'ddp'}", baseline_dir=result["model_dir"], **QUIET)
    a = load_file(f"{runs[False]['model_dir']}/model.safetensors")
    b = load_file(f"{runs[True]['model_dir']}/model.safetensors")
    base = load_file(f"{result['model_dir']}/model.safetensors")
    moved = max(float((a[k].float() - base[k].float()).abs().max()) for k in a)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert moved > 1e-3 and diff < 1e-4 * max(1.0, moved * 100), (moved, diff)
    assert runs[True]["history"][0]["train_loss"] == pytest.approx(runs[False]["history"][0]["train_loss"], rel=1e-4)


def test_group_dro_moves_the_group_weights(synth):
    cfg, _ = synth
    from aimfair_ray.train.baseline import train_group_dro

    c = cfg.model_copy(deep=True)
    c.group_dro.eta = 0.1
    res = train_group_dro(c, **QUIET)
    q = np.array(res["group_weights"]["q"])
    assert q.shape == (4,) and q.sum() == pytest.approx(1.0)
    assert q.max() - q.min() > 0.02, q  # the ascent moved them (all workers agree: one q is reported)
    assert res["method"] == "group_dro" and Path(res["model_dir"], "model.safetensors").is_file()
