import numpy as np
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score

from aimfair_ray.metrics import fairness_report


def _random(seed, n, n_groups):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = rng.integers(0, n_groups, n)
    p = np.where(rng.random(n) < 0.7 + 0.05 * s, y, 1 - y)  # group-dependent error rates
    return y, p, s


@pytest.mark.parametrize("seed,n_groups", [(0, 2), (1, 2), (2, 3), (3, 4), (4, 5)])
def test_metrics_match_fairlearn(seed, n_groups):
    y, p, s = _random(seed, 500 + 37 * seed, n_groups)
    r = fairness_report(y, p, s)
    assert r["acc"] == pytest.approx(accuracy_score(y, p))
    assert r["eod_worst"] == pytest.approx(equalized_odds_difference(y, p, sensitive_features=s))
    assert r["dp"] == pytest.approx(demographic_parity_difference(y, p, sensitive_features=s))
    mf = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate}, y_true=y, y_pred=p,
                     sensitive_features=s)
    assert r["eo"] == pytest.approx((mf.difference()["tpr"] + mf.difference()["fpr"]) / 2)
    cells = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=p,
                        sensitive_features={"y": y, "s": s}).by_group
    assert r["wst"] == pytest.approx(cells.min())
    assert r["std"] == pytest.approx(np.std(cells.to_numpy()))  # population std over cells
    for (yy, ss), acc in cells.items():
        assert r["group_acc"][f"y{yy}_s{ss}"] == pytest.approx(acc)
    assert r["n"] == len(y)
    assert sum(r["cell_counts"].values()) == len(y)
    assert sum(np.sum(cm) for cm in r["confusion"].values()) == len(y)


def test_known_values_and_empty_cell():
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    s = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([1, 1, 0, 0, 1, 0, 1, 0])
    r = fairness_report(y, p, s)
    assert r["acc"] == 0.75
    assert r["group_acc"] == {"y0_s0": 1.0, "y0_s1": 0.5, "y1_s0": 1.0, "y1_s1": 0.5}
    assert r["wst"] == 0.5
    assert r["eo"] == pytest.approx((0.5 + 0.5) / 2)
    # a cell with no samples is reported with count 0 and left out of WST/STD
    r2 = fairness_report(y[:6], p[:6], s[:6], n_classes=2, n_groups=2)
    assert r2["cell_counts"]["y0_s1"] == 0 and "y0_s1" not in r2["group_acc"]


def test_multiclass_and_bad_input():
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 3, 300), rng.integers(0, 2, 300)
    r = fairness_report(y, y, s)
    assert r["acc"] == 1.0 and r["eo"] == 0.0 and len(r["group_acc"]) == 6
    with pytest.raises(ValueError, match="length mismatch"):
        fairness_report([0, 1], [0], [0, 1])


@pytest.mark.parametrize("n_classes,n_groups", [(2, 2), (2, 3), (3, 2), (4, 5)])
def test_metrics_from_a_count_table_equal_the_reports(n_classes, n_groups):
    """The bootstrap computes its replicates from (target, group, prediction) counts: at the observed counts they
    are the report's own figures, empty cells and groups included."""
    from aimfair_ray.metrics import count_table, metrics_from_counts

    rng = np.random.default_rng(n_classes * 10 + n_groups)
    for t in range(10):
        y, s = rng.integers(0, n_classes, 300), rng.integers(0, n_groups, 300)
        p = np.where(rng.random(300) < 0.7, y, rng.integers(0, n_classes, 300))
        if t % 2:  # a cell, then a whole group, with no rows
            keep = ~((y == 0) & (s == n_groups - 1)) if t % 4 == 1 else s != n_groups - 1
            y, s, p = y[keep], s[keep], p[keep]
        want = fairness_report(y, p, s, n_classes, n_groups)
        got = metrics_from_counts(count_table(y, p, s, n_classes, n_groups))
        for k in got:
            assert float(got[k]) == pytest.approx(want[k], abs=1e-12), (t, k)


def test_bootstrap_intervals_are_seeded_hold_the_estimate_narrow_with_n_and_cover_the_truth():
    from aimfair_ray.metrics import bootstrap_intervals

    rng = np.random.default_rng(0)

    def draw(n, acc=(0.9, 0.8, 0.7, 0.6)):  # 4 equal cells with known accuracies: WST 0.6, ACC 0.75
        y, s = np.repeat([0, 0, 1, 1], n), np.repeat([0, 1, 0, 1], n)
        ok = rng.random(4 * n) < np.repeat(acc, n)
        return y, np.where(ok, y, 1 - y), s

    y, p, s = draw(100)
    a, b = (bootstrap_intervals(y, p, s, 2, 2, 500, seed=3) for _ in range(2))
    assert a == b and a != bootstrap_intervals(y, p, s, 2, 2, 500, seed=4)
    rep = fairness_report(y, p, s, 2, 2)
    assert all(lo <= rep[m] <= hi for m, (lo, hi) in a.items()), (a, rep)
    wide, narrow = (bootstrap_intervals(*draw(n), 2, 2, 500)["acc"] for n in (50, 800))
    assert (narrow[1] - narrow[0]) < 0.5 * (wide[1] - wide[0])  # ~1/sqrt(n): a quarter of the width at 16x n
    # coverage: the ACC interval holds the true 0.75 in about 95% of fresh test sets
    hits = sum(lo <= 0.75 <= hi for lo, hi in (bootstrap_intervals(*draw(100), 2, 2, 400, seed=i)["acc"]
                                               for i in range(200)))
    assert 180 <= hits <= 199, hits


def test_a_one_class_model_is_named_and_its_eo_and_dp_marked_trivial():
    from aimfair_ray.evaluate import fmt, with_evidence

    y, s = np.array([0, 0, 1, 1] * 50), np.array([0, 1, 0, 1] * 50)
    const = fairness_report(y, np.ones(200, int), s, 2, 2)
    with_evidence(const, y, np.ones(200, int), s, 200, target_names=["no", "yes"])
    assert const["trivial"] and const["eo"] == 0 and const["dp"] == 0
    assert any("predicts yes for 100.0% of the 200 images" in w and "EO and DP" in w for w in const["warnings"])
    assert fmt(const, "eo").endswith("(trivial)") and "(trivial)" not in fmt(const, "acc")
    assert fmt(const, "acc") == f"0.5000 [{const['intervals']['acc'][0]:.3f}, {const['intervals']['acc'][1]:.3f}]"
    fine = fairness_report(y, y, s, 2, 2)
    with_evidence(fine, y, y, s, 0)
    assert not fine["trivial"] and fine["warnings"] == [] and fine["intervals"] == {} and fmt(fine, "eo") == "0.0000"


def test_any_torch_classifier_audited_through_the_api_as_frames_with_intervals():
    """api.audit_classifier: a plain PyTorch model (not this project's checkpoint) on labelled uint8 images; its
    Audit gives the overall figures and each cell's accuracy as pandas frames with intervals, equal to fairlearn's."""
    import torch

    from aimfair_ray import AimfairError
    from aimfair_ray.api import audit_classifier

    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    images = rng.integers(0, 100, (400, 8, 8, 3)).astype(np.uint8)
    images[..., 0] += (150 * y).astype(np.uint8)[:, None, None]  # the red channel says the class...
    images[..., 0] = np.where(((s == 1) & (rng.random(400) < 0.3))[:, None, None], 0, images[..., 0])  # ...less for group 1

    class RedIsOne(torch.nn.Module):
        def forward(self, x):
            red = x[:, 0].mean((1, 2))
            return torch.stack([0.4 - red, red - 0.4], 1)

    a = audit_classifier(RedIsOne(), images, y, s, target_names=["no", "yes"], group_names=["a", "b"], batch_size=64)
    p = (images[..., 0].astype(float).mean((1, 2)) / 255 > 0.4).astype(int)
    mf = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=p, sensitive_features=s)
    assert a.summary.loc["acc", "value"] == pytest.approx(mf.overall)
    cells = a.by_cell
    assert list(cells.columns) == ["target", "group", "n", "accuracy", "ci_low", "ci_high"]
    assert cells.loc["y1_s1", ["target", "group"]].tolist() == ["yes", "b"] and cells["n"].sum() == 400
    assert (cells["ci_low"] <= cells["accuracy"]).all() and (cells["accuracy"] <= cells["ci_high"]).all()
    assert a.summary.loc["wst", "value"] == cells["accuracy"].min() < a.summary.loc["acc", "value"]
    s_ = a.summary
    assert ((s_["ci_low"] <= s_["value"]) & (s_["value"] <= s_["ci_high"])).all() and not a.one_class
    assert "WST" in repr(a) and "[" in repr(a)
    with pytest.raises(AimfairError, match="400 images, 399 targets"):
        audit_classifier(RedIsOne(), images, y[:-1], s)
