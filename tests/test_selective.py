"""AIM-Fair selection math and the min–max group weights, in plain PyTorch (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aimfair_ray.minmax import GroupWeights
from aimfair_ray.train import selective as sel


class ThreeFeatures(nn.Module):
    """logit_1 = a·f_a + b·f_b + c·f_c, logit_0 = 0: each tensor's gradient is -(1-p)·f (known)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Parameter(torch.zeros(1)) for _ in range(3))

    def forward(self, x):
        z = self.a * x[:, 0, 0, 0] + self.b * x[:, 1, 0, 0] + self.c * x[:, 2, 0, 0]
        return torch.stack([torch.zeros_like(z), z], 1)


def _batch(fa, fb, fc, n=8):
    img = torch.zeros(n, 3, 1, 1, dtype=torch.uint8)
    img[:, 0], img[:, 1], img[:, 2] = fa, fb, fc
    return {"image": img, "target": torch.ones(n, dtype=torch.long), "group": torch.zeros(n, dtype=torch.long)}


def test_known_gradients_rank_bias_and_domain_tensors():
    model = ThreeFeatures()
    # a: the same on Rb and Sb, different on Su -> bias only; b: differs Rb vs Sb only -> domain only; c: constant.
    data = {"rb": _batch(10, 30, 10), "sb": _batch(10, 10, 10), "su": _batch(30, 10, 10)}
    g = {}
    for s, b in data.items():
        sums, n = sel.grad_sums(model, [b], mean=[0, 0, 0], std=[1 / 255] * 3, device="cpu")
        g[s] = sel.mean_grads(sums, n)
    # at zero weights p = 0.5, y = 1: dL/dw = -(1 - 0.5) * f
    assert torch.allclose(g["rb"]["b"], torch.tensor([-15.0], dtype=torch.float64))
    domain, bias = sel.scores(g)
    assert max(bias, key=bias.get) == "a" and bias["a"] == pytest.approx(10.0)
    assert max(domain, key=domain.get) == "b" and domain["b"] == pytest.approx(10.0)
    assert bias["b"] == 0 and domain["a"] == 0 and domain["c"] == bias["c"] == 0
    # k=1: lowest domain is a (tie with c broken by order), highest bias is a -> {a}
    assert sel.select(domain, bias, 1) == ["a"]
    # k=2: lowest domain {a, c}, highest bias {a, b} -> {a}
    assert sel.select(domain, bias, 2) == ["a"]
    assert sel.select(domain, bias, 3) == ["a", "b", "c"]
    # an empty intersection grows k until it holds enough tensors
    d2, b2 = {"x": 0.0, "y": 1.0, "z": 2.0}, {"x": 0.0, "y": 1.0, "z": 2.0}
    assert sel.select(d2, b2, 1) == [] and sel.select_at_least(d2, b2, 1, 1) == (["y"], 2)
    assert sel.select_at_least(d2, b2, 1, 0) == ([], 1)


def test_gradients_do_not_depend_on_batching():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    imgs = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8)
    ys = torch.randint(0, 2, (24,))
    whole, n1 = sel.grad_sums(model, [{"image": imgs, "target": ys}], [0.5] * 3, [0.5] * 3, "cpu")
    parts, n2 = sel.grad_sums(model, [{"image": imgs[i:i + 5], "target": ys[i:i + 5]} for i in range(0, 24, 5)],
                              [0.5] * 3, [0.5] * 3, "cpu")
    assert n1 == n2 == 24
    for k in whole:
        assert torch.allclose(whole[k], parts[k], atol=1e-5)


def test_resolve_k_and_random_control():
    assert sel.resolve_k(0.5, 14) == 7 and sel.resolve_k(3, 14) == 3 and sel.resolve_k(100, 14) == 14
    assert sel.resolve_k(0.01, 14) == 1
    with pytest.raises(ValueError, match="k must be > 0"):
        sel.resolve_k(0, 14)
    names = [f"t{i}" for i in range(20)]
    a, b = sel.random_tensors(names, 5, seed=1), sel.random_tensors(names, 5, seed=1)
    assert a == b and len(a) == 5 and a == [n for n in names if n in a]
    assert sel.random_tensors(names, 5, seed=2) != a


def test_element_masks_follow_the_same_rule():
    g = {"rb": {"w": torch.tensor([0.0, 5.0, 0.0, 0.0])},
         "sb": {"w": torch.tensor([0.0, 0.0, 0.0, 0.0])},
         "su": {"w": torch.tensor([3.0, 9.0, 0.0, 1.0])}}
    m = sel.element_masks(g, 0.5)["w"]  # k = 2: lowest domain {0, 2}, highest bias {1, 0} -> {0}
    assert m.tolist() == [True, False, False, False]


def test_freeze_skips_weight_gradients_and_keeps_bn_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    assert sel.head_tensors(model) == ["4.weight", "4.bias"]
    frozen_bn = sel.freeze(model, ["4.weight", "4.bias"], bn_stats="frozen_layers")
    assert frozen_bn == [model[1]]
    assert sel.freeze(model, ["1.weight", "4.weight"], "frozen_layers") == []  # its weight trains
    assert sel.freeze(model, ["1.weight", "4.weight"], "keep") == [model[1]]
    assert sel.freeze(model, ["4.weight"], "update") == []
    frozen_bn = sel.freeze(model, ["4.weight", "4.bias"], bn_stats="frozen_layers")
    from aimfair_ray.config import TrainConfig
    from aimfair_ray.train import loop

    opt = loop.make_optimizer(model.parameters(), TrainConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"image": torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), "target": torch.randint(0, 2, (16,)),
             "group": torch.zeros(16, dtype=torch.long)}
    loop.train_epoch(model, [batch], opt, [0.5] * 3, [0.5] * 3, "cpu", frozen_bn=frozen_bn)
    after = model.state_dict()
    assert model[0].weight.grad is None  # no weight-gradient work for frozen tensors
    for k in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["4.weight"], after["4.weight"])
    with pytest.raises(ValueError, match="unknown parameter"):
        sel.freeze(model, ["nope"])


def test_element_mask_keeps_masked_weights_under_adamw():
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, :2] = True
    init = lin.weight.detach().clone()
    keep = sel.ElementMask(lin, {"weight": mask})
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        loss = lin(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        keep()
    assert torch.equal(lin.weight[~mask], init[~mask])
    assert not torch.equal(lin.weight[mask], init[mask])


def test_group_weights_exponentiated_gradient():
    gw = GroupWeights(3, eta=0.5)
    losses = torch.tensor([1.0, 1.0, 3.0, 0.5], requires_grad=True)
    groups = torch.tensor([0, 0, 1, 2])
    robust = gw(losses, groups)
    w = torch.tensor([math.exp(0.5 * 1.0), math.exp(0.5 * 3.0), math.exp(0.5 * 0.5)], dtype=torch.float64)
    w = w / w.sum()
    assert torch.allclose(gw.q, w)
    assert robust.item() == pytest.approx(float((w * torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)).sum()), rel=1e-6)
    robust.backward()  # gradient reaches every sample through its group's mean
    assert losses.grad[0].item() == pytest.approx(float(w[0]) / 2, rel=1e-6)
    # the worst group gains weight over repeated steps; an absent group keeps its weight
    q2 = gw.q[2].item()
    for _ in range(20):
        gw(torch.tensor([0.1, 2.0]), torch.tensor([0, 1]))
    assert gw.q.argmax().item() == 1 and gw.q[0] < 1e-6 and gw.q[2].item() == pytest.approx(q2)
    gw0 = GroupWeights(2, eta=0.0)
    gw0(torch.tensor([5.0, 0.1]), torch.tensor([0, 1]))
    assert torch.allclose(gw0.q, torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="expected 3"):
        gw.load_state_dict(gw0.state_dict())
    gw2 = GroupWeights(2, eta=1.0)
    gw2.load_state_dict({"q": [0.2, 0.8]})
    assert torch.allclose(gw2.q, torch.tensor([0.2, 0.8], dtype=torch.float64))
    with pytest.raises(ValueError, match="eta"):
        GroupWeights(2, eta=-1)


def test_group_weights_ema_smooths_the_ascent():
    gw = GroupWeights(2, eta=1.0, ema=0.5)
    gw(torch.tensor([1.0, 3.0]), torch.tensor([0, 1]))  # first sight: the smoothed losses are the batch's
    assert torch.allclose(gw.avg, torch.tensor([1.0, 3.0], dtype=torch.float64))
    gw(torch.tensor([3.0]), torch.tensor([0]))  # group 1 absent: its smoothed loss stays 3.0
    assert torch.allclose(gw.avg, torch.tensor([2.0, 3.0], dtype=torch.float64))
    q = torch.tensor([math.exp(1.0 + 2.0), math.exp(3.0 + 3.0)], dtype=torch.float64)
    assert torch.allclose(gw.q, q / q.sum())  # q ∝ exp(eta * sum of the smoothed losses seen so far)
    again = GroupWeights(2, eta=1.0, ema=0.5)
    again.load_state_dict(gw.state_dict())
    assert torch.equal(again.avg, gw.avg) and torch.equal(again.seen, gw.seen)
    with pytest.raises(ValueError, match="EMA decay"):
        GroupWeights(2, eta=1.0, ema=1.0)


def test_a_k_based_selection_of_under_one_percent_of_the_weights_warns_naming_finetune_k():
    from aimfair_ray.train.finetune import small_selection

    info = {"method": "selective", "n_trainable_tensors": 2, "n_tensors": 149, "trainable_fraction": 0.0001, "k": 0.5}
    said = small_selection(info, 0.5)
    assert said.startswith("selective chose 2 of 149 tensors, 0.01% of the weights") and "raise finetune.k (now 0.5)" in said
    assert small_selection(dict(info, trainable_fraction=0.2), 0.5) is None  # enough weights
    assert small_selection(dict(info, method="linear", k=None), None) is None  # no k to raise: the head by design
