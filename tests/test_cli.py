import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from aimfair_ray.cli import app

from conftest import TINY, tiny_gen


def test_demo_end_to_end_and_rerun(ray_cluster, tiny_pipeline, tmp_path):
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    sets = TINY + tiny_gen(tiny_pipeline) + [f"output_dir={tmp_path}"]
    args = [sys.executable, "-m", "aimfair_ray.cli", "demo"] + [x for s in sets for x in ("--set", s)]
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("biased baseline on the test set")]
    assert line and all(k in line[0] for k in ("ACC", "WST", "STD", "EO"))
    run = tmp_path / "cmnist"
    rep = json.loads((run / "baseline" / "audit" / "audit.json").read_text())
    assert {"acc", "wst", "std", "eo", "eod_worst", "dp", "group_acc", "n"} <= set(rep)
    assert f"ACC {rep['acc']:.4f}" in line[0]
    for d in ("data", "synthetic", "baseline", "baseline/audit", "finetune/selective", "finetune/selective/audit"):
        assert (run / d / "config.yaml").is_file()
    tuned = [ln for ln in res.stdout.splitlines() if ln.startswith("fine-tuned (selective) on the test set")]
    ft = json.loads((run / "finetune" / "selective" / "audit" / "audit.json").read_text())
    assert tuned and f"WST {ft['wst']:.4f}" in tuned[0]
    assert json.loads((run / "finetune" / "selective" / "selection.json").read_text())["n_trainable_tensors"] >= 1
    for kind in ("balanced", "imbalanced"):
        assert (run / "synthetic" / kind / "_COMPLETE").is_file()
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "data: reusing" in again.stdout and again.stdout.count("train: reusing") == 2
    assert "prompts: reusing" in again.stdout and "0 to generate" in again.stdout


def test_audit_bad_checkpoints_exit_nonzero(ray_cluster, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "--checkpoint", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "model.pt").write_bytes(b"\x80\x04")
    res = runner.invoke(app, ["audit", "--checkpoint", str(tmp_path / "pk")])
    assert res.exit_code == 2 and "pickled checkpoints are never loaded" in res.output


def test_finetune_and_benchmark_bad_input_exit_nonzero(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["finetune", "--method", "bogus", "--set", f"output_dir={tmp_path}"])
    assert res.exit_code == 2 and "unknown fine-tuning method 'bogus'" in res.output and "selective" in res.output
    res = runner.invoke(app, ["finetune", "--set", f"output_dir={tmp_path}"])
    assert res.exit_code == 2 and "aimfair train baseline" in res.output
    res = runner.invoke(app, ["benchmark", "aimfair", "--methods", "full,nope", "--set", f"output_dir={tmp_path}"])
    assert res.exit_code == 2 and "unknown --methods ['nope']" in res.output
    res = runner.invoke(app, ["finetune", "--set", "finetune.bn_stats=sometimes"])
    assert res.exit_code == 2 and "finetune.bn_stats" in res.output


def test_help_on_every_command():
    runner = CliRunner()
    for cmd in ([], ["data", "prepare"], ["train", "baseline"], ["audit"], ["demo"], ["config", "show"],
                ["generate", "prompts"], ["generate", "images"], ["generate", "all"], ["generate", "filter"],
                ["generate", "quality"], ["finetune"], ["train", "groupdro"], ["benchmark", "aimfair"]):
        res = runner.invoke(app, cmd + ["--help"])
        assert res.exit_code == 0 and "Usage" in res.output
