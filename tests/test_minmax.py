"""The min–max objective of EGT on toy problems with known answers (plain PyTorch, no Ray)."""

import math

import pytest
import torch

from aimfair_ray.minmax import GroupWeights, NoiseBuckets, NoiseLevelWeights, Objective


@pytest.mark.parametrize("eta", [0.1, 0.5])
def test_weights_move_toward_the_worse_group_at_the_rate_eta_sets(eta):
    """Fixed losses L0 = 1, L1 = 2: after t steps, q1 / q0 = exp(eta * t * (L1 - L0))."""
    gw = GroupWeights(2, eta=eta)
    losses, groups = torch.tensor([1.0, 2.0]), torch.tensor([0, 1])
    for t in range(1, 11):
        gw(losses, groups)
        assert math.log(gw.q[1] / gw.q[0]) == pytest.approx(eta * t * 1.0, rel=1e-9)
    assert gw.q[1] > gw.q[0]


def test_two_quadratic_group_losses_reach_the_min_max_equilibrium():
    """L0 = (θ - 0)², L1 = 4 (θ - 3)². min_θ max_q: the losses are equal at θ* = 2 (both 4), and
    stationarity q0 * 2θ + q1 * 8 (θ - 3) = 0 gives q* = (2/3, 1/3). ERM would stop at θ = 2.4."""
    gw = GroupWeights(2, eta=0.05)
    theta = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.02)
    for _ in range(3000):
        losses = torch.stack([theta ** 2, 4 * (theta - 3) ** 2])
        loss = gw(losses, torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert theta.item() == pytest.approx(2.0, abs=1e-3)
    assert gw.q.tolist() == pytest.approx([2 / 3, 1 / 3], abs=1e-3)


def test_every_timestep_falls_in_exactly_one_bucket():
    for n_buckets, T in [(1, 1000), (4, 1000), (7, 1000), (10, 10), (3, 50)]:
        nb = NoiseBuckets(n_buckets, T)
        b = nb(torch.arange(T))
        assert b.min() == 0 and b.max() == n_buckets - 1
        assert torch.all(b[1:] >= b[:-1])  # contiguous: noise levels are not interleaved
        sizes = torch.bincount(b, minlength=n_buckets)
        assert sizes.sum() == T and sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
        edges = nb.edges()
        assert edges[0][0] == 0 and edges[-1][1] == T - 1
        assert all(e[1] + 1 == f[0] for e, f in zip(edges, edges[1:]))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        NoiseBuckets(4, 1000)(torch.tensor([1000]))
    with pytest.raises(ValueError, match="n_buckets"):
        NoiseBuckets(0, 1000)


def test_noise_level_weights_act_per_bucket():
    """Group 1 is worse at low noise, group 0 at high noise: each bucket's weights follow its own worst group."""
    w = NoiseLevelWeights(2, eta=1.0, n_buckets=2, num_timesteps=100)
    t = torch.tensor([10, 10, 90, 90])
    groups = torch.tensor([0, 1, 0, 1])
    losses = torch.tensor([0.1, 1.0, 2.0, 0.5], requires_grad=True)
    for _ in range(5):
        loss = w(losses, groups, t)
    assert w.q[0, 1] > 0.9 and w.q[1, 0] > 0.9
    loss.backward()
    assert losses.grad[1] > losses.grad[0] and losses.grad[2] > losses.grad[3]
    again = NoiseLevelWeights(2, eta=1.0, n_buckets=2, num_timesteps=100)
    again.load_state_dict(w.state_dict())
    assert torch.equal(again.q, w.q)


def test_objectives():
    losses, groups = torch.tensor([1.0, 1.0, 1.0, 5.0]), torch.tensor([0, 0, 0, 1])
    assert Objective("erm", 2)(losses, groups).item() == pytest.approx(2.0)
    assert Objective("conditional", 2)(losses, groups).item() == pytest.approx(2.0)
    assert Objective("reweight", 2)(losses, groups).item() == pytest.approx(3.0)  # balanced: (1 + 5) / 2
    mm = Objective("minmax", 2, eta=1.0)
    assert mm(losses, groups).item() > 3.0 and mm.weights.q[1] > 0.5
    rw = Objective("reweight", 2, n_buckets=4, num_timesteps=1000)
    assert isinstance(rw.weights, NoiseLevelWeights)
    assert rw(losses, groups, torch.tensor([0, 300, 600, 900])).item() == pytest.approx(2.0)  # one sample per bucket
    with pytest.raises(ValueError, match="unknown objective"):
        Objective("dro", 2)


def test_absent_groups_do_not_drift_the_weights_toward_the_majority():
    """Small batches often miss the minority group: such a batch must not move the weights, and a
    batch without some groups moves only the present ones' ratios (by the usual EG step)."""
    gw = GroupWeights(3, eta=1.0)
    for _ in range(10):
        gw(torch.tensor([0.5, 0.7]), torch.tensor([0, 0]))  # only group 0 present
    assert torch.allclose(gw.q, torch.full((3,), 1 / 3, dtype=torch.float64))
    gw(torch.tensor([1.0, 3.0]), torch.tensor([0, 1]))  # group 2 absent
    assert gw.q[2] == pytest.approx(1 / 3)
    assert math.log(gw.q[1] / gw.q[0]) == pytest.approx(2.0)


def test_worst_rule_puts_all_weight_on_each_buckets_worst_group_of_the_smoothed_losses():
    """``worst``: in each noise bucket, q is one-hot on the group with the highest (EMA-smoothed) loss; the
    robust loss is that group's loss. A one-batch spike does not flip it while the EMA remembers."""
    w = NoiseLevelWeights(2, eta=0.0, n_buckets=2, num_timesteps=100, ema=0.9, rule="worst")
    t, groups = torch.tensor([10, 10, 90, 90]), torch.tensor([0, 1, 0, 1])
    losses = torch.tensor([0.1, 1.0, 2.0, 0.5], requires_grad=True)
    loss = w(losses, groups, t)
    assert torch.equal(w.q, torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
    assert loss.item() == pytest.approx((2 * 1.0 + 2 * 2.0) / 4)  # each bucket's worst group, weighted by its samples
    loss.backward()
    assert losses.grad.tolist() == pytest.approx([0.0, 0.5, 0.5, 0.0])
    w(torch.tensor([1.5, 1.0, 2.0, 0.5]), groups, t)  # bucket 0: one batch where group 0 is worse
    assert w.q[0].tolist() == [0.0, 1.0]  # EMA: 0.9 * 0.1 + 0.1 * 1.5 = 0.24 < 1.0
    sharp = GroupWeights(3, eta=0.0, rule="worst")
    sharp(torch.tensor([0.2, 0.9, 0.4]), torch.tensor([0, 1, 2]))
    assert sharp.q.tolist() == [0.0, 1.0, 0.0]
    assert Objective("minmax", 3, rule="worst").weights.rule == "worst"
    assert Objective("reweight", 3, rule="worst").weights.rule == "soft"  # only min–max follows the rule
    with pytest.raises(ValueError, match="update rule"):
        GroupWeights(2, eta=1.0, rule="hard")
