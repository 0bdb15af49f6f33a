"""The official AIM-Fair recipe as options (issue 18), in plain PyTorch and config: SGD with step
decay, train-mode gradient scores, k as a ratio, augmentation, natural val, pretrained backbones,
JTT's weights, and the benchmark's aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from aimfair_ray import AimfairError
from aimfair_ray.config import load_config
from aimfair_ray.models import SmallCNN, build_model
from aimfair_ray.train import loop
from aimfair_ray.train import selective as sel
from aimfair_ray.train.augment import augmenter, crop_flip


def _digits(n=16, size=32, seed=0):
    """Coloured strokes on black: a real Colored MNIST draw."""
    from aimfair_ray.config import DataConfig
    from aimfair_ray.data.cmnist import colorize, load_mnist_5k

    digits, _ = load_mnist_5k()
    rng = np.random.default_rng(seed)
    groups = np.arange(n) % 2
    imgs = colorize(digits[:n], groups, DataConfig().colors, 0, size, rng)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), groups


def test_official_layer_shows_every_value_of_the_recipe():
    from aimfair_ray.cli import app

    res = CliRunner().invoke(app, ["config", "show", "--config", "aimfair-official"])
    assert res.exit_code == 0, res.output
    cfg = load_config("cmnist", "aimfair-official")
    t, f = cfg.train, cfg.finetune
    assert (t.optimizer, t.momentum, t.lr, t.weight_decay, t.epochs, t.lr_steps, t.lr_gamma, t.batch_size) == \
        ("sgd", 0.9, 0.01, 1e-4, 15, [11], 0.1, 128)
    assert (t.augment, f.augment, tuple(t.crop_scale), t.select_metric) == ("crop_flip", "crop_flip", (0.08, 1.0), "val_acc")
    assert (f.optimizer, f.lr, f.epochs, f.batch_size, f.bn_stats, f.score_mode, f.score_batch_size, f.mix_real) == \
        ("sgd", 0.06, 10, 128, "update", "train", 128, 0.0)
    assert sel.resolve_k(f.k, 62) == 55 and f.k == pytest.approx(55 / 62)
    assert cfg.data.val_bias == "natural" and cfg.data.bias == pytest.approx(1 / 9) and cfg.data.resize == "stretch"
    assert (cfg.generate.n_balanced_per_cell, cfg.generate.n_imbalanced) == (5000, 20000)
    for text in ("optimizer: sgd", "momentum: 0.9", "lr: 0.06", "- 11", "augment: crop_flip", "bn_stats: update",
                 "score_mode: train", "val_bias: natural", "n_balanced_per_cell: 5000"):
        assert text in res.output, text
    assert "aimfair-official (recipe layer" in CliRunner().invoke(app, ["config", "presets"]).output


def test_sgd_keeps_momentum_buffers_for_trained_tensors_only():
    torch.manual_seed(0)
    model = SmallCNN(2, 8)
    sel.freeze(model, [n for n, _ in model.named_parameters() if n.startswith("head")], "update")
    tc = load_config("cmnist", "aimfair-official").train
    opt = loop.make_optimizer(model.parameters(), tc)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    x, _ = _digits(8)
    loop.train_step(model, loop.to_input(x, [0.5] * 3, [0.5] * 3, "cpu"), torch.arange(8) % 2, opt)
    buffers = {n: opt.state[p].get("momentum_buffer") for n, p in model.named_parameters() if p in opt.state}
    assert set(buffers) == {"head.weight", "head.bias"} and all(b is not None and b.abs().sum() > 0 for b in buffers.values())
    adamw = loop.make_optimizer(model.parameters(), load_config("cmnist").train)
    assert isinstance(adamw, torch.optim.AdamW)


def test_step_decay_is_a_function_of_the_epoch():
    tc = load_config("cmnist", "aimfair-official").train
    assert [loop.epoch_lr(tc, e) for e in (0, 9, 10, 14)] == pytest.approx([0.01, 0.01, 0.001, 0.001])
    assert loop.epoch_lr(load_config("cmnist").train, 5) == 0.002  # no steps: constant


def test_train_mode_scores_use_batch_statistics():
    torch.manual_seed(0)
    model = SmallCNN(2, 8)
    x, _ = _digits(16)
    batch = {"image": x, "target": torch.arange(16) % 2}
    mean, std = [0.5] * 3, [0.5] * 3
    seen = []
    hook = model.features[0][1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    g_train, n_train = sel.grad_sums(model, [batch], mean, std, "cpu", "train")
    g_eval, n_eval = sel.grad_sums(model, [batch], mean, std, "cpu", "eval")
    hook.remove()
    assert seen == [True, False] and (n_train, n_eval) == (1, 16)  # train: counted in batches
    # moving the running statistics changes eval-mode gradients, never train-mode ones
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(9.0)
    g_train2, _ = sel.grad_sums(model, [batch], mean, std, "cpu", "train")
    g_eval2, _ = sel.grad_sums(model, [batch], mean, std, "cpu", "eval")
    k = "features.0.0.weight"
    assert torch.allclose(g_train[k], g_train2[k], atol=1e-10)
    assert not torch.allclose(g_eval[k], g_eval2[k], atol=1e-6)
    # train mode: the batch-mean loss (eval sums per sample); two batches average
    halves = [{k2: v[:8] for k2, v in batch.items()}, {k2: v[8:] for k2, v in batch.items()}]
    g_two, n_two = sel.grad_sums(model, halves, mean, std, "cpu", "train")
    assert n_two == 2 and not torch.allclose(g_two[k] / 2, g_train[k], atol=1e-8)


def test_set_batches_are_one_set_and_full_size():
    stream = [{"set": torch.tensor(s), "target": torch.arange(len(s)), "image": torch.zeros(len(s), 3, 2, 2)}
              for s in ([0, 1, 0, 2, 0], [1, 1, 0, 0, 2], [0, 1])]
    out = list(sel.set_batches(stream, 3, 2))
    assert [s for s, _ in out] == [0, 0, 1, 2, 0, 1]  # 6 rows of set 0, 4 of set 1, 2 of set 2, as they fill
    assert all(len(b["target"]) == 2 and bool((b["set"] == s).all()) for s, b in out)
    assert len(list(sel.set_batches(stream, 3, 4))) == 2  # 6 of set 0 -> one batch of 4, set 1 (4) -> one; rest dropped


def test_augmentation_changes_pixels_not_labels():
    from aimfair_ray.config import DataConfig
    from aimfair_ray.data.cmnist import stroke_color

    x, groups = _digits(32)
    aug = augmenter("crop_flip", (0.3, 1.0), seed=1, epoch=0)
    y = aug(x)
    assert y.shape == x.shape and y.dtype == torch.uint8 and not torch.equal(x, y)
    assert torch.equal(x, _digits(32)[0])  # the input is not touched
    # the labels still hold: each image keeps its stroke colour (the group label)
    assert (stroke_color(y.permute(0, 2, 3, 1).numpy(), DataConfig().colors) == groups).all()
    assert torch.equal(augmenter("crop_flip", (0.3, 1.0), seed=1, epoch=0)(x), y)  # seeded
    assert not torch.equal(augmenter("crop_flip", (0.3, 1.0), seed=1, epoch=1)(x), y)  # a new draw each epoch
    full = crop_flip(x, torch.Generator().manual_seed(0), (1.0, 1.0))  # whole image: itself or its mirror
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(full, x))
    assert augmenter("none", (0.08, 1), 0) is None


def test_k_as_a_ratio_count_or_fraction():
    assert load_config("cmnist", overrides=["finetune.k=55/62"]).finetune.k == pytest.approx(55 / 62)
    assert sel.resolve_k(55 / 62, 62) == 55 and sel.resolve_k(55 / 62, 14) == 12 and sel.resolve_k(12, 14) == 12
    with pytest.raises(AimfairError, match="ratio"):
        load_config("cmnist", overrides=["finetune.k=55/x"])
    # the official k on ResNet-18: the intersection of two top-55 lists of 62 holds at least 48 tensors
    rng = np.random.default_rng(0)
    names = [f"t{i}" for i in range(62)]
    dom, bias = dict(zip(names, rng.random(62))), dict(zip(names, rng.random(62)))
    assert len(sel.select(dom, bias, 55)) >= 48


def test_resnet18_with_pretrained_true_refuses():
    from aimfair_ray.cli import app

    with pytest.raises(AimfairError, match="torchvision:resnet18"):
        load_config("cmnist", overrides=["model.backbone=resnet18", "model.pretrained=true"])
    with pytest.raises(AimfairError, match="no pretrained weights"):
        build_model("resnet18", 2, 32, pretrained=True)
    res = CliRunner().invoke(app, ["config", "show", "--set", "model.backbone=resnet18", "--set", "model.pretrained=true"])
    assert res.exit_code == 2 and "Traceback" not in res.output and "torchvision:resnet18" in res.output
    # null: the backbone's own default (weights where they exist)
    assert not load_config("cmnist", overrides=["model.backbone=resnet18"]).model.use_pretrained
    assert load_config("cmnist", overrides=["model.backbone=efficientnet_lite0"]).model.use_pretrained


def test_stretch_resizes_the_whole_image(tmp_path):
    from PIL import Image

    from aimfair_ray.data.codecs import decode_png
    from aimfair_ray.data.prepare import EncodeImages

    a = np.zeros((60, 30, 3), np.uint8)
    a[:15] = 255  # a white top quarter: cropped away by the centre square, kept (squeezed) by stretch
    Image.fromarray(a).save(tmp_path / "x.png")
    crop = decode_png(EncodeImages(16, False)._load(str(tmp_path / "x.png")))
    whole = decode_png(EncodeImages(16, False, "stretch")._load(str(tmp_path / "x.png")))
    assert crop.shape == whole.shape == (16, 16, 3)
    assert crop[:3].max() == 0 and whole[:3].min() == 255


def test_natural_val_has_no_biased_draw():
    from aimfair_ray.data import cmnist

    cfg = load_config("cmnist", overrides=["data.val_bias=natural", "data.n_val=400"])
    counts = cmnist.build(cfg.data)["cell_counts"]
    val, train = counts["val"], counts["train"]
    assert min(val.values()) > 70  # ~100 per cell, not 5% / 45%
    assert min(train.values()) * 9 == max(train.values())  # train keeps b = 1/9
    assert load_config("cmnist", overrides=["data.val_bias=0.3"]).data.val_draw_bias == 0.3
    assert load_config("cmnist").data.val_draw_bias == pytest.approx(1 / 9)


def test_jtt_upweights_exactly_the_misclassified_rows():
    from aimfair_ray.train.jtt import error_weights

    target = np.array([0, 1, 1, 0, 1, 0])
    pred = np.array([0, 0, 1, 1, 1, 0])
    w = error_weights(pred, target, 5.0)
    assert w.mean() == pytest.approx(1.0)
    assert np.allclose(w[pred != target] / w[pred == target][0], 5.0)
    assert len(set(w[pred == target].tolist())) == 1


def test_benchmark_aggregations_and_paired_differences():
    from aimfair_ray.benchmark import aggregate, official, paired, targets, to_markdown, versus_baseline
    from aimfair_ray.tables import verdict

    def audit(acc, wst, cells):
        return {"acc": acc, "wst": wst, "std": float(np.std(list(cells.values()))), "eo": 1 - wst, "group_acc": cells}

    per_seed = {s: {"baseline": audit(0.8, 0.4 + 0.1 * s, {"y0_s0": 0.4 + 0.1 * s, "y0_s1": 0.9}),
                    "selective": audit(0.82, 0.7, {"y0_s0": 0.7, "y0_s1": 0.8 if s else 0.9})} for s in range(3)}
    table = aggregate(per_seed)
    b = table["baseline"]["wst"]
    assert b["mean"] == pytest.approx(0.5) and b["ci95"][0] < 0.5 < b["ci95"][1]
    off = official([r["selective"]["group_acc"] for r in per_seed.values()])
    assert off["cells"] == pytest.approx({"y0_s0": 0.7, "y0_s1": 2.5 / 3})
    assert (off["wst"], off["std"]) == pytest.approx((0.7, np.std([0.7, 2.5 / 3])))
    pair = paired(per_seed, against=("baseline",))
    assert pair["baseline"]["wst"]["wins"] == 3 and pair["baseline"]["eo"]["wins"] == 3
    # +20 points on average, but the 3 paired differences (30, 20, 10) leave 0 inside their interval: not met
    goals = {g["target"]: g for g in targets(table, pair)}
    wst_goal = goals["WST at least 10 points above the baseline, the paired interval above 0"]
    assert wst_goal["met"] is False and wst_goal["decided"] == "not decided at 3 seeds", wst_goal
    assert goals["EO at most half the baseline's"]["decided"] == "not decided at 3 seeds"
    md = to_markdown(table, [0, 1, 2], "t", pair=pair)
    assert "WST*" in md and "selective vs" in md and "95% intervals" in md and "3/3, not decided at 3 seeds" in md
    # steady gains decide: the same claim met, "better"; ACC 3 points under full: outside ±2, not met
    steady = {s: {"baseline": audit(0.8, 0.4 + 0.01 * s, {"y0_s0": 0.4 + 0.01 * s, "y0_s1": 0.9}),
                  "full": audit(0.85 + 0.001 * s, 0.5, {"y0_s0": 0.5, "y0_s1": 0.9}),
                  "selective": audit(0.82, 0.7, {"y0_s0": 0.7, "y0_s1": 0.9})} for s in range(3)}
    goals = {g["target"]: g for g in targets(aggregate(steady), paired(steady, against=("baseline", "full")))}
    wst_goal = goals["WST at least 10 points above the baseline, the paired interval above 0"]
    assert wst_goal["met"] is True and wst_goal["decided"] == "better"
    acc_goal = goals["ACC within ±2 points of full fine-tuning"]
    assert acc_goal["met"] is False and acc_goal["decided"] == "outside ±2 points", acc_goal
    vs = versus_baseline(steady)  # each row minus the baseline, paired: selective's WST +29..31 points, decided
    assert set(vs) == {"full", "selective"} and verdict(vs["selective"]["wst"], True) == "better"
    assert vs["selective"]["wst"]["mean"] == pytest.approx(0.7 - 0.41) and vs["full"]["acc"]["wins"] == 3
    md = to_markdown(aggregate(steady), [0, 1, 2], "t", vs_base=vs)
    assert "| row vs baseline |" in md and "| selective | +2.0 [" in md
    assert verdict({"ci95": [-0.05, -0.01], "n": 4}, False) == "better" and verdict({"ci95": [0.01, 0.2], "n": 4}, False) \
        == "worse" and verdict({"ci95": [0.1, 0.1], "n": 1}, True) == "not decided at 1 seed"
    # a row that finished for some seeds only is summarised over those, and says how many
    per_seed[2]["jtt"] = audit(0.7, 0.6, {"y0_s0": 0.6, "y0_s1": 0.8})
    part = aggregate(per_seed)["jtt"]
    assert part["seeds"] == [2] and part["wst"]["values"] == [0.6]
    assert "| jtt | 1 |" in to_markdown(aggregate(per_seed), [0, 1, 2], "t")
    # a selective model that predicts one class on seed 1 (its trivial flag, or read off the cells of an older
    # record): its EO of 0 meets no claim, and the table says which rows have such seeds
    from aimfair_ray.benchmark import one_class

    n = {"y0_s0": 250, "y0_s1": 250, "y1_s0": 250, "y1_s1": 250}
    assert one_class({"group_acc": {"y0_s0": 1.0, "y0_s1": 1.0, "y1_s0": 0.0, "y1_s1": 0.01}, "cell_counts": n})
    assert not one_class({"group_acc": {"y0_s0": 0.9, "y0_s1": 1.0, "y1_s0": 0.2, "y1_s1": 0.1}, "cell_counts": n})
    steady[1]["selective"].update(eo=0.0, trivial=True)
    table = aggregate(steady)
    assert table["selective"]["one_class_seeds"] == [1] and table["baseline"]["one_class_seeds"] == []
    eo_goal = {g["target"]: g for g in targets(table, paired(steady))}["EO at most half the baseline's"]
    assert eo_goal["met"] is False and eo_goal["decided"] == "not decided: one-class models", eo_goal
    assert "| selective (1 one-class) | 3 |" in to_markdown(table, [0, 1, 2], "t")


def test_the_llama_egt_preset_is_valid_and_its_data_fits_bold():
    """The cluster preset for the paper's text setting: a Llama-3.2 model id, LoRA on every block, DeepSpeed;
    its BOLD sets can be drawn (held-out people, 90/10 train share)."""
    from aimfair_ray.egt.text import corpus, text_sets

    cfg = load_config("cmnist", "egt-llama")
    t = cfg.egt.text
    assert t.model.startswith("meta-llama/Llama-3.2") and t.lora_rank > 0 and t.train_layers == 0 and t.deepspeed
    assert cfg.train.use_gpu and cfg.egt.objective == "minmax"
    tr, ev = text_sets(corpus(t), t.n_train, cfg.egt.minority_share, t.n_eval_per_group, cfg.data.seed, 0)
    assert len(tr.texts) == t.n_train and int(tr.groups.sum()) == round(0.1 * t.n_train)
    assert len(ev.texts) == 2 * t.n_eval_per_group


@pytest.mark.parametrize("name", ["aimfair-cmnist", "aimfair-lite0"])
def test_the_published_aimfair_table_is_its_json_rendered(name):
    """benchmarks/results/aimfair-cmnist.md is what `benchmark.render` makes of the .json beside it: a page and its
    file can't disagree (after the tables' code changes, `aimfair benchmark render` writes both again)."""
    import json
    from pathlib import Path

    from aimfair_ray.benchmark import render

    prefix = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / name
    result = json.loads(prefix.with_suffix(".json").read_text())
    assert render(result) == prefix.with_suffix(".md").read_text()
    assert f"not decided at {len(result['seeds'])} seeds" in render(result)
    assert result["rendered"]["command"].startswith("aimfair benchmark render")
