
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
                ["generate", "quality"], ["finetune"], ["train", "groupdro"], ["train", "jtt"], ["benchmark", "aimfair"],
                ["submit"],
                ["jobs", "list"], ["jobs", "logs"], ["jobs", "stop"], ["sweep"], ["serve"]):
        res = runner.invoke(app, cmd + ["--help"])
        assert res.exit_code == 0 and "Usage" in res.output


def test_serve_refuses_a_token_on_the_command_line_and_a_missing_model_before_ray(tmp_path):
    """(`aimfair serve` itself runs on the share-nothing cluster: tests/test_share_nothing.py.)"""
    res = CliRunner().invoke(app, ["serve", "--token", "abc"])
    assert res.exit_code == 2 and "--token-file" in res.output and "process list" in res.output
    res = CliRunner().invoke(app, ["serve", "--model", f"x={tmp_path / 'nope'}"])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_unexpected_errors_are_one_line_unless_verbose(monkeypatch, tmp_path):
    from aimfair_ray import pipeline

    def boom(*_a, **_k):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "run_prepare", boom)
    args = ["data", "prepare", "--set", f"output_dir={tmp_path}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "RuntimeError: boom" in res.output and "--verbose" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["--verbose", *args])
    assert isinstance(res.exception, RuntimeError)  # raised with its traceback
    res = CliRunner().invoke(app, ["--verbose", "data", "prepare", "--set", "train.epochs=0"])
    assert res.exit_code == 2 and "train.epochs" in res.output  # a user error: still exit 2, with the traceback


def test_serve_treats_an_empty_ray_address_as_unset():
    from aimfair_ray.serving.config import serve_env

    assert "RAY_ADDRESS" not in serve_env({"RAY_ADDRESS": "", "AIMFAIR_SERVE_TOKEN": "t"})
    assert "RAY_ADDRESS" not in serve_env({"RAY_ADDRESS": "  "})
    env = serve_env({"RAY_ADDRESS": "10.0.0.1:6379", "AIMFAIR_SERVE_TOKEN": "t"})
    assert env["RAY_ADDRESS"] == "10.0.0.1:6379" and env["AIMFAIR_SERVE_TOKEN"] == "t"  # the token by env, not argv
