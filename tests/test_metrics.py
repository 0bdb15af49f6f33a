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
