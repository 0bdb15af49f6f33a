from pathlib import Path

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


def _cmdlines() -> dict[int, list[str]]:
    """Every process's whole argument list, by pid, from /proc (a process gone meanwhile is skipped)."""
    import os

    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[int(pid)] = f.read().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
    return out


def test_aimfair_serve_runs_the_config_on_loopback_until_sigterm(ray_cluster, ray_head, s3, tmp_path):
    """`aimfair serve` with the shipped config's layout, one model on S3 (`--model mine=s3://...`: the replica
    reads it from the store into its node's cache) and no generators; a SIGTERM stops it. Its token (from
    --token-file) is in no written file, log, console line or process argument list."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import requests
    import torch
    import yaml

    from aimfair_ray.models import build_model, save_classifier

    torch.manual_seed(0)
    meta = {"backbone": "small_cnn", "width": 8, "num_classes": 2, "image_size": 32, "mean": [0.5] * 3,
            "std": [0.5] * 3, "target_names": ["a", "b"], "group_names": ["g0", "g1"]}
    model = f"{s3}/serve-{tmp_path.name}/m/model"
    save_classifier(build_model("small_cnn", 2, 32, width=8), meta, model)
    cfg = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "serve", "config.yaml")))
    cfg["applications"][0]["args"].update(image_pipeline=None, text_model=None)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = os.urandom(16).hex()
    (tmp_path / "token").write_text(token)
    args = [os.path.join(os.path.dirname(sys.executable), "aimfair"), "serve", "--config", str(tmp_path / "serve.yaml"),
            "--model", f"mine={model}", "--port", str(port), "--token-file", str(tmp_path / "token"),
            "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(args, env=dict(os.environ, RAY_ADDRESS=ray_cluster), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the app still deploying
                pass
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"aimfair serve did not come up: {proc.stdout.read()[-4000:]}")
            time.sleep(1)
        ok = requests.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert ok.status_code == 200 and [m["id"] for m in ok.json()["models"]] == ["mine"]
        import base64

        import numpy as np

        from aimfair_ray.data.codecs import encode_png

        image = base64.b64encode(encode_png(np.full((32, 32, 3), 128, np.uint8))).decode()
        got = requests.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": "mine", "images": [image]},
                            headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert got.status_code == 200 and got.json()["predictions"][0]["label"] in ("a", "b"), got.text
        assert requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401
        written = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
        app0 = written["applications"][0]
        assert written["http_options"] == {"host": "127.0.0.1", "port": port} and list(app0["args"]["models"]) == ["mine"]
        # the config's options for other models and for the disabled generators are dropped
        assert {d["name"] for d in app0["deployments"]} == {"Api"}
        assert app0["args"]["token_file"] == str(tmp_path / "token")
        # whole argument lists from /proc (ps cuts them at the terminal width): the server's own is exactly
        # the arguments given, to the last one, and no process's holds the token
        cmdlines = _cmdlines()
        argv = cmdlines[proc.pid]  # the interpreter, then the entry script (its shebang) and our arguments
        assert args[0] in argv and argv[argv.index(args[0]):] == args, argv
        assert not [pid for pid, other in cmdlines.items() if any(token in a for a in other)]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        from ray import serve

        serve.shutdown()  # `serve run` killed on a timeout leaves its app (route /) on the session cluster
    assert token not in out and "token_file" in (tmp_path / "out" / "config.yaml").read_text()
    for f in list((tmp_path / "out").rglob("*")) + list(Path(ray_head["temp_dir"]).rglob("*")):
        if f.is_file() and not f.is_symlink() and f.stat().st_size < 50 * 2**20:
            assert token.encode() not in f.read_bytes(), f  # Serve's controller and replica logs included
    res = CliRunner().invoke(app, ["serve", "--token", token])
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
