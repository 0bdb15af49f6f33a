import json
from pathlib import Path

import pytest

from aimfair_ray import AimfairError
from aimfair_ray.config import AuditConfig, load_config
from aimfair_ray.evaluate import audit
from aimfair_ray.train.baseline import train_baseline

AUDIT_KEYS = {"acc", "wst", "std", "eo", "eod_worst", "dp", "group_acc", "n"}


def test_two_workers_train_and_audit(trained, tmp_path):
    cfg, meta, result = trained
    hist = result["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and all(h["world_size"] == 2 for h in hist)
    model_dir = Path(result["model_dir"])
    assert sorted(p.name for p in model_dir.iterdir()) == ["README.md", "_COMPLETE", "model.json", "model.safetensors"]
    # every checkpoint Ray kept is safetensors + JSON, never a pickle
    ckpts = [c for c in Path(result["run_path"]).glob("checkpoint_*") if c.is_dir()]
    assert ckpts and all({p.suffix for p in c.iterdir()} <= {".safetensors", ".json"} for c in ckpts)
    assert (Path(cfg.stage_dir("baseline")) / "config.yaml").is_file()
    rep = audit(str(model_dir), f"{cfg.data_dir}/test", str(tmp_path / "audit"), AuditConfig(local_max_rows=0))
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    # the actor pool (above) and the calling process (a small split) predict the same
    local = audit(str(model_dir), f"{cfg.data_dir}/test", str(tmp_path / "local"))
    assert {k: local[k] for k in ("acc", "wst", "eo", "group_acc", "confusion")} == \
        {k: rep[k] for k in ("acc", "wst", "eo", "group_acc", "confusion")}
    assert AUDIT_KEYS <= set(saved) and saved["n"] == 200 == rep["n"]
    lo, hi = saved["intervals"]["acc"]  # 95% bootstrap intervals, seeded: the pool's audit and the local one agree
    assert saved["n_bootstrap"] == 1000 and lo <= saved["acc"] <= hi and local["intervals"] == rep["intervals"]
    assert set(saved["intervals"]) == {"acc", "wst", "std", "eo", "dp"}
    assert set(saved["group_acc"]) == {"y0_s0", "y0_s1", "y1_s0", "y1_s1"}
    # the folder's Hugging Face card, written again by the audit: WST with its interval in model-index
    from huggingface_hub import ModelCard

    card = ModelCard.load(model_dir / "README.md")
    wst = next(r for r in card.data.eval_results if r.metric_type == "worst_group_accuracy")
    lo, hi = saved["intervals"]["wst"]
    assert wst.metric_value == round(saved["wst"], 4) and f"95% interval [{lo:.3f}, {hi:.3f}]" in wst.metric_name
    assert card.data.fairness_audit["wst"]["ci"] == [round(lo, 4), round(hi, 4)] and "Audit on the test split" in card.text
    assert (tmp_path / "audit" / "group_acc.png").read_bytes()[:4] == b"\x89PNG"
    # the same weights on the same split: the audit is reused, not predicted again
    mtime = (tmp_path / "audit" / "group_acc.png").stat().st_mtime_ns
    assert audit(str(model_dir), f"{cfg.data_dir}/test", str(tmp_path / "audit"), AuditConfig(local_max_rows=0)) == saved
    assert (tmp_path / "audit" / "group_acc.png").stat().st_mtime_ns == mtime
    # rerun with the same config reuses the trained model instead of training again
    msgs = []
    again = train_baseline(cfg, log=msgs.append)
    assert again["model_dir"] == result["model_dir"] and any("reusing" in m for m in msgs)


def test_train_without_data_says_what_to_run(ray_cluster, tmp_path):
    cfg = load_config("cmnist", overrides=[f"output_dir={tmp_path}"])
    with pytest.raises(AimfairError, match="aimfair data prepare"):
        train_baseline(cfg, log=lambda *_: None)


def test_wandb_offline_logs_metrics_and_chart(trained, tmp_path, monkeypatch):
    from aimfair_ray.tracking import log_run

    cfg, _, result = trained
    monkeypatch.setenv("WANDB_MODE", "offline")
    rep = audit(result["model_dir"], f"{cfg.data_dir}/test", str(tmp_path / "a"))
    run_dir = log_run(cfg, "baseline", result["history"], rep, {"audit/group_acc_chart": str(tmp_path / "a" / "group_acc.png")},
                      out_dir=str(tmp_path / "wb"))
    assert Path(run_dir).exists() and list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    media = {part for p in Path(run_dir).rglob("*") if p.is_file() and "media" in p.parts for part in p.parts}
    assert {"images", "table"} <= media  # the audit chart, and the audit's cells with their intervals as a table
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(AimfairError, match="WANDB_API_KEY"):
        log_run(cfg, "baseline", [], out_dir=str(tmp_path / "wb2"))


def test_every_training_command_takes_wandb():
    import typer

    from aimfair_ray.cli import app

    root = typer.main.get_command(app)
    for path in ("train baseline", "train groupdro", "train jtt", "finetune", "egt", "benchmark aimfair", "benchmark egt",
                 "sweep", "demo"):
        cmd = root
        for part in path.split():
            cmd = cmd.commands[part]
        assert "--wandb" in [o for p in cmd.params for o in getattr(p, "opts", [])], path
