"""Ray Tune sweeps: the spec, the Pareto front and the command's refusals (a real sweep, killed and resumed, runs on
the share-nothing cluster: tests/test_share_nothing.py)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from aimfair_ray import AimfairError
from aimfair_ray.cli import app
from aimfair_ray.config import load_config
from aimfair_ray.sweep import SweepSpec, check_space, concurrency, load_spec, pareto_front, trial_config


def test_pareto_front_known_answer():
    # (utility up, unfairness down): (0.80, 0.30) is beaten by (0.90, 0.20); a duplicate of a front point stays.
    pts = [(0.90, 0.20), (0.80, 0.30), (0.70, 0.05), (0.95, 0.40), (0.90, 0.20), (0.60, 0.05)]
    assert pareto_front(pts) == [0, 2, 3, 4]
    # EGT: quality and its gap, both lower is better: (0.60, 0.05) beats all; (0.50, 0.30) trades gap for quality
    assert pareto_front(pts, x_high=False) == [5] and pareto_front(pts + [(0.5, 0.3)], x_high=False) == [5, 6]


def test_spec_checks_and_trial_configs():
    base = load_config("cmnist")
    for kind in ("selective", "group_dro", "egt-image", "egt-text"):
        spec = load_spec(kind)
        check_space(base, spec)
        assert len(spec.space) >= 2
    egt = load_spec("egt-image")
    assert egt.egt == "image" and egt.time_attr == "step" and egt.mode == "min"
    assert concurrency(trial_config(base, {}, egt), egt, {"CPU": 4}) == 4  # an EGT trial reads no Ray Data set
    spec = load_spec("selective")
    assert spec.n_trials == 10  # 5 k x 2 lr
    assert spec.model_copy(update={"num_samples": 3, "space": {**spec.space, "x": {"uniform": [0, 1]}}}).n_trials == 30
    cfg = trial_config(base, {"finetune.k": 0.8, "finetune.lr": 0.003}, spec)
    assert cfg.finetune.k == 0.8 and cfg.finetune.lr == 0.003 and cfg.train.num_workers == 1  # overrides applied
    assert base.train.num_workers == 2
    # resources decide the concurrency: 1 worker + 2 CPUs for the data of each trial
    assert concurrency(cfg, spec, {"CPU": 4}) == 1 and concurrency(cfg, spec, {"CPU": 9}) == 3
    with pytest.raises(AimfairError, match="lower train.num_workers"):
        concurrency(cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": 8})}), spec, {"CPU": 4})
    bad = [({"kind": "selective", "space": {"finetune.k": {"grid": []}}}, "empty list"),
           ({"kind": "selective", "space": {"finetune.lr": {"loguniform": [0, 1]}}}, "must be > 0"),
           ({"kind": "selective", "space": {"finetune.lr": {"uniform": [2, 1]}}}, "low < high"),
           ({"kind": "selective", "space": {"finetune.k": {"normal": [1, 2]}}}, "exactly one of grid"),
           ({"kind": "selective", "space": {"finetune.k": {"grid": [1]}}, "objective": "acc"}, "unknown metric")]
    for raw, msg in bad:
        with pytest.raises(Exception, match=msg):
            SweepSpec.model_validate(raw)
    typo = SweepSpec.model_validate({"kind": "selective", "space": {"finetune.kk": {"grid": [1]}}})
    with pytest.raises(AimfairError, match="unknown field 'kk'"):
        check_space(base, typo)
    neg = SweepSpec.model_validate({"kind": "selective", "space": {"finetune.lr": {"grid": [0.001, -1]}}})
    with pytest.raises(AimfairError, match="finetune.lr"):
        check_space(base, neg)


def test_sweep_cli_bad_input_exits_nonzero(tmp_path, monkeypatch):
    runner = CliRunner()
    res = runner.invoke(app, ["sweep", "bogus", "--set", f"output_dir={tmp_path}"])
    assert res.exit_code == 2 and "choose selective, group_dro, egt-image, egt-text" in res.output
    f = tmp_path / "s.yaml"
    f.write_text("space:\n  finetune.k: {grid: [0.5]}\nobjective: val_accuracy\n")
    res = runner.invoke(app, ["sweep", "selective", "--space", str(f), "--set", f"output_dir={tmp_path}"])
    assert res.exit_code == 2 and "unknown metric" in res.output and "val_acc" in res.output
    res = runner.invoke(app, ["sweep", "selective", "--set", f"output_dir={tmp_path}"])
    assert res.exit_code == 2 and "no baseline" in res.output and "aimfair demo" in res.output
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    res = runner.invoke(app, ["sweep", "minmax", "--wandb", "--set", f"output_dir={tmp_path}"])  # the old kind name
    assert res.exit_code == 2 and "WANDB_API_KEY" in res.output
    assert "note: `sweep minmax` is now `sweep group_dro`" in res.output


# A real sweep, killed midway and resumed (only the rest runs), on nodes that share only S3: tests/test_share_nothing.py.
