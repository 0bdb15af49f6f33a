"""Ray Tune sweeps: the spec, the Pareto front, and a real sweep that is killed and resumed."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TINY, tiny_gen
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


SPACE = """\
kind: selective
space:
  finetune.lr: {grid: [0.001, 0.01]}
  finetune.synthetic: {grid: [balanced, balanced_filtered]}   # no filtered sets here: those 2 trials fail
objective: {val_acc: 1.0, val_eo: -0.5}
pareto: [val_acc, val_eo]
asha: {grace_period: 1}
overrides: [train.num_workers=1]
"""


def _run_until_a_trial_ends_then_kill(args: list[str], env: dict, out: Path, wait: float = 300, settle: float = 0) -> dict:
    """Start a sweep command; once a trial has ended (its result and its line in attempts.log written;
    ``settle`` seconds more, so the next trial is starting), SIGKILL the driver's process group; return
    the finished trials' result mtimes."""
    log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stall the driver, and Tune with it
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    def ended() -> dict:
        return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json")
                if (p.parent / "attempts.log").is_file()}

    deadline = time.time() + wait
    while time.time() < deadline and not (finished := ended()):
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the sweep ended before a trial did: {log.read()[-3000:]}")
        time.sleep(1)
    assert finished, "no trial finished in time"
    time.sleep(settle)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, hard, while other trials are still to run
    proc.wait()
    time.sleep(2)  # let Ray notice the dead driver and free its trials' workers
    return finished


def test_sweep_killed_midway_resumes_only_the_rest(synth, ray_cluster, tiny_pipeline, tmp_path):
    cfg, _ = synth
    space = tmp_path / "sweep.yaml"
    space.write_text(SPACE)
    sets = TINY + tiny_gen(tiny_pipeline) + [f"output_dir={cfg.output_dir}", "train.num_workers=2",
                                             "finetune.epochs=2", "finetune.batch_size=8"]
    args = [sys.executable, "-m", "aimfair_ray.cli", "sweep", "selective", "--space", str(space), "--name", "t"]
    args += [x for s in sets for x in ("--set", s)]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    out = Path(cfg.stage_dir("sweep/t"))
    finished = _run_until_a_trial_ends_then_kill(args + ["--wandb"], env, out, wait=420, settle=3)

    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)  # W&B: kept from the start
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if "sweep: resuming" in ln]
    assert line, res.stdout[-3000:]
    counts = [int(w) for w in re.findall(r"(\d+) (?:finished|failed|to run)", line[0])]
    n_done = counts[0]
    assert 1 <= n_done < 4 and sum(counts) == 4, line[0]  # finished + failed + to run: every trial
    # finished trials were not trained again: same result.json, one training each
    for tid, mtime in finished.items():
        assert (out / "trials" / tid / "result.json").stat().st_mtime_ns == mtime
        assert (out / "trials" / tid / "attempts.log").read_text().split().count("trained") == 1
    data = json.loads((out / "trials.json").read_text())
    rows = data["trials"]
    assert len(rows) == 4
    errors = [r for r in rows if r["status"] == "ERROR"]
    assert len(errors) == 2 and all(r["params"]["finetune.synthetic"] == "balanced_filtered" for r in errors)
    assert all("no synthetic" in r["error"] and "aimfair generate all" in r["error"] for r in errors)
    good = [r for r in rows if r["status"] != "ERROR"]
    assert all(r["trainings"] == (r["status"] == "DONE") for r in good)  # once across both calls (ASHA-stopped: 0)
    assert all(r["metrics"]["objective"] == pytest.approx(r["metrics"]["val_acc"] - 0.5 * r["metrics"]["val_eo"])
               for r in good)
    assert data["best"]["trial_id"] in {r["trial_id"] for r in good}
    assert data["best"]["metrics"]["objective"] == max(r["metrics"]["objective"] for r in good)
    assert any(r["pareto"] for r in good) and not any(r["pareto"] for r in errors)
    with open(out / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and {"finetune.lr", "val_acc", "val_eo", "objective", "checkpoint"} <= set(table[0])
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    assert "Best trial" in summary and "2 failed" in summary
    logged = {p.name.rsplit("-", 1)[1] for p in (out / "wandb").glob("offline-run-*")}
    assert set(finished) <= logged and len(logged) > len(finished), logged  # before and after the resume
