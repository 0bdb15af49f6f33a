from typer.testing import CliRunner

from aimfair_ray.cli import app


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
                ["generate", "quality"], ["finetune"], ["train", "groupdro"], ["benchmark", "aimfair"], ["submit"],
                ["jobs", "list"], ["jobs", "logs"], ["jobs", "stop"], ["sweep"]):
        res = runner.invoke(app, cmd + ["--help"])
        assert res.exit_code == 0 and "Usage" in res.output
