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


# The test that needs Ray Train runs of its own comes first, before the module's shared worker group opens.
def test_jobs_on_one_worker_group_train_what_runs_of_their_own_train(synth):
    """workgroup: a training run and a scoring run as jobs on one shared worker group give the weights,
    history and scores that their own Ray Train runs give (the fixture's baseline and the scores of its
    run, both trained on runs of their own), with their checkpoints in the run's job folder."""
    from aimfair_ray.train.baseline import train_baseline
    from aimfair_ray.workgroup import shared_workers

    cfg, base = synth
    quiet = dict(log=lambda *_: None, force=True)
    own = [base, compute_scores(cfg, base["model_dir"], **QUIET)]  # reused if an earlier test computed them
    with shared_workers(cfg.train, cfg.ray_storage, "wg") as group:
        jobs = [train_baseline(cfg, stage="wg/job", **quiet),
                compute_scores(cfg, base["model_dir"], stage="wg/job-scores", **quiet)]
    assert group.board is not None and not group.thread.is_alive()  # it ran, and closed
    assert list(Path(jobs[0]["run_path"], "job").glob("checkpoint_*")) and not Path(own[0]["run_path"], "job").exists()
    keys = ("epoch", "train_loss", "val_acc", "val_wst")
    assert [{k: h[k] for k in keys} for h in jobs[0]["history"]] == [{k: h[k] for k in keys} for h in own[0]["history"]]
    assert jobs[0]["best_epoch"] == own[0]["best_epoch"]
    a, b = (load_file(f"{r['model_dir']}/model.safetensors") for r in (jobs[0], own[0]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert jobs[1]["counts"] == own[1]["counts"] and jobs[1]["domain"] == own[1]["domain"] and jobs[1]["bias"] == own[1]["bias"]


@pytest.fixture(scope="module")
def one_group(synth):
    """One shared worker group for the runs of the tests below: each is a job on it, as `aimfair finetune` and a
    benchmark seed run them (jobs give the figures of runs of their own: the test above), so Ray Train starts
    its workers once for the module, not once per run."""
    from aimfair_ray.workgroup import shared_workers

    cfg, _ = synth
    with shared_workers(cfg.train, cfg.ray_storage, "tests-finetune") as group:
        yield group


def test_a_job_interrupted_after_its_last_checkpoint_resumes_from_it(synth, one_group):
    """The first test's job, its result removed as if its driver died after the last checkpoint, run again as a
    job on another group (the module's): it resumes from that checkpoint, trains no epoch and writes no new
    checkpoint."""
    from aimfair_ray.train.baseline import train_baseline

    cfg, _ = synth
    run = Path(cfg.stage_dir("wg/job"))
    first = train_baseline(cfg, stage="wg/job", **QUIET)  # the first test's job, reused (trained here if run alone)
    ckpts = sorted(p.name for p in Path(first["run_path"], "job").glob("checkpoint_*"))
    assert ckpts
    (run / "result.json").unlink()
    msgs = []
    again = train_baseline(cfg, stage="wg/job", log=msgs.append)
    assert any("resuming the interrupted run" in m for m in msgs), msgs
    assert again["history"] == first["history"]
    assert sorted(p.name for p in Path(again["run_path"], "job").glob("checkpoint_*")) == ckpts


def test_deepspeed_and_ddp_give_the_same_result(synth, one_group):
    """Same seed, same data order, one epoch of linear fine-tuning (frozen BatchNorm, so per-sample
    gradients): ZeRO-2 (a Ray Train run of its own, beside the module's group) and DDP (a job on the group)
    land on the same weights."""
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


def test_scores_over_two_workers_match_plain_torch(synth, one_group):
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


def test_finetune_trains_only_the_chosen_tensors(synth, one_group):
    cfg, result = synth
    cfg = cfg.model_copy(deep=True)
    cfg.finetune.mix_real = 0.5  # 16 synthetic + 8 real images
    msgs = []
    res = finetune(cfg, "selective", log=msgs.append)
    assert any("on 16 synthetic + 8 real images" in m for m in msgs), msgs
    small = res["selection"]["trainable_fraction"] < 0.01  # the warning names finetune.k exactly when it should
    assert any("raise finetune.k" in m for m in msgs) == small, (res["selection"]["trainable_fraction"], msgs)
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


def test_group_dro_moves_the_group_weights(synth, one_group):
    cfg, _ = synth
    from aimfair_ray.train.baseline import train_group_dro

    c = cfg.model_copy(deep=True)
    c.group_dro.eta = 0.1
    res = train_group_dro(c, **QUIET)
    q = np.array(res["group_weights"]["q"])
    assert q.shape == (4,) and q.sum() == pytest.approx(1.0)
    assert q.max() - q.min() > 0.02, q  # the ascent moved them (all workers agree: one q is reported)
    assert res["method"] == "group_dro" and Path(res["model_dir"], "model.safetensors").is_file()


def test_official_recipe_scores_finetune_and_oracle_on_ray_train(synth, one_group):
    """score_mode=train on two workers (batches of one set, counted in batches), then selective with
    SGD, step decay, crop+flip and BatchNorm statistics updated, trained on real balanced images
    (the benchmark's oracle row) with the synthetic scores' tensors."""
    cfg, result = synth
    c = cfg.model_copy(deep=True)
    f = c.finetune
    f.score_mode, f.score_batch_size, f.optimizer, f.lr, f.lr_steps, f.epochs = "train", 4, "sgd", 0.06, [2], 2
    f.bn_stats, f.k = "update", 0.9
    c.train.augment, c.train.crop_scale = "crop_flip", (0.5, 1.0)
    sc = compute_scores(c, result["model_dir"], stage="official/scores", **QUIET)
    # Su: 16 rows dealt over 2 workers, full batches of 4 only; Sb: 10 rows -> at most 2 batches
    assert 2 <= sc["counts"]["su"] <= 4 and 1 <= sc["counts"]["sb"] <= 2 and sc["counts"]["rb"] >= 90
    assert sc["key"]["mode"] == "train" and sc["domain"] != compute_scores(cfg, result["model_dir"], **QUIET)["domain"]
    real = c.paths.split("generator")
    msgs = []
    res = finetune(c, "selective", stage="official/oracle_selective", baseline_dir=result["model_dir"],
                   scores_stage="official/scores", real_set=real, log=msgs.append)
    assert any(f"on {read_table(real, ['id']).num_rows} real images" in m for m in msgs), msgs
    assert [h["lr"] for h in res["history"]] == pytest.approx([0.06, 0.006])
    base = load_file(f"{result['model_dir']}/model.safetensors")
    tuned = load_file(f"{res['model_dir']}/model.safetensors")
    frozen = set(base) - set(res["selection"]["trainable"])
    assert any(not torch.equal(base[k], tuned[k]) for k in base if "running_mean" in k)  # bn_stats=update
    assert all(torch.equal(base[k], tuned[k]) for k in frozen if "running" not in k and "num_batches" not in k)
    meta = json.loads(Path(res["model_dir"], "model.json").read_text())
    assert meta["provenance"]["real_share"] == 1.0 and meta["provenance"]["real_set"] == real


def test_jtt_retrains_with_its_errors_upweighted(synth, one_group):
    from aimfair_ray.data.io import image_dataset
    from aimfair_ray.train.jtt import predict_split, train_jtt

    cfg, _ = synth
    c = cfg.model_copy(deep=True)
    c.jtt.epochs, c.jtt.upweight = 1, 6.0
    c.train.epochs = 1
    res = train_jtt(c, stage="jtt", **QUIET)
    ids, target, pred = predict_split(c.stage_dir("jtt/identify") + "/model", c.paths.split("train"))
    wrong = pred != target
    assert res["n_errors"] == int(wrong.sum()) > 0 and res["n_train"] == len(ids) == 400
    assert res["method"] == "jtt" and len(res["history"]) == 1
    # the train feed carries weight lam for exactly those rows (mean 1), in id order
    from aimfair_ray.train.jtt import error_weights

    w = error_weights(pred, target, 6.0)
    feed = image_dataset([c.paths.split("train")], c.data.image_size, c.train.cache_mb,
                         weights={i: x for i, x, e in zip(ids, w, wrong) if e}, default_weight=float(w[~wrong][0]))
    import ray

    got = ray.get(feed.ref)["weight"]
    assert np.allclose(got, w) and np.allclose(got[wrong], 6.0 * got[~wrong][0])
